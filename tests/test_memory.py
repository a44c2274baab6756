"""Worst batch first: the epoch's largest batches run before the first update and leave no trace."""

import numpy as np
import pytest
import torch

from asr import SetupError
from asr.memory import WorstBatchFirst, worst_batches
from tests.conftest import SHRUNK, assembled


def _train(cv_corpus, tmp_path, probe):
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=0", "data.max_batch_seconds=8", f"run_dir={tmp_path}",
                    "model.config.mask_time_prob=0.3", "model.config.mask_time_length=2", *SHRUNK,
                    "~callbacks.worst_batch_first", callbacks=[probe], max_steps=3, limit_val_batches=0)
    run.fit()
    return run.model, run.data


def test_the_worst_batches_run_first_and_change_nothing(cv_corpus, tmp_path):
    """With SpecAugment drawing random masks: the same weights after 3 updates with the probe as without it
    (random states, gradients and the loader put back), and the probe ran the epoch's batch of most padded
    audio."""
    probe = WorstBatchFirst(when=True)
    probed, data = _train(cv_corpus, tmp_path / "a", probe)
    plain, _ = _train(cv_corpus, tmp_path / "b", WorstBatchFirst(when=False))
    for (name, a), b in zip(probed.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    loader = data.train_dataloader()
    seconds = loader.dataset.clips.seconds
    batches = loader.batch_sampler.batches(0)
    padded = max(len(b) * seconds[b].max() for b in batches)
    assert probe.probed and probe.probed[0]["padded_seconds"] == pytest.approx(padded, abs=0.1)
    assert all(p["padded_seconds"] <= 8 for p in probe.probed)


def test_worst_batches_are_the_most_padded_and_the_most_attention():
    class Sampler:
        epoch = 0

        def batches(self, epoch):
            return [[0, 1, 2, 3], [4], [5, 6]]

    seconds = np.array([2.0, 2.0, 2.0, 2.0, 9.0, 3.0, 4.0])  # padded 8, 9, 8; attention 16, 81, 32
    assert worst_batches(Sampler(), seconds) == [[4]]
    seconds[4] = 3.0  # padded 8, 3, 8 (the first wins); attention 16, 9, 32
    assert worst_batches(Sampler(), seconds) == [[0, 1, 2, 3], [5, 6]]


def test_a_probe_setting_that_is_not_one_is_named():
    with pytest.raises(SetupError, match="worst_batch_first.when='yes'"):
        WorstBatchFirst(when="yes")


def test_the_memory_planner_finds_the_largest_budget_that_fits():
    """On the CPU (peak resident memory) with the tiny model: budgets double from one longest clip until
    data.max_batch_size binds; with 99% kept free not even one clip fits, and it says so."""
    import subprocess
    import sys

    import asr

    command = [sys.executable, "-m", "asr.memory", "device=cpu", "data.max_seconds=2", "data.max_batch_size=8"]
    out = subprocess.run(command, cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.splitlines()
    rows = [line.split() for line in lines[lines.index(next(x for x in lines if "peak GB" in x)) + 1:-1]]
    assert [(r[0], r[1]) for r in rows] == [("2", "1"), ("4", "2"), ("8", "4"), ("16", "8")]
    peaks = [float(r[2]) for r in rows]
    assert peaks == sorted(peaks) and peaks[0] > 0
    assert lines[-1] == "largest that fits: data.max_batch_seconds=16"
    out = subprocess.run([*command, "margin=0.99"], cwd=asr.REPO_DIR, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.splitlines()[-1].startswith("not even one clip of data.max_seconds fits")
