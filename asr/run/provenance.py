"""What a run is: the settings that define it, the config a resumed run starts from (`resumed`), and the data
an evaluation of its checkpoint scores (`the_runs_data`). train.py and evaluate.py read a run's record here.
"""

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from asr import SetupError
from asr.core import checkpoints
from asr.core.config import command_line_changes, expand_path

log = logging.getLogger(__name__)

# The settings that say what a run is (dotted key prefixes), and what each is part of. A resumed run keeps
# what its checkpoint means (`CHECKPOINT_MEANS`: `resumed` refuses a change); evaluate.py scores the data of
# the run (every data key here: `the_runs_data`) unless the command line says otherwise.
DEFINES = {"model.arch": "architecture", "model.pretrained": "architecture", "model.finetune": "what trains",
           "data.language": "language",
           "data.lang": "language", "data.corpus": "corpus", "data.root": "data root",
           "data.train_split": "vocabulary", "data.train_extra": "vocabulary", "data.columns": "vocabulary",
           "data.dev_split": "splits", "data.test_split": "splits", "data.dev_speakers": "splits",
           "data.min_seconds": "clips kept", "data.max_seconds": "clips kept",
           "data.corpora": "corpus"}  # several corpora: their readers, roots, splits and weights
# Classes a config.yaml names (`_target_`) that have moved since it was written: a run recorded before a move
# resumes with the class where it is now.
MOVED = {f"asr.{old}": new for old, new in {
    "data.SpeechDataModule": "asr.data.module.SpeechDataModule", "model.CTCModel": "asr.model.module.CTCModel",
    "speed.SpeedMonitor": "asr.model.speed.SpeedMonitor", "cluster.Requeue": "asr.run.cluster.Requeue",
    "console.Progress": "asr.run.console.Progress", "plateau.PlateauWatch": "asr.run.plateau.PlateauWatch",
    "tracking.PredictionsTable": "asr.run.tracking.PredictionsTable",
    "memory.WorstBatchFirst": "asr.run.warmup.WorstBatchFirst"}.items()}
CHECKPOINT_MEANS = ("architecture", "what trains", "language", "corpus", "data root", "vocabulary")
MEANING = {key: what for key, what in DEFINES.items() if what in CHECKPOINT_MEANS}
RUN_DATA = tuple(key.removeprefix("data.") for key in DEFINES if key.startswith("data."))


