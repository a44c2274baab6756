"""W&B through real offline runs, read back from their files (tests/wandb_records.py): one run per Hydra
job, what reaches it, and no secret in any file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import asr
from tests.wandb_records import read_run, records

SECRET = "0123456789abcdef0123456789abcdef01234567"  # what a W&B API key looks like


def wandb_env(tmp_path: Path) -> dict:
    return dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_API_KEY=SECRET,
                WANDB_DATA_DIR=str(tmp_path / "wandb-data"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
                WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))


@pytest.fixture(scope="module")
def sweep(cv_corpus, tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """A real 2-job multirun (Hydra's basic launcher: both jobs in one process) logging to W&B offline."""
    tmp = tmp_path_factory.mktemp("wandb-sweep")
    sweep_dir = tmp / "sweep"
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "logger=wandb", "optim.lr=1e-3,2e-3", f"data.root={cv_corpus}",
         "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
         "data.num_workers=0", f"hydra.sweep.dir={sweep_dir}"],
        cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=600, env=wandb_env(tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [read_run(d) for job in ("0", "1") for d in (sweep_dir / job / "wandb").glob("offline-run-*")]
    return tmp, sweep_dir, runs


def test_a_multirun_writes_one_run_directory_per_job(sweep):
    _, sweep_dir, _ = sweep
    runs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    assert [r.name for r in runs] == ["0", "1"]
    assert [OmegaConf.load(r / "config.yaml").optim.lr for r in runs] == [1e-3, 2e-3]


def test_a_sweep_logs_one_finished_run_per_job_named_grouped_and_tagged(sweep):
    _, sweep_dir, runs = sweep
    assert len(runs) == 2 and runs[0]["id"] != runs[1]["id"]
    assert [r["name"] for r in runs] == ["lr=0.001", "lr=0.002"]  # the swept override, not the common ones
    # the sweep directory's <date>/<time> tail (here outside the project: its last two parts), not its absolute path
    assert {r["group"] for r in runs} == {f"{sweep_dir.parent.name}/{sweep_dir.name}"}
    assert {r["job_type"] for r in runs} == {"train"}
    assert all({"lang=demo", "model=tiny", "sched=linear", "precision=32"} <= set(r["tags"]) for r in runs)
    assert [r["exit_code"] for r in runs] == [0, 0]  # each finished when its job ended


def test_the_whole_config_and_the_runs_facts_reach_wandb(sweep):
    _, sweep_dir, runs = sweep
    for job, run in enumerate(runs):
        config = run["config"]
        assert config["optim"]["lr"] == [1e-3, 2e-3][job] and config["trainer"]["max_steps"] == 4
        assert config["choices"]["sched"] == "linear" and config["world_size"] == 1
        assert config["batch_per_update"]["accumulate"] == 1
        assert config["data_report"]["train"]["kept"] == 12 and "dropped" in config["data_report"]["dev"]
        assert set(config["versions"]) == {"Transformers", "Pytorch", "Lightning"}
        logged = {key for step in run["history"] for key in step}
        assert {"train/loss", "train/grad_norm", "train/padding_fraction", "train/audio_seconds_per_second",
                "train/skipped_updates", "lr-AdamW/pg1", "val/cer", "val/wer", "val/loss"} <= logged
        results = json.loads((sweep_dir / str(job) / "results.json").read_text())
        assert run["summary"]["val/cer"] == pytest.approx(results["val_cer"])  # the best evaluation
        assert run["summary"]["best_step"] == results["step"]


def test_each_evaluation_logs_a_table_of_dev_predictions_with_audio(sweep, cv_corpus):
    _, sweep_dir, runs = sweep
    tables = [step for step in runs[0]["history"] if step.get("val/predictions/_type") == "table-file"]
    assert len(tables) == 2  # one per evaluation (updates 2 and 4)
    [path] = (sweep_dir / "0" / "wandb").glob("offline-run-*/run-*.wandb")
    artifacts = [r.artifact for r in records(path) if r.WhichOneof("record_type") == "artifact"
                 and r.artifact.type == "run_table"]
    assert len(artifacts) == 2
    files = {c.path: c.local_path for c in artifacts[-1].manifest.contents}
    assert sum(p.startswith("media/audio/") and p.endswith(".wav") for p in files) == 4  # the 4 dev clips
    [table] = [json.loads(Path(local).read_text()) for p, local in files.items() if p.endswith(".table.json")]
    assert table["columns"] == ["id", "audio", "reference", "hypothesis", "cer"] and len(table["data"]) == 4
    dev = {line.split("\t")[1] for line in (cv_corpus / "dev.tsv").read_text().splitlines()[1:]}
    assert {row[0] for row in table["data"]} == dev
    assert all(row[2] and isinstance(row[3], str) and row[4] >= 0.0 for row in table["data"])


def test_no_secret_reaches_a_file(sweep):
    tmp, _, _ = sweep
    leaks = [p for p in tmp.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks


@pytest.mark.slow  # 9-13 s of processes: make test stays under 8 minutes on 2 cores
def test_a_failed_job_marks_its_wandb_run_failed(cv_corpus, tmp_path):
    """lr 1e30: every gradient after the first update is non-finite; the run stops with exit code 1."""
    result = subprocess.run(
        [sys.executable, "train.py", "logger=wandb", f"data.root={cv_corpus}", "optim.lr=1e30",
         "model.max_consecutive_skips=2", "trainer.max_steps=20", "data.num_workers=0", "data.max_batch_seconds=8",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=600, env=wandb_env(tmp_path))
    assert result.returncode == 1
    [run] = [read_run(d) for d in (tmp_path / "run" / "wandb").glob("offline-run-*")]
    assert run["exit_code"] == 1


def test_the_sweep_summary_ranks_the_jobs_and_plots_them(sweep):
    _, sweep_dir, _ = sweep
    result = subprocess.run([sys.executable, "-m", "asr.tools.sweep", f"dir={sweep_dir}"], cwd=asr.REPO_DIR,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["#", "run", "overrides", "dev", "WER"]
    rows = [line.split() for line in lines[1:3]]
    assert sorted(row[2] for row in rows) == ["optim.lr=0.001", "optim.lr=0.002"]  # what differs, not all overrides
    cers = [float(row[4]) for row in rows]
    assert cers == sorted(cers)
    for job in ("0", "1"):  # each row is the job's results.json
        results = json.loads((sweep_dir / job / "results.json").read_text())
        assert any(row[1] == job and row[4] == f"{results['val_cer']:.4f}" for row in rows)
    import matplotlib.image

    assert matplotlib.image.imread(sweep_dir / "sweep.png").shape[:2] == (500, 800)
    for job in ("0", "1"):  # every run draws its curves: loss, dev CER, learning rate
        assert matplotlib.image.imread(sweep_dir / job / "curves.png").shape[:2] == (800, 700)


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run_without_repeating_a_step(cv_corpus, tmp_path):
    """ckpt_path=last in the same run directory: the same W&B run id, and the history goes on from the
    resumed update: every update's loss once, every evaluation once."""
    run_dir = tmp_path / "run"

    def train(*overrides):
        result = subprocess.run(
            [sys.executable, "train.py", "logger=wandb", f"data.root={cv_corpus}", "trainer.val_check_interval=2",
             "trainer.log_every_n_steps=1", "data.num_workers=0", f"hydra.run.dir={run_dir}", *overrides],
            cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=600, env=wandb_env(tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]

    train("trainer.max_steps=4")
    train("trainer.max_steps=8", "ckpt_path=last")
    runs = [read_run(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"] == (run_dir / "wandb_id").read_text().strip()
    steps = {key: [h["trainer/global_step"] for run in runs for h in run["history"] if key in h]
             for key in ("train/loss", "val/cer")}
    # Lightning labels an update's loss with the updates before it: 0..7, evaluations after updates 2, 4, 6, 8.
    assert steps["train/loss"] == list(range(8)) and steps["val/cer"] == [1, 3, 5, 7]
    assert [h["trainer/global_step"] for h in runs[1]["history"] if "train/loss" in h][0] == 4
