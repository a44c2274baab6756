"""What a run reports: the model-card results table (results.md) and results.json.

The table has the columns of the HF Trainer's cards in shared/seeds/: Training Loss (mean since the
previous evaluation) | Epoch | Step (optimizer updates) | Validation Loss | Wer | Cer.
"""

import json
import time
from pathlib import Path

import lightning as L
import torch

HEADER = ("| Training Loss | Epoch | Step | Validation Loss | Wer    | Cer    |\n"
          "|:-------------:|:-----:|:----:|:---------------:|:------:|:------:|\n")


def table_row(row: dict) -> str:
    return (f"| {row['train_loss']:<13.4f} | {row['epoch']:<5.2f} | {row['step']:<4d} | "
            f"{row['val_loss']:<15.4f} | {row['val_wer']:<6.4f} | {row['val_cer']:<6.4f} |\n")


class RunReport(L.Callback):
    """Counts training audio, padding and time; writes results.md after each evaluation and
    results.json at the end of fit into `run_dir`."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.rows: list[dict] = []
        self.audio_seconds = self.padded_seconds = 0.0
        self.skipped_clips = 0  # training clips that failed to decode and were left out of their batch
        self.loss_sum, self.loss_count = torch.zeros(()), 0
        self.started = self.train_seconds = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()
        self.loss_sum = torch.zeros((), device=pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch is None:  # every clip of the batch failed to decode; counted by the model
            return
        self.skipped_clips += batch["skipped"]
        self.audio_seconds += batch["audio_seconds"]
        self.padded_seconds += batch["padded_seconds"]
        # host floats: logging them never waits on the GPU. Throughput is this rank's, since fit began.
        pl_module.log_dict({
            "train/padding_fraction": 1 - batch["audio_seconds"] / batch["padded_seconds"],
            "train/audio_seconds_per_second": self.audio_seconds / (time.perf_counter() - self.started),
        }, batch_size=len(batch["ids"]))
        if outputs is None:
            return
        self.loss_sum += outputs["loss"].detach().float()  # stays on the device: no sync per step
        self.loss_count += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val/cer" not in trainer.callback_metrics:
            return
        metrics = trainer.callback_metrics
        steps_per_epoch = max(1, trainer.num_training_batches // trainer.accumulate_grad_batches)
        self.rows.append({
            "train_loss": (self.loss_sum / max(1, self.loss_count)).item(),
            "epoch": trainer.global_step / steps_per_epoch,
            "step": trainer.global_step,
            "val_loss": metrics["val/loss"].item(),
            "val_wer": metrics["val/wer"].item(),
            "val_cer": metrics["val/cer"].item(),
            **({"val_mer": metrics["val/mer"].item()} if "val/mer" in metrics else {}),
        })
        self.loss_sum.zero_()
        self.loss_count = 0
        if trainer.is_global_zero:
            (self.run_dir / "results.md").write_text(HEADER + "".join(map(table_row, self.rows)))

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_seconds = time.perf_counter() - self.started
        totals = trainer.strategy.reduce(
            torch.tensor([self.audio_seconds, self.padded_seconds, self.skipped_clips], device=pl_module.device,
                         dtype=torch.float64), reduce_op="sum")
        self.audio_seconds, self.padded_seconds, self.skipped_clips = totals.tolist()

    def results(self, **extra) -> dict:
        """The best evaluation by dev CER (the exported model) and the run's totals."""
        best = min(self.rows, key=lambda r: r["val_cer"]) if self.rows else {}
        return {
            **{k: best[k] for k in ("val_loss", "val_wer", "val_cer", "step", "epoch") if k in best},
            "train_audio_seconds": self.audio_seconds,
            "train_seconds": self.train_seconds,
            # padded audio / all audio the encoder saw in training batches
            "padding_fraction": 1 - self.audio_seconds / self.padded_seconds if self.padded_seconds else 0.0,
            "skipped_clips": int(self.skipped_clips),
            "evaluations": self.rows,
            **extra,
        }

    def write_results(self, **extra) -> dict:
        results = self.results(**extra)
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=1))
        return results
