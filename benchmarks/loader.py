"""Does one loader worker keep up with decoding? Audio-seconds per second of one process, side by side in one run.

    python benchmarks/loader.py [clips=200] [passes=2] [repeats=3] [old=true]

The corpus: `clips` 48 kHz MP3 clips of distinct lengths (2-10 s) in the Common Voice layout, written to a
temporary directory. The audio is numpy, not espeak-ng (no system package needed): a pitch contour with
harmonics, syllable-like envelopes and noise. MP3 decoding costs much the same whatever it holds.

Rows, all in this process with one torch thread (as a loader worker, `asr.data.loading._one_thread`), except the last:
- decode only: soundfile's read of the MP3 (float32, 48 kHz), nothing else. The bar's reference.
- old load path: main at 8f8c191, `torchaudio.functional.resample` (a filter designed per clip), then a
  normalisation that copies.
- new load path: `asr.core.audio.load` (soxr HQ) and `asr.core.audio.normalize` (in place), as `UtteranceDataset` runs.
- one worker, end to end: `SpeechDataModule.train_dataloader()` with data.num_workers=1 (dataset + collate
  into the planned shapes, in the worker process), timed from the iterator's creation to its last batch over
  `passes` epochs after a first, untimed, one (the worker is persistent). The main process only takes
  batches. With old=true, the same with the old load path patched in (the worker is forked, so it inherits it).
- one worker with augmentation: augment=speed (0.9/1.0/1.1: another resampling ratio), augment=noise
  (half of the clips get a segment of a 16 kHz WAV file from a folder of 20 s files, as MUSAN's) and
  augment=speed_noise.

Every row is measured `repeats` times, in turns (a shared machine drifts): the table gives the median and
the range of the ratios.

audio-s/s is per wall second; per CPU-s is per CPU second of the process doing the work (this one, or the
worker), which other processes on a shared machine disturb less. ratio: the row's rate / decode only's.
The bar: one worker >= 0.7x decode only. The settings and their defaults: conf/bench/loader.yaml (`--help`).
"""

import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing

from asr.core import audio  # noqa: E402
from asr.core.config import compose  # noqa: E402
from asr.core.frames import WAV2VEC2  # noqa: E402
from asr.data.module import SpeechDataModule  # noqa: E402
from asr.tools import cli, synth  # noqa: E402


