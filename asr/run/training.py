"""One run, built in one place: `assemble` (config -> batch per update -> data -> model -> callbacks ->
logger -> trainer, returned as a `Run`), `Run.fit`, then `conclude` (export, results, model card). An
evaluation of a checkpoint is built from the same objects in `asr.run.evaluation.assemble_evaluation`
(evaluate.py).

train.py, the benchmarks and the tests build their runs here. Overrides (of the config, or the trainer
arguments `assemble` takes) may shrink a run; nothing retypes it.
"""

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.accelerators import CPUAccelerator
from omegaconf import DictConfig, OmegaConf, open_dict

from asr import Complete, Requeued, SetupError, TrainingStopped
from asr.core import checkpoints
from asr.core.config import checked, expand_path
from asr.core.frames import WAV2VEC2, Geometry
from asr.core.text import Vocabulary
from asr.data.module import SpeechDataModule
from asr.model import finetune as tuning
from asr.model import inference, speed
from asr.model.encoder import check_pretrained, wav2vec2_config
from asr.model.export import export
from asr.model.module import CTCModel
from asr.run import cluster, console, provenance, rundir, search, tracking
from asr.run.average import AverageBest, check_kept
from asr.run.report import RunReport, framework_versions, model_card

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What `assemble` built. `batch` is what one optimizer update trains on (`cluster.batch_per_update`):
    its one computation, which the trainer, the logs, results.json and the model card all read."""

    cfg: DictConfig  # resolved and checked
    dir: Path
    batch: dict
    data: SpeechDataModule
    model: CTCModel
    trainer: L.Trainer
    report: RunReport
    logger: object  # a Lightning logger, or False
    ckpt_path: str | None  # the checkpoint fit resumes from
    pruning: object | None = None  # a search trial's pruning callback
    callbacks: list = field(default_factory=list)

    def fit(self) -> None:
        """Train. Raises `Requeued` when signalled (state saved) and `TrainingStopped` when the model
        stopped itself (state saved); otherwise the last state is in checkpoints/last.ckpt."""
        self.trainer.fit(self.model, datamodule=self.data, ckpt_path=self.ckpt_path)
        requeue = next((c for c in self.callbacks if isinstance(c, cluster.Requeue) and c.saved), None)
        if requeue is not None:
            if self.trainer.is_global_zero:
                self.report.write_results(state="requeued", requeue_checkpoint=str(requeue.saved))
            how = f"SLURM job {requeue.requeued} requeued" if requeue.requeued else "run the same command to resume"
            raise Requeued(f"signalled at update {self.trainer.global_step}: saved {requeue.saved}; {how}")
        if self.model.stop_reason:  # every rank stops alike; the state is kept for a look or a restart
            stopped = self.dir / "checkpoints" / f"stopped-step{self.trainer.global_step}.ckpt"
            self.trainer.save_checkpoint(stopped, weights_only=False)
            if self.trainer.is_global_zero:
                self.report.write_results(state="stopped", stopped_checkpoint=str(stopped),
                                          stop_reason=self.model.stop_reason)
            raise TrainingStopped(f"{self.model.stop_reason} Its state: {stopped}")
        last = next((c for c in self.trainer.checkpoint_callbacks if c.filename == "last"), None)  # callbacks.last
        if last is not None and last._last_global_step_saved != self.trainer.global_step:  # updates after its save
            # the final state: ckpt_path=last goes on
            self.trainer.save_checkpoint(Path(last.dirpath) / "last.ckpt", weights_only=False)

    def first_evaluation(self) -> int | None:
        """The update after which the first dev evaluation comes, as the trainer counts; None if none ever does."""
        trainer = self.trainer
        every = getattr(trainer, "val_check_batch", None)
        if not every or math.isinf(every) or trainer.limit_val_batches == 0:
            return None
        epochs = trainer.check_val_every_n_epoch
        batches = (epochs - 1) * trainer.num_training_batches + every if epochs else every
        return math.ceil(batches / self.batch["accumulate"])


def validation_cadence(cfg: DictConfig, batch: dict) -> dict:
    """`val_every_updates` as Lightning counts (batches of one process), or nothing: the trainer's own."""
    if not cfg.val_every_updates:
        return {}
    return {"val_check_interval": cfg.val_every_updates * batch["accumulate"], "check_val_every_n_epoch": None}


