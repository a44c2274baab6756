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
    printed = capsys.readouterr().out
    assert "audio-s/s" in printed and printed.count("HF Trainer") == 2 and "x" in printed.split("HF Trainer")[0]
