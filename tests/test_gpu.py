"""On a GPU (skipped without CUDA): syncs per update, the demo in bf16 and fp16, the worst-batch probe's
out-of-memory message, evaluate.py on the GPU, the cards' memory table. Their first run (one H200, main at
8f8c191) is in docs/gpu.md. GPU machines have no espeak-ng: the corpus is then tones numpy makes."""

import json
import os
import shutil
import subprocess
import sys

import lightning as L
import pytest
import torch

import asr
from asr.model import speed
from tests.conftest import assembled

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory):
    """The espeak-ng corpus of the CPU tests where espeak-ng is installed, else 12 train clips of tones."""
    if shutil.which("espeak-ng"):
        return request.getfixturevalue("cv_corpus")
    from benchmarks.gpu import synthetic_corpus

    return synthetic_corpus(tmp_path_factory.mktemp("tones") / "pt", clips=12, low=1.0, high=3.0)


class CountSyncs(L.Callback):
    """Synchronising CUDA calls (`asr.model.speed.SyncSites`) from one batch end to the next, and their sites."""

    def on_train_start(self, trainer, pl_module):
        self.per_update, self._seen = {}, 0
        self.sites = speed.SyncSites().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_update[trainer.global_step] = self.sites.count - self._seen
        self._seen = self.sites.count

    def on_train_end(self, trainer, pl_module):
        self.sites.__exit__(None, None, None)


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_an_update_does_not_synchronise_between_log_steps(corpus, tmp_path, precision):
    run = assembled(f"data.root={corpus}", "data.num_workers=1", "data.max_batch_seconds=8", f"run_dir={tmp_path}",
                    "trainer.log_every_n_steps=4", f"precision={precision}", "~callbacks.requeue",
                    callbacks=[count := CountSyncs()], max_steps=8, limit_val_batches=0, accelerator="gpu")
    run.fit()
    assert all(not count.per_update[step] for step in (2, 3, 4, 6, 7, 8)), (count.per_update,
                                                                            count.sites.sites.most_common())


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
    """Every experiment's card batch measured: a peak in GB, and "fits" exactly when the peak leaves the 10%
    margin free. (On the first H200 run every card fitted in fp16, 12.6-53.8 GB.)"""
    from asr.tools.memory import capacity_gb

    result = subprocess.run([sys.executable, "-m", "asr.tools.memory", "cards=true"], cwd=asr.REPO_DIR,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    experiments = sorted(p.stem for p in (asr.REPO_DIR / "conf" / "experiment").glob("*.yaml"))
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()[:1] in
            [[e] for e in experiments]}
    assert sorted(rows) == experiments
    allowed = 0.9 * capacity_gb(torch.device("cuda"))
    for name, row in rows.items():  # experiment precision clips x seconds s peak fits ...
        peak, fits = row[6], row[7]
        if peak == "OOM":
            assert fits == "no", name
            continue
        assert 1 < float(peak) and (fits == "yes") == (float(peak) <= allowed), name
