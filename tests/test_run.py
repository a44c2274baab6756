"""A run's integrity through the real command line: a resumed run keeps its own config, a wrong checkpoint
fails before any data is read, paths as users type them, and a console that says what happened."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import asr
from asr import SetupError
from asr.core import checkpoints
from asr.core.config import check_overrides, expand_path_overrides
from asr.run import tracking
from asr.run.training import _warn_cpu_oversubscription
from tests.conftest import compose_config

PY = sys.executable


def train(*overrides, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "train.py", *overrides], cwd=asr.REPO_DIR, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, **(env or {})))


def config(run_dir: Path, name: str = "config.yaml") -> dict:
    return yaml.safe_load((run_dir / name).read_text())


@pytest.fixture(scope="module")
def hy_run(trained_run) -> tuple[Path, subprocess.CompletedProcess]:
    """A run trained with lang=hy on a Portuguese corpus in the Common Voice layout (given as ~/cv), then
    resumed with only its directory, ckpt_path=last and a longer budget (conftest's `trained_run`)."""
    return trained_run.dir, trained_run.resumed


def test_a_run_older_than_a_setting_resumes_with_its_default_and_says_so(hy_run, tmp_path, caplog):
    """A setting added to the code after a run started (here data.prefetch_factor, taken out of the run's
    config.yaml) takes today's default on resume, and the log names it; a node the run removed
    (~callbacks.last) stays removed; a class the record names where it was before a move is found where it is."""
    import shutil

    from asr.core.config import compose
    from asr.run import provenance

    run = tmp_path / "run"
    shutil.copytree(hy_run[0], run)
    record = config(run)
    del record["data"]["prefetch_factor"], record["callbacks"]["last"]
    record["data"]["_target_"] = "asr.data.SpeechDataModule"  # where the class was before asr/data/ was a package
    (run / "config.yaml").write_text(yaml.safe_dump(record))
    cfg = provenance.resumed(compose("train", [f"run_dir={run}", "ckpt_path=last"]))
    assert cfg.data.prefetch_factor == 2 and cfg.data.lang == "hy"  # the run's own config, plus the new setting
    assert "last" not in cfg.callbacks and "checkpoint" in cfg.callbacks
    assert cfg.data._target_ == "asr.data.module.SpeechDataModule"
    assert "config.yaml predates data.prefetch_factor=2: today's default" in caplog.text


def test_resume_with_only_ckpt_path_keeps_the_runs_corpus_language_and_vocabulary(hy_run):
    run_dir, resumed = hy_run
    data = config(run_dir)["data"]
    assert (data["lang"], data["language"], data["corpus"]) == ("hy", "hy", "common_voice")
    assert data["root"] == str(run_dir.parent / "cv")  # ~ expanded, as the first start had it
    assert json.loads((run_dir / "model" / "asr.json").read_text())["language"] == "hy"
    first = config(run_dir, "config.1.yaml")  # the first start's config, kept
    assert first["trainer"]["max_steps"] == 2 and config(run_dir)["trainer"]["max_steps"] == 4
    assert first["data"] == data
    results = json.loads((run_dir / "results.json").read_text())
    assert [row["step"] for row in results["evaluations"]] == [2, 4]  # both parts
    [line] = [line for line in (resumed.stdout + resumed.stderr).splitlines() if "with its config.yaml" in line]
    assert line.endswith("from the command line: trainer.max_steps: 2 -> 4")  # what changed, and only that


def test_resume_keeps_the_runs_vocabulary(hy_run):
    run_dir, _ = hy_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    vocab = json.loads((run_dir / "vocab.json").read_text())
    assert checkpoint["hyper_parameters"]["vocab"] == sorted(vocab, key=vocab.get)


def test_a_resume_that_changes_what_the_checkpoint_means_is_refused(hy_run):
    run_dir, _ = hy_run
    before = (run_dir / "config.yaml").read_text()
    refused = train(f"hydra.run.dir={run_dir}", "ckpt_path=last", "model.arch.hidden_size=64", "lang=pt")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("error: resuming")
    assert "model.arch.hidden_size (architecture): 128 in the run, 64 on the command line" in line
    assert "data.language (language): 'hy' in the run, 'pt' on the command line" in line
    assert (run_dir / "config.yaml").read_text() == before and not (run_dir / "config.3.yaml").exists()


def test_ckpt_path_last_on_an_empty_directory_fails_in_seconds_naming_it(tmp_path):
    started = time.perf_counter()
    result = train(f"hydra.run.dir={tmp_path}", "ckpt_path=last", "data.root=/no/such/corpus")  # data never read
    seconds = time.perf_counter() - started
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ckpt_path=last: no checkpoint in") and str(tmp_path) in line
    assert seconds < 60
    print(f"ckpt_path=last on an empty directory: exit 1 after {seconds:.1f} s")


def test_a_missing_checkpoint_fails_naming_its_path(tmp_path):
    result = train(f"hydra.run.dir={tmp_path}", f"ckpt_path={tmp_path}/none.ckpt", "data.root=/no/such/corpus")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: ckpt_path={tmp_path}/none.ckpt does not exist: give a checkpoint "
                                     f"(<run>/checkpoints/*.ckpt), a run directory, or last "
                                     f"(with hydra.run.dir=<the run>).")


