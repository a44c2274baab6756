"""Decode a split with a trained model and score it: greedily, by beam search, or by beam search with
an n-gram language model (pyctcdecode + KenLM).

    python evaluate.py ckpt_path=<run>                       # the run's best checkpoint, on its own test split
    python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt split=dev [lang=... data.root=...]
    python evaluate.py ckpt_path=... decoder=beam_lm [lm_path=<arpa>] alpha=0.5 beta=1.0
    python evaluate.py -m ckpt_path=... split=dev decoder=beam_lm alpha=0.3,0.5,0.8 beta=0,1,2   # a sweep

By default it scores the data the run was trained on: corpus, root, language (text rules) and split names
from the run's config.yaml beside checkpoints/. lang=... or data.* on the command line scores other data,
and says so. Split: train, dev, test, or the release's own name (ASCEND's validation).

A run of several corpora (data.corpora) scores each corpus's split on its own (metrics.json's by_corpus, a line
each), or one of them with corpus=<name>. wer and cer are then over every utterance together; hour_weighted
gives their mean over the corpora weighted by each one's hours of the split, as val/cer weighs the dev splits.

Writes metrics.json (wer, cer, and mer for Mandarin; with a beam decoder also the greedy figures; per language tag under
by_language when the corpus tags utterances, as ASCEND does) and predictions.jsonl (id, language, reference, hypothesis
per utterance) into the run directory. Streams: one batch of logits in memory at a time. With logger=wandb, also a W&B
eval run in the training run's group (asr.run.tracking.log_evaluation).
"""

import heapq
import json
import logging
import sys

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from asr import SetupError
from asr.core import text
from asr.core.config import register_resolvers
from asr.model.metrics import UNITS, CorpusErrors, ErrorRates, corpus_rates, utterance_cer
from asr.run import tracking
from asr.run.evaluation import assemble_evaluation
from asr.tools import cli

register_resolvers()  # before Hydra composes
log = logging.getLogger("evaluate")
def evaluate(cfg: DictConfig) -> dict:
    scoring = assemble_evaluation(cfg)  # the checkpoint, the run's data, the model, the decoder
    cfg, data, model, decoder, role, split = (scoring.cfg, scoring.data, scoring.model, scoring.decoder, scoring.role,
                                              scoring.split)
    trained, run_dir = scoring.trained, scoring.dir
    scored = {"corpus": cfg.data.corpus, "root": cfg.data.root, "split": split, "checkpoint": scoring.checkpoint}
    # each corpus's split scored on its own, under its own text rules (`CorpusErrors`); with several corpora each
    # prediction names its corpus and that corpus's root, and metrics.json every corpus scored (`corpora`)
    corpora = {name: {"corpus": part.corpus, "root": part.root, "language": part.language}
               for name, part in data.shown.items()}
    if corpora:
        scored = {"split": split, "checkpoint": scoring.checkpoint}
    loader = data.dataloader(role)
    errors, greedy_errors = ErrorRates(), ErrorRates()
    # the corpora of data.corpora, each on its own (a single data.root's figures are the whole's: not counted twice)
    by_corpus = CorpusErrors(data.scoring(), tuple(UNITS)) if corpora else None
    seconds, skipped = 0.0, 0
    worst = []  # with a W&B logger: (CER, line) of the worst_utterances highest, as a min-heap
    with open(run_dir / "predictions.jsonl", "w", encoding="utf-8") as out, torch.inference_mode():
        for batch in tqdm(loader, desc=f"decoding {split}", unit="batch"):
            data.count_dropped(role, batch["dropped"])
            if not batch["ids"]:
                continue
            decoded = model.decode(batch, decoder, cfg.beam_width)  # as validation decodes
            greedy, hypotheses = decoded.greedy, decoded.hypotheses
            errors.update(batch["texts"], hypotheses, batch["languages"])
            greedy_errors.update(batch["texts"], greedy, batch["languages"])
            if by_corpus is not None:
                by_corpus.update(batch, hypotheses)
            for i, (utt_id, tag, reference, hypothesis, best_path) in enumerate(zip(
                    batch["ids"], batch["languages"], batch["texts"], hypotheses, greedy)):
                line = {"id": utt_id, "language": tag, "reference": reference, "hypothesis": hypothesis, **scored,
                        **({"corpus": batch["corpora"][i], "root": corpora[batch["corpora"][i]]["root"]}
                           if corpora else {})}
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
        decoding.update(alpha=cfg.alpha, beta=cfg.beta, lm_path=str(scoring.lm_path))
    metrics = {**rates, **decoding, "n_utterances": sum(errors.utterances.values()), "audio_seconds": seconds,
               "skipped_clips": skipped, **scored,
               **({"corpora": corpora} if corpora else {"language": cfg.data.language}),
               "train_run": str(trained["run"]) if trained["run"] else None,
               **({"other_data": {k: {"trained": old, "scored": new} for k, (old, new) in trained["other"].items()}}
                  if trained["other"] else {}),
               **({"by_language": by_language} if len(by_language) > 1 else {}),
               **({"by_corpus": {name: {k: v for k, v in e.rates().items()
                                        if k != "mer" or text.is_chinese(corpora[name]["language"])} | {
                                            "n_utterances": sum(e.utterances.values())}
                                 for name, e in by_corpus.errors.items() if e.utterances}} if corpora else {}),
               "data_report": data.report[role]}
    if len(metrics.get("by_corpus", {})) > 1:  # as val/cer weighs the corpora's dev, by this split's hours
        weighted = corpus_rates({name: part.report[role] for name, part in data.parts.items()},
                                by_corpus.counts().tolist(), seconds="seconds")
        metrics["hour_weighted"] = {"wer": weighted["wer"], "cer": weighted["cer"]}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False))
    if cfg.logger:
        paths = {u.id: u.path for u in data.load(role)}
        tracking.log_evaluation(cfg, metrics, [{**row, "path": paths[row["id"]]}
                                               for _, _, row in sorted(worst, key=lambda e: -e[0])],
                                trained["run"], trained["group"])
    return metrics


def where(metrics: dict) -> str:
    """What was scored, for the summary line: a corpus and its root, or several."""
    if "corpora" in metrics:
        return ", ".join(f"{name} ({c['corpus']} at {c['root']})" for name, c in metrics["corpora"].items())
    return f"{metrics['corpus']} at {metrics['root']}"


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
    other = " (not the data the run was trained on)" if "other_data" in metrics else ""
    print(f"{metrics['split']} {cfg.decoder}: WER {metrics['wer']:.4f}  CER {metrics['cer']:.4f}{mer}{greedy}  "
          f"({metrics['n_utterances']} utterances of {where(metrics)}{other}; "
          f"{metrics['checkpoint']}) -> {cfg.run_dir}")
    for name, rates in metrics.get("by_corpus", {}).items():  # several corpora: each on its own
        print(f"  {name}: WER {rates['wer']:.4f}  CER {rates['cer']:.4f}  ({rates['n_utterances']} utterances)")
    if "hour_weighted" in metrics:
        mean = metrics["hour_weighted"]
        print(f"  weighted by each corpus's {metrics['split']} hours (as val/cer weighs dev): WER {mean['wer']:.4f}  "
              f"CER {mean['cer']:.4f}")


if __name__ == "__main__":
    cli.start("evaluate", main)
