"""Worst batch first, then every shape: the plan's shapes run before the first update and leave no trace."""

import numpy as np
import pytest
import torch

from asr import SetupError
from asr.data.batching import Planned
from asr.run.warmup import (
    WorstBatchFirst,
    fastest,
    keep_attention,
    shape_lengths,
    warmup_batch,
    warmup_order,
    worst_shapes,
)
from tests.conftest import SHRUNK, assembled


def _train(cv_corpus, tmp_path, probe):
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=0", "data.max_batch_seconds=8", f"run_dir={tmp_path}",
                    "model.config.mask_time_prob=0.3", "model.config.mask_time_length=2", *SHRUNK,
                    "~callbacks.worst_batch_first", callbacks=[probe], max_steps=3, limit_val_batches=1)
    run.fit()
    return run.model, run.data


def test_every_shape_runs_first_the_worst_first_and_changes_nothing(cv_corpus, tmp_path, caplog):
    """With SpecAugment drawing random masks: the same weights after 3 updates with the warm-up as without it
    (random states, gradients, module modes and the loader put back). It ran every training shape (forward
    and backward) and every dev shape, the most padded training shape first, and logged what it added."""
    probe = WorstBatchFirst(when=True, every_shape=True, choose_attention=True)
    with caplog.at_level("INFO", logger="asr.run.warmup"):
        probed, data = _train(cv_corpus, tmp_path / "a", probe)
    plain, _ = _train(cv_corpus, tmp_path / "b", WorstBatchFirst(when=False, every_shape=True, choose_attention=True))
    for (name, a), b in zip(probed.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    train_shapes = data.train_dataloader().batch_sampler.shapes
    dev_shapes = data.sampler("dev").shapes
    ran = [(p["split"], p["clips"], round(p["padded_seconds"], 1)) for p in probe.probed]
    assert sorted(ran) == sorted([("train", c, round(c * s / 16_000, 1)) for c, s in train_shapes]
                                 + [("dev", c, round(c * s / 16_000, 1)) for c, s in dev_shapes])
    assert probe.probed[0]["padded_seconds"] == pytest.approx(max(c * s for c, s in train_shapes) / 16_000, abs=0.1)
    assert all(p["padded_seconds"] <= 8 for p in probe.probed)
    assert probe.warmup["train_shapes"] == len(train_shapes) and probe.warmup["dev_shapes"] == len(dev_shapes)
    assert "attention" not in probe.warmup  # CUDA only
    assert probe.warmup["seconds"] >= sum(p["seconds"] for p in probe.probed) * 0.99
    assert any("warm-up before the first update" in r.message for r in caplog.records)


def test_only_the_worst_shapes_without_every_shape():
    shapes = [(8, 16_000), (1, 144_000), (4, 48_000), (2, 64_000)]  # padded 8, 9, 12, 8 s; attention 1x, 9x, 4.5x, 4x
    assert worst_shapes(shapes) == [(4, 48_000), (1, 144_000)]
    assert warmup_order(shapes, every_shape=False) == [(4, 48_000), (1, 144_000)]
    assert warmup_order(shapes, every_shape=True) == [(4, 48_000), (1, 144_000), (8, 16_000), (2, 64_000)]
    assert worst_shapes([(2, 32_000)]) == [(2, 32_000)] and worst_shapes([]) == []


def test_a_shapes_batch_has_a_real_batchs_lengths_and_the_commonest_shape_comes_first():
    class Sampler:
        epoch = 0

        def batches(self, epoch):
            return [Planned([0, 1], (2, 32_000)), Planned([2], (1, 48_000)), Planned([3, 4], (2, 32_000))]

    seconds = np.array([1.5, 2.0, 3.0, 0.5, 1.0])
    lengths = shape_lengths(Sampler(), seconds)
    assert list(lengths) == [(2, 32_000), (1, 48_000)]  # 2 batches of the first shape, 1 of the second
    assert lengths == {(2, 32_000): [24_000, 32_000], (1, 48_000): [48_000]}
    batch = warmup_batch([24_000, 32_000], 32_000, vocab_size=6, generator=torch.Generator().manual_seed(0))
    assert batch["audio"].shape == (2, 32_000) and batch["shape"] == (2, 32_000)
    assert not batch["audio"][0, 24_000:].any() and batch["audio"][0, :24_000].abs().sum() > 0
    assert batch["label_lengths"] == [22, 30]  # 15 characters per second
    assert (batch["labels"][0, 22:] == -100).all() and (batch["labels"][:, :22] < 5).all()  # never the blank


def test_the_fastest_attention_kernel_is_kept_and_the_slower_ones_switched_off():
    """The choice from measured times (a scripted timer here: CPUs have no cuDNN or flash attention); a kernel
    that cannot run on the inputs (flash: no padding mask) is neither chosen nor switched off."""
    def unavailable():
        raise RuntimeError("No available kernel. Aborting execution.")

    scripted = {"cudnn": 0.004, "efficient": 0.003}
    runs = {"cudnn": lambda: "cudnn", "flash": unavailable, "efficient": lambda: "efficient"}
    choice, times = fastest(runs, timer=lambda run: scripted[run()])
    assert choice == "efficient" and times == {"cudnn": 0.004, "flash": None, "efficient": 0.003}
    flags = {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in ("cudnn", "flash", "mem_efficient")}
    try:
        assert keep_attention(choice, times) == ["cudnn"]
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert keep_attention(None, {"cudnn": None}) == []
    finally:
        for name, on in flags.items():
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)
    assert fastest({"flash": unavailable}, timer=lambda run: run()) == (None, {"flash": None})


def test_a_probe_setting_that_is_not_one_is_named():
    with pytest.raises(SetupError, match="worst_batch_first.when='yes'"):
        WorstBatchFirst(when="yes", every_shape=True, choose_attention=True)


@pytest.mark.slow  # a planner process over several budgets (14 s)
def test_the_memory_planner_finds_the_largest_budget_that_fits():
    """On the CPU (peak resident memory) with the tiny model: budgets double from one longest clip until
    data.max_batch_size binds; with 99% kept free not even one clip fits, and it says so."""
    import subprocess
    import sys

    import asr

    command = [sys.executable, "-m", "asr.tools.memory", "device=cpu", "data.max_seconds=2", "data.max_batch_size=8"]
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
