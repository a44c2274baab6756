"""On a GPU (skipped without CUDA): syncs per update, the demo in bf16 and fp16, the worst-batch probe's
out-of-memory message, evaluate.py on the GPU. Their first run (one H200, main at 8f8c191) is in
docs/gpu.md."""

import json
import os
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch

import asr
from tests.conftest import assembled

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class CountSyncs(L.Callback):
    """CUDA sync warnings (torch.cuda.set_sync_debug_mode("warn")) from one batch end to the next."""

    def __init__(self):
        self.per_update, self._caught = {}, None

    def on_train_start(self, trainer, pl_module):
        self._context = warnings.catch_warnings(record=True)
        self._caught = self._context.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_update[trainer.global_step] = [str(w.message) for w in self._caught if "synchroniz" in str(w.message)]
        self._caught.clear()

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode(0)
        self._context.__exit__(None, None, None)


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_an_update_does_not_synchronise_between_log_steps(cv_corpus, tmp_path, precision):
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=1", "data.max_batch_seconds=8", f"run_dir={tmp_path}",
                    "trainer.log_every_n_steps=4", f"precision={precision}", "~callbacks.requeue",
                    callbacks=[count := CountSyncs()], max_steps=8, limit_val_batches=0, accelerator="gpu")
    run.fit()
    assert all(not count.per_update[step] for step in (2, 3, 4, 6, 7, 8)), count.per_update


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_the_demo_trains_on_the_gpu(tmp_path, precision):
    result = subprocess.run([sys.executable, "train.py", f"precision={precision}", "trainer.max_steps=200",
                             "trainer.val_check_interval=100", "logger=csv", f"hydra.run.dir={tmp_path}"],
                            cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["evaluations"]
    assert results["skipped_updates"] < 10 and rows[-1]["val_loss"] < rows[0]["val_loss"]


def test_the_worst_batch_probe_stops_an_oversized_batch_at_once(tmp_path):
    """A batch budget far too large for the GPU: the probe's message, before the first update."""
    result = subprocess.run([sys.executable, "train.py", "model=xlsr_1b", "model.pretrained=null",
                             "data.max_batch_seconds=100000", "data.max_batch_size=null", "trainer.max_steps=1",
                             "logger=none", f"hydra.run.dir={tmp_path}"],
                            cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 1
    assert "out of memory on the epoch's worst batch" in result.stderr and "data.max_batch_seconds" in result.stderr


def test_evaluate_on_the_gpu_agrees_with_the_cpu(tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "train.py", "trainer.max_steps=100", "logger=none", f"hydra.run.dir={run}"],
                   cwd=asr.REPO_DIR, check=True, capture_output=True, timeout=900)
    ckpt = next((run / "checkpoints").glob("best-*.ckpt"))
    out = {}
    for device in ("cpu", "cuda"):
        subprocess.run([sys.executable, "evaluate.py", f"ckpt_path={ckpt}", f"device={device}", "split=dev",
                        f"hydra.run.dir={tmp_path / device}"], cwd=asr.REPO_DIR, check=True, capture_output=True,
                       timeout=900)
        out[device] = json.loads((tmp_path / device / "metrics.json").read_text())
    assert out["cuda"]["cer"] == pytest.approx(out["cpu"]["cer"], abs=0.01)


def test_the_cards_memory_table_runs_on_the_gpu():
    result = subprocess.run([sys.executable, "-m", "asr.memory", "cards=true"], cwd=asr.REPO_DIR, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sum(line.startswith(("ascend", "cv", "zeroth")) for line in result.stdout.splitlines()) == 5
