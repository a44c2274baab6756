"""benchmarks/gpu.py runs (here on the CPU with the tiny model) and prints what it claims to measure."""

import pytest


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_matrix_with_the_hf_trainer_side_by_side(capsys):
    import benchmarks.gpu as gpu

    rows = gpu.main(["--model", "tiny", "--precision", "32", "--checkpointing", "off", "on", "--steps", "3",
                     "--warmup", "1", "--clips", "24", "--max-seconds", "3", "--hf", "--peak-tflops", "1"])
    assert [(r["ckpt"], r["who"]) for r in rows] == [("off", "ours"), ("off", "HF Trainer"),
                                                     ("on", "ours"), ("on", "HF Trainer")]
    for r in rows:
        assert r["audio_s_per_s"] > 0 and 0 < r["mfu"] < 1
        # MFU is the model FLOPs of the audio per second over the given peak
    ours = rows[0]
    assert ours["mfu"] == pytest.approx(ours["audio_s_per_s"] * ours["gflop_per_audio_s"] * 1e9 / 1e12)
    assert 0 <= ours["wait"] < 1
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    ours_lines = [line for line in printed if "ours" in line]
    assert len(ours_lines) == 2 and sum("Trainer" in line for line in printed) == 2
    for line, (mine, theirs) in zip(ours_lines, (rows[0:2], rows[2:4])):  # the ratio printed beside ours
        assert float(line[-1].rstrip("x")) == pytest.approx(mine["audio_s_per_s"] / theirs["audio_s_per_s"], abs=0.006)
        assert float(line[line.index("ours") + 1]) == pytest.approx(mine["audio_s_per_s"], abs=0.06)
