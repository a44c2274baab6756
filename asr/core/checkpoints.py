"""Checkpoints: written atomically, and the one a run resumes from."""

import json
import logging
import os
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from asr import SetupError
from asr.core import outputs

log = logging.getLogger(__name__)
REQUEUE_CHECKPOINT = "requeue.ckpt"  # in the checkpoint directory; a run that finds it resumes from it


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in its own directory and renames it into place: whatever
    kills the process, the path holds the previous checkpoint or the new one, never a truncated file.
    (Lightning's writer goes through a temporary file in $TMPDIR; where that is another filesystem, a
    node-local /tmp beside a shared run directory, its final move is a copy that can be cut short.)"""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        with outputs.atomic(path, "wb") as f:
            torch.save(checkpoint, f)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash of the node
        finally:
            os.close(directory)


# What every checkpoint of this project holds (CTCModel.on_save_checkpoint, Lightning), beyond torch's own
# format: a model rebuilds from them alone.
KEYS = ("state_dict", "hyper_parameters", "wav2vec2_config")


def problem(path: str | Path) -> str | None:
    """Why `path` is not a checkpoint this project can load, or None. Checks that it is a zip archive with
    its central directory (a file cut short by a full disk or a lost node has none), that torch opens it,
    and that it holds `KEYS`. The tensors are mapped, not read (`mmap`): a check costs milliseconds at
    any size."""
    path = Path(path)
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        what = "empty" if size == 0 else f"{size:,} bytes but not the zip archive torch writes"
        return (f"{path} is not a readable checkpoint ({what}: cut short by a full disk or a lost node, "
                f"or not a checkpoint)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 (torch raises RuntimeError, pickle and zip errors alike)
        return f"{path} is not a readable checkpoint (torch: {str(error).strip().splitlines()[0]})"
    missing = [key for key in KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else list(KEYS)
    if missing:
        return f"{path} is not a checkpoint of train.py (it lacks {', '.join(missing)})"
    return None


def verified(path: str, setting: str = "ckpt_path") -> str:
    """`path` when it is a checkpoint this project can load (`problem`); else SetupError saying why, naming the
    readable checkpoints beside it and the override (`setting`=...) that picks one."""
    why = problem(path)
    if why is None:
        return path
    folder = Path(path).absolute().parent
    others = sorted((p for p in folder.glob("*.ckpt") if p.name != Path(path).name and problem(p) is None),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    if others:
        listed = ", ".join(f"{p.name} (update {_update(p)})" for p in others)
        why += f". Readable beside it: {listed}; the newest: {setting}={others[0]}"
    else:
        why += f". No readable checkpoint beside it: give another ({setting}=<a .ckpt>)"
    raise SetupError(why)


def is_average(path: str | Path) -> bool:
    """Whether `path` is a checkpoint `asr.run.average` wrote: it records its sources under `averaged` (the
    tensors are mapped, not read)."""
    return problem(path) is None and "averaged" in torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _update(path: Path) -> int:
    """The optimizer update a checkpoint was saved at (its tensors are not read)."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run directory a checkpoint was written into (`<run>/checkpoints/<name>.ckpt`), or None."""
    parent = Path(checkpoint).absolute().parent
    return parent.parent if parent.name == "checkpoints" else None


def _holds(directory: Path) -> str:
    """What a directory holds, for a message: its first entries, or that it is empty or absent."""
    if not directory.is_dir():
        return f"{directory} does not exist"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"{directory} holds {shown}" if names else f"{directory} is empty"


def _directory(path: Path) -> Path:
    """A run directory's checkpoint directory (a checkpoint directory given itself stays as it is)."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() or path.name != "checkpoints" else path


def last_checkpoint(checkpoint_dir: Path, asked: str) -> Path:
    """The state a run stopped in: the newer of `REQUEUE_CHECKPOINT` (saved when it was signalled) and
    last.ckpt. SetupError naming the directory and what it holds when there is neither."""
    found = [p for p in (checkpoint_dir / REQUEUE_CHECKPOINT, checkpoint_dir / "last.ckpt") if p.is_file()]
    if not found:
        run = checkpoint_dir.parent if checkpoint_dir.name == "checkpoints" else checkpoint_dir
        held = _holds(checkpoint_dir) if checkpoint_dir.is_dir() else _holds(run)
        raise SetupError(f"{asked}: no checkpoint in {checkpoint_dir} ({held}); train.py writes "
                         f"last.ckpt there at each evaluation. Give hydra.run.dir=<the run> or ckpt_path=<a .ckpt>.")
    return max(found, key=lambda p: p.stat().st_mtime)


def resume_checkpoint(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    """The checkpoint a run starts from, checked before any data is read (SetupError otherwise):
    `ckpt_path` when given (`last`: the run directory's last state, `last_checkpoint`; a run directory:
    its last state; else a checkpoint file that must exist); else the requeue checkpoint a signalled run
    left (`Requeue`); else, in a job SLURM restarted without one (a node failed), the last checkpoint."""
    if ckpt_path == "last":
        return str(last_checkpoint(checkpoint_dir, "ckpt_path=last"))
    if ckpt_path:
        path = Path(ckpt_path)
        if path.is_dir():
            return str(last_checkpoint(_directory(path), f"ckpt_path={ckpt_path}"))
        if not path.is_file():
            raise SetupError(f"ckpt_path={ckpt_path} does not exist: give a checkpoint (<run>/checkpoints/*.ckpt), "
                             f"a run directory, or last (with hydra.run.dir=<the run>).")
        if is_average(path):
            raise SetupError(f"ckpt_path={ckpt_path} is an average of checkpoints (python -m asr.tools.average): "
                             f"weights without an optimizer or a position, not a state to resume. evaluate.py, "
                             f"transcribe.py and python -m asr.tools.export take it.")
        return ckpt_path
    requeue = checkpoint_dir / REQUEUE_CHECKPOINT
    if requeue.is_file():
        log.warning("resuming from %s (saved when the run was signalled)", requeue)
        return str(requeue)
    last = checkpoint_dir / "last.ckpt"
    if int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0) > 0 and last.is_file():
        log.warning("SLURM restarted this job: resuming from %s", last)
        return str(last)
    return None


def best_checkpoint(ckpt_path: str) -> str:
    """The checkpoint evaluate.py scores: a file as given; of a run directory (or its checkpoints/), the best
    by dev CER (results.json's best_checkpoint, else the best-*.ckpt), else its last state. SetupError naming
    what is there otherwise."""
    path = Path(ckpt_path)
    if path.is_file():
        return verified(ckpt_path)
    if not path.is_dir():
        raise SetupError(f"ckpt_path={ckpt_path} does not exist: give a checkpoint (<run>/checkpoints/*.ckpt) "
                         f"or a run directory.")
    checkpoint_dir = _directory(path)
    results = checkpoint_dir.parent / "results.json"
    if results.is_file():
        best = json.loads(results.read_text()).get("best_checkpoint")
        # recorded where the run was written: a run copied or moved elsewhere holds it under its own checkpoints/
        if best and (here := checkpoint_dir / Path(best).name).is_file():
            return verified(str(here))
    best = sorted(checkpoint_dir.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return verified(str(best[-1]) if best else str(last_checkpoint(checkpoint_dir, f"ckpt_path={ckpt_path}")))
