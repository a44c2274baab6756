"""Several processes and clusters: the batch per update on any world size, the launcher's allocation,
atomic checkpoints, DDP with LayerDrop and unreadable batches, and a real one-node SLURM cluster
(slurm/local.sh): jobs through sbatch and through Hydra's submitit launcher, a preemption that requeues
and resumes exactly, torchrun with two nodes."""

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

import asr
from asr import SetupError
from asr.core import checkpoints
from asr.core.frames import WAV2VEC2
from asr.data.batching import DurationBatchSampler
from asr.data.module import SpeechDataModule
from asr.model import inference
from asr.run import cluster
from tests.conftest import compose_config, data_module

PY = sys.executable
DEMO = asr.REPO_DIR / "demo" / "cv-pt"


def test_batch_per_update_keeps_a_cards_batch_on_any_number_of_gpus():
    one = cluster.batch_per_update(128, None, 1, 16, 320, world_size=1)
    eight = cluster.batch_per_update(128, None, 1, 16, 320, world_size=8)
    assert (one["accumulate"], one["clips"]) == (8, 128) and (eight["accumulate"], eight["clips"]) == (1, 128)
    assert "128 clips" in eight["text"] and "x 8 processes" in eight["text"]
    assert cluster.batch_per_update(None, 240, 1, None, 30, world_size=2)["accumulate"] == 4
    with pytest.raises(SetupError, match=r"update_clips=128 does not divide into 3 process\(es\) "
                                         r"x data.max_batch_size=16"):
        cluster.batch_per_update(128, None, 1, 16, 320, world_size=3)
    with pytest.raises(SetupError, match="drop trainer.accumulate_grad_batches"):
        cluster.batch_per_update(128, None, 8, 16, 320, world_size=1)
    with pytest.raises(SetupError, match="needs data.max_batch_size"):
        cluster.batch_per_update(128, None, 1, None, 320, world_size=1)
    # without a stated total, the batch grows with the world size, as Lightning does it
    assert cluster.batch_per_update(None, None, 2, 8, 160, world_size=4)["clips"] == 64


def test_an_allocation_unlike_the_config_stops_naming_both(monkeypatch):
    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    cluster.check_allocation(1, 1)  # no external launcher: Lightning starts the processes
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2(x2)")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    with pytest.raises(SetupError, match=r"started 2 process\(es\) per node on 2 node\(s\), but trainer.devices=1 "
                                         r"and trainer.num_nodes=1: pass trainer.devices=2 trainer.num_nodes=2"):
        cluster.check_allocation(1, 1)
    cluster.check_allocation(2, 2)
    assert cluster.world_size(2, 2) == 4


def test_a_restarted_job_finds_its_run_directory(monkeypatch, tmp_path):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert asr.run_dir_name("2026-11-22/10-00-00") == "2026-11-22/10-00-00"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "exp7")
    assert asr.run_dir_name("x") == "torchrun-exp7"  # every node of a torchrun rendezvous agrees
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_NAME", "asr-train")
    assert asr.run_dir_name("x") == "slurm-42"  # every task of the job, and the job requeued
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: runs in it are separate
    assert asr.run_dir_name("x") == "torchrun-exp7"


@pytest.mark.slow
def test_ddp_with_layerdrop_an_unreadable_batch_and_validation_equal_to_one_process(cv_corpus, tmp_path):
    """2 CPU processes through train.py: LayerDrop skips layers (DDP then needs unused-parameter
    handling), one batch of nothing but an unreadable clip is a zero-loss step on its rank, and the
    dev WER/CER of the 2 ranks equal one process's on the same weights. The worst-batch probe runs first
    on each rank (outside DDP's all-reduce)."""
    root = tmp_path / "cv"
    shutil.copytree(cv_corpus, root)
    bad = sorted((root / "clips").iterdir())[0]
    bad.write_bytes(b"not audio" * 100)  # its duration is in clip_durations.tsv: met when loaded
    run_dir = tmp_path / "run"
    common = [f"data.root={root}", "data.max_batch_size=1", "data.num_workers=0", "trainer.accelerator=cpu"]
    subprocess.run([PY, "train.py", *common, "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=6",
                    "trainer.val_check_interval=6", "model.config.layerdrop=0.5", "logger=none",
                    "callbacks.worst_batch_first.when=true", f"hydra.run.dir={run_dir}"],
                   cwd=asr.REPO_DIR, check=True, capture_output=True, timeout=600)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["empty_batches"] == 1 and results["skipped_clips"] == 1
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["train"]["dropped"] == {"unreadable_audio": 1} and report["train"]["kept"] == 11

    cfg = compose_config(overrides=common)
    data = SpeechDataModule.from_config(cfg.data, WAV2VEC2)
    data.setup("fit")
    model = inference.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    one = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False).validate(model, datamodule=data, verbose=False)[0]
    evaluation = results["evaluations"][-1]
    assert evaluation["step"] == 6
    assert (evaluation["val_wer"], evaluation["val_cer"]) == (pytest.approx(one["val/wer"], abs=1e-7),
                                                              pytest.approx(one["val/cer"], abs=1e-7))