def speechlike(seconds: float, rng: np.random.Generator, rate: int = 48_000) -> np.ndarray:
    """(samples,) float32: a wandering pitch with 8 harmonics under syllable envelopes (~4 a second), plus noise."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 9))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t), 0, None) ** 2
    wave = 0.3 * envelope * voiced + 0.01 * rng.standard_normal(len(t))
    return (wave / np.abs(wave).max() * 0.5).astype(np.float32)


def make_corpus(root: Path, clips: int) -> list[Path]:
    """`clips` MP3 clips at 48 kHz, lengths spread evenly over 2-10 s (all distinct), all in train plus 4 in dev
    and test; Common Voice layout (asr.tools.synth.write_common_voice)."""
    rng = np.random.default_rng(0)
    seconds = rng.permutation(np.linspace(2.0, 10.0, clips + 8))
    sentences = synth.demo_sentences(clips + 8, random.Random(0))
    voice = synth.TRAIN_VOICES[0]
    splits = {"train": [(s, voice) for s in sentences[:clips]], "dev": [(s, voice) for s in sentences[clips:clips + 4]],
              "test": [(s, voice) for s in sentences[clips + 4:]]}
    synth.write_common_voice(root, splits, locale="pt", audio_for=lambda i, _s, _v: speechlike(seconds[i], rng))
    return sorted((root / "clips").glob("*.mp3"))[:clips]


def old_load(path, sample_rate: int = audio.SAMPLE_RATE, speed: float = 1.0) -> np.ndarray:
    """asr.core.audio.load at 8f8c191: torchaudio's resample."""
    wave, rate = sf.read(path, dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if rate != sample_rate:
        wave = torchaudio.functional.resample(torch.from_numpy(wave), rate, sample_rate).numpy()
    return wave


def old_normalize(wave: np.ndarray) -> np.ndarray:
    """asr.core.audio.normalize at 8f8c191: a new array (and float64 temporaries)."""
    return (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)


def rate(paths: list[Path], read) -> tuple[float, float]:
    """Audio-seconds per wall second and per CPU second of `read(path) -> seconds` over `paths`, in this process."""
    started, cpu, seconds = time.perf_counter(), time.process_time(), 0.0
    for path in paths:
        seconds += read(path)
    return seconds / (time.perf_counter() - started), seconds / (time.process_time() - cpu)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc, 10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def decode_only(path) -> float:
    wave, rate = sf.read(path, dtype="float32")
    return len(wave) / rate


def make_noise(folder: Path) -> Path:
    """4 noise files of 20 s at 16 kHz (WAV, as MUSAN's): 2 of noise, 2 of music (music/)."""
    rng = np.random.default_rng(1)
    (folder / "music").mkdir(parents=True)
    for i in range(2):
        sf.write(folder / f"noise-{i}.wav", (0.1 * rng.standard_normal(320_000)).astype(np.float32), 16_000)
        sf.write(folder / "music" / f"music-{i}.wav", speechlike(20.0, rng, rate=16_000), 16_000)
    return folder


def worker_rate(root: Path, passes: int, *overrides: str) -> tuple[tuple[float, float], int]:
    """((audio-s per wall second, per CPU second of the worker process) of one DataLoader worker through the
    real training loader, distinct batch shapes seen)."""
    os.environ["ASR_CACHE_DIR"] = str(root.parent / "cache")  # listings and durations stay in the temporary directory
    cfg = compose("train", ["lang=pt", f"data.root={root}", "data.num_workers=1", "data.max_batch_seconds=60",
                            f"run_dir={root.parent / 'run'}", *overrides])
    data = SpeechDataModule.from_config(cfg.data, WAV2VEC2)
    data.setup("fit")
    loader = data.train_dataloader()
    batches = iter(loader)  # starts the (persistent) worker
    worker = batches._workers[0].pid
    shapes = {tuple(b["audio"].shape) for b in batches}  # a first epoch, untimed
    started, cpu, seconds = time.perf_counter(), cpu_seconds(worker), 0.0
    for _ in range(passes):
        for batch in loader:
            seconds += batch["audio_seconds"]
            shapes.add(tuple(batch["audio"].shape))
    wall = seconds / (time.perf_counter() - started)
    return (wall, seconds / (cpu_seconds(worker) - cpu)), len(shapes)


def main(argv: list[str]) -> None:
    args, _ = cli.parse("bench/loader", argv)
    torch.set_num_threads(1)  # as a loader worker
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pt"
        paths = make_corpus(root, args.clips)
        noise = f"data.augment.noise_dir={make_noise(Path(tmp) / 'noise')}"
        total = sum(sf.info(p).duration for p in paths)
        rate(paths[:5], decode_only)  # warm-up: page cache, imports
        rows: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.repeats):
            measured = {
                "decode only (soundfile, 48 kHz)": rate(paths, decode_only),
                "new load path (soxr HQ, in place)": rate(paths,
                                                          lambda p: len(audio.normalize(audio.load(p))) / 16_000),
            }
            measured["one worker, end to end (new)"], shapes = worker_rate(root, args.passes)
            measured["one worker, augment=speed"] = worker_rate(root, args.passes, "augment=speed")[0]
            measured["one worker, augment=noise"] = worker_rate(root, args.passes, "augment=noise", noise)[0]
            measured["one worker, augment=speed_noise"] = worker_rate(root, args.passes, "augment=speed_noise",
                                                                      noise)[0]
            for name, figures in measured.items():
                rows.setdefault(name, []).append(figures)
        if args.old:
            rows["old load path (torchaudio resample)"] = [
                rate(paths, lambda p: len(old_normalize(old_load(p))) / 16_000)]
            audio.load, audio.normalize = old_load, old_normalize  # the forked worker inherits these
            rows["one worker, end to end (old load path)"] = [worker_rate(root, args.passes)[0]]
    print(f"{len(paths)} MP3 clips at 48 kHz, 2-10 s, {total / 60:.1f} min of audio; torch threads 1; "
          f"worker rows over {args.passes} epochs of 60 s batches ({shapes} batch shapes); {args.repeats} repeats: "
          f"median [min-max]\n")
    print(f"{'path':<40} {'audio-s/s':>10} {'ratio':>17}   {'per CPU-s':>10} {'ratio':>17}")
    reference = rows["decode only (soundfile, 48 kHz)"]
    for name, figures in rows.items():
        walls = [wall / ref[0] for (wall, _), ref in zip(figures, reference)]
        cpus = [cpu / ref[1] for (_, cpu), ref in zip(figures, reference)]
        print(f"{name:<40} {np.median([f[0] for f in figures]):>10.0f} {spread(walls):>17}   "
              f"{np.median([f[1] for f in figures]):>10.0f} {spread(cpus):>17}")


def spread(ratios: list[float]) -> str:
    return f"{np.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


if __name__ == "__main__":
    main(sys.argv[1:])
