"""evaluate.py through its command line: it scores the data the run was trained on unless told otherwise,
says which, takes the release's split names and shows only its own options."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import asr

PY = sys.executable
DEMO = asr.REPO_DIR / "demo" / "cv-pt"


def command(script, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, script, *args], cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def hy_run(trained_run) -> Path:
    """Trained with lang=hy on a corpus that is not the demo (the config's default data): conftest's `trained_run`."""
    return trained_run.dir


@pytest.fixture(scope="module")
def root(trained_run) -> Path:
    """The data root the run was trained on, as its config.yaml records it."""
    return trained_run.root


def test_given_only_a_checkpoint_it_scores_the_runs_own_test_split(hy_run, root, tmp_path):
    result = command("evaluate.py", f"ckpt_path={hy_run}", "data.num_workers=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    best = json.loads((hy_run / "results.json").read_text())["best_checkpoint"]
    assert (metrics["corpus"], metrics["root"], metrics["split"], metrics["checkpoint"]) == \
        ("common_voice", str(root), "test", best)
    assert metrics["language"] == "hy" and "other_data" not in metrics
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    test_ids = {line.split("\t")[1] for line in (root / "test.tsv").read_text().splitlines()[1:]}
    assert {p["id"] for p in predictions} == test_ids and metrics["n_utterances"] == 4
    assert all((p["corpus"], p["root"], p["split"], p["checkpoint"]) == ("common_voice", str(root), "test", best)
               for p in predictions)
    assert f"test greedy: WER {metrics['wer']:.4f}" in result.stdout and f"of common_voice at {root}" in result.stdout


def test_a_copied_run_scores_its_own_best_checkpoint_not_the_originals(hy_run, tmp_path):
    """results.json records the best checkpoint where the run was written; a copy of the run (the original
    moved or deleted, or still there) scores the copy's."""
    import shutil

    from asr.core import checkpoints

    copy = tmp_path / "copy"
    shutil.copytree(hy_run, copy, ignore=shutil.ignore_patterns("wandb"))
    best = Path(json.loads((hy_run / "results.json").read_text())["best_checkpoint"])
    assert best.is_file() and best.parent == hy_run / "checkpoints"
    assert checkpoints.best_checkpoint(str(copy)) == str(copy / "checkpoints" / best.name)
    assert checkpoints.best_checkpoint(str(copy / "checkpoints")) == str(copy / "checkpoints" / best.name)


def test_other_data_is_scored_when_asked_and_said_so(hy_run, root, tmp_path):
    result = command("evaluate.py", f"ckpt_path={hy_run / 'checkpoints' / 'last.ckpt'}", "lang=demo", "split=dev",
                     "data.num_workers=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["root"], metrics["split"], metrics["n_utterances"]) == (str(DEMO), "dev", 50)
    assert metrics["other_data"]["root"] == {"trained": str(root), "scored": str(DEMO)}
    assert metrics["other_data"]["language"] == {"trained": "hy", "scored": "pt"}
    assert "scoring other data than" in result.stdout + result.stderr
    assert "(not the data the run was trained on)" in result.stdout


def test_split_names_are_the_releases_or_the_error_lists_them(hy_run, root, tmp_path):
    result = command("evaluate.py", f"ckpt_path={hy_run}", "split=validation", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: split=validation is not a split of common_voice at {root}: give one of train, dev, test."]


def test_a_missing_checkpoint_or_an_empty_run_directory_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    result = command("evaluate.py", f"ckpt_path={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: ckpt_path={tmp_path / 'run'}: no checkpoint in")


def test_an_lm_without_the_decoder_that_reads_it_is_refused_before_any_load(tmp_path):
    result = command("evaluate.py", f"ckpt_path={tmp_path / 'no-run'}", f"lm_path={tmp_path / 'lm.arpa'}",
                     "decoder=beam", f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: lm_path={tmp_path / 'lm.arpa'} is read by decoder=beam_lm only: add "
                                     f"decoder=beam_lm (decoder=beam uses no LM)")


def test_help_shows_only_what_evaluate_takes():
    """As train.py's (tests/test_cli.py): the docstring's top, evaluate.py's groups, and its key settings, each
    with its default and its comment."""
    from asr.tools import cli

    result = command("evaluate.py", "--help")
    assert result.returncode == 0, result.stderr
    groups = result.stdout.split("config groups")[1].split("\n\n")[0].splitlines()[1:]
    groups = dict(line.split(None, 1) for line in groups)
    assert list(groups) == ["data", "lang", "logger"]
    shipped = sorted(p.stem for p in (asr.REPO_DIR / "conf" / "lang").glob("*.yaml"))
    assert groups["lang"].replace("*", "").split(", ") == shipped
    settings = result.stdout.split("settings you will reach for")[1].split("\n\n")[0].splitlines()[1:]
    shown = [line.strip().split("=", 1)[0] for line in settings if not line.startswith("      ")]
    assert shown == list(cli.KEY_SETTINGS["evaluate"]) and "ckpt_path=???" in result.stdout
    commented = [i for i, line in enumerate(settings) if not line.startswith("      ")]
    assert all(settings[i + 1].startswith("      ") for i in commented)  # each with its comment below it
    for train_only in ("model", "experiment", "sched", "search", "precision", "optim."):
        assert train_only not in groups and f"  {train_only}" not in result.stdout
