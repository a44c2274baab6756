"""Checkpoints: written atomically, and the one a run resumes from."""

import logging
import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

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
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash of the node
        finally:
            os.close(directory)


def resume_checkpoint(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    """The checkpoint a run starts from: `ckpt_path` when given; else the requeue checkpoint a signalled
    run left (`Requeue`); else, in a job SLURM restarted without one (a node failed), the last checkpoint."""
    if ckpt_path:
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
