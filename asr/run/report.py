"""What a run reports: the model-card results table (results.md) and results.json.

The table has the columns of the HF Trainer's model cards: Training Loss (mean since the
previous evaluation) | Epoch | Step (optimizer updates) | Validation Loss | Wer | Cer.
"""

import json
import time
from pathlib import Path

import lightning as L
import torch

from asr.run import rundir

HEADER = ("| Training Loss | Epoch | Step | Validation Loss | Wer    | Cer    |\n"
          "|:-------------:|:-----:|:----:|:---------------:|:------:|:------:|\n")


def table_row(row: dict) -> str:
    return (f"| {row['train_loss']:<13.4f} | {row['epoch']:<5.2f} | {row['step']:<4d} | "
            f"{row['val_loss']:<15.4f} | {row['val_wer']:<6.4f} | {row['val_cer']:<6.4f} |\n")


class RunReport(L.Callback):
    """Counts training audio, padding and time; writes results.md and results.json into `run_dir` after
    each evaluation (results.json's `state`: training; a killed run's stays so) and at the end (complete,
    requeued or stopped). During training its totals are rank 0's; at the end, all ranks' summed.

    Its state is in every checkpoint, so a resumed run (a requeued job, `ckpt_path=last`) keeps the
    evaluations and totals from before the restart. Totals are per rank and summed at the end: a
    checkpoint holds rank 0's, which only rank 0 restores (each rank's are not gathered at a save)."""

    def __init__(self, run_dir: str | Path, batch_per_update: dict, monitor: str = "val/cer"):
        self.run_dir = Path(run_dir)
        self.monitor = monitor  # what picks the best evaluation (callbacks.checkpoint.monitor): val/cer, val/<name>/cer
        self.batch_per_update = batch_per_update  # in results.json (asr.run.cluster.batch_per_update)
        self.rows: list[dict] = []
        self.audio_seconds = self.padded_seconds = 0.0
        # codec padding cut from clips that decode longer than stated (asr.data.loading.collate)
        self.truncated_seconds = 0.0
        self.skipped_clips = 0  # training clips that could not be read and were left out of their batch
        self.empty_batches = 0  # training batches of which no clip could be read: zero-loss steps
        self.dropped: dict[str, list] = {"train": [], "dev": []}  # (id, reason) of clips that could not be read
        self.skipped_updates = 0  # optimizer updates skipped for non-finite gradients
        self.loss_sum = self.loss_count = torch.zeros(())
        self.started = self.train_seconds = None
        self.cost: dict = {}  # what the model costs: parameters, optimizer state, peak memory (`on_train_end`)
        self.seconds_before = 0.0  # training time of the run before it was resumed
        self._restored: dict | None = None  # a checkpoint's state, applied when training starts
        # curves.png: training loss (mean over each log_every_n_steps updates) and learning rate per point
        self.curve: dict[str, list] = {"step": [], "loss": [], "lr": []}
        self._pending: list[tuple] = []  # (step, loss on the device, lr): read at the next evaluation
        self._interval = torch.zeros(2)
        self._last_step = -1

    def state_dict(self) -> dict:
        self._read_curve()
        return {"rows": self.rows, "curve": self.curve, "audio_seconds": self.audio_seconds,
                "padded_seconds": self.padded_seconds, "truncated_seconds": self.truncated_seconds,
                "skipped_clips": self.skipped_clips, "empty_batches": self.empty_batches, "dropped": self.dropped,
                "loss_sum": float(self.loss_sum), "loss_count": float(self.loss_count),
                "train_seconds": self.seconds_so_far()}

    def load_state_dict(self, state: dict) -> None:
        self.rows = state["rows"]
        self.curve = state.get("curve", self.curve)
        self.seconds_before = state["train_seconds"]
        self._restored = state

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()
        self.loss_sum = torch.zeros((), device=pl_module.device)
        self.loss_count = torch.zeros((), device=pl_module.device)
        self._interval = torch.zeros(2, device=pl_module.device)
        self._last_step = trainer.global_step
        restored = self._restored
        if restored and trainer.is_global_zero:  # rank 0's totals, summed with the others' at the end
            self.audio_seconds, self.padded_seconds = restored["audio_seconds"], restored["padded_seconds"]
            self.truncated_seconds = restored.get("truncated_seconds", 0.0)
            self.skipped_clips, self.empty_batches = restored["skipped_clips"], restored["empty_batches"]
            self.dropped = restored["dropped"]
            self.loss_sum += restored["loss_sum"]
            self.loss_count += restored["loss_count"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.dropped["train"] += batch["dropped"]
        self.skipped_clips += batch["skipped"]
        if not batch["ids"]:  # no clip of the batch could be read: a zero-loss step
            self.empty_batches += 1
            return
        self.audio_seconds += batch["audio_seconds"]
        self.padded_seconds += batch["padded_seconds"]
        self.truncated_seconds += batch.get("truncated_seconds", 0.0)
        if outputs is None:
            return
        # stays on the device: no sync per step. Lightning hands on the loss divided by the accumulation
        loss = outputs["loss"].detach().float() * trainer.accumulate_grad_batches
        finite = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)  # skipped updates
        self.loss_sum += finite
        self.loss_count += torch.isfinite(loss)
        self._interval += torch.stack([finite, torch.isfinite(loss).float()])
        if trainer.global_step != self._last_step:  # an update happened in this batch
            self._last_step = trainer.global_step
            if trainer.global_step % trainer.log_every_n_steps == 0:
                self._pending.append((trainer.global_step, (self._interval[0] / self._interval[1].clamp(min=1)).clone(),
                                      trainer.optimizers[0].param_groups[0]["lr"]))
                self._interval.zero_()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.dropped["dev"] += batch["dropped"]

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val/cer" not in trainer.callback_metrics:
            return
        metrics = trainer.callback_metrics
        steps_per_epoch = max(1, trainer.num_training_batches // trainer.accumulate_grad_batches)
        self.rows.append({
            "train_loss": (self.loss_sum / self.loss_count.clamp(min=1)).item(),
            "epoch": trainer.global_step / steps_per_epoch,
            "step": trainer.global_step,
            "val_loss": metrics["val/loss"].item(),
            "val_wer": metrics["val/wer"].item(),
            "val_cer": metrics["val/cer"].item(),
            **({"val_mer": metrics["val/mer"].item()} if "val/mer" in metrics else {}),
            # the CTC blank plateau (asr.run.plateau): shares of empty dev transcripts and of blank dev frames
            **{f"val_{name}": metrics[f"val/{name}"].item() for name in ("empty_hypotheses", "blank_frames")
               if f"val/{name}" in metrics},
            **({"corpora": corpora} if (corpora := corpus_rates(metrics)) else {}),
        })
        self.loss_sum.zero_()
        self.loss_count.zero_()
        if trainer.is_global_zero:
            rundir.write(self.run_dir / "results.md", HEADER + "".join(map(table_row, self.rows))
                         + corpus_table(self.best(), trainer.datamodule))
            self.write_results(state="training")
            self.write_curves()

    def _read_curve(self) -> None:
        for step, loss, lr in self._pending:  # one read of the device per evaluation, not per step
            self.curve["step"].append(step)
            self.curve["loss"].append(float(loss))
            self.curve["lr"].append(lr)
        self._pending = []

    def write_curves(self) -> None:
        """curves.png: training loss, dev CER and learning rate against update."""
        from asr.run import plots  # matplotlib: imported when a run draws its curves, not by every tool

        self._read_curve()
        plots.run_curves(self.run_dir / "curves.png", self.curve, self.rows)

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_seconds = self.seconds_so_far()
        self.cost = training_cost(pl_module, trainer.optimizers)
        self.skipped_updates = pl_module.skipped_updates
        totals = trainer.strategy.reduce(
            torch.tensor([self.audio_seconds, self.padded_seconds, self.truncated_seconds, self.skipped_clips,
                          self.empty_batches], device=pl_module.device, dtype=torch.float64), reduce_op="sum")
        (self.audio_seconds, self.padded_seconds, self.truncated_seconds, self.skipped_clips,
         self.empty_batches) = totals.tolist()
        if trainer.world_size > 1:  # every rank met other clips
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, self.dropped)
            self.dropped = {split: [d for rank in gathered for d in rank[split]] for split in self.dropped}
        if trainer.datamodule is not None:
            for split, dropped in self.dropped.items():
                trainer.datamodule.count_dropped(split, dropped)

    def best(self) -> dict:
        """The best evaluation by `monitor` (the exported model's), or {} before any."""
        key = monitored(self.monitor)
        scored = [r for r in self.rows if key(r) is not None]
        return min(scored, key=key) if scored else {}

    def results(self, **extra) -> dict:
        """The best evaluation by `monitor` (dev CER by default; the exported model) and the run's totals; with
        several corpora each corpus's dev WER and CER at that evaluation (`corpora`)."""
        best = self.best()
        return {
            **{k: best[k] for k in ("val_loss", "val_wer", "val_cer", "step", "epoch", "corpora") if k in best},
            **({"monitor": self.monitor} if self.monitor != "val/cer" else {}),
            "train_audio_seconds": self.audio_seconds,
            "train_seconds": self.train_seconds if self.train_seconds is not None else self.seconds_so_far(),
            # padded audio / all audio the encoder saw in training batches
            "padding_fraction": 1 - self.audio_seconds / self.padded_seconds if self.padded_seconds else 0.0,
            # codec padding cut from clips that decoded longer than their stated duration (asr.data.loading.CODEC_SLACK)
            "truncated_seconds": round(self.truncated_seconds, 3),
            "skipped_clips": int(self.skipped_clips),
            "empty_batches": int(self.empty_batches),
            "skipped_updates": self.skipped_updates,
            "evaluations": self.rows,
            "batch_per_update": self.batch_per_update,
            **self.cost,
            **extra,
        }

    def seconds_so_far(self) -> float:
        """Training time of the run: before it was resumed, and since this start began training."""
        return self.seconds_before + (time.perf_counter() - self.started if self.started else 0.0)

    def write_results(self, **extra) -> dict:
        results = self.results(**extra)
        rundir.write(self.run_dir / "results.json", json.dumps(results, indent=1))
        return results


