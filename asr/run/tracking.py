"""What a run tells its dashboard (W&B): one run per Hydra job, named after the job's overrides, grouped
by sweep, tagged by its choices, with the whole resolved config; finished when the job ends."""

import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from asr.core import audio
from asr.data.loading import UtteranceDataset, collate
from asr.model.metrics import utterance_cer

log = logging.getLogger(__name__)
# Overrides that say where, not what: left out of a run's name.
_WHERE = ("data.root", "run_dir", "ckpt_path", "hydra.", "model.pretrained", "data.cache_dir", "+callbacks.")
TAGGED_GROUPS = ("lang", "model", "sched", "precision", "experiment", "search", "augment")


def job_context() -> dict:
    """The Hydra job's overrides, group choices and sweep directory (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {"overrides": [], "choices": {}, "sweep_dir": None, "cwd": None}
    hydra = HydraConfig.get()
    multirun = str(hydra.mode) == "RunMode.MULTIRUN"
    overrides = list(hydra.overrides.task)
    if multirun:  # the keys the sweep varies, from the sweep's own record of its command line
        sweep = Path(hydra.sweep.dir) / "multirun.yaml"
        if sweep.is_file():
            from hydra.core.override_parser.overrides_parser import OverridesParser

            recorded = OmegaConf.load(sweep).hydra
            parsed = OverridesParser.create().parse_overrides(list(recorded.overrides.task))
            searched = recorded.sweeper.get("params") or {}  # a search's space (asr.run.search)
            swept = {o.key_or_group for o in parsed if o.is_sweep_override()} | set(searched)
            overrides = [o for o in overrides if o.partition("=")[0].lstrip("+~") in swept]
    return {"overrides": overrides, "choices": dict(hydra.runtime.choices),
            "sweep_dir": hydra.sweep.dir if multirun else None, "cwd": hydra.runtime.cwd}


def sweep_group(sweep_dir: str, cwd: str | None = None) -> str:
    """A multirun's W&B group, readable on a dashboard: its sweep directory relative to the directory it was
    started from (multirun/2026-12-01/00-22-16), else the directory's last two parts (its <date>/<time>)."""
    path = Path(sweep_dir)
    if not path.is_absolute():
        return str(path)
    if cwd and path.is_relative_to(cwd) and path != Path(cwd):
        return str(path.relative_to(cwd))
    return "/".join(path.parts[-2:])


def run_name(overrides: list[str]) -> str | None:
    """`lr=0.001,sched=tristage`: the job's overrides (last key part; in a sweep, the swept ones),
    without the paths."""
    parts = []
    for override in sorted(overrides):
        key, _, value = override.partition("=")
        if not value or key.lstrip("+~").startswith(_WHERE):
            continue
        parts.append(f"{key.lstrip('+~').split('.')[-1].split('/')[-1]}={value}")
    return ",".join(parts) or None


def wandb_init(logger: dict, job: dict, job_type: str) -> dict:
    """wandb.init arguments of a WandbLogger: name, group, job type and tags, where the config leaves
    them unset. Group: the multirun's sweep directory (`sweep_group`), else the experiment's name."""
    if not str(logger.get("_target_", "")).endswith("WandbLogger"):
        return {}
    choices = job["choices"]
    out = {"job_type": logger.get("job_type") or job_type}
    if not logger.get("name"):
        out["name"] = run_name(job["overrides"])
    if not logger.get("group"):
        out["group"] = (sweep_group(job["sweep_dir"], job.get("cwd")) if job["sweep_dir"] else None) or \
            choices.get("experiment")
    tags = [f"{group}={choices[group]}" for group in TAGGED_GROUPS if choices.get(group)]
    out["tags"] = list(dict.fromkeys([*(logger.get("tags") or []), *tags]))
    return out


def run_config(cfg: DictConfig, batch_per_update: dict, data_report: dict, versions: dict, choices: dict) -> dict:
    """The config a dashboard filters and groups by: the whole resolved config, the group choices (lang,
    model, sched, precision, experiment), the batch per update and world size, the data report's kept
    hours and dropped counts per split, framework versions."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["choices"] = {group: choices.get(group) for group in TAGGED_GROUPS}
    config["batch_per_update"] = {k: v for k, v in batch_per_update.items() if k != "text"}
    config["world_size"] = batch_per_update["world_size"]
    config["data_report"] = {split: {"kept": r["kept"], "hours": round(r["seconds"] / 3600, 3),
                                     "dropped": dict(r["dropped"])} for split, r in data_report.items()}
    config["versions"] = versions
    return config


def _open_run():
    """This process's open W&B run, or None (wandb not even imported: no W&B logger ran)."""
    import sys

    wandb = sys.modules.get("wandb")
    return wandb.run if wandb is not None else None