def test_a_run_directory_as_ckpt_path_resumes_its_last_state_and_evaluates_its_best(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    with pytest.raises(SetupError, match=f"no checkpoint in {ckpts} \\({ckpts} is empty\\)"):
        checkpoints.resume_checkpoint(str(tmp_path), ckpts)
    for name in ("best-step4.ckpt", "last.ckpt"):  # what a checkpoint of train.py holds at least (evaluate checks)
        torch.save({key: {} for key in checkpoints.KEYS}, ckpts / name)
    assert checkpoints.resume_checkpoint(str(tmp_path), tmp_path / "elsewhere") == str(ckpts / "last.ckpt")
    assert checkpoints.resume_checkpoint("last", ckpts) == str(ckpts / "last.ckpt")
    assert checkpoints.best_checkpoint(str(tmp_path)) == str(ckpts / "best-step4.ckpt")
    (ckpts / checkpoints.REQUEUE_CHECKPOINT).write_bytes(b"")  # signalled after its last save: the newer state
    os.utime(ckpts / "last.ckpt", (1, 1))
    assert checkpoints.resume_checkpoint("last", ckpts) == str(ckpts / checkpoints.REQUEUE_CHECKPOINT)


def test_paths_as_users_type_them(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CORPORA", "/data/cv")
    assert expand_path_overrides(["data.root=~/cv/pt", "hydra.run.dir=$CORPORA/run", "optim.lr=1e-3"]) == \
        [f"data.root={tmp_path}/cv/pt", "hydra.run.dir=/data/cv/run", "optim.lr=1e-3"]
    cfg = compose_config(overrides=["data.root=$CORPORA/pt", "ckpt_path=$CORPORA/x.ckpt"])
    assert (cfg.data.root, cfg.ckpt_path) == ("/data/cv/pt", "/data/cv/x.ckpt")
    check_overrides([f"data.root={tmp_path}/cv/pt"], "train")
    with pytest.raises(SetupError) as error:
        check_overrides(["data.root=a~b"], "train")
    assert str(error.value).splitlines() == [
        "data.root=a~b does not parse as an override (characters such as ~ = [ ] , need quotes): quote the value "
        "for Hydra, and the whole for the shell: 'data.root=\"a~b\"'"]


def test_a_tilde_in_data_root_is_the_home_directory(tmp_path):
    result = train("data.root=~/cv/pt", f"hydra.run.dir={tmp_path / 'run'}", env={"HOME": str(tmp_path)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: data.root={tmp_path}/cv/pt does not exist")


def test_more_cpu_processes_than_cores_warns(monkeypatch, caplog):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    trainer = L.Trainer(accelerator="cpu", devices=3, strategy="ddp", logger=False, enable_progress_bar=False)
    _warn_cpu_oversubscription(trainer)
    assert "trainer.devices=3 CPU processes on 2 core(s)" in caplog.text
    caplog.clear()
    _warn_cpu_oversubscription(L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False))
    assert "CPU processes on" not in caplog.text


SRUN_HINT = """
from asr.run import console
console.quiet_libraries()
from lightning.fabric.plugins.environments import SLURMEnvironment
SLURMEnvironment._validate_srun_used()
"""


@pytest.mark.parametrize("inside", [False, True])
def test_the_srun_hint_shows_inside_a_slurm_allocation_only(inside, tmp_path):
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    if inside:
        env["SLURM_JOB_ID"] = "7"
    result = subprocess.run([PY, "-c", SRUN_HINT], cwd=asr.REPO_DIR, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert ("The `srun` command is available" in result.stderr) == inside


def test_the_console_says_what_happened(cv_corpus, tmp_path):
    """Two updates, no evaluation yet (one comes at the end of the epoch): the last line says when, and the
    console holds none of the library lines that do not apply."""
    result = train(f"data.root={cv_corpus}", "trainer.max_steps=2", "data.max_batch_seconds=20",
                   "data.num_workers=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    first = results["first_evaluation_at_update"]
    assert results["evaluations"] == [] and first > 2
    assert f"no dev evaluation in 2 updates: the first comes after update {first}" in result.stdout
    assert "nan" not in result.stdout
    assert out.count("data report (") == 1
    for noise in ("srun", "litlogger", "LeafSpec", "weights_only", "FLOPs", "Tip:"):
        assert noise not in out, noise
    assert "Trainable params" in out  # the model summary, without its FLOPs


def test_a_multiruns_wandb_group_is_readable(tmp_path):
    assert tracking.sweep_group("/home/u/proj/multirun/2026-12-01/00-22-16", "/home/u/proj") == \
        "multirun/2026-12-01/00-22-16"
    assert tracking.sweep_group("/scratch/sweeps/2026-12-01/00-22-16", "/home/u/proj") == "2026-12-01/00-22-16"
    assert tracking.sweep_group("multirun/2026-12-01/00-22-16", "/home/u/proj") == "multirun/2026-12-01/00-22-16"