def corpus_rates(metrics: dict) -> dict[str, dict]:
    """{name: {val_wer, val_cer}} of the val/<name>/wer and val/<name>/cer an evaluation logged (several corpora)."""
    names = sorted({key.split("/")[1] for key in metrics if key.count("/") == 2 and key.startswith("val/")})
    return {name: {f"val_{m}": metrics[f"val/{name}/{m}"].item() for m in ("wer", "cer")
                   if f"val/{name}/{m}" in metrics}
            for name in names}


def monitored(monitor: str):
    """The value of `monitor` (val/cer, val/wer, val/<name>/cer...) in a results row, or None where it has none."""
    parts = monitor.split("/")
    if len(parts) == 3:
        return lambda row: row.get("corpora", {}).get(parts[1], {}).get(f"val_{parts[2]}")
    return lambda row: row.get("_".join(parts))


def corpus_table(best: dict, data=None) -> str:
    """Several corpora: a row per corpus at the best evaluation (results.md, the model card): its dev hours when
    the data module is at hand, WER and CER; '' for one corpus."""
    if not best.get("corpora"):
        return ""
    dev = ((data.report.get("dev") or {}).get("corpora") or {}) if data is not None and hasattr(data, "report") else {}
    lines = [f"\nPer corpus, at the best evaluation (step {best['step']}):\n\n",
             "| Corpus | Dev hours | Wer    | Cer    |\n", "|:------:|:---------:|:------:|:------:|\n"]
    for name, rates in best["corpora"].items():
        hours = f"{dev[name]['seconds'] / 3600:.2f}" if name in dev else "-"
        lines.append(f"| {name} | {hours} | {rates.get('val_wer', float('nan')):<6.4f} | "
                     f"{rates.get('val_cer', float('nan')):<6.4f} |\n")
    return "".join(lines)


