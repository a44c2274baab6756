"""Shared fixtures: the real Hydra config, composed and shrunk, and a small espeak-ng corpus in the
Common Voice release layout."""

import contextlib
import io
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import asr
from asr.core.config import compose
from asr.core.frames import WAV2VEC2
from asr.data.module import SpeechDataModule
from asr.tools import synth


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Duration and audio caches of the test corpora stay out of the user's ~/.cache."""
    os.environ["ASR_CACHE_DIR"] = str(tmp_path_factory.mktemp("asr-cache"))


def compose_config(name: str = "train", overrides: list[str] = ()):
    """The real config as the scripts get it: composed, resolved and checked against the code
    (`asr.core.config.checked`). Without a run_dir override it is a throwaway directory."""
    overrides = list(overrides)
    if not any(o.startswith("run_dir=") for o in overrides):
        overrides.append(f"run_dir={tempfile.mkdtemp(prefix='run-')}")
    return compose(name, overrides)


def data_module(*overrides: str):
    """The SpeechDataModule of the train config with these overrides."""
    return SpeechDataModule.from_config(compose_config(overrides=overrides).data, WAV2VEC2)


@pytest.fixture(scope="session")
def cv_corpus(tmp_path_factory) -> Path:
    """12 train, 4 dev, 4 test utterances of espeak Portuguese in the Common Voice layout."""
    root = tmp_path_factory.mktemp("cv") / "pt"
    sentences = synth.demo_sentences(20, random.Random(1))
    voices = synth.TRAIN_VOICES[:2]
    splits = {
        "train": [(s, voices[i % 2]) for i, s in enumerate(sentences[:12])],
        "dev": [(s, synth.DEV_VOICES[0]) for s in sentences[12:16]],
        "test": [(s, synth.TEST_VOICES[0]) for s in sentences[16:]],
    }
    synth.write_common_voice(root, splits, locale="pt")
    return root


@dataclass
class TrainedRun:
    dir: Path  # the run directory: config.yaml, config.1.yaml, checkpoints/ (best-step<N>, last), model/, results
    root: Path  # its data root as config.yaml records it (~/cv expanded: a link to `cv_corpus`)
    resumed: subprocess.CompletedProcess  # the second start's output


@pytest.fixture(scope="session")
def trained_run(cv_corpus, tmp_path_factory) -> TrainedRun:
    """One run for the tests that read a trained run (test_run, test_evaluate, test_faults); none writes into
    it (copy it first). The tiny model with lang=hy on the Portuguese corpus, given as ~/cv: 2 updates, then
    resumed with only its directory, ckpt_path=last, trainer.max_steps=4 and logger=none again; evaluations at
    updates 2 and 4."""
    home = tmp_path_factory.mktemp("home")
    (home / "cv").symlink_to(cv_corpus)
    run_dir = home / "run"
    command = [sys.executable, "train.py"]
    common = dict(cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=600)
    first = subprocess.run([*command, "lang=hy", "data.root=~/cv", "trainer.max_steps=2",
                            "trainer.val_check_interval=2", "data.max_batch_seconds=20", "data.num_workers=0",
                            "logger=none", f"hydra.run.dir={run_dir}"],
                           env=dict(os.environ, HOME=str(home)), **common)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = subprocess.run([*command, f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_steps=4",
                              "logger=none"], **common)  # logger=none again, as the first command had it
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return TrainedRun(run_dir, home / "cv", resumed)


