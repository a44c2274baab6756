"""The benchmarks take key=value as the tools do (conf/bench/<name>.yaml, --help, one-line errors), the GPU
session's command lines parse, and benchmarks/gpu.py (here on the CPU with the tiny model) and
benchmarks/transcribe.py run and print what they claim to measure."""

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import asr
from asr.core import audio
from asr.core.config import compose
from asr.tools import cli
from benchmarks import ctc, gpu, mix, precision, transcribe
from tests.conftest import in_process

BENCHMARKS = sorted(p.stem for p in (asr.REPO_DIR / "benchmarks").glob("*.py"))


def test_every_benchmark_has_its_settings_file():
    settings_files = sorted(p.stem for p in (asr.REPO_DIR / "conf" / "bench").glob("*.yaml"))
    assert len(BENCHMARKS) == 15 and settings_files == BENCHMARKS


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_answers_help_and_takes_its_settings_at_the_top_level(name):
    """`--help` through the script's `main(sys.argv[1:])`; the settings compose as conf/bench/<name>.yaml writes
    them, not nested under `bench` (the file's `# @package _global_`)."""
    module = importlib.import_module(f"benchmarks.{name}")
    assert "main(sys.argv[1:])" in Path(module.__file__).read_text().split('if __name__ == "__main__":')[1]
    result = in_process(module.main, ["--help"])
    assert result.returncode == 0 and f"settings (key=value; defaults in conf/bench/{name}.yaml)" in result.stdout
    assert f"python benchmarks/{name}.py" in result.stdout and "@package" not in result.stdout
    written = OmegaConf.load(asr.REPO_DIR / "conf" / "bench" / f"{name}.yaml")
    needed = [f"{key}=x" for key in written if OmegaConf.is_missing(written, key)]  # settings without a default
    settings, rest = cli.parse(f"bench/{name}", needed)
    assert list(settings) == list(written) and rest == []
    listed = [line.split()[0] for line in result.stdout.split("settings (key=value")[1].splitlines()[1:]]
    assert listed == list(written)


def test_a_benchmark_runs_with_key_value_overrides():
    [row] = ctc.main(["shapes=[[40,2,6,5]]", "repeats=1", "autograd=true"])
    assert row["shape"] == "40,2,6,5" and row["autograd_ms"] > 0
    assert row["loss_rel"] < 1e-5 and row["grad_abs"] < 1e-5  # asr.model.ctc and torch's ctc_loss agree