def training_cost(model, optimizers: list) -> dict:
    """What the trained model cost (results.json, the model card): parameters that trained and in all, the
    optimizer state's bytes, and the peak memory of this process's fit (CUDA: the allocator's peak on this
    rank's GPU; CPU: the process's peak resident memory, which includes the data and the libraries)."""
    import resource

    state = [t for optimizer in optimizers for s in optimizer.state.values() for t in s.values()
             if isinstance(t, torch.Tensor)]
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    return {"finetune": model.finetune_method,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_parameters": sum(p.numel() for p in model.parameters()),
            "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_of": "cuda_allocator" if cuda else "process_rss"}


def hyperparameters(cfg: dict, batch: dict) -> list[str]:
    """The card's "Training hyperparameters" list, in the HF Trainer's words, from a resolved run config and
    its batch per update (`asr.run.cluster.batch_per_update`, as the run computed it)."""
    data, trainer, optim, sched = cfg["data"], cfg["trainer"], cfg["optim"], cfg["sched"]
    world = batch["world_size"]
    lines = {"learning_rate": repr(float(optim["lr"]))}
    if data.get("max_batch_size"):  # clips, as the HF Trainer counts a batch
        lines["train_batch_size"] = data["max_batch_size"]
        lines["eval_batch_size"] = data.get("eval_max_batch_size") or data["max_batch_size"]
    else:
        lines["train_batch_seconds"] = f"{data['max_batch_seconds']} (padded audio per batch, duration-bucketed)"
    lines["seed"] = cfg["seed"]
    if world > 1:
        lines["num_devices"] = world
    lines["gradient_accumulation_steps"] = batch["accumulate"]
    if batch["clips"]:
        lines["total_train_batch_size"] = batch["clips"]
    betas = ",".join(str(b) for b in optim["betas"])
    lines["optimizer"] = (f"AdamW with betas=({betas}) and epsilon={float(optim['eps'])!r}, weight_decay="
                          f"{optim.get('weight_decay', 0.0)}")
    if optim.get("head_lr"):
        lines["ctc_head_learning_rate"] = repr(float(optim["head_lr"]))
    lines["lr_scheduler_type"] = sched["name"]
    if sched["name"] == "linear":
        if sched.get("warmup_steps") is not None:
            lines["lr_scheduler_warmup_steps"] = sched["warmup_steps"]
        else:
            lines["lr_scheduler_warmup_ratio"] = sched["warmup_ratio"]
    else:
        lines["lr_scheduler_ratios"] = list(sched["ratios"])
        lines["lr_scheduler_init_lr_scale"] = sched["init_lr_scale"]
        lines["lr_scheduler_final_lr_scale"] = sched["final_lr_scale"]
    if trainer.get("max_steps", -1) > 0:
        lines["training_steps"] = trainer["max_steps"]
    else:
        lines["num_epochs"] = trainer["max_epochs"]
    if cfg["model"].get("freeze_finetune_updates"):
        lines["freeze_finetune_updates"] = cfg["model"]["freeze_finetune_updates"]
    precision = str(trainer.get("precision", "32-true"))
    if precision.startswith("16"):
        lines["mixed_precision_training"] = "Native AMP"
    elif precision.startswith("bf16"):
        lines["mixed_precision_training"] = "Native AMP (bf16)"
    return [f"- {key}: {value}" for key, value in lines.items()]


