"""Who writes a run directory, and how: one process per run directory, and files replaced whole.

One process per run directory: a second train.py on a directory a live run writes into stops at once,
naming the host and process that hold it.

The lock is the kernel's: a POSIX record lock (`fcntl.lockf`) on `<run>/.lock`. It dies with its process,
so a run killed by SIGKILL or an OOM never blocks its own resume or requeue, and unlike `flock` it is not
inherited by the loader workers the process forks (they would hold it for seconds after it died). Rank 0
holds it for the whole run; the other ranks of a run are started by it (Lightning's launcher) or beside it
(srun, torchrun) and do not take it. On NFS it is the server's lock, so two nodes are kept apart too; a
node that died holds it until the server's lease ends (NFS v4: about 90 s). Where the file system has no
locks, the run warns and goes on without one.
"""

import errno
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from asr import SetupError, slurm_job_id
from asr.core import outputs

log = logging.getLogger(__name__)
LOCK = ".lock"  # in the run directory; it stays there, the lock itself ends with its process
_held: dict[Path, int] = {}  # run directory -> descriptor: this process holds its lock


def hold(run_dir: str | Path) -> None:
    """Take the run directory's lock for this process (rank 0; others return), before anything is written
    into it, then remove the temporary files a killed writer left. SetupError naming the holder when another
    live process has it. Taking it again in the process that holds it (a Hydra multirun's jobs, tests) is a
    no-op."""
    if rank_zero_only.rank != 0 or int(os.environ.get("NODE_RANK", 0) or 0) > 0:  # Lightning's own multi-node
        return
    run_dir = Path(run_dir).absolute()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's line stays
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EAGAIN):  # no locks on this file system (ENOLCK, ENOSYS...)
            os.close(fd)
            log.warning("%s: this file system has no locks (%s): nothing keeps a second process out of the run "
                        "directory", run_dir, os.strerror(error.errno))
            return
        holder = os.pread(fd, 1024, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise SetupError(f"{run_dir} is in use by {holder}: one process trains in a run directory at a time. "
                         f"Wait for it to end or stop it (a killed process frees it at once), or give another "
                         f"hydra.run.dir.") from None
    job = slurm_job_id()
    os.ftruncate(fd, 0)
    os.pwrite(fd,
              f"process {os.getpid()} on {socket.gethostname()}{f' (SLURM job {job})' if job else ''}\n".encode(), 0)
    _held[run_dir] = fd
    for partial in [*run_dir.glob(".*.partial"), *run_dir.glob("checkpoints/.*.partial")]:
        # what a killed writer left (`asr.core.outputs.partial_path`): a file, or the directory of model/'s export
        shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)


def release() -> None:
    """Give up the locks this process holds (its run ended); their files stay."""
    while _held:
        _, fd = _held.popitem()
        fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)


def write(path: str | Path, text: str) -> None:
    """`text` into `path` through a temporary file beside it and a rename (`asr.core.outputs.write`): a reader (or
    a process killed while it writes) sees the previous content or the new, never part of it."""
    outputs.write(path, text)