def finish(exit_code: int) -> None:
    """Ends this process's W&B run, if one is open: Lightning's WandbLogger never does, so the next job
    of a multirun in the same process would log into it. A failed job's run is marked failed."""
    run = _open_run()
    if run is not None:
        run.finish(exit_code=exit_code)


def preempted() -> None:
    """The job was requeued: its W&B run is marked preempting (it goes on when the job restarts)."""
    run = _open_run()
    if run is not None:
        run.mark_preempting()


def summarize(results: dict) -> None:
    """The W&B run's summary is its best evaluation (what results.json holds), not its last."""
    run = _open_run()
    if run is None:
        return
    best = {f"val/{k[4:]}": v for k, v in results.items() if k.startswith("val_")}
    run.summary.update({**best, "best_step": results.get("step"),
                              **{k: results[k] for k in ("train_audio_seconds", "train_seconds", "padding_fraction",
                                                         "skipped_clips", "skipped_updates") if k in results}})


def logger_resume(logger: dict, run_dir: Path, resuming: bool) -> dict:
    """What a logger needs to go on where a resumed run (a requeued job, `ckpt_path=last`) stopped.

    W&B: the run id kept in the run directory (`wandb_id`, made by rank 0 on the first start), so that
    the resumed run continues the same W&B run. CSV: Lightning's writer deletes a `metrics.csv` it finds;
    a resumed run keeps it as `metrics.<n>.csv` and starts a new one."""
    target = str(logger.get("_target_", ""))
    if target.endswith("CSVLogger"):
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        metrics = Path(logger["save_dir"]) / logger.get("name", "") / str(logger.get("version", "")) / "metrics.csv"
        if resuming and rank_zero_only.rank == 0 and metrics.is_file():
            n = 1 + sum(1 for _ in metrics.parent.glob("metrics.*.csv"))
            metrics.rename(metrics.with_name(f"metrics.{n}.csv"))
        return {}
    if not target.endswith("WandbLogger") or logger.get("id"):
        return {}
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    id_file = run_dir / "wandb_id"
    if not id_file.is_file():
        if rank_zero_only.rank != 0:  # only rank 0 logs; it writes the id
            return {}
        import uuid

        id_file.write_text(uuid.uuid4().hex[:12])  # W&B ids: letters and digits
    return {"id": id_file.read_text().strip(), "resume": "allow"}


