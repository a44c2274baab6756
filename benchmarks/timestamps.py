"""How well a model's word timestamps and forced alignment place words: clips joined with known silences.

    python benchmarks/timestamps.py model_path=<run>/model                 # 6 demo test clips
    python benchmarks/timestamps.py model_path=<run>/model clips=20 gap=1.0

The first `clips` test clips of the corpus (by name) are joined with `gap` seconds of silence before, between
and after them into one 16 kHz file. transcribe.py's path with timestamps=word transcribes it, and for each clip the
words whose middle falls in it are compared with where its speech starts and ends (the first and last
10 ms frame above 2% of the clip's peak). asr.align's path aligns the clips' transcripts, and the words
that land outside their clip are counted. Prints a row per clip and the worst differences. The settings
and their defaults: conf/bench/timestamps.yaml (`--help`).
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from asr import align, cli, transcription  # noqa: E402
from asr.data import audio, corpora, text  # noqa: E402
from asr.model.module import CTCModel  # noqa: E402


def joined(clips: list, path, gap: float) -> list[tuple[float, float, float, float]]:
    """The clips one after another with `gap` seconds of silence around each, written to `path` (16 kHz WAV);
    for each: (its start, its end, where its speech starts, where it ends) in seconds of the joined file."""
    silence = np.zeros(int(gap * audio.SAMPLE_RATE), np.float32)
    waves, spans, at = [], [], gap
    for clip in clips:
        wave = audio.load(clip)
        frames = np.abs(wave[: len(wave) // 160 * 160]).reshape(-1, 160).max(axis=1)
        loud = np.flatnonzero(frames > 0.02 * frames.max())
        seconds = len(wave) / audio.SAMPLE_RATE
        spans.append((at, at + seconds, at + loud[0] * 0.01, at + (loud[-1] + 1) * 0.01))
        waves += [silence, wave]
        at += seconds + gap
    sf.write(path, np.concatenate([*waves, silence]), audio.SAMPLE_RATE)
    return spans


def main(argv: list[str]) -> dict:
    args, _ = cli.parse("bench/timestamps", argv)
    clips = corpora.read_split("common_voice", args.root, args.split, args.language,
                               cache_dir=Path(tempfile.gettempdir()) / "asr-bench-timestamps")
    said = dict(sorted(zip(clips.column("path"), (text.normalize(t, args.language) for t in clips.column("text")))))
    paths = list(said)[: args.clips]
    with tempfile.TemporaryDirectory() as tmp:
        recording = Path(tmp) / "joined.wav"
        spans = joined(paths, recording, args.gap)
        model = CTCModel.load(args.model_path)[0].eval()
        timed = next(transcription.transcribe(model, [str(recording)], chunk_seconds=30.0, stride_seconds=5.0,
                                              batch_seconds=120.0, num_workers=0, timestamps="word"))
        logits, _ = transcription.file_logits(model, str(recording))  # as python -m asr.align reads it
        ids, _ = align.targets(" ".join(said[p] for p in paths), model.vocab, model.hparams.language)
        aligned = align.align(torch.log_softmax(logits.float(), dim=-1), ids, model.vocab,
                              model.geometry.seconds_per_frame)
    print(f"{len(paths)} clips joined with {args.gap:g} s of silence; {args.model_path}\n")
    print(f"{'clip':<34} {'speech s':>13} {'words s':>13} {'start':>6} {'end':>6}  aligned outside")
    starts, ends, outside, at = [], [], 0, 0
    for path, (start, end, speech_start, speech_end) in zip(paths, spans):
        inside = [w for w in timed.words if start <= (w["start"] + w["end"]) / 2 <= end]
        words = aligned[at : at + len(said[path].split())]
        at += len(words)
        out = sum(not (start <= w["start"] < w["end"] <= end) for w in words)
        outside += out
        if inside:
            starts.append(inside[0]["start"] - speech_start)
            ends.append(inside[-1]["end"] - speech_end)
        first, last = (f"{inside[0]['start']:.2f}-{inside[-1]['end']:.2f}", f"{starts[-1]:+.2f} {ends[-1]:+.2f}") \
            if inside else ("none", "-")
        print(f"{Path(path).name:<34} {speech_start:>6.2f}-{speech_end:<6.2f} {first:>13} {last:>13}  {out} of {len(words)}")
    result = {"worst_start": max(map(abs, starts), default=None), "worst_end": max(map(abs, ends), default=None),
              "aligned_outside": outside, "aligned_words": len(aligned)}
    print(f"\nworst difference from the speech: first word's start {result['worst_start']:.2f} s, last word's end "
          f"{result['worst_end']:.2f} s; aligned words outside their clip: {outside} of {len(aligned)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
