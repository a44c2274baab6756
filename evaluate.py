"""Decode a split with a trained model and score it: greedily, by beam search, or by beam search with
an n-gram language model (pyctcdecode + KenLM).

    python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt [lang=... data.root=... split=test]
    python evaluate.py ckpt_path=... decoder=beam_lm [lm_path=<arpa>] alpha=0.5 beta=1.0
    python evaluate.py -m ckpt_path=... split=dev decoder=beam_lm alpha=0.3,0.5,0.8 beta=0,1,2   # a sweep

Writes metrics.json (wer, cer, and mer for Mandarin; with a beam decoder also the greedy figures; per language tag under by_language when the corpus
tags utterances, as ASCEND does) and predictions.jsonl (id, language, reference, hypothesis per
utterance) into the run directory. Streams: one batch of logits in memory at a time. With logger=wandb,
also a W&B eval run in the training run's group (asr.tracking.log_evaluation).
"""

import heapq
import json
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

import asr
from asr import SetupError, lm, quote_numeric_choices, text, tracking
from asr.config import check_overrides, checked, register_resolvers
from asr.metrics import ErrorRates, utterance_cer
from asr.model import CTCModel

register_resolvers()  # before Hydra composes


def evaluate(cfg: DictConfig) -> dict:
    cfg = checked(cfg, "evaluate")
    if cfg.logger and not str(cfg.logger._target_).endswith("WandbLogger"):
        raise SetupError("evaluate.py logs to W&B only (logger=wandb); metrics.json holds its figures")
    if not Path(cfg.ckpt_path).is_file():
        raise SetupError(f"ckpt_path={cfg.ckpt_path} does not exist (train.py writes <run>/checkpoints/*.ckpt)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = asr.device(cfg.device)
    model = CTCModel.from_checkpoint(cfg.ckpt_path).to(device).eval()

    data = instantiate(cfg.data, _convert_="all")
    if problem := data.check():
        raise SetupError(problem)
    data.vocab = model.vocab  # labels and [UNK] counts in the model's own vocabulary
    loader = data.dataloader(cfg.split)
    decoder, lm_path = build_decoder(cfg, model, data, run_dir)
    errors, greedy_errors = ErrorRates(), ErrorRates()
    seconds, skipped = 0.0, 0
    worst = []  # with a W&B logger: (CER, line) of the worst_utterances highest, as a min-heap
    with open(run_dir / "predictions.jsonl", "w", encoding="utf-8") as out, torch.inference_mode():
        for batch in tqdm(loader, desc=f"decoding {cfg.split}", unit="batch"):
            data.count_dropped(cfg.split, batch["dropped"])
            if not batch["ids"]:
                continue
            mask = batch["attention_mask"].to(device)
            logits = model.model(batch["audio"].to(device), attention_mask=mask).logits
            frames = model.frames(batch["lengths"])
            greedy = model.transcribe(logits, frames)
            hypotheses = greedy
            if decoder is not None:  # one utterance's log-probabilities at a time, on the host
                log_probs = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
                # decode_beams, as Wav2Vec2ProcessorWithLM and the pipeline call it (decode() prunes history)
                hypotheses = [text.normalize(decoder.decode_beams(lp[:n], beam_width=cfg.beam_width)[0][0],
                                             model.hparams.language) for lp, n in zip(log_probs, frames.tolist())]
            errors.update(batch["texts"], hypotheses, batch["languages"])
            greedy_errors.update(batch["texts"], greedy, batch["languages"])
            for utt_id, tag, reference, hypothesis, best_path in zip(batch["ids"], batch["languages"], batch["texts"],
                                                                     hypotheses, greedy):
                line = {"id": utt_id, "language": tag, "reference": reference, "hypothesis": hypothesis}
                if decoder is not None:
                    line["greedy_hypothesis"] = best_path
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                if cfg.logger:
                    cer = utterance_cer(reference, hypothesis)
                    entry = (cer, len(worst), {**line, "cer": cer})
                    (heapq.heappush if len(worst) < cfg.worst_utterances else heapq.heappushpop)(worst, entry)
            seconds += batch["audio_seconds"]
            skipped += batch["skipped"]
    rates, greedy_rates = errors.rates(), greedy_errors.rates()
    if not text.is_chinese(model.hparams.language):
        rates.pop("mer")
        greedy_rates.pop("mer")
    by_language = errors.by_tag()
    decoding = {"decoder": cfg.decoder}
    if decoder is not None:
        decoding.update(beam_width=cfg.beam_width, greedy=greedy_rates)
    if cfg.decoder == "beam_lm":
        decoding.update(alpha=cfg.alpha, beta=cfg.beta, lm_path=str(lm_path))
    metrics = {**rates, **decoding, "n_utterances": sum(errors.utterances.values()), "audio_seconds": seconds,
               "skipped_clips": skipped, "split": cfg.split, "ckpt_path": str(cfg.ckpt_path),
               **({"by_language": by_language} if len(by_language) > 1 else {}),
               "data_report": data.report[cfg.split]}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False))
    if cfg.logger:
        paths = {u.id: u.path for u in data.load(cfg.split)}
        tracking.log_evaluation(cfg, metrics, [{**row, "path": paths[row["id"]]}
                                               for _, _, row in sorted(worst, key=lambda e: -e[0])])
    return metrics


def build_decoder(cfg: DictConfig, model: CTCModel, data, run_dir: Path):
    """(pyctcdecode decoder or None for greedy, the LM file). Without lm_path, beam_lm builds a
    `lm_order`-gram model from the training transcripts into the run directory."""
    if cfg.decoder == "greedy":
        return None, None
    if cfg.decoder not in ("beam", "beam_lm"):
        raise SetupError(f"decoder={cfg.decoder} is unknown; expected greedy, beam or beam_lm")
    lm_path = None
    if cfg.decoder == "beam_lm":
        lm_path = cfg.lm_path
        if lm_path is None:
            lm_path = lm.build([u.text for u in data.raw("train")], run_dir / "lm", cfg.lm_order,
                               data.hparams.language)
        elif not Path(lm_path).is_file():
            raise SetupError(f"lm_path={lm_path} does not exist (python -m asr.lm text=<file> out=<dir> builds one)")
    return lm.beam_decoder(model.vocab.tokens, lm_path, cfg.alpha, cfg.beta), lm_path


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        metrics = evaluate(cfg)
    except SetupError as error:
        tracking.finish(exit_code=1)
        sys.exit(f"error: {error}")
    except BaseException:
        tracking.finish(exit_code=1)
        raise
    mer = f"  MER {metrics['mer']:.4f}" if "mer" in metrics else ""
    greedy = (f"  (greedy: WER {metrics['greedy']['wer']:.4f}  CER {metrics['greedy']['cer']:.4f})"
              if "greedy" in metrics else "")
    print(f"{cfg.split} {cfg.decoder}: WER {metrics['wer']:.4f}  CER {metrics['cer']:.4f}{mer}{greedy}  "
          f"({metrics['n_utterances']} utterances) -> {cfg.run_dir}")


if __name__ == "__main__":
    sys.argv = quote_numeric_choices(sys.argv)
    try:
        check_overrides(sys.argv[1:], "evaluate")  # a mistyped key, named with the valid ones
    except SetupError as error:
        sys.exit(f"error: {error}")
    main()