@dataclass
class LearnedRun:
    dir: Path  # the run directory: checkpoints/best-step<N>.ckpt transcribes its dev split at CER < 0.5
    root: Path  # its corpus: 300 train, 30 dev, 10 test clips of short sentences, in the Common Voice layout


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory) -> LearnedRun:
    """A model that transcribes, for the slow tests that need one (test_train, test_onnx): `model=tiny` with its
    defaults on a generated corpus unlike the demo (short sentences of other words and voices), validated every
    50 updates and stopped once its dev CER is under 0.5 (or at its 1,500 updates)."""
    root = tmp_path_factory.mktemp("short") / "pt"
    synth.make_short(root, n_train=300, n_dev=30, n_test=10, seed=1)
    run_dir = tmp_path_factory.mktemp("tiny")
    result = subprocess.run(
        [sys.executable, "train.py", "lang=pt", f"data.root={root}", "logger=none", "trainer.val_check_interval=50",
         "+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping", "+callbacks.stop.monitor=val/cer",
         "+callbacks.stop.stopping_threshold=0.5", "+callbacks.stop.patience=1000", f"hydra.run.dir={run_dir}"],
        cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return LearnedRun(run_dir, root)


@pytest.fixture(scope="session")
def slurm():
    """The one-node SLURM cluster of slurm/local.sh, started if it is not running. Its tests skip, with the
    reason, only where it cannot start (not root, slurm-wlm not installed: `make setup` installs it)."""
    import shutil
    import subprocess

    if shutil.which("sbatch") and subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                                 timeout=30).stdout.strip().startswith(("idle", "mixed", "alloc")):
        return
    started = subprocess.run([str(asr.REPO_DIR / "slurm" / "local.sh")], capture_output=True, text=True, timeout=180)
    if started.returncode:
        pytest.skip(f"no SLURM cluster: {(started.stderr or started.stdout).strip()}")


# A run shrunk to its training loop: no metrics logger, no checkpoints, no progress bar.
SHRUNK = ("logger=none", "~callbacks.checkpoint", "~callbacks.last", "+trainer.enable_progress_bar=false",
          "+trainer.enable_model_summary=false")


@pytest.fixture(scope="session")
def barely_trained(cv_corpus, tmp_path_factory) -> Path:
    """A run of one update at a tiny learning rate, for the tests that compare two ways of transcribing
    (test_transcribe, test_timestamps, test_align, test_onnx; none writes into it): near-random weights, so
    transcripts are long and varied (a trained-to-blank model would make every comparison trivially equal).
    Its checkpoints/ and model/."""
    run_dir = tmp_path_factory.mktemp("barely-trained")
    result = subprocess.run([sys.executable, "train.py", f"data.root={cv_corpus}", "trainer.max_steps=1",
                             "trainer.val_check_interval=1", "optim.lr=1e-9", "data.num_workers=0",
                             "data.max_batch_seconds=20", "logger=none", f"hydra.run.dir={run_dir}"],
                            cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def assembled(*overrides: str, callbacks=(), **trainer_args):
    """The run train.py would build (`asr.run.training.assemble`) from the train config with these overrides;
    `callbacks` and `trainer_args` as `assemble` takes them."""
    from asr.run.training import assemble

    return assemble(compose_config(overrides=overrides), callbacks=list(callbacks), **trainer_args)


def recorded_fit(run_dir, *overrides: str, ckpt_path=None, callbacks=(), max_steps: int):
    """A shrunk run (`SHRUNK`, 2 loader workers, no validation) fitted for `max_steps` updates into `run_dir`,
    from `ckpt_path` when given: its trainer and the clip ids of each training batch (`RecordUpdates`)."""
    from tests.callbacks import RecordUpdates

    record = RecordUpdates()
    run = assembled(*overrides, "data.num_workers=2", f"run_dir={run_dir}", *SHRUNK,
                    f"ckpt_path='{ckpt_path}'" if ckpt_path else "ckpt_path=null", callbacks=[record, *callbacks],
                    max_steps=max_steps, accelerator="cpu", limit_val_batches=0)
    run.fit()
    return run.trainer, record.ids


def in_process(main, argv: list[str]) -> subprocess.CompletedProcess:
    """A tool's `main(argv)` (transcribe.py, python -m asr.tools.export) run in this process, ending as its command
    line would: exit status, stdout and stderr. Its imports are paid once per session, not once per call."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as stop:
            if isinstance(stop.code, str):  # sys.exit("error: ...") prints it and exits 1
                print(stop.code, file=sys.stderr)
            code = 1 if isinstance(stop.code, str) else stop.code or 0
    return subprocess.CompletedProcess(["python", *argv], code, out.getvalue(), err.getvalue())


def attention_mask(lengths: list[int], samples: int):
    """(B, samples) bool, True on each clip's samples: the mask HF's Wav2Vec2 forward takes, for the tests that
    call HF's forward beside ours (our encoder pass takes the host `lengths` instead)."""
    import torch

    return torch.arange(samples)[None, :] < torch.tensor(lengths)[:, None]