def _set(node: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _remove(node: dict, key: str) -> None:
    """Removes a dotted key, and a branch it leaves empty."""
    first, _, rest = key.partition(".")
    if not isinstance(node, dict) or first not in node:
        return
    if rest:
        _remove(node[first], rest)
        if node[first] == {}:
            del node[first]
    else:
        del node[first]


def _reroot(node, old: str, new: str):
    """Paths inside the run directory `old` moved to `new` (checkpoint and logger directories)."""
    if isinstance(node, dict):
        return {k: _reroot(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_reroot(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old + "/")):
        return new + node[len(old):]
    return node


def resumed(cfg: DictConfig) -> DictConfig:
    """The config a run starts from. One that resumes from a checkpoint of a run directory (ckpt_path=last, a
    run directory or one of its checkpoints, a requeued or restarted job) starts from that run's config.yaml,
    the resolved config it was built from. What the command line changes (`command_line_changes`) applies on
    top and is logged; a change of what the checkpoint means (`MEANING`: architecture, vocabulary, language,
    corpus, data root) is refused, naming each key and both values. A setting the code gained since the run
    started takes today's default (`_settings_added_since`), and the log says which. The checkpoint is
    checked here, before any data is read. A run that does not resume keeps `cfg`."""
    run_dir = Path(expand_path(cfg.run_dir)).absolute()
    ckpt = checkpoints.resume_checkpoint(expand_path(cfg.ckpt_path), run_dir / "checkpoints")
    ckpt = ckpt and checkpoints.verified(ckpt)  # readable, with this project's keys; else the others named
    source = ckpt and checkpoints.run_dir_of(ckpt)
    if not source or not (source / "config.yaml").is_file():
        if ckpt:
            log.warning("resuming from %s, which has no config.yaml beside its checkpoints/: the config as composed",
                        ckpt)
        return cfg
    record = _moved(OmegaConf.to_container(OmegaConf.load(source / "config.yaml")))
    changes, removed = command_line_changes(cfg, "train")
    changes = {k: v for k, v in changes.items() if k not in ("run_dir", "ckpt_path")}
    held = OmegaConf.create(record)  # the run's settings, read by dotted key
    flat = {k: OmegaConf.select(held, k, default=None) for k in changes}
    refused = [f"{k} ({what}): {flat[k]!r} in the run, {v!r} on the command line"
               for k, v in changes.items() for prefix, what in MEANING.items()
               if (k == prefix or k.startswith(prefix + ".")) and v != flat[k]]
    if refused:
        raise SetupError(f"resuming {source} cannot change what its checkpoint means: {'; '.join(refused)}. "
                         f"Leave these out to resume it, or start a new run (another hydra.run.dir, no ckpt_path).")
    absent = object()
    removed = {k for k in removed if OmegaConf.select(held, k, default=absent) is not absent}
    for key in removed:  # what the command line removes that the run had (logger=none again removes nothing)
        _remove(record, key)
    for key, value in changes.items():
        _set(record, key, value)
    added = _settings_added_since(record, cfg)
    for key, value in added.items():
        _set(record, key, value)
    if added:
        log.warning("%s's config.yaml predates %s: today's default%s", source,
                    ", ".join(f"{k}={v!r}" for k, v in added.items()), "s" if len(added) > 1 else "")
    recorded = record.get("run_dir")  # where the run was when it wrote config.yaml: a copied or moved run's
    if recorded and recorded != str(run_dir):  # checkpoints and logs go where it is now
        record = _reroot(record, recorded, str(run_dir))
    record.update(run_dir=str(run_dir), ckpt_path=ckpt)
    shown = [f"{k}: {flat[k]!r} -> {v!r}" for k, v in changes.items() if v != flat[k]] + [f"{k} removed" for k in
                                                                                          sorted(removed)]
    log.warning("resuming %s from %s with its config.yaml%s", source, ckpt,
                f"; from the command line: {', '.join(shown)}" if shown else " (the command line changes nothing)")
    return OmegaConf.create(record)



def _moved(node):
    """A config with each `_target_` that names a class in `MOVED` naming it where it is now."""
    if isinstance(node, dict):
        return {k: MOVED.get(v, v) if k == "_target_" else _moved(v) for k, v in node.items()}
    return [_moved(v) for v in node] if isinstance(node, list) else node


def _settings_added_since(record: dict, cfg: DictConfig) -> dict:
    """{dotted key: value in `cfg`} of the settings `cfg` has and the run's `record` lacks, where the record
    has the node they sit in: settings added to the code since the run started. A whole node the record lacks
    (a callback the run removed, `~callbacks.checkpoint`) is not one of them."""
    added = {}

    def walk(node: DictConfig, kept: dict, prefix: str) -> None:
        for key in node:
            path = f"{prefix}{key}"
            value = node._get_node(key)
            if key not in kept:
                if not isinstance(value, DictConfig):
                    added[path] = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, path)}))["v"]
            elif isinstance(value, DictConfig) and isinstance(kept[key], dict):
                walk(value, kept[key], f"{path}.")

    walk(cfg, record, "")
    return added


def the_runs_data(cfg: DictConfig, changes: dict, ckpt: str) -> tuple[DictConfig, dict]:
    """`cfg` with the data the checkpoint's run was trained on (`RUN_DATA` from the config.yaml beside its
    checkpoints/), except what the command line changed (`changes`), and what the scoring needs to know of
    that run: {run, group (its W&B group), other (key -> [trained on, scored]: other data, said so)}."""
    run = checkpoints.run_dir_of(ckpt)
    record = run / "config.yaml" if run else None
    if record is None or not record.is_file():  # the data settings the checkpoint itself carries, if it does
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
        if "datamodule_hyper_parameters" not in checkpoint:
            language = checkpoint["hyper_parameters"]["language"]
            log.warning("%s has no config.yaml beside its checkpoints/ and records no data: scoring the data as "
                        "configured (lang=%s, data.root=%s)%s", ckpt, cfg.data.lang, cfg.data.root,
                        f"; the model was trained with the text rules of {language!r}"
                        if language != cfg.data.language else "")
            return cfg, {"run": run, "group": None, "other": {}}
        log.info("%s has no config.yaml beside its checkpoints/: scoring the data it records", ckpt)
        trained = {"data": dict(checkpoint["datamodule_hyper_parameters"])}
    else:
        trained = OmegaConf.to_container(OmegaConf.load(record))
    settings = OmegaConf.to_container(cfg)
    for key in RUN_DATA:
        if f"data.{key}" not in changes and not any(k.startswith(f"data.{key}.") for k in changes):
            settings["data"][key] = trained["data"].get(key)
    other = {k: [trained["data"].get(k), settings["data"][k]] for k in RUN_DATA
             if settings["data"][k] != trained["data"].get(k)}
    if other:
        log.warning("scoring other data than %s was trained on: %s", run,
                    ", ".join(f"data.{k}={new!r} (trained on {old!r})" for k, (old, new) in other.items()))
    group = (trained.get("logger") or {}).get("group")
    return OmegaConf.create(settings), {"run": run, "group": group, "other": other}