def test_setup_reads_each_header_once_over_ranks_started_together(tmp_path):
    """Two processes set up at the same moment (as srun or torchrun start ranks) on the demo without its
    stated durations: one reads the 570 headers, the other waits for it and reads none. (Without the
    lock both read them all: the start is synchronised so that their reads overlap.)"""
    root = tmp_path / "cv-pt"
    shutil.copytree(DEMO, root, copy_function=os.link)
    (root / "clip_durations.tsv").unlink()
    go = tmp_path / "go"
    script = "\n".join([
        "import logging, os, time", "from tests.conftest import data_module",
        "logging.basicConfig(level=logging.INFO)",
        f"data = data_module('lang=pt', 'data.root={root}', 'data.num_workers=0')",
        "print('ready', flush=True)",
        f"while not os.path.exists({str(go)!r}): time.sleep(0.001)",
        "data.setup('fit')"])
    env = dict(os.environ, ASR_CACHE_DIR=str(tmp_path / "cache"))
    ranks = [subprocess.Popen([PY, "-c", script], cwd=asr.REPO_DIR, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for rank in ranks:
        assert rank.stdout.readline().strip() == "ready"
    go.touch()
    logs = [r.communicate(timeout=300)[1] for r in ranks]
    assert [r.returncode for r in ranks] == [0, 0], logs
    reads = [sum(int(n) for n in re.findall(r"(\d+) clip headers read", log)) for log in logs]
    assert sorted(reads) == [0, 570]  # 520 train and 50 dev clips, read by one process only


@pytest.mark.slow
def test_a_signalled_run_outside_slurm_saves_stops_and_the_same_command_resumes_it(cv_corpus, tmp_path):
    run_dir = tmp_path / "run"
    command = [PY, "train.py", f"data.root={cv_corpus}", "data.max_batch_size=1", "data.num_workers=0",
               "trainer.max_steps=16", "trainer.val_check_interval=4", f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(command, cwd=asr.REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 300
    while not (run_dir / "results.md").is_file():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR1)
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0 and "run the same command to resume" in out, out[-2000:]
    assert (run_dir / "checkpoints" / checkpoints.REQUEUE_CHECKPOINT).is_file()
    stopped_at = json.loads((run_dir / "results.json").read_text())["evaluations"][-1]["step"]
    assert stopped_at < 16

    subprocess.run(command, cwd=asr.REPO_DIR, check=True, capture_output=True, timeout=600)
    results = json.loads((run_dir / "results.json").read_text())
    assert [row["step"] for row in results["evaluations"]] == [4, 8, 12, 16]
    def evaluated(name):  # logger steps (update - 1) with a dev CER
        with open(run_dir / "csv" / name) as f:
            return {int(row["step"]) + 1 for row in csv.DictReader(f) if row.get("val/cer")}

    assert set(range(4, stopped_at + 1, 4)) <= evaluated("metrics.1.csv")  # the first start's metrics, kept
    assert set(range(stopped_at + 4, 17, 4)) <= evaluated("metrics.csv")


# ---------------------------------------------------------------- on the one-node SLURM cluster


def squeue_empty(job: str) -> bool:
    return not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()


def wait_for(job: str, timeout: float) -> None:
    """Until the job left the queue (no sacct here: a finished job is one squeue no longer lists)."""
    deadline = time.time() + timeout
    while not squeue_empty(job):
        if time.time() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"SLURM job {job} still queued after {timeout} s")
        time.sleep(1)


@pytest.mark.slow
def test_a_preempted_slurm_job_requeues_and_resumes_with_the_next_batch(slurm, tmp_path):
    """sbatch slurm/train.sbatch on 2 tasks; `scancel --signal=USR1` mid-run (what a preemption or the time
    limit sends): the run saves, requeues, and the requeued job trains on exactly the batches the
    uninterrupted run would have, with every evaluation from before and after in results.json."""
    run_dir, record = tmp_path / "run", tmp_path / "record"
    overrides = ["trainer.accelerator=cpu", "trainer.max_steps=16", "trainer.val_check_interval=4",
                 "data.num_workers=0", "logger=wandb", f"hydra.run.dir={run_dir}",
                 "+callbacks.record._target_=tests.callbacks.RecordUpdates", f"+callbacks.record.out_dir={record}"]
    job = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", f"--output={tmp_path}/slurm-%j.out",
                          "slurm/train.sbatch", *overrides], cwd=asr.REPO_DIR, check=True, capture_output=True,
                         text=True, env=dict(os.environ, PYTHON=PY, WANDB_MODE="offline")).stdout.strip()
    deadline = time.time() + 300
    while not (run_dir / "results.md").is_file():  # the first evaluation (update 4) is written
        assert time.time() < deadline and not squeue_empty(job), (tmp_path / f"slurm-{job}.out").read_text()[-3000:]
        time.sleep(0.2)
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_for(job, 400)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "requeued SLURM job" in log and "restart 1" in log, log[-3000:]

    results = json.loads((run_dir / "results.json").read_text())
    assert [row["step"] for row in results["evaluations"]] == [4, 8, 12, 16]
    assert not (run_dir / "checkpoints" / checkpoints.REQUEUE_CHECKPOINT).exists()  # done: no resume left behind
    wandb_runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(wandb_runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in wandb_runs}) == 1  # the same W&B run
    data = data_module("data.num_workers=0")
    train = data.load("train")
    for rank in range(2):
        before = json.loads((record / f"rank{rank}.json").read_text())
        after = json.loads((record / f"rank{rank}.restart1.json").read_text())
        assert 4 <= len(before["ids"]) < 16 and len(before["ids"]) + len(after["ids"]) == 16
        sampler = DurationBatchSampler(train.seconds, data.hparams.max_batch_seconds, max_batch_size=None,
                                       num_buckets=data.hparams.num_buckets, attention_q=None, seed=data.hparams.seed,
                                       shuffle=True, num_replicas=2, rank=rank, geometry=data.geometry)
        ids, planned = train.column("id"), []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            planned += [[ids[i] for i in batch] for batch in sampler]
        assert before["ids"] + after["ids"] == planned[:16]
    print(f"signal to the requeued job's first batch: {after['times'][0] - signalled:.1f} s; "
          f"updates before the signal: {len(before['ids'])}")