def _write_config(cfg: DictConfig, run_dir: Path) -> None:
    """config.yaml, written whole (`rundir.write`); a config.yaml of an earlier start is kept as config.<n>.yaml (as the
    CSV logger keeps metrics.<n>.csv). Rank 0 only: other ranks may be reading it (`provenance.resumed`)."""
    if rank_zero_only.rank != 0:
        return
    path = run_dir / "config.yaml"
    if path.is_file():
        n = 1 + sum(1 for _ in run_dir.glob("config.*.yaml"))
        (run_dir / f"config.{n}.yaml").write_bytes(path.read_bytes())
    rundir.write(path, OmegaConf.to_yaml(cfg))


def _warn_cpu_oversubscription(trainer: L.Trainer) -> None:
    cores = len(os.sched_getaffinity(0))
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores and trainer.is_global_zero:
        log.warning("trainer.devices=%d CPU processes on %d core(s): each gets less than a core, and the run is "
                    "slower than with trainer.devices=%d", trainer.num_devices, cores, cores)


def check_monitor(cfg: DictConfig, data: SpeechDataModule) -> str:
    """The model-selection metric (callbacks.checkpoint.monitor; val/cer without that callback). With several
    corpora val/cer is the hour-weighted mean of their dev CERs and val/<name>/cer one corpus's: a name that is
    not one of data.corpora stops the run, naming them."""
    monitor = OmegaConf.select(cfg, "callbacks.checkpoint.monitor", default=None) or "val/cer"
    parts = monitor.split("/")
    if len(parts) == 3 and parts[0] == "val":
        names = list(data.shown)  # logged per corpus: those of data.corpora
        if parts[1] not in names:
            raise SetupError(f"callbacks.checkpoint.monitor={monitor}: {parts[1]!r} is not a corpus of this run"
                             + (f"; give one of {', '.join(f'val/{n}/cer' for n in names)}, or val/cer (their "
                                f"hour-weighted mean)" if names else " (data.corpora is not set): give val/cer"))
    return monitor


