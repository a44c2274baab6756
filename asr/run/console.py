"""What a run prints: each line true and the user's to act on. Library lines that do not apply here are
filtered, each where it does not apply and only there; the model summary leaves out Lightning's FLOPs
figure (counted only through a model's `example_input_array`, which ours has none of: it printed 0)."""

import logging
import os
import sys
import time
import warnings
from datetime import timedelta

import torch
from lightning.pytorch.callbacks import RichModelSummary, TQDMProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from transformers.utils import logging as hf_logging

from asr import SetupError


class _Dropping(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_LITLOGGER_TIP = _Dropping("💡 Tip: For seamless cloud")  # Lightning's advertisement for its cloud loggers


def quiet_libraries(resuming: bool = False) -> None:
    """Filters, for this process, the library lines that do not apply here:
    - Lightning's "`srun` is available but is not used" outside a SLURM allocation (no SLURM_JOB_ID): it
      fires wherever slurm-client is installed; inside an allocation it may mean a forgotten srun, so it stays;
    - Lightning's tips for litlogger and litmodels (advertisements, not about this run);
    - torch's deprecation of `LeafSpec` as Lightning's `_pytree` calls it (Lightning's to change, not the user's);
    - transformers' progress bars (writing the exported model's one shard);
    - `resuming` a run in its own directory: that its checkpoint directory is not empty (it is the run's), and
      that the CSV logger will delete earlier logs (`tracking.logger_resume` kept them as metrics.<n>.csv).
    """
    if resuming:
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    if not os.environ.get("SLURM_JOB_ID"):
        warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar of a one-file export
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _LITLOGGER_TIP not in rank_zero.filters:
        rank_zero.addFilter(_LITLOGGER_TIP)


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary (layers, parameters, modes) without the FLOPs column and total."""

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict, total_flops: int, **summarize_kwargs) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:  # the first is the layer index, named " "
            table.add_column(name, style="dim" if name == " " else None,
                             justify=("right" if name in ("Params", "Params per Device", "In sizes", "Out sizes")
                                      else "left"))
        for row in zip(*(values for _, values in columns)):
            table.add_row(*map(str, row))
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in (("Trainable params", get_human_readable_count(int(trainable_parameters))),
                             ("Non-trainable params",
                              get_human_readable_count(int(total_parameters - trainable_parameters))),
                             ("Total params", get_human_readable_count(int(total_parameters))),
                             ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
                             ("Modules in train mode", total_training_modes["train"]),
                             ("Modules in eval mode", total_training_modes["eval"])):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)


class Progress(TQDMProgressBar):
    """Training progress on the console, on rank 0.

    In a terminal: Lightning's progress bars, with the training loss (the mean of the updates since the
    last `trainer.log_every_n_steps`-th, read from the device once per that many updates).

    Elsewhere (stdout a file: SLURM, nohup, a pipe), where a bar's carriage returns make one long line and its
    rate reads 0.00it/s: no bar, but one plain line every `trainer.log_every_n_steps` updates, at most one per
    `every_seconds`, as the HF Trainer logs, and one per evaluation:

        update 150/1500 (10%)  epoch 1.25  loss 2.8712  lr 2.94e-03  audio-s/s 201  elapsed 0:00:45  remaining 0:06:45
        evaluation at update 150: dev loss 2.6140  WER 0.9830  CER 0.6120

    lr: the encoder's learning rate in the last update (the CSV's lr-AdamW/pg1 at that step). audio-s/s: real
    audio (padding excluded) per second of training since the previous line, evaluations
    excluded; elapsed: since this process started training; remaining: the updates left at this start's pace.
    plain: auto (a line when stdout is not a terminal), true or false."""

    def __init__(self, plain: bool | str, every_seconds: float):
        super().__init__()
        if plain not in ("auto", True, False):
            raise SetupError(f"callbacks.progress.plain={plain!r}: give auto, true or false.")
        self.plain = not sys.stdout.isatty() if plain == "auto" else plain
        self.every_seconds = every_seconds
        self.loss: float | None = None  # the last mean read
        self._sum = torch.zeros(2)  # (loss sum, updates) since the last read, on the device
        self._step = -1
        self._audio = 0.0
        self._started = self._line_at = self._excluded = 0.0
        self._start_step = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.plain:
            self.disable()  # no bars: the lines below instead

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {"loss": f"{self.loss:.4f}", **items} if self.loss is not None else items

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._sum = torch.zeros(2, device=pl_module.device)
        self._step = self._start_step = trainer.global_step
        self._started = self._line_at = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._lr = optimizer.param_groups[0]["lr"]  # the rate of this update (the schedule steps after it)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:  # the other ranks print nothing: nothing to count
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if outputs is not None and batch["ids"]:
            loss = outputs["loss"].detach().float() * trainer.accumulate_grad_batches  # Lightning divided it
            self._sum += torch.stack([torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0),
                                      torch.isfinite(loss).float()])
        self._audio += batch["audio_seconds"]
        step = trainer.global_step
        if step != self._step and step % trainer.log_every_n_steps == 0:
            now = time.perf_counter()
            if not self.plain or now - self._line_at >= self.every_seconds:
                total, count = self._sum.tolist()  # the one read of the device per line
                self._sum.zero_()
                self.loss = total / count if count else float("nan")
                if self.plain:
                    print(self._line(trainer, batch_idx, now), flush=True)
                    self._line_at, self._audio, self._excluded = now, 0.0, 0.0
        self._step = step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _line(self, trainer, batch_idx: int, now: float) -> str:
        step = trainer.global_step
        total = (trainer.max_steps if trainer.max_steps and trainer.max_steps > 0
                 else int(trainer.estimated_stepping_batches))
        epoch = trainer.current_epoch + (batch_idx + 1) / max(1, trainer.num_training_batches)
        elapsed = now - self._started
        done = step - self._start_step
        remaining = elapsed / done * max(0, total - step) if done else float("nan")
        rate = self._audio / max(now - self._line_at - self._excluded, 1e-9)
        lr = getattr(self, "_lr", trainer.optimizers[0].param_groups[0]["lr"])
        return (f"update {step}/{total} ({step / max(1, total):.0%})  epoch {epoch:.2f}  loss {self.loss:.4f}  "
                f"lr {lr:.2e}  audio-s/s {rate:.0f}  elapsed {_clock(elapsed)}  remaining {_clock(remaining)}")

    def on_validation_start(self, trainer, pl_module) -> None:
        super().on_validation_start(trainer, pl_module)
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking:
            return
        self._excluded += time.perf_counter() - self._validation_start
        metrics = trainer.callback_metrics
        if self.plain and trainer.is_global_zero and "val/cer" in metrics:
            print(f"evaluation at update {trainer.global_step}: dev loss {float(metrics['val/loss']):.4f}  "
                  f"WER {float(metrics['val/wer']):.4f}  CER {float(metrics['val/cer']):.4f}", flush=True)


def _clock(seconds: float) -> str:
    return "?" if seconds != seconds else str(timedelta(seconds=round(seconds)))
