"""One run, built in one place: `assemble` (config -> batch per update -> data -> model -> callbacks ->
logger -> trainer, returned as a `Run`), `Run.fit`, then `conclude` (export, results, model card).

train.py, the benchmarks and the tests build their runs here. Overrides (of the config, or the trainer
arguments `assemble` takes) may shrink a run; nothing retypes it.
"""

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from asr import Requeued, SetupError, TrainingStopped, checkpoints, cluster, search, tracking
from asr.config import checked
from asr.data import SpeechDataModule
from asr.export import export
from asr.model import CTCModel, check_pretrained
from asr.report import RunReport, framework_versions, model_card


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
                self.report.write_results(requeue_checkpoint=str(requeue.saved), batch_per_update=self.batch)
            how = f"SLURM job {requeue.requeued} requeued" if requeue.requeued else "run the same command to resume"
            raise Requeued(f"signalled at update {self.trainer.global_step}: saved {requeue.saved}; {how}")
        if self.model.stop_reason:  # every rank stops alike; the state is kept for a look or a restart
            stopped = self.dir / "checkpoints" / f"stopped-step{self.trainer.global_step}.ckpt"
            self.trainer.save_checkpoint(stopped)
            if self.trainer.is_global_zero:
                self.report.write_results(stopped_checkpoint=str(stopped), stop_reason=self.model.stop_reason)
            raise TrainingStopped(f"{self.model.stop_reason} Its state: {stopped}")
        last = next((c for c in self.trainer.checkpoint_callbacks if c.filename == "last"), None)  # callbacks.last
        if last is not None and last._last_global_step_saved != self.trainer.global_step:  # updates after its save
            self.trainer.save_checkpoint(Path(last.dirpath) / "last.ckpt")  # the final state: ckpt_path=last goes on


def validation_cadence(cfg: DictConfig, batch: dict) -> dict:
    """`val_every_updates` as Lightning counts (batches of one process), or nothing: the trainer's own."""
    if not cfg.val_every_updates:
        return {}
    return {"val_check_interval": cfg.val_every_updates * batch["accumulate"], "check_val_every_n_epoch": None}


def assemble(cfg: DictConfig, callbacks: list = (), **trainer_args) -> Run:
    """The run a train config describes, ready to fit. Writes config.yaml, vocab.json and data_report.json
    into the run directory. `callbacks` are added to the config's; `trainer_args` override the trainer's
    (a benchmark's `limit_val_batches=0`, a test's `max_steps`)."""
    cfg = checked(cfg, "train")  # resolved, and every key and type checked against the code
    cluster.check_allocation(cfg.trainer.devices, cfg.trainer.num_nodes)
    batch = cluster.batch_of(cfg)
    configured = [instantiate(c) for c in cfg.callbacks.values()]
    for callback in configured:
        if isinstance(callback, cluster.Requeue):
            callback.listen()  # from the start: SLURM may signal while the data is read
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True)

    data = instantiate(cfg.data, _convert_="all")
    problems = [p for p in (data.check(), check_pretrained(cfg.model.pretrained)) if p]
    if problems:
        raise SetupError("\n".join(problems))
    data.setup("fit")  # one rank at a time: the first fills the caches (SpeechDataModule.setup)
    data.vocab.save(run_dir / "vocab.json")
    data.write_report(run_dir / "data_report.json")
    model = CTCModel.from_config(cfg, data.vocab.tokens)

    ckpt_path = checkpoints.resume_checkpoint(cfg.ckpt_path, run_dir / "checkpoints")
    job = tracking.job_context()
    wandb_args = tracking.wandb_init(cfg.logger, job, "train") if cfg.logger else {}
    logger = instantiate(cfg.logger, **tracking.logger_resume(cfg.logger, run_dir, resuming=bool(ckpt_path)),
                         **wandb_args) if cfg.logger else False
    report = RunReport(run_dir)
    pruning = search.for_this_job()  # a trial of a search reports its evaluations to the study
    callbacks = [*configured, report, *([pruning] if pruning else []), *callbacks]
    world = batch["world_size"]
    trainer = instantiate(cfg.trainer, **{
        "callbacks": callbacks, "logger": logger, "plugins": cluster.plugins(),
        "strategy": cluster.strategy(cfg.trainer.strategy, cfg.model.config.get("layerdrop", 0.0), world),
        "accumulate_grad_batches": batch["accumulate"], **validation_cadence(cfg, batch), **trainer_args})
    if trainer.is_global_zero:
        print(f"batch: {batch['text']}", flush=True)
        if group := wandb_args.get("group") or (cfg.logger or {}).get("group"):
            (run_dir / "wandb_group").write_text(group)  # evaluate.py logs its eval runs into this group
    if logger:
        logger.log_hyperparams(tracking.run_config(cfg, batch, data.report, framework_versions(), job["choices"]))
    return Run(cfg, run_dir, batch, data, model, trainer, report, logger, ckpt_path, pruning, callbacks)


def conclude(run: Run) -> dict:
    """After a completed fit, on rank 0: the data report with the clips met unreadable while training, the
    best model exported to model/ with its card, results.json and curves.png. Returns the results."""
    if not run.trainer.is_global_zero:
        return {}
    run.data.write_report(run.dir / "data_report.json")
    best_by_cer = run.trainer.checkpoint_callback  # callbacks.checkpoint; without it, the final weights
    best = best_by_cer and (best_by_cer.best_model_path or best_by_cer.last_model_path)
    export(CTCModel.from_checkpoint(best) if best else run.model.cpu(), run.dir / "model")
    results = run.report.write_results(best_checkpoint=best or None, batch_per_update=run.batch,
                                       **({"pruned_at_step": run.pruning.pruned_at_step} if run.pruning else {}))
    run.report.write_curves()
    tracking.summarize(results)
    (run.dir / "checkpoints" / checkpoints.REQUEUE_CHECKPOINT).unlink(missing_ok=True)  # a new start starts afresh
    card = model_card(OmegaConf.to_container(run.cfg, resolve=True), run.batch, results, framework_versions())
    (run.dir / "model" / "README.md").write_text(card, encoding="utf-8")
    return results


def train(cfg: DictConfig) -> dict:
    """Assemble, fit and conclude the run of a train config: its results (results.json)."""
    run = assemble(cfg)
    run.fit()
    return conclude(run)