def assemble(cfg: DictConfig, callbacks: list = (), **trainer_args) -> Run:
    """The run a train config describes, ready to fit. Writes config.yaml, vocab.json and data_report.json
    into the run directory. `callbacks` are added to the config's; `trainer_args` override the trainer's
    (a benchmark's `limit_val_batches=0`, a test's `max_steps`)."""
    cfg = checked(cfg, "train")  # resolved, and every key and type checked against the code
    speed.configure_cuda_allocator(cfg.model.expandable_segments)  # before anything initialises CUDA
    cluster.check_machine(cfg.trainer)  # no setting that Lightning would swap for another
    check_kept(cfg.callbacks)  # callbacks.average.best: as many best checkpoints kept
    tuning.check(OmegaConf.to_container(cfg.model.finetune))  # its method's settings and their types
    run_dir = Path(cfg.run_dir)
    ckpt_path = checkpoints.resume_checkpoint(cfg.ckpt_path, run_dir / "checkpoints")  # before any data is read
    ckpt_path = ckpt_path and checkpoints.verified(ckpt_path)
    console.quiet_libraries(resuming=bool(ckpt_path) and checkpoints.run_dir_of(ckpt_path) == run_dir.absolute())
    cluster.check_allocation(cfg.trainer.devices, cfg.trainer.num_nodes)
    batch = cluster.batch_of(cfg)
    configured = [instantiate(c) for c in cfg.callbacks.values()]
    for callback in configured:
        if isinstance(callback, cluster.Requeue):
            callback.listen()  # from the start: SLURM may signal while the data is read
    job = tracking.job_context()
    wandb_args = tracking.wandb_init(cfg.logger, job, "train") if cfg.logger else {}
    if group := wandb_args.pop("group", None):
        with open_dict(cfg):
            cfg.logger.group = group  # in config.yaml: evaluate.py logs its eval runs into this group
    method = cfg.model.finetune.method
    tuned_without_base = (f"finetune={method} adapts a pretrained base and keeps it frozen: give "
                          f"model.pretrained=<hub id or model directory> (the base; model.pretrained=null is random "
                          f"weights)") if method != "full" and cfg.model.pretrained is None else None
    base_problem = check_pretrained(cfg.model.pretrained)
    # The frames of the model to come (a base that cannot load stops the run below, before any data is read),
    # and a resumed run's vocabulary: the checkpoint's, whatever the transcripts say.
    geometry = WAV2VEC2 if base_problem else Geometry.of(wav2vec2_config(cfg.model.pretrained,
                                                                         OmegaConf.to_container(cfg.model.arch)))
    resumed_from = ckpt_path and checkpoints.run_dir_of(ckpt_path)
    vocab = (Vocabulary.load(resumed_from / "vocab.json")
             if resumed_from and (resumed_from / "vocab.json").is_file() else None)
    data = SpeechDataModule.from_config(cfg.data, geometry, vocab)
    problems = [p for p in (tuned_without_base, data.check(), base_problem) if p]
    if problems:
        raise SetupError("\n".join(problems))
    monitor = check_monitor(cfg, data)  # from the settings, before any data is read
    rundir.hold(run_dir)  # one process per run directory, from its first write on
    _write_config(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True)

    data.setup("fit")  # one rank at a time: the first fills the caches (SpeechDataModule.setup)
    if rank_zero_only.rank == 0:
        data.vocab.save(run_dir / "vocab.json")
        data.write_report(run_dir / "data_report.json")
    model = CTCModel.from_config(cfg, data.vocab.tokens, data.language)

    logger = instantiate(cfg.logger, **tracking.logger_resume(cfg.logger, run_dir, resuming=bool(ckpt_path)),
                         **wandb_args) if cfg.logger else False
    report = RunReport(run_dir, batch, monitor=monitor)
    pruning = search.for_this_job()  # a trial of a search reports its evaluations to the study
    summary = (cfg.trainer.get("enable_model_summary", True) is not False
               and trainer_args.get("enable_model_summary", True))
    if cfg.trainer.get("enable_progress_bar", True) is False or trainer_args.get("enable_progress_bar", True) is False:
        configured = [c for c in configured if not isinstance(c, console.Progress)]  # Lightning refuses a bar then
    callbacks = [*configured, report, *([pruning] if pruning else []), *([console.ModelSummary()] if summary else []),
                 *callbacks]
    world = batch["world_size"]
    trainer = instantiate(cfg.trainer, **{
        "callbacks": callbacks, "logger": logger, "plugins": cluster.plugins(),
        "strategy": cluster.strategy(cfg.trainer.strategy, cfg.model.config.get("layerdrop", 0.0), world),
        "accumulate_grad_batches": batch["accumulate"], **validation_cadence(cfg, batch), **trainer_args,
        "enable_model_summary": False})  # console.ModelSummary instead, when it is on
    _warn_cpu_oversubscription(trainer)
    if trainer.is_global_zero:
        print(f"batch: {batch['text']}", flush=True)
    if logger:
        logger.log_hyperparams(tracking.run_config(cfg, batch, data.report, framework_versions(), job["choices"]))
    return Run(cfg, run_dir, batch, data, model, trainer, report, logger, ckpt_path, pruning, callbacks)


