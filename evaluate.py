"""Decode a split greedily with a trained model and score it.

    python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt [lang=... data.root=... split=test]

Writes metrics.json (wer, cer, and mer for Mandarin; per language tag under by_language when the corpus
tags utterances, as ASCEND does) and predictions.jsonl (id, language, reference, hypothesis per
utterance) into the run directory. Streams: one batch of logits in memory at a time.
"""

import json
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from asr import SetupError, quote_numeric_choices, text
from asr.metrics import ErrorRates
from asr.model import CTCModel


def evaluate(cfg: DictConfig) -> dict:
    if not Path(cfg.ckpt_path).is_file():
        raise SetupError(f"ckpt_path={cfg.ckpt_path} does not exist (train.py writes <run>/checkpoints/*.ckpt)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    model = CTCModel.from_checkpoint(cfg.ckpt_path).to(device).eval()

    data = instantiate(cfg.data, _convert_="all")
    if problem := data.check():
        raise SetupError(problem)
    data.vocab = model.vocab  # labels and [UNK] counts in the model's own vocabulary
    loader = data.dataloader(cfg.split)
    errors = ErrorRates()
    seconds, skipped = 0.0, 0
    with open(run_dir / "predictions.jsonl", "w", encoding="utf-8") as out, torch.inference_mode():
        for batch in tqdm(loader, desc=f"decoding {cfg.split}", unit="batch"):
            if batch is None:
                continue
            mask = batch["attention_mask"].to(device)
            logits = model.model(batch["audio"].to(device), attention_mask=mask).logits
            hypotheses = model.transcribe(logits, model.frames(batch["lengths"]))
            errors.update(batch["texts"], hypotheses, batch["languages"])
            for utt_id, tag, reference, hypothesis in zip(batch["ids"], batch["languages"], batch["texts"],
                                                          hypotheses):
                out.write(json.dumps({"id": utt_id, "language": tag, "reference": reference,
                                      "hypothesis": hypothesis}, ensure_ascii=False) + "\n")
            seconds += batch["audio_seconds"]
            skipped += batch["skipped"]
    rates = errors.rates()
    if not text.is_chinese(model.hparams.language):
        rates.pop("mer")
    by_language = errors.by_tag()
    metrics = {**rates, "n_utterances": sum(errors.utterances.values()), "audio_seconds": seconds,
               "skipped_clips": skipped, "split": cfg.split, "ckpt_path": str(cfg.ckpt_path),
               **({"by_language": by_language} if len(by_language) > 1 else {}),
               "data_report": data.report[cfg.split]}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False))
    return metrics


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        metrics = evaluate(cfg)
    except SetupError as error:
        sys.exit(f"error: {error}")
    mer = f"  MER {metrics['mer']:.4f}" if "mer" in metrics else ""
    print(f"{cfg.split}: WER {metrics['wer']:.4f}  CER {metrics['cer']:.4f}{mer}  "
          f"({metrics['n_utterances']} utterances) -> {cfg.run_dir}")


if __name__ == "__main__":
    sys.argv = quote_numeric_choices(sys.argv)
    main()
