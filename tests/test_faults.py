"""Faults and bad input through the real command lines: a file that is not a checkpoint, a half-written
last.ckpt, two processes in one run directory, settings the machine cannot honour, files transcribe.py
cannot read, a console in a log file, results.json of a running or killed run, characters outside the
vocabulary at evaluation, a run with nothing left to train, and SIGKILL during a checkpoint save."""

import csv
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

import asr
import transcribe
from asr import SetupError
from asr.core import checkpoints, text
from asr.run import cluster, rundir
from asr.run.console import Progress
from tests.conftest import assembled, data_module, in_process

PY = sys.executable
TINY = ("data.num_workers=0", "data.max_batch_seconds=20")


def command(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, script, *args], cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=600)


def start(script: str, *args: str) -> subprocess.Popen:
    """A command in the background, its output in a file (a pipe nobody reads could fill and block it)."""
    return subprocess.Popen([PY, script, *args], cwd=asr.REPO_DIR, stdout=tempfile.TemporaryFile(),
                            stderr=subprocess.STDOUT)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The failed command's stderr holds no traceback; its last line is the error."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """The run's own files (not Hydra's .hydra/ and train.log, which Hydra writes before train.py starts)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.parts[len(run_dir.parts)] not in (".hydra", "train.log")}


def wait_for(condition, process: subprocess.Popen, seconds: float = 120, what: str = "") -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, f"{what}: the run ended first (exit {process.returncode})"
        assert time.time() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def finished(trained_run) -> Path:
    """A run of 4 updates evaluated at 2 and 4 (lang=hy): best-step<N>.ckpt, last.ckpt, results.json
    (conftest's `trained_run`: copy it before writing into it)."""
    return trained_run.dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    """The run copied, its paths (config.yaml, results.json) rewritten to the copy."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for name in ("config.yaml", "results.json"):
        (copy / name).write_text((copy / name).read_text().replace(str(run_dir), str(copy)))
    return copy


# 1. A file that is not a checkpoint

def test_a_file_that_is_not_a_checkpoint_stops_every_tool_in_one_line(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_text("hi\n")
    for script, setting, extra in (("train.py", "ckpt_path", f"hydra.run.dir={tmp_path / 'run'}"),
                                   ("evaluate.py", "ckpt_path", f"hydra.run.dir={tmp_path / 'eval'}"),
                                   ("transcribe.py", "model_path", f"audio={bad}")):
        started = time.time()
        line = one_error_line(in_process(transcribe.main, [f"{setting}={bad}", extra]) if script == "transcribe.py"
                              else command(script, f"{setting}={bad}", extra))
        assert line.startswith(f"error: {bad} is not a readable checkpoint (3 bytes but not the zip archive"), line
        assert f"give another ({setting}=<a .ckpt>)" in line
        assert time.time() - started < 60
    assert not (tmp_path / "run" / "config.yaml").exists()  # no data read, nothing of the run written


def test_a_checkpoint_of_something_else_names_what_it_lacks(tmp_path):
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    assert checkpoints.problem(other) == (f"{other} is not a checkpoint of train.py "
                                          "(it lacks hyper_parameters, wav2vec2_config)")


# 2. A half-written last.ckpt

@pytest.mark.slow  # 17 s of train.py processes: make test stays under 8 minutes on 2 cores
def test_a_half_written_last_checkpoint_names_the_readable_ones_and_changes_nothing(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a save cut short
    before = snapshot(run)
    best = next((run / "checkpoints").glob("best-step*.ckpt"))
    line = one_error_line(command("train.py", f"hydra.run.dir={run}", "ckpt_path=last"))
    assert f"{last} is not a readable checkpoint" in line
    update = torch.load(best, weights_only=True)["global_step"]
    assert f"Readable beside it: {best.name} (update {update}); the newest: ckpt_path={best}" in line
    assert snapshot(run) == before  # no config.yaml rewritten, no config.1.yaml added

    resumed = command("train.py", f"hydra.run.dir={run}", f"ckpt_path={best}", "trainer.max_steps=6")  # as it says
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["evaluations"][-1]["step"] == 6


# 3. Two processes in one run directory

@pytest.mark.slow
def test_a_second_process_in_a_live_run_directory_is_refused_and_a_killed_one_frees_it(cv_corpus, tmp_path):
    run = tmp_path / "run"
    first = start("train.py", f"data.root={cv_corpus}", "trainer.max_steps=400", "val_every_updates=2", *TINY,
                  f"hydra.run.dir={run}")
    try:
        wait_for(lambda: (run / "checkpoints" / "last.ckpt").is_file(), first, what="the first evaluation")
        before = (run / "config.yaml").read_bytes()
        started = time.time()
        line = one_error_line(command("train.py", f"hydra.run.dir={run}", "ckpt_path=last"))
        assert time.time() - started < 60
        assert line == (f"error: {run} is in use by process {first.pid} on {socket.gethostname()}: one process "
                        f"trains in a run directory at a time. Wait for it to end or stop it (a killed process frees "
                        f"it at once), or give another hydra.run.dir.")
        assert (run / "config.yaml").read_bytes() == before and not list(run.glob("config.*.yaml"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = json.loads((run / "results.json").read_text())["evaluations"][-1]["step"]
    resumed = command("train.py", f"hydra.run.dir={run}", "ckpt_path=last", f"trainer.max_steps={done + 1}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_the_lock_is_per_process_and_released_at_exit(tmp_path):
    holder = subprocess.Popen([PY, "-c", f"from asr.run import rundir; rundir.hold({str(tmp_path)!r}); "
                               "print('held', flush=True); import time; time.sleep(60)"], cwd=asr.REPO_DIR,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SetupError, match=f"in use by process {holder.pid} on "):
            rundir.hold(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rundir.hold(tmp_path)  # the kernel freed it with its process
    rundir.hold(tmp_path)  # again in the process that holds it: nothing to do
    rundir.release()


# 4. Settings the machine cannot honour

@pytest.mark.slow  # 14 s of train.py processes: make test stays under 8 minutes on 2 cores
@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA refuses")
def test_settings_a_cpu_cannot_honour_stop_with_the_override_that_works(tmp_path):
    line = one_error_line(command("train.py", "precision=16", f"hydra.run.dir={tmp_path / 'a'}"))
    assert "precision=16 is fp16 mixed precision, which needs a CUDA GPU" in line and "precision=bf16" in line
    line = one_error_line(command("train.py", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'b'}"))
    assert "trainer.devices=2 counts GPUs, and this machine has none" in line and "trainer.accelerator=cpu" in line
    assert not (tmp_path / "a" / "config.yaml").exists() and not (tmp_path / "b" / "config.yaml").exists()


def test_the_machine_check_passes_what_runs_and_names_bf16_without_support(monkeypatch):
    def trainer(**kw):
        return OmegaConf.create({"accelerator": "auto", "devices": 1, "precision": "32-true", **kw})

    if not torch.cuda.is_available():
        cluster.check_machine(trainer(devices=2, accelerator="cpu", precision="bf16-mixed"))  # the tests' CPU DDP
        cluster.check_machine(trainer(precision="bf16-mixed"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU of before Ampere
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(SetupError, match="precision=bf16 needs a GPU with bf16 .* Tesla V100 has none: "
                                         "give precision=16"):
        cluster.check_machine(trainer(precision="bf16-mixed"))
    cluster.check_machine(trainer(precision="16-mixed", devices=2))


# 5. transcribe.py

def test_transcribe_names_each_file_it_cannot_read_and_exits_1(finished, cv_corpus, tmp_path):
    folder = tmp_path / "recordings"
    clips = sorted((cv_corpus / "clips").glob("*.mp3"))[:2]
    for i, clip in enumerate(clips):
        (folder / f"day{1 - i}").mkdir(parents=True)
        shutil.copy(clip, folder / f"day{1 - i}" / "a.mp3")
    (folder / "notes.txt").write_text("not audio, not listed")
    (folder / "empty.wav").write_bytes(b"")
    sf.write(folder / "short.wav", np.zeros(0, dtype=np.float32), 16_000)  # a header and no samples
    missing = tmp_path / "gone.wav"
    result = in_process(transcribe.main, [f"model_path={finished / 'model'}", f"audio=[{folder},{missing}]",
                                          "format=json"])
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {folder / 'empty.wav'} is empty (0 bytes)",
                      f"error: {folder / 'short.wav'} holds 0 samples at 16 kHz, too few for one encoder frame (25 ms)",
                      f"error: {missing} does not exist",
                      "error: 3 of 5 files failed (named above); the others were transcribed"]
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == \
        [str(folder / "day0" / "a.mp3"), str(folder / "day1" / "a.mp3")]  # a directory: recursively, sorted


def test_the_data_report_gives_the_same_reasons_as_transcribe(cv_corpus, tmp_path):
    root = tmp_path / "cv"
    shutil.copytree(cv_corpus, root)
    train = list(csv.DictReader(open(root / "train.tsv"), delimiter="\t"))
    (root / "clips" / train[0]["path"]).write_bytes(b"")
    (root / "clips" / train[1]["path"]).unlink()
    (root / "clips" / train[2]["path"]).write_bytes(b"not audio" * 100)
    (root / "clip_durations.tsv").unlink(missing_ok=True)  # headers are read: each problem is met at the start
    data = data_module(f"data.root={root}", "data.num_workers=0")
    data.load("train")
    report = data.report["train"]
    assert report["dropped"] == {"empty_file": 1, "missing_file": 1, "unreadable_audio": 1}
    path = [str(root / "clips" / row["path"]) for row in train]
    assert report["examples"] == {"empty_file": [f"{train[0]['path']}: {path[0]} is empty (0 bytes)"],
                                  "missing_file": [f"{train[1]['path']}: {path[1]} does not exist"],
                                  "unreadable_audio": [f"{train[2]['path']}: {path[2]} does not decode as audio"]}


# 6. A console in a log file

def test_a_console_in_a_file_prints_a_plain_line_per_log_step(cv_corpus, tmp_path):
    result = command("train.py", f"data.root={cv_corpus}", "trainer.max_steps=6", "trainer.log_every_n_steps=2",
                     "val_every_updates=3", "callbacks.progress.every_seconds=0", *TINY, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "it/s" not in out  # no progress bar in a file
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("update ")]
    assert [line[1] for line in lines] == ["2/6", "4/6", "6/6"]
    logged = {int(row["step"]): row for row in csv.DictReader(open(tmp_path / "csv" / "metrics.csv"))
              if row.get("lr-AdamW/pg1")}
    for line in lines:
        fields = {line[i]: line[i + 1] for i in range(3, len(line) - 1, 2)}  # after "update 2/6 (33%)"
        step = int(line[1].split("/")[0])
        assert float(fields["lr"]) == pytest.approx(float(logged[step - 1]["lr-AdamW/pg1"]), rel=1e-2)  # its update's
        assert 0 < float(fields["loss"]) < 20 and float(fields["audio-s/s"]) > 0
    assert [line for line in result.stdout.splitlines() if line.startswith("evaluation at update")] == [
        f"evaluation at update {row['step']}: dev loss {row['val_loss']:.4f}  WER {row['val_wer']:.4f}  "
        f"CER {row['val_cer']:.4f}" for row in json.loads((tmp_path / "results.json").read_text())["evaluations"]]


def test_a_terminal_bar_shows_the_loss_and_plain_lines_wait_their_seconds(cv_corpus, capfd):
    common = (f"data.root={cv_corpus}", "logger=none", "~callbacks.checkpoint", "~callbacks.last", *TINY,
              "trainer.max_steps=4", "trainer.log_every_n_steps=2", "+trainer.enable_model_summary=false")
    run = assembled(*common, "callbacks.progress.plain=false", "trainer.accumulate_grad_batches=2")
    losses, step = [], run.model.training_step  # (updates done before it, the batch's own loss)
    run.model.training_step = lambda *args, **kwargs: losses.append(
        (run.trainer.global_step, float(out := step(*args, **kwargs)))) or out
    run.fit()
    bar = capfd.readouterr().out  # Lightning's bars write to stdout
    progress = next(c for c in run.callbacks if isinstance(c, Progress))
    window = [loss for done, loss in losses if done >= 2]  # updates 3 and 4 (an epoch's end cuts one short)
    mean = sum(window) / len(window)
    assert progress.loss == pytest.approx(mean, rel=1e-5) and f"loss={progress.loss:.4f}" in bar  # not / 2
    assert run.report.state_dict()["curve"]["loss"][-1] == pytest.approx(mean, rel=1e-5)  # curves.png's too
    assembled(*common, "callbacks.progress.plain=true", "callbacks.progress.every_seconds=3600").fit()
    out = capfd.readouterr().out
    # none before its hour
    assert not [line for line in out.splitlines() if line.startswith("update ")] and "it/s" not in out
    with pytest.raises(SetupError, match="callbacks.progress.plain='sometimes'"):
        Progress(plain="sometimes", every_seconds=30)


# 7. results.json during the run

def test_results_json_is_written_at_each_evaluation_and_a_killed_run_keeps_it(cv_corpus, tmp_path):
    run = tmp_path / "run"
    process = start("train.py", f"data.root={cv_corpus}", "trainer.max_steps=400", "val_every_updates=2", *TINY,
                    f"hydra.run.dir={run}")
    try:
        wait_for(lambda: (run / "results.json").is_file(), process, what="results.json of a running run")
        first = json.loads((run / "results.json").read_text())
        assert first["state"] == "training" and first["evaluations"][0]["step"] == 2
        assert first["batch_per_update"]["accumulate"] == 1 and first["train_seconds"] > 0
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    kept = json.loads((run / "results.json").read_text())  # whole: written through a rename
    assert kept["state"] == "training" and len(kept["evaluations"]) >= 1


# 8. Characters outside the vocabulary at evaluation

def test_characters_outside_the_vocabulary_get_one_warning_line(finished, cv_corpus, tmp_path):
    root = tmp_path / "cv"
    shutil.copytree(cv_corpus, root)
    with open(root / "test.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows:
        row["sentence"] += " привет"
    with open(root / "test.tsv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    result = command("evaluate.py", f"ckpt_path={finished}", f"data.root={root}", "data.num_workers=0",
                     f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr[-3000:]
    warned = [line for line in result.stdout.splitlines() if "not in the model's vocabulary" in line]  # Hydra's log
    assert len(warned) == 1
    vocab = set(json.loads((finished / "vocab.json").read_text())) | {" "}
    count = sum(c not in vocab for row in rows for c in text.normalize(row["sentence"], "hy"))  # the run's rules
    assert count >= 6 * len(rows)  # п р и в е т in every test transcript, and what else train never had
    assert f"{count} characters of the test transcripts are not in the model's vocabulary, among them " in warned[0]
    assert warned[0].split("among them ")[1].startswith(" ".join(sorted("привет")))  # the commonest first


# 9. A run with nothing left to train

@pytest.mark.slow  # two train.py processes (14 s)
def test_resuming_a_finished_run_says_it_is_complete_and_changes_nothing(finished, tmp_path):
    from asr.run.training import nothing_left

    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    result = command("train.py", f"hydra.run.dir={run}", "ckpt_path=last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == (
        f"{run} is complete at update 4 (trainer.max_steps=4); nothing is left to train. "
        f"trainer.max_steps=<more than 4> goes on from last.ckpt; its results are as they were.")
    assert snapshot(run) == before
    cfg = OmegaConf.load(run / "config.yaml")  # a budget below the checkpoint's update: complete too
    cfg.ckpt_path, cfg.trainer.max_steps = "last", 3
    with pytest.raises(asr.Complete, match=r"complete at update 4 \(trainer.max_steps=3\)") as done:
        nothing_left(cfg)
    assert done.value.results == json.loads((run / "results.json").read_text())

    results = json.loads((run / "results.json").read_text())  # killed after its last update, before concluding
    (run / "results.json").write_text(json.dumps({**results, "state": "training"}))
    shutil.rmtree(run / "model")
    concluded = command("train.py", f"hydra.run.dir={run}", "ckpt_path=last")
    assert concluded.returncode == 0, concluded.stderr[-3000:]
    assert "reached trainer.max_steps=4 but was not concluded" in concluded.stdout
    assert json.loads((run / "results.json").read_text())["state"] == "complete"
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.slow  # 9-13 s of processes: make test stays under 8 minutes on 2 cores
def test_a_run_at_the_end_of_its_epochs_is_complete_and_one_with_more_goes_on(cv_corpus, tmp_path):
    """max_epochs counts the epoch whose last batch the checkpoint trained, saved before the epoch closed."""
    from asr.run.training import nothing_left

    result = command("train.py", f"data.root={cv_corpus}", "trainer.max_steps=-1", "trainer.max_epochs=1",
                     "trainer.check_val_every_n_epoch=1", "trainer.val_check_interval=1.0", *TINY,
                     f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = OmegaConf.load(tmp_path / "config.yaml")
    cfg.ckpt_path = "last"
    with pytest.raises(asr.Complete, match=f"{tmp_path} is complete at update .* \\(trainer.max_epochs=1\\)"):
        nothing_left(cfg)
    cfg.trainer.max_epochs = 2
    assert nothing_left(cfg) is None


# A kill during a checkpoint save

@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_leaves_a_last_checkpoint_that_resumes(cv_corpus, tmp_path):
    """300 MB of ballast in every checkpoint: the kill lands while last.ckpt's successor is being written."""
    run = tmp_path / "run"
    folder = run / "checkpoints"
    process = start("train.py", f"data.root={cv_corpus}", "trainer.max_steps=400", "val_every_updates=2", *TINY,
                    "+callbacks.ballast._target_=tests.callbacks.Ballast", "+callbacks.ballast.megabytes=300",
                    f"hydra.run.dir={run}")
    try:
        wait_for(lambda: (folder / "last.ckpt").is_file(), process, what="a first last.ckpt")
        wait_for(lambda: any(p.name.startswith(".last.ckpt.") and p.stat().st_size > 0 for p in folder.iterdir()
                             if p.name.endswith(".partial")), process, what="a later save of last.ckpt")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert checkpoints.problem(folder / "last.ckpt") is None
    assert list(folder.glob(".last.ckpt.*.partial"))  # the kill landed mid-save: its file is still there
    saved_at = torch.load(folder / "last.ckpt", weights_only=True, mmap=True)["global_step"]
    resumed = command("train.py", f"hydra.run.dir={run}", "ckpt_path=last", f"trainer.max_steps={saved_at + 2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run} from {folder / 'last.ckpt'}" in resumed.stdout  # from the checkpoint, not afresh
    assert not list(folder.glob(".*.partial"))  # what the killed save left, removed once the lock was held
    results = json.loads((run / "results.json").read_text())
    assert results["state"] == "complete" and results["evaluations"][-1]["step"] == saved_at + 2


@pytest.mark.slow  # evaluate, export and average in turn, ~10 s: make test stays under 8 minutes on 2 cores
def test_a_run_copied_elsewhere_works_with_its_original_deleted(finished, tmp_path):
    """A run directory is self-contained: copied elsewhere and the original deleted, evaluate.py scores the
    copy's best checkpoint, asr.tools.export exports it and asr.tools.average averages the copy's checkpoints,
    whatever paths its config.yaml and results.json recorded where it was written."""
    from asr.core.config import compose
    from asr.tools import average as average_tool
    from asr.tools import export as export_tool
    from tests.conftest import in_process

    original = copy_of(finished, tmp_path)  # a run whose files record its own paths
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    recorded = Path(json.loads((copy / "results.json").read_text())["best_checkpoint"])
    assert not recorded.exists() and (copy / "checkpoints" / recorded.name).is_file()
    import evaluate

    metrics = evaluate.evaluate(compose("evaluate", [f"ckpt_path={copy}", f"run_dir={tmp_path / 'eval'}",
                                                     "data.num_workers=0"]))
    assert metrics["checkpoint"] == str(copy / "checkpoints" / recorded.name)
    exported = in_process(export_tool.main, [f"ckpt_path={copy}", f"out={tmp_path / 'model'}"])
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    averaged = in_process(average_tool.main, [f"run={copy}", "last=2"])
    assert averaged.returncode == 0, averaged.stderr[-2000:]
    assert str(copy / "checkpoints" / "average-last2.ckpt") in averaged.stdout + averaged.stderr
