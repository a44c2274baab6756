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
    out = capsys.readouterr().out
    printed = [line.split() for line in out[out.index("all settings:"):].splitlines()]  # each setting's, then all
    ours_lines = [line for line in printed if "ours" in line]
    assert len(ours_lines) == 2 and sum("Trainer" in line for line in printed) == 2
    for line, (mine, theirs) in zip(ours_lines, (rows[0:2], rows[2:4])):  # the ratio printed beside ours
        assert float(line[-1].rstrip("x")) == pytest.approx(mine["audio_s_per_s"] / theirs["audio_s_per_s"], abs=0.006)
        assert float(line[line.index("ours") + 1]) == pytest.approx(mine["audio_s_per_s"], abs=0.06)


@pytest.mark.slow
def test_the_one_gpu_command_profiles_on_a_cpu_too(capsys):
    """--profile on the tiny model (CPU): the timed updates hold no epoch boundary of the corpus sized for
    them, the warm-up ran every training shape, the profiled update's top operators and the sync-debug
    update are reported (syncs: not on a CPU), peak memory and GPU-busy share are CUDA's only."""
    import benchmarks.gpu as gpu

    [row] = gpu.main(["--model", "tiny", "--precision", "32", "--steps", "2", "--warmup", "1", "--profile",
                      "--profile-steps", "1", "--sync-steps", "1", "--max-seconds", "4",
                      "callbacks.worst_batch_first.when=true"])
    assert row["epoch_boundary"] is False and row["host_ms_median"] > 0 and 1 <= row["timed_shapes"] <= 2
    assert row["warmup"]["train_shapes"] == row["plan_shapes"] and row["warmup"]["seconds"] > 0
    assert row["profiled_updates"] == 1 and len(row["top"]) > 5 and row["top"][0][1] > 0
    assert row["memory_gb"] is None and row["gpu_busy"] is None and row["syncs_per_update"] == [0]
    out = capsys.readouterr().out
    for text in ("host ms per update", "top CPU operators", "not measured on a CPU", "warm-up before the first update"):
        assert text in out, text


def test_the_synthetic_corpus_is_sized_for_the_updates_with_distinct_lengths(tmp_path):
    import benchmarks.gpu as gpu
    from asr import audio

    assert gpu.corpus_clips(20, 200, 2, 15) == 613  # 1.3 x 20 x 200 s / 8.5 s per clip, + 1
    root = gpu.synthetic_corpus(tmp_path / "pt", clips=5, low=2, high=3)
    durations = (root / "clip_durations.tsv").read_text().splitlines()[1:]
    assert len(durations) == 5 + gpu.DEV_CLIPS and len({d.split("\t")[1] for d in durations}) == len(durations)
    assert len((root / "train.tsv").read_text().splitlines()) == 6 and len(list((root / "clips").glob("*.mp3"))) == 13
    first = durations[0].split("\t")
    decoded = len(audio.load(root / "clips" / first[0])) / audio.SAMPLE_RATE
    assert decoded == pytest.approx(int(first[1]) / 1000, abs=0.06)  # MP3 codec padding: tens of ms


def test_the_gpu_busy_share_is_the_union_of_kernel_intervals():
    import benchmarks.gpu as gpu

    assert gpu.busy_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    assert gpu.busy_seconds([]) == 0


def test_the_gpu_session_script_runs_its_parts_under_a_budget_and_summarises(tmp_path):
    """Its `check` part (imports and versions) on this machine, a part the budget leaves no time for skipped,
    and the summary last."""
    import os
    import subprocess
    import sys

    import asr

    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "BUDGET": "60", "MIN_PART": "60"}
    # check gets the whole budget and takes seconds (it imports torch), so cards is left under MIN_PART
    out = subprocess.run(["bash", "benchmarks/gpu_session.sh", "check", "cards"], cwd=asr.REPO_DIR, env=env,
                         capture_output=True, text=True, timeout=120).stdout
    summary = out[out.index("=== summary"):].splitlines()
    assert summary[1].startswith("check    ok") and summary[2].startswith("cards    skipped"), out
    assert "torch 2." in out and (tmp_path / "check.log").exists()