class PredictionsTable(L.Callback):
    """After each evaluation, a W&B table (`val/predictions`) of a fixed sample of dev clips (`clips`,
    drawn once with `seed`): the clip's audio, its reference, the model's greedy hypothesis and its CER,
    so that a dashboard shows the transcripts improving evaluation by evaluation. Runs on rank 0 only
    and only with a W&B logger; `seconds` is its wall time per evaluation. With training augmentation
    (conf/augment/) one more row: the first clip as the augmentation perturbs it (`augment` says how), to
    hear what training hears and see what the model makes of it."""

    def __init__(self, clips: int, seed: int):
        self.clips, self.seed = clips, seed
        self.sample: list[dict] | None = None
        self.seconds: list[float] = []

    def _draw(self, datamodule) -> list[dict]:
        dev = datamodule.load("dev")
        rows = np.random.default_rng(self.seed).choice(len(dev), size=min(self.clips, len(dev)), replace=False)
        dataset = UtteranceDataset(dev, datamodule.vocab)
        sample = []
        for i in sorted(int(r) for r in rows):
            item = dataset[i]
            if "dropped" not in item:
                item["raw"] = audio.load(dev[i].path)
                sample.append(item)
        augment = getattr(datamodule, "augment", None)
        if sample and augment is not None and augment.active:
            i = int(min(rows))
            item = UtteranceDataset(dev, datamodule.vocab, augment).item(i, augment.choose(0, i, force=True))
            if "dropped" not in item:
                item["raw"] = item["audio"] / max(1e-6, float(np.abs(item["audio"]).max()))  # normalised: peaks > 1
                sample.append(item)
        return sample

    def on_validation_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.loggers import WandbLogger

        logger = next((x for x in trainer.loggers if isinstance(x, WandbLogger)), None)
        if trainer.sanity_checking or logger is None or not trainer.is_global_zero:
            return
        import wandb

        started = time.perf_counter()
        if self.sample is None:
            self.sample = self._draw(trainer.datamodule)
        if not self.sample:
            return
        batch = collate(self.sample, hop=pl_module.geometry.hop)
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            hypotheses = pl_module.decode(batch).hypotheses  # as validation decodes
        pl_module.train(was_training)
        augmented = any("augment" in item for item in self.sample)  # the column only where augmentation runs
        table = wandb.Table(columns=["id", *(["augment"] if augmented else []), "audio", "reference", "hypothesis",
                                     "cer"])
        for item, hypothesis in zip(self.sample, hypotheses):
            cer = utterance_cer(item["text"], hypothesis)
            table.add_data(item["id"], *([item.get("augment", "none")] if augmented else []),
                           wandb.Audio(item["raw"], sample_rate=audio.SAMPLE_RATE), item["text"], hypothesis, cer)
        logger.experiment.log({"val/predictions": table, "trainer/global_step": trainer.global_step})
        self.seconds.append(time.perf_counter() - started)
        log.info("predictions table of %d dev clips logged in %.2f s", len(self.sample), self.seconds[-1])


def log_evaluation(cfg: DictConfig, metrics: dict, worst: list[dict], train_run: Path | None,
                   train_group: str | None) -> None:
    """evaluate.py's W&B run: job type eval, in the group of the training run it evaluates (`train_group`,
    logger.group of that run's config.yaml), with the split's figures as summary and three tables: the decoders
    side by side (greedy and the chosen one), the figures per language tag, and `worst`, the utterances of
    highest CER with their audio."""
    import wandb

    logger = cfg.logger
    init = wandb_init(logger, job_context(), "eval")
    group = logger.group or train_group or init.get("group")
    config = {**OmegaConf.to_container(cfg, resolve=True), "train_run": str(train_run) if train_run else None}
    run = wandb.init(project=logger.project, entity=logger.entity, dir=logger.save_dir,
                     mode="offline" if logger.offline else None, name=init.get("name") or f"{cfg.split} {cfg.decoder}",
                     group=group, job_type=init["job_type"], tags=init["tags"], config=config)
    split, rates = cfg.split, ("wer", "cer", "mer")
    figures = {f"{split}/{k}": metrics[k] for k in rates if k in metrics}
    figures |= {f"{split}/greedy/{k}": v for k, v in metrics.get("greedy", {}).items() if k in rates}
    for tag, by_tag in metrics.get("by_language", {}).items():
        figures |= {f"{split}/{tag}/{k}": v for k, v in by_tag.items() if k in rates}
    shown = [k for k in rates if k in metrics]
    decoders = wandb.Table(columns=["decoder", *shown])
    if "greedy" in metrics:
        decoders.add_data("greedy", *(metrics["greedy"][k] for k in shown))
    decoders.add_data(cfg.decoder, *(metrics[k] for k in shown))
    tables = {f"{split}/decoders": decoders}
    if metrics.get("by_language"):
        languages = wandb.Table(columns=["language", "utterances", *shown])
        for tag, by_tag in metrics["by_language"].items():
            languages.add_data(tag, by_tag["n_utterances"], *(by_tag.get(k) for k in shown))
        tables[f"{split}/languages"] = languages
    columns = ["id", "language", "audio", "reference", "hypothesis", *(["greedy_hypothesis"] if "greedy" in metrics
                                                                      else []), "cer"]
    table = wandb.Table(columns=columns)
    for row in worst:
        table.add_data(row["id"], row["language"], wandb.Audio(audio.load(row["path"]), sample_rate=audio.SAMPLE_RATE),
                       row["reference"], row["hypothesis"], *([row["greedy_hypothesis"]] if "greedy" in metrics
                                                                else []), row["cer"])
    tables[f"{split}/worst"] = table
    run.log({**figures, **tables})
    run.summary.update({**figures, "n_utterances": metrics["n_utterances"]})
    run.finish()
