"""Decode + resample speed per loader worker, with and without the 16 kHz cache (data.decode_cache).

    python benchmarks/decode.py                                      # 300 clips of the demo
    python benchmarks/decode.py dir=<cv-corpus/pt>/clips clips=1000  # a corpus's clips directory

Prints audio-seconds decoded per second of one process (one DataLoader worker) for the release audio
(48 kHz MP3 for Common Voice: decode, then resample to 16 kHz) and for the FLAC and WAV copies, plus the
one-time cost of making the copies and their size on disk. All measured in this one run, same clips.
The settings and their defaults: conf/bench/decode.yaml (`--help`).
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from asr.core import audio  # noqa: E402
from asr.data import cache  # noqa: E402
from asr.tools import cli  # noqa: E402


def rate(paths: list[str]) -> tuple[float, float]:
    """(audio seconds, audio seconds per wall second) of decoding `paths` to 16 kHz in this process."""
    started, seconds = time.perf_counter(), 0.0
    for path in paths:
        seconds += len(audio.load(path)) / audio.SAMPLE_RATE
    return seconds, seconds / (time.perf_counter() - started)


def main(argv: list[str]) -> None:
    args, _ = cli.parse("bench/decode", argv)
    torch.set_num_threads(1)  # as a loader worker (asr.data.loading._one_thread)
    paths = sorted(str(p) for p in Path(args.dir).iterdir() if p.suffix in (".mp3", ".flac", ".wav"))[: args.clips]
    rate(paths[:10])  # warm-up: imports, resampling kernels
    seconds, release = rate(paths)
    size = sum(Path(p).stat().st_size for p in paths)
    print(f"{len(paths)} clips, {seconds / 60:.1f} min of audio, one process, torch threads 1\n")
    print(f"{'audio read by the loader':<28} {'audio-s/s':>10} {'vs release':>10} {'MB':>7} {'one-time s':>11}")
    print(f"{'release (' + Path(paths[0]).suffix[1:] + ', resampled)':<28} {release:>10.0f} {1:>10.2f} "
          f"{size / 1e6:>7.1f} {'-':>11}")
    for fmt in ("flac", "wav"):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            copies = cache.decoded_copies(paths, Path(tmp), workers=1, format=fmt)
            build = time.perf_counter() - started
            _, cached = rate(copies)
            size = sum(Path(p).stat().st_size for p in copies)
            print(f"{'cache, 16 kHz ' + fmt:<28} {cached:>10.0f} {cached / release:>10.2f} {size / 1e6:>7.1f} "
                  f"{build:>11.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
