"""Decode a split greedily with a trained model and score it.

    python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt [lang=... data.root=... split=test]

Writes metrics.json (wer, cer, n_utterances, audio_seconds) and predictions.jsonl (id, reference,
hypothesis per utterance) into the run directory. Streams: one batch of logits in memory at a time.
"""

import json
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchmetrics.text import CharErrorRate, WordErrorRate
from tqdm import tqdm

from asr import SetupError, quote_numeric_choices
from asr.model import CTCModel


def evaluate(cfg: DictConfig) -> dict:
    if not Path(cfg.ckpt_path).is_file():
        raise SetupError(f"ckpt_path={cfg.ckpt_path} does not exist (train.py writes <run>/checkpoints/*.ckpt)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    model = CTCModel.from_checkpoint(cfg.ckpt_path).to(device).eval()

    data = instantiate(cfg.data)
    if problem := data.check():
        raise SetupError(problem)
    data.vocab = model.vocab  # labels and [UNK] counts in the model's own vocabulary
    loader = data.dataloader(cfg.split)
    wer, cer = WordErrorRate(), CharErrorRate()
    n, seconds = 0, 0.0
    with open(run_dir / "predictions.jsonl", "w", encoding="utf-8") as out, torch.inference_mode():
        for batch in tqdm(loader, desc=f"decoding {cfg.split}", unit="batch"):
            mask = batch["attention_mask"].to(device)
            logits = model.model(batch["audio"].to(device), attention_mask=mask).logits
            hypotheses = model.vocab.greedy_decode(logits, model.frames(mask))
            wer.update(hypotheses, batch["texts"])
            cer.update(hypotheses, batch["texts"])
            for utt_id, reference, hypothesis in zip(batch["ids"], batch["texts"], hypotheses):
                out.write(json.dumps({"id": utt_id, "reference": reference, "hypothesis": hypothesis},
                                     ensure_ascii=False) + "\n")
            n += len(hypotheses)
            seconds += batch["audio_seconds"]
    metrics = {"wer": wer.compute().item(), "cer": cer.compute().item(), "n_utterances": n,
               "audio_seconds": seconds, "split": cfg.split, "ckpt_path": str(cfg.ckpt_path),
               "data_report": data.report[cfg.split]}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False))
    return metrics


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        metrics = evaluate(cfg)
    except SetupError as error:
        sys.exit(f"error: {error}")
    print(f"{cfg.split}: WER {metrics['wer']:.4f}  CER {metrics['cer']:.4f}  "
          f"({metrics['n_utterances']} utterances) -> {cfg.run_dir}")


if __name__ == "__main__":
    sys.argv = quote_numeric_choices(sys.argv)
    main()