@pytest.mark.slow
def test_a_two_point_sweep_through_the_submitit_launcher_runs_two_jobs_of_two_tasks(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [PY, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null",
         "hydra.launcher.timeout_min=10", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=3",
         "trainer.val_check_interval=3", "data.num_workers=0", "logger=none", "optim.lr=1e-3,2e-3",
         f"hydra.sweep.dir={sweep}"],
        cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sbatch = next((sweep / ".submitit").glob(".submission_file_*.sh")).read_text()
    assert "#SBATCH --ntasks-per-node=2" in sbatch and "#SBATCH --signal=USR1@120" in sbatch
    assert "#SBATCH --array=0-1" in sbatch  # one job per point
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["batch_per_update"]["world_size"] == 2 and results["step"] == 3
        assert f"lr: {lr}" in (sweep / job / "config.yaml").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_with_two_nodes_on_localhost(tmp_path):
    """`torchrun --nnodes=2` (here both nodes on this machine): one run directory, a world of 2.

    The rendezvous store is this test's, not a node agent's: with torchrun's static rendezvous the agent of
    node 0 hosts it and may exit while node 1's agent still waits at the exit barrier, which then times out
    after 300 s and fails the run (pytorch/pytorch#69520; seen here under load). Both agents join as clients
    of a store that outlives them."""
    run_dir, port = tmp_path / "run", free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # noqa: F841
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    nodes = [subprocess.Popen(
        [PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=twonodes", "--rdzv-conf=is_host=false",
         "train.py", "trainer.accelerator=cpu",
         "trainer.num_nodes=2", "trainer.strategy=ddp", "trainer.max_steps=3", "trainer.val_check_interval=3",
         "data.num_workers=0", "logger=none", f"hydra.run.dir={run_dir}"],
        cwd=asr.REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["batch_per_update"]["world_size"] == 2 and results["step"] == 3


def test_a_requeue_signal_that_is_not_one_stops_with_its_name():
    with pytest.raises(SetupError, match=r"callbacks.requeue.signal='USR9' is not a signal"):
        cluster.Requeue("USR9", "checkpoints")
    assert cluster.Requeue("usr1", "checkpoints").signum == signal.SIGUSR1


def test_a_cards_batch_and_evaluation_cadence_hold_on_1_and_8_gpus():
    """experiment=cv8_hy_1b states 128 clips per update and an evaluation every 100 updates: on 1 GPU
    that is 8 accumulated batches and an evaluation every 800 of them, on 8 GPUs 1 and 100."""
    from asr.run.training import validation_cadence

    cfg = compose_config(overrides=["experiment=cv8_hy_1b", "data.root=x"])
    for world, accumulate in ((1, 8), (8, 1)):
        batch = cluster.batch_per_update(cfg.update_clips, cfg.update_seconds, cfg.trainer.accumulate_grad_batches,
                                         cfg.data.max_batch_size, cfg.data.max_batch_seconds, world)
        assert (batch["accumulate"], batch["clips"]) == (accumulate, 128)
        assert validation_cadence(cfg, batch) == {"val_check_interval": 100 * accumulate,
                                                  "check_val_every_n_epoch": None}
    tiny = compose_config(overrides=["update_seconds=120"])  # 30-second batches on the tiny model
    batch = cluster.batch_per_update(tiny.update_clips, tiny.update_seconds, tiny.trainer.accumulate_grad_batches,
                                     tiny.data.max_batch_size, tiny.data.max_batch_seconds, 2)
    assert (batch["accumulate"], batch["seconds"]) == (2, 120)
    assert validation_cadence(tiny, batch) == {}