def conclude(run: Run) -> dict:
    """After a completed fit, on rank 0: the data report with the clips met unreadable while training, the
    best model exported to model/ with its card, with callbacks.average.best the best checkpoints averaged and
    scored on dev (`AverageBest`), results.json and curves.png. Returns the results."""
    if not run.trainer.is_global_zero:
        return {}
    if any(r.get("met_while_loading") for r in run.data.report.values()):  # else as written at the start
        run.data.write_report(run.dir / "data_report.json")
    best_by_cer = run.trainer.checkpoint_callback  # callbacks.checkpoint; without it, the final weights
    best = best_by_cer and (best_by_cer.best_model_path or best_by_cer.last_model_path)
    export(inference.from_checkpoint(best) if best else run.model.cpu(), run.dir / "model", format="hf",
           overwrite=True, source=best or run.dir)  # the run's own model/: replaced at each end
    first = {} if run.report.rows else {"updates": run.trainer.global_step,
                                        "first_evaluation_at_update": run.first_evaluation()}
    size = {"checkpoint_bytes": Path(best).stat().st_size} if best else {}
    average = next((c for c in run.callbacks if isinstance(c, AverageBest) and c.best), None)
    averaged = ({"average": average.conclude(run.dir, best, run.data, run.trainer.strategy.root_device)}
                if average else {})
    results = run.report.write_results(state="complete", best_checkpoint=best or None, **first, **size, **averaged,
                                       **({"pruned_at_step": run.pruning.pruned_at_step} if run.pruning else {}))
    run.report.write_curves()
    tracking.summarize(results)
    (run.dir / "checkpoints" / checkpoints.REQUEUE_CHECKPOINT).unlink(missing_ok=True)  # a new start starts afresh
    card = model_card(OmegaConf.to_container(run.cfg, resolve=True), run.batch, results, framework_versions())
    (run.dir / "model" / "README.md").write_text(card, encoding="utf-8")
    return results


def nothing_left(cfg: DictConfig) -> None:
    """`Complete` when the checkpoint a run resumes from (`cfg.ckpt_path`, as `provenance.resumed` set it) is already at
    the end of its schedule (trainer.max_steps updates or trainer.max_epochs epochs, whichever it set) and
    the run was concluded (results.json's state: complete); a run killed between its last update and its
    conclusion goes on to `conclude`. Read before anything is built or written: the directory stays as it was."""
    ckpt = checkpoints.resume_checkpoint(expand_path(cfg.ckpt_path), Path(expand_path(cfg.run_dir)) / "checkpoints")
    if not ckpt:
        return
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    update = state.get("global_step", 0)
    # epochs done: the epoch's counter, plus the epoch whose last batch it had trained (saved at its end)
    batches = state.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    epoch = state.get("epoch", 0) + bool(batches.get("is_last_batch"))
    max_steps, max_epochs = cfg.trainer.max_steps or -1, cfg.trainer.max_epochs or -1
    if 0 < max_steps <= update:  # Lightning stops at whichever limit comes first
        limit, more = f"trainer.max_steps={max_steps}", f"trainer.max_steps=<more than {update}>"
    elif 0 < max_epochs <= epoch:
        limit, more = f"trainer.max_epochs={max_epochs}", f"trainer.max_epochs=<more than {epoch}>"
    else:
        return
    source = checkpoints.run_dir_of(ckpt) or Path(ckpt).parent
    results = json.loads((source / "results.json").read_text()) if (source / "results.json").is_file() else {}
    # results.json of before its `state`: written at the end, unless the run was requeued or stopped
    ended = "requeue_checkpoint" not in results and "stopped_checkpoint" not in results
    if results.get("state", "complete" if results and ended else None) != "complete":
        log.warning("%s reached %s but was not concluded (killed or signalled after its last update): it exports "
                    "its best model and writes its results now", source, limit)
        return
    raise Complete(f"{source} is complete at update {update} ({limit}); nothing is left to train. {more} goes "
                   f"on from {Path(ckpt).name}; its results are as they were.", results)


def train(cfg: DictConfig) -> dict:
    """Assemble (from the run's own config when it resumes: `resumed`), fit and conclude the run of a train
    config: its results (results.json). `Complete` when it resumes a run with nothing left to train."""
    cfg = provenance.resumed(cfg)
    nothing_left(cfg)
    try:
        run = assemble(cfg)
        run.fit()
        return conclude(run)
    finally:
        rundir.release()
