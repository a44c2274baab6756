"""Checkpoints: written atomically, and the one a run resumes from."""

import signal
import subprocess
import sys
import time

import torch

import asr
from asr.core import checkpoints

PY = sys.executable
SAVE_TWICE = """
import sys, time, torch
from asr.core.checkpoints import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"version": 1}, path)
print("first saved", flush=True)
io.save_checkpoint({"version": 2, "weights": torch.ones(200_000_000)}, path)  # 800 MB: killed while writing
"""


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    child = subprocess.Popen([PY, "-c", SAVE_TWICE, str(path)], cwd=asr.REPO_DIR, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "first saved"
    deadline = time.time() + 60
    while not any(p.name.endswith(".partial") and p.stat().st_size > 0 for p in tmp_path.iterdir()):
        assert time.time() < deadline and child.poll() is None, "the second save never started"
        time.sleep(0.001)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert torch.load(path, weights_only=True) == {"version": 1}


def test_a_restarted_job_resumes_from_its_requeue_or_last_checkpoint(monkeypatch, tmp_path):
    """No ckpt_path: the requeue checkpoint a signalled run left; else, in a job SLURM restarted (a node
    failed), last.ckpt; else nothing (a new run in an old directory starts afresh)."""
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert checkpoints.resume_checkpoint(None, folder) is None
    (folder / "last.ckpt").write_bytes(b"")
    assert checkpoints.resume_checkpoint(None, folder) is None  # a new run in an old directory
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM restarted the job without a requeue checkpoint
    assert checkpoints.resume_checkpoint(None, folder) == str(folder / "last.ckpt")
    (folder / checkpoints.REQUEUE_CHECKPOINT).write_bytes(b"")
    assert checkpoints.resume_checkpoint(None, folder) == str(folder / checkpoints.REQUEUE_CHECKPOINT)
    (folder / "x.ckpt").write_bytes(b"")
    assert checkpoints.resume_checkpoint(str(folder / "x.ckpt"), folder) == str(folder / "x.ckpt")  # as given
