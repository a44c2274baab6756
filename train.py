"""Fine-tune a wav2vec2 / XLS-R encoder with CTC.

    python train.py                                        # tiny model on the embedded demo
    python train.py lang=hy model=xlsr_1b sched=tristage data.root=<cv-corpus/hy-AM>
    python train.py hydra.run.dir=<run> ckpt_path=last     # resume a run where it stopped
    sbatch slurm/train.sbatch experiment=cv8_hy_1b ...     # on a SLURM cluster (README: several GPUs)

Writes into the run directory: config.yaml, vocab.json, data_report.json, checkpoints/ (last and
best by dev CER), model/ (the best model, HF format), results.md and results.json. A run signalled by
SLURM saves checkpoints/requeue.ckpt and requeues its job; started again in that directory it resumes.
"""

import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from asr import SetupError, TrainingStopped, cluster, quote_numeric_choices, search, tracking
from asr.config import check_overrides, checked
from asr.export import export
from asr.model import CTCModel, check_pretrained
from asr.report import RunReport, framework_versions, model_card




class Requeued(Exception):
    """The run was signalled, saved where it was and (under SLURM) requeued; see `cluster.Requeue`."""


def validation_cadence(cfg: DictConfig, per_update: dict) -> dict:
    """`val_every_updates` as Lightning counts (batches of one process), or nothing: the trainer's own."""
    if not cfg.val_every_updates:
        return {}
    return {"val_check_interval": cfg.val_every_updates * per_update["accumulate"], "check_val_every_n_epoch": None}


def train(cfg: DictConfig) -> dict:
    cfg = checked(cfg, "train")  # resolved, and every key and type checked against the code
    cluster.check_allocation(cfg.trainer.devices, cfg.trainer.num_nodes)
    world = cluster.world_size(cfg.trainer.devices, cfg.trainer.num_nodes)
    per_update = cluster.batch_per_update(cfg.update_clips, cfg.update_seconds, cfg.trainer.accumulate_grad_batches,
                                          cfg.data.max_batch_size, cfg.data.max_batch_seconds, world)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    pruning = search.for_this_job()  # a trial of a search reports its evaluations to the study
    for callback in callbacks:
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
    report = RunReport(run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    ckpt_path = cluster.resume_checkpoint(cfg.ckpt_path, checkpoint_dir)
    job = tracking.job_context()
    wandb_args = tracking.wandb_init(cfg.logger, job, "train") if cfg.logger else {}
    logger = instantiate(cfg.logger, **cluster.logger_resume(cfg.logger, run_dir, resuming=bool(ckpt_path)),
                         **wandb_args) if cfg.logger else False
    callbacks += [report, *([pruning] if pruning else [])]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=cluster.plugins(),
                          strategy=cluster.strategy(cfg.trainer.strategy, cfg.model.config.get("layerdrop", 0.0), world),
                          accumulate_grad_batches=per_update["accumulate"], **validation_cadence(cfg, per_update))
    if trainer.is_global_zero:
        print(f"batch: {per_update['text']}", flush=True)
        if group := wandb_args.get("group") or (cfg.logger or {}).get("group"):
            (run_dir / "wandb_group").write_text(group)  # evaluate.py logs its eval runs into this group
    if logger:
        logger.log_hyperparams(tracking.run_config(cfg, per_update, data.report, framework_versions(),
                                                   job["choices"]))
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    requeue = next((c for c in callbacks if isinstance(c, cluster.Requeue) and c.saved), None)
    if requeue is not None:
        if trainer.is_global_zero:
            report.write_results(requeue_checkpoint=str(requeue.saved), batch_per_update=per_update)
        how = f"SLURM job {requeue.requeued} requeued" if requeue.requeued else "run the same command to resume"
        raise Requeued(f"signalled at update {trainer.global_step}: saved {requeue.saved}; {how}")
    if model.stop_reason:  # every rank stops alike; the state is kept for a look or a restart
        stopped = run_dir / "checkpoints" / f"stopped-step{trainer.global_step}.ckpt"
        trainer.save_checkpoint(stopped)
        if trainer.is_global_zero:
            report.write_results(stopped_checkpoint=str(stopped), stop_reason=model.stop_reason)
        raise TrainingStopped(f"{model.stop_reason} Its state: {stopped}")

    last = next((c for c in trainer.checkpoint_callbacks if c.filename == "last"), None)  # callbacks.last
    if last is not None and last._last_global_step_saved != trainer.global_step:  # updates after its last save
        trainer.save_checkpoint(Path(last.dirpath) / "last.ckpt")  # the final state: ckpt_path=last trains on
    if not trainer.is_global_zero:
        return {}
    data.write_report(run_dir / "data_report.json")  # with the clips met unreadable while training
    checkpoints = trainer.checkpoint_callback  # callbacks.checkpoint; without it, the final weights
    best = checkpoints and (checkpoints.best_model_path or checkpoints.last_model_path)
    export(CTCModel.from_checkpoint(best) if best else model.cpu(), run_dir / "model")
    results = report.write_results(best_checkpoint=best or None, batch_per_update=per_update,
                                   **({"pruned_at_step": pruning.pruned_at_step} if pruning else {}))
    report.write_curves()
    tracking.summarize(results)
    (checkpoint_dir / cluster.REQUEUE_CHECKPOINT).unlink(missing_ok=True)  # done: a new start starts afresh
    card = model_card(OmegaConf.to_container(cfg, resolve=True), results, framework_versions())
    (run_dir / "model" / "README.md").write_text(card, encoding="utf-8")
    return results


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    """The job's results (a search reads its objective from them)."""
    try:
        results = train(cfg)
    except (SetupError, TrainingStopped) as error:
        tracking.finish(exit_code=1)
        if tracking.job_context()["sweep_dir"]:
            raise  # Hydra marks the job failed (with its overrides); a search goes on with its next trial
        sys.exit(f"error: {error}")
    except Requeued as stopped:
        tracking.preempted()
        # Exit, not return: under Hydra's submitit launcher a return would report the job finished.
        print(f"{stopped}", flush=True)
        sys.exit(0)
    except BaseException:
        tracking.finish(exit_code=1)  # a crashed job's W&B run is marked failed
        raise
    tracking.finish(exit_code=0)  # the next job of a multirun starts its own W&B run
    if results:
        print(f"dev WER {results.get('val_wer', float('nan')):.4f}  CER {results.get('val_cer', float('nan')):.4f}"
              f"  after {results['train_seconds']:.0f} s -> {cfg.run_dir}")
    return results


if __name__ == "__main__":
    sys.argv = quote_numeric_choices(sys.argv)
    try:
        check_overrides(sys.argv[1:], "train")  # a mistyped key, named with the valid ones
    except SetupError as error:
        sys.exit(f"error: {error}")
    main()