def model_card(cfg: dict, batch: dict, results: dict, versions: dict[str, str]) -> str:
    """README.md of the exported model, in the format of the HF Trainer's model cards."""
    base = cfg["model"].get("pretrained")
    origin = (f"a fine-tuned version of [{base}](https://huggingface.co/{base})" if base and "/" in base
              and not base.startswith(("/", ".")) else f"fine-tuned from {base}" if base else "trained from scratch")
    scores = [("Loss", "val_loss"), ("Wer", "val_wer"), ("Cer", "val_cer"), ("Mer", "val_mer")]
    lines = [
        "---", "language:", f"- {cfg['data']['language'] or 'und'}", "tags:", "- automatic-speech-recognition",
        "- ctc", "- xlsr-ctc", "---", "", f"# {cfg['data']['lang']} ({Path(str(cfg['data']['root'])).name})", "",
        f"This model is {origin} on {trained_on(cfg['data'])}.",
        "It achieves the following results on the evaluation set:",
        *(f"- {name}: {results[key]:.4f}" for name, key in scores if key in results), "",
        "## Training procedure", "", "### Training hyperparameters", "",
        "The following hyperparameters were used during training:", *hyperparameters(cfg, batch), "",
        *cost_lines(results),
        "### Training results", "", HEADER.rstrip("\n"),
        *(table_row(row).rstrip("\n") for row in results.get("evaluations", [])),
        *(corpus_table(results).rstrip("\n").split("\n") if results.get("corpora") else []), "",
        "### Framework versions", "", *(f"- {name} {version}" for name, version in versions.items()), "",
    ]
    return "\n".join(lines)


def trained_on(data: dict) -> str:
    """The card's words for the training data: the corpus and its root, or each corpus of data.corpora."""
    if data.get("corpora"):
        return "; ".join(f"{c['name']} ({c.get('lang') or c.get('corpus')}, {c.get('root')}"
                         + (f", weight {c['weight']}" if c.get("weight") is not None else "") + ")"
                         for c in data["corpora"])
    return f"{data['corpus']} ({data['root']})"


def cost_lines(results: dict) -> list[str]:
    """The card's "What training cost" list, from results.json (`training_cost`)."""
    if "trainable_parameters" not in results:
        return []
    peak = "the GPU allocator's peak" if results.get("peak_memory_of") == "cuda_allocator" else "peak process RSS (CPU)"
    return ["### What training cost", "",
            f"- fine-tuning: {results['finetune']}",
            f"- trainable parameters: {results['trainable_parameters']:,} of {results['total_parameters']:,} "
            f"({results['trainable_parameters'] / results['total_parameters']:.2%})",
            f"- optimizer state: {results['optimizer_state_bytes'] / 1e6:.1f} MB",
            *([f"- checkpoint: {results['checkpoint_bytes'] / 1e6:.1f} MB"] if "checkpoint_bytes" in results else []),
            f"- peak memory: {results['peak_memory_bytes'] / 1e9:.2f} GB ({peak})", ""]


def framework_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(package) for name, package in
            (("Transformers", "transformers"), ("Pytorch", "torch"), ("Lightning", "lightning"))}