def test_an_unknown_key_a_flag_or_a_value_out_of_choices_is_one_line():
    result = subprocess.run([sys.executable, "benchmarks/ctc.py", "repeat=1"], cwd=asr.REPO_DIR, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: repeat is not a setting of python benchmarks/ctc.py; its settings: autograd, " \
                            "repeats, shapes\n"
    result = in_process(ctc.main, ["--repeats", "1"])  # the old grammar
    assert (result.returncode, result.stderr) == (
        1, "error: '--repeats' is not key=value; `python benchmarks/ctc.py --help` lists the settings\n")
    result = in_process(ctc.main, ["shapes=[40,2,6,5]"])
    assert result.returncode == 1 and result.stderr.startswith("error: shapes: a list of [frames,clips,")
    result = in_process(precision.main, ["precisions=[32,fp8]"])
    assert (result.returncode, result.stderr) == (1, "error: precisions=fp8: expected one of 32, bf16, 16\n")


def test_the_mix_benchmark_plans_each_run_once_with_the_same_updates_and_averaging(tmp_path):
    """Its runs' train configs as composed (nothing trained): per seed the demo, short and a mix per demo weight; per
    language seed es and demo+es, the demo run of a seed of both parts planned once; every run the tiny model from
    scratch with the same updates, 10 dev evaluations and the average of the best, and any other override."""
    args, rest = cli.parse("bench/mix", ["seeds=[0,1]", "language_seeds=[1,2]", "updates=300", "average_best=4",
                                         "optim.lr=1e-3"], passthrough=True)
    roots = {name: tmp_path / name for name in ("demo", "short", "es")}
    runs = mix.plan(args, roots)
    assert [(r.name, r.seed) for r in runs] == [
        ("demo", 0), ("short", 0), ("mix-0.5-0.5", 0), ("mix-0.8-0.2", 0),
        ("demo", 1), ("short", 1), ("mix-0.5-0.5", 1), ("mix-0.8-0.2", 1), ("es", 1), ("demo+es", 1),
        ("demo", 2), ("es", 2), ("demo+es", 2)]
    for run in runs:
        cfg = compose("train", [*mix.command(run, args, list(rest), tmp_path / "run")[2:-1], f"run_dir={tmp_path}"])
        assert (cfg.seed, cfg.trainer.max_steps, cfg.val_every_updates, cfg.optim.lr) == (run.seed, 300, 30, 1e-3)
        assert cfg.callbacks.average.best == cfg.callbacks.checkpoint.save_top_k == 4
        assert cfg.model.pretrained is None and cfg.model.arch.hidden_size == 128  # the tiny model, from scratch
        if len(run.corpora) == 1:
            assert (cfg.data.corpora, cfg.data.root, cfg.data.lang) == (None, str(roots[run.name]), mix.LANGS[run.name])
        else:
            assert [(c["name"], c["lang"], c["root"], c.get("weight")) for c in cfg.data.corpora] == [
                (name, mix.LANGS[name], str(roots[name]), weight) for name, weight in {
                    "mix-0.5-0.5": [("demo", 0.5), ("short", 0.5)], "mix-0.8-0.2": [("demo", 0.8), ("short", 0.2)],
                    "demo+es": [("demo", None), ("es", None)]}[run.name]]


def test_the_mix_benchmark_stops_at_a_key_it_sets_or_a_mistyped_one_in_one_line():
    for argv, error in [(["seed=3"], "error: seed is set for each run by python benchmarks/mix.py: give seeds=\n"),
                        (["update=20"], "error: update is not a setting of python benchmarks/mix.py (seeds, "
                                        "demo_weights, language_seeds, updates, average_best, out): did you mean "
                                        "updates?\n"),
                        (["demo_weights=[0.5,1]"], "error: demo_weights: 1: give the demo's share of a mix, between 0 "
                                                   "and 1\n")]:
        result = in_process(mix.main, argv)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", error)


def test_the_mix_tables_give_each_seed_then_the_mean_and_spread():
    rows = [{"run": run, "seed": seed, "corpora": corpora,
             "test": {"best": {c: {"cer": cer + 0.1 * i} for i, c in enumerate(corpora)}}}
            for run, corpora, figures in [("demo", ["demo"], {0: 0.2, 1: 0.3}), ("short", ["short"], {0: 0.5, 1: 0.4}),
                                          ("mix-0.5-0.5", ["demo", "short"], {0: 0.1, 1: 0.2})]
            for seed, cer in figures.items()]
    header, *lines = mix.cer_table(rows, ["demo", "short", "mix-0.5-0.5"], ["demo", "short"], [0, 1])
    assert header.split()[1:] == ["demo", "s0", "demo", "s1", "short", "s0", "short", "s1", "demo", "mean", "demo",
                                  "spread", "short", "mean", "short", "spread"]
    assert [line.split() for line in lines] == [
        ["demo", "0.200", "0.300", "-", "-", "0.250", "0.100", "-", "-"],
        ["short", "-", "-", "0.500", "0.400", "-", "-", "0.450", "0.100"],
        ["mix-0.5-0.5", "0.100", "0.200", "0.200", "0.300", "0.150", "0.100", "0.250", "0.100"]]
    assert mix.against_alone(rows, ["mix-0.5-0.5"], [0, 1]) == [
        "mix-0.5-0.5 on demo: -0.100 against demo alone; seed spread 0.100: within the spread or better",
        "mix-0.5-0.5 on short: -0.200 against short alone; seed spread 0.100: within the spread or better"]


def test_the_transcribe_benchmark_times_both_paths_on_the_same_clips(tmp_path, capsys):
    """6 clips of a directory of 2 (the list repeated): each path's audio-s/s is the clips' audio over its wall
    time, the ratio is theirs, and the two paths, greedy on the same weights, give the same transcripts in the
    files' order (a near-tie of the random model, alone or padded into a batch, may part one)."""
    clips = sorted((asr.REPO_DIR / "demo" / "cv-pt" / "clips").glob("*.mp3"))[:2]
    for clip in clips:
        (tmp_path / clip.name).symlink_to(clip)
    result = transcribe.main([f"dir={tmp_path}", "clips=6"])
    seconds = 3 * sum(len(audio.load(c)) for c in clips) / audio.SAMPLE_RATE
    assert result["clips"] == 6 and result["audio_seconds"] == pytest.approx(seconds)
    old, new = result["old"], result["new"]
    assert old == old[:2] * 3 and old[0] != old[1] and min(map(len, old)) > 10  # not a blank model
    assert result["equal"] == sum(a == b for a, b in zip(old, new)) >= 5
    out = capsys.readouterr().out
    assert out.startswith(f"6 clips of {tmp_path} (2 distinct), ")
    for side in ("old", "new"):
        [row] = [line.split() for line in out.splitlines() if line.endswith(f"({side})") or f"({side}) " in line]
        assert float(row[-2]) == pytest.approx(result[f"{side}_seconds"], abs=0.006)
        assert float(row[-1]) == pytest.approx(seconds / result[f"{side}_seconds"], abs=0.06)
    ratio = float(out.split("new / old: ")[1].split("x")[0])
    assert ratio == pytest.approx(result["new_rate"] / result["old_rate"], abs=0.006)
    assert f"equal transcripts: {result['equal']} of 6" in out


def session_commands(program: str) -> list[list[str]]:
    """The arguments of each `"$PYTHON" <program> ...` command in benchmarks/gpu_session.sh, as bash splits
    them, with $PEAK_TFLOPS at its default."""
    script = (asr.REPO_DIR / "benchmarks" / "gpu_session.sh").read_text().replace("\\\n", " ")
    peak = re.search(r"^PEAK_TFLOPS=\$\{PEAK_TFLOPS:-(\d+)\}", script, re.M).group(1)
    found = re.findall(rf'"\$PYTHON" {re.escape(program)} (.*?)(?:;;|$)', script, re.M)
    return [shlex.split(command.replace('"$PEAK_TFLOPS"', peak)) for command in found]


def test_the_gpu_session_runs_benchmark_command_lines_that_parse():
    """Each benchmarks/gpu.py command of gpu_session.sh: its settings, the matrix they make and each setting's
    train config composed (a bad override of the train config fails here, not on the GPU machine)."""
    commands = session_commands("benchmarks/gpu.py")
    assert len(commands) == 3
    composed = []
    for argv in commands:
        args, rest = cli.parse("bench/gpu", argv, passthrough=True)
        assert args.peak_tflops == 790
        composed.append([(setting, compose("train", [*overrides, "data.root=/tmp", "run_dir=/tmp"]))
                         for setting, overrides in gpu.matrix(args, rest)])
    bench, compiled, segments = composed
    assert [(s["model"], s["precision"], cfg.trainer.precision) for s, cfg in bench] == [
        ("xlsr_300m", "bf16", "bf16-mixed"), ("xlsr_1b", "bf16", "bf16-mixed")]
    assert [cfg.model.compile for _, cfg in compiled] == ["encoder"]
    assert [cfg.model.expandable_segments for _, cfg in segments] == [True]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_matrix_with_the_hf_trainer_side_by_side(capsys):
    rows = gpu.main(["models=tiny", "precisions=32", "checkpointing=[false,true]", "steps=3", "warmup=1", "clips=24",
                     "max_seconds=3", "hf=true", "peak_tflops=1"])
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
    """profile=true on the tiny model (CPU): the timed updates hold no epoch boundary of the corpus sized for
    them, the warm-up ran every training shape, the profiled update's top operators and the sync-debug
    update are reported (syncs: not on a CPU), peak memory and GPU-busy share are CUDA's only."""
    [row] = gpu.main(["models=tiny", "precisions=32", "steps=2", "warmup=1", "profile=true", "profile_steps=1",
                      "sync_steps=1", "max_seconds=4", "callbacks.worst_batch_first.when=true"])
    assert row["epoch_boundary"] is False and row["host_ms_median"] > 0 and 1 <= row["timed_shapes"] <= 2
    assert row["warmup"]["train_shapes"] == row["plan_shapes"] and row["warmup"]["seconds"] > 0
    assert row["profiled_updates"] == 1 and len(row["top"]) > 5 and row["top"][0][1] > 0
    assert row["memory_gb"] is None and row["gpu_busy"] is None and row["syncs_per_update"] == [0]
    out = capsys.readouterr().out
    for text in ("host ms per update", "top CPU operators", "not measured on a CPU", "warm-up before the first update"):
        assert text in out, text


def test_the_synthetic_corpus_is_sized_for_the_updates_with_distinct_lengths(tmp_path):
    assert gpu.corpus_clips(20, 200, 2, 15) == 613  # 1.3 x 20 x 200 s / 8.5 s per clip, + 1
    root = gpu.synthetic_corpus(tmp_path / "pt", clips=5, low=2, high=3)
    durations = (root / "clip_durations.tsv").read_text().splitlines()[1:]
    assert len(durations) == 5 + gpu.DEV_CLIPS and len({d.split("\t")[1] for d in durations}) == len(durations)
    assert len((root / "train.tsv").read_text().splitlines()) == 6 and len(list((root / "clips").glob("*.mp3"))) == 13
    first = durations[0].split("\t")
    decoded = len(audio.load(root / "clips" / first[0])) / audio.SAMPLE_RATE
    assert decoded == pytest.approx(int(first[1]) / 1000, abs=0.06)  # MP3 codec padding: tens of ms


def test_the_gpu_busy_share_is_the_union_of_kernel_intervals():
    assert gpu.busy_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    assert gpu.busy_seconds([]) == 0


def test_the_gpu_session_script_runs_its_parts_under_a_budget_and_summarises(tmp_path):
    """Its `check` part (imports and versions) on this machine, a part the budget leaves no time for skipped,
    and the summary last."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "BUDGET": "60", "MIN_PART": "60"}
    # check gets the whole budget and takes seconds (it imports torch), so cards is left under MIN_PART
    out = subprocess.run(["bash", "benchmarks/gpu_session.sh", "check", "cards"], cwd=asr.REPO_DIR, env=env,
                         capture_output=True, text=True, timeout=120).stdout
    summary = out[out.index("=== summary"):].splitlines()
    assert summary[1].startswith("check    ok") and summary[2].startswith("cards    skipped"), out
    assert "torch 2." in out and (tmp_path / "check.log").exists()


def test_speech_ends_before_a_faint_echo_but_not_before_a_fading_sound():
    """speech_span on 16 kHz tones: 0.2 s of silence, 1 s of speech, then (a) a gap and a faint echo at 3% of the
    peak, as espeak-ng's f3 voice leaves, cut off; (b) a sound fading steadily through 2%, kept."""
    import numpy as np

    from benchmarks.timestamps import speech_span

    t = np.arange(16000) / 16000
    speech = np.concatenate([np.zeros(3200), np.sin(2 * np.pi * 200 * t)]).astype(np.float32)
    echo = 0.03 * np.sin(2 * np.pi * 200 * t[:1600])  # 100 ms
    with_echo = np.concatenate([speech, np.zeros(480), echo, np.zeros(3200)]).astype(np.float32)
    assert speech_span(with_echo) == pytest.approx((0.2, 1.2, 1.33))  # the echo (1.23-1.33 s) left out
    fade = np.sin(2 * np.pi * 200 * t[:3200]) * np.linspace(0.06, 0.0, 3200)  # 200 ms, under 2% after 133 ms
    fading = np.concatenate([speech, fade, np.zeros(3200)]).astype(np.float32)
    start, end, whole = speech_span(fading)
    assert (start, end) == pytest.approx((0.2, 1.34)) and whole == end  # nothing cut from a steady fade


def test_the_timestamps_benchmark_compares_each_clip_with_its_speech(barely_trained, capsys):
    """Two demo test clips joined: a row per clip, and every word of their transcripts aligned."""
    from benchmarks import timestamps

    result = timestamps.main([f"model_path={barely_trained / 'model'}", "clips=2"])
    printed = capsys.readouterr().out
    assert printed.count("common_voice_pt_") == 2 and "worst difference from the speech" in printed
    words = sum(len(t.split()) for t in ["o vizinho vê as batatas", "às vezes o vizinho pinta o pão na escola"])
    assert result["aligned_words"] == words and 0 <= result["aligned_outside"] <= words


def test_the_confidence_benchmark_scores_each_way_by_auroc(barely_trained, cv_corpus, capsys):
    """Right and wrong words from the alignment of hypothesis and reference; AUROC as the Mann-Whitney chance;
    every way scored on a model's transcripts of a corpus."""
    import numpy as np

    from benchmarks import confidence

    assert confidence.right_words("o gato come a casa", "o pato come casa") == [True, False, True, True]
    assert confidence.right_words("o gato", "o gato gato") == [True, True, False]  # an insertion is wrong
    assert confidence.right_words("o gato", "") == [] and confidence.right_words("", "a b") == [False, False]
    right = np.array([True, True, False, False])
    assert confidence.auroc(np.array([0.9, 0.8, 0.1, 0.2]), right) == 1.0
    assert confidence.auroc(np.array([0.1, 0.2, 0.9, 0.8]), right) == 0.0
    assert confidence.auroc(np.array([0.5, 0.9, 0.5, 0.1]), right) == 3.5 / 4  # the tie counts half
    result = confidence.main([f"model_path={barely_trained / 'model'}", f"root={cv_corpus}", "splits=[test]"])
    printed = capsys.readouterr().out
    assert result["words"] >= result["wrong"] > 0 and "tsallis min all" in printed and "max_prob mean all" in printed
    assert set(result["auroc"]) == {f"{m} {a} {o}" for m in ("max_prob", "tsallis") for a in ("mean", "min")
                                    for o in ("all", "nonblank")}
