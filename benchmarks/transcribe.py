"""transcribe.py's path (`asr.model.transcription`) against the one it replaced (b7f9b85: transformers' ASR pipeline,
one file at a time), side by side in one run: same model, same clips, same torch threads.

    python benchmarks/transcribe.py                        # 300 clips of the demo
    python benchmarks/transcribe.py clips=1000 num_workers=0

The model: the tiny one (conf/model/tiny.yaml) with random weights (speed does not depend on training) and the
demo's vocabulary, exported (`asr.model.export`) to a temporary directory that both paths load, as transcribe.py
loads a model directory. The clips: the first `clips` files of `dir` by name, the list repeated when it holds
fewer. Each path first transcribes the first 2 clips, untimed (imports, kernels), then all of them, timed:
- pipeline (old): `asr.core.audio.load` then `pipeline("automatic-speech-recognition")` per file, a file longer than
  chunk_seconds in its windows, each transcript under the model's text rules (`asr.core.text.normalize`).
- transcribe.py (new): `asr.model.transcription.transcribe`, files batched by duration (batch_seconds), decoded by
  num_workers loader processes, from the start of the loader to the last transcript.
Prints audio-seconds per wall second of each, their ratio, and how many transcripts the two paths agree on
(both greedy on the same weights; a near-tie of two tokens can fall either way between a clip run alone and
one padded into a batch). The settings and their defaults: conf/bench/transcribe.yaml (`--help`).
"""

import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import pipeline
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from asr.core import audio, text  # noqa: E402
from asr.core.config import compose  # noqa: E402
from asr.core.frames import WAV2VEC2  # noqa: E402
from asr.data.loading import workers  # noqa: E402
from asr.data.module import SpeechDataModule  # noqa: E402
from asr.model import inference  # noqa: E402
from asr.model.export import export  # noqa: E402
from asr.model.module import CTCModel  # noqa: E402
from asr.model.transcription import Recognizer, transcribe  # noqa: E402
from asr.tools import cli  # noqa: E402


def demo_model(out_dir: Path) -> Path:
    """The tiny model with random weights (the train config's seed) and the demo's vocabulary, exported."""
    cfg = compose("train", [f"run_dir={out_dir / 'run'}"])
    data = SpeechDataModule.from_config(cfg.data, WAV2VEC2)
    data.load("train")  # the vocabulary of the training transcripts
    torch.manual_seed(cfg.seed)
    return export(CTCModel.from_config(cfg, data.vocab.tokens), out_dir / "model", format="hf", overwrite=False,
                  source=None)


def old_path(pipe, paths: list[str], language: str, chunk_seconds: float, stride_seconds: float) -> list[str]:
    """The loop of transcribe.py at b7f9b85: decode a file, run the pipeline on it, normalise its transcript."""
    transcripts = []
    for path in paths:
        wave = audio.load(path)
        chunking = {"chunk_length_s": chunk_seconds, "stride_length_s": stride_seconds} \
            if len(wave) / audio.SAMPLE_RATE > chunk_seconds else {}
        result = pipe({"raw": wave, "sampling_rate": audio.SAMPLE_RATE}, **chunking)
        transcripts.append(text.normalize(result["text"], language))
    return transcripts


def new_path(model, paths: list[str], args) -> list[str]:
    """transcribe.py's loop: `asr.model.transcription.transcribe`, transcripts in the files' order."""
    out = transcribe(Recognizer(model, None, None, "none"), paths, chunk_seconds=args.chunk_seconds,
                     stride_seconds=args.stride_seconds, batch_seconds=args.batch_seconds,
                     num_buckets=args.num_buckets, num_workers=workers(args.num_workers))
    return [result.text for result in out]


def timed(run) -> tuple[list[str], float]:
    started = time.perf_counter()
    return run(), time.perf_counter() - started


def main(argv: list[str]) -> dict:
    """The figures printed, and each path's transcripts (old, new)."""
    args, _ = cli.parse("bench/transcribe", argv)
    hf_logging.disable_progress_bar()  # its "Loading weights" bar
    names = sorted(str(p) for p in Path(args.dir).iterdir() if p.suffix in (".mp3", ".flac", ".wav"))
    paths = (names * -(-args.clips // len(names)))[: args.clips]
    seconds = sum(len(audio.load(p)) for p in paths) / audio.SAMPLE_RATE  # and the files in the page cache for both
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = demo_model(Path(tmp))
        pipe = pipeline("automatic-speech-recognition", model=str(model_dir), device="cpu")
        model = inference.load(model_dir)[0].eval()
        language = model.hparams.language
        old_path(pipe, paths[:2], language, args.chunk_seconds, args.stride_seconds)  # warm-up
        new_path(model, paths[:2], args)
        old, old_wall = timed(lambda: old_path(pipe, paths, language, args.chunk_seconds, args.stride_seconds))
        new, new_wall = timed(lambda: new_path(model, paths, args))
    equal = sum(a == b for a, b in zip(old, new))
    result = {"clips": len(paths), "audio_seconds": seconds, "old_seconds": old_wall, "new_seconds": new_wall,
              "old_rate": seconds / old_wall, "new_rate": seconds / new_wall, "equal": equal, "old": old, "new": new}
    print(f"{len(paths)} clips of {args.dir} ({len(set(paths))} distinct), {seconds / 60:.1f} min of audio; tiny "
          f"model, random weights; CPU, torch threads {torch.get_num_threads()}\n")
    rows = {"pipeline, one file at a time (old)": old_wall,
            f"transcribe.py, {args.batch_seconds:g} s batches, "
            f"loader workers {workers(args.num_workers)} (new)": new_wall}
    print(f"{'path':<58} {'wall s':>7} {'audio-s/s':>10}")
    for name, wall in rows.items():
        print(f"{name:<58} {wall:>7.2f} {seconds / wall:>10.1f}")
    print(f"new / old: {result['new_rate'] / result['old_rate']:.2f}x audio-seconds per second")
    print(f"equal transcripts: {equal} of {len(paths)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
