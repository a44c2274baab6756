"""How well a model's word timestamps and forced alignment place words: clips joined with known silences.

    python benchmarks/timestamps.py model_path=<run>/model                 # 6 demo test clips
    python benchmarks/timestamps.py model_path=<run>/model clips=20 gap=1.0

The first `clips` test clips of the corpus (by name) are joined with `gap` seconds of silence before, between
and after them into one 16 kHz file. transcribe.py's path with timestamps=word transcribes it, and for each clip the
words whose middle falls in it are compared with where its speech starts and ends (the first and last
10 ms frame above 2% of the clip's peak, less the faint echo one test voice leaves after its last sound:
`speech_span`; the worst end counting the echoes is printed too). asr.tools.align's path aligns the clips' transcripts,
and the words that land outside their clip are counted: a word is outside when its first or its last
20 ms frame holds none of the clip (the joined clips do not start on frame boundaries, so a word's first frame
may begin up to a frame before the clip's first sample and still cover it). Prints a row per clip and the worst
differences. The settings and their defaults: conf/bench/timestamps.yaml (`--help`).
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from asr.core import audio, text  # noqa: E402
from asr.data import corpora  # noqa: E402
from asr.model import (
    inference,  # noqa: E402
    transcription,  # noqa: E402
)
from asr.tools import align, cli  # noqa: E402

# python -m asr.tools.align's windows over a long file (conf/align.yaml; transcribe.py's are the same)
ALIGN = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "align.yaml")
TRANSCRIBE = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "transcribe.yaml")


def speech_span(wave: np.ndarray) -> tuple[float, float, float]:
    """(start, end) in seconds of a clip's speech, and where it would end with its echo: from the first to the
    last 10 ms frame above 2% of the clip's peak, less an echo after the last sound. The echo: after the last
    frame above 5% of the peak, the level falls to a low point and then rises again, above 2% and to at least
    twice that low point, without reaching 5%. espeak-ng's variant f3 (pt+f3, one of the demo's two test voices;
    `echo 120 10` in its voice file) repeats its speech 120 ms later, faintly: the last vowel stops within 10-20 ms,
    and its echo rises to 2-3% of the peak for about 100 ms. No word covers it; the speech ends at the last
    frame above 2% before the low point. The rule is made for the demo's espeak-ng voices: on recorded speech a
    quiet last consonant after a short dip could be taken for an echo."""
    frames = np.abs(wave[: len(wave) // 160 * 160]).reshape(-1, 160).max(axis=1)
    level = frames / frames.max()
    loud = np.flatnonzero(level > 0.02)
    first, last = int(loud[0]), int(loud[-1])
    sound = int(np.flatnonzero(level > 0.05)[-1])  # the last frame of the speech proper
    tail = level[sound : last + 1]
    top = int(np.argmax(tail[1:])) + 1 if len(tail) > 1 else 0  # the echo's loudest frame, if there is one
    low = int(np.argmin(tail[:top])) if top else 0
    if top and tail[top] > 0.02 and tail[low] <= tail[top] / 2:
        end = sound + int(np.flatnonzero(tail[: low + 1] > 0.02)[-1]) + 1
        return first * 0.01, end * 0.01, (last + 1) * 0.01
    return first * 0.01, (last + 1) * 0.01, (last + 1) * 0.01


def joined(clips: list, path, gap: float) -> list[tuple[float, float, float, float, float]]:
    """The clips one after another with `gap` seconds of silence around each, written to `path` (16 kHz WAV);
    for each: (its start, its end, where its speech starts, where it ends, where it ends with its echo) in
    seconds of the joined file (`speech_span`)."""
    silence = np.zeros(int(gap * audio.SAMPLE_RATE), np.float32)
    waves, spans, at = [], [], gap
    for clip in clips:
        wave = audio.load(clip)
        start, end, echo = speech_span(wave)
        seconds = len(wave) / audio.SAMPLE_RATE
        spans.append((at, at + seconds, at + start, at + end, at + echo))
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
        model = inference.load(args.model_path)[0].eval()
        if args.pause_seconds != "model":  # decode.pause_seconds to measure, in place of the model's own
            model.hparams.pause_seconds = args.pause_seconds
        recognizer = transcription.Recognizer(model, None, None, "word")
        timed = next(transcription.transcribe(recognizer, [str(recording)], chunk_seconds=ALIGN.chunk_seconds,
                                              stride_seconds=ALIGN.stride_seconds,
                                              batch_seconds=120.0, num_buckets=TRANSCRIBE.num_buckets,
                                              num_workers=0))
        # as python -m asr.tools.align reads it
        logits, _ = transcription.file_logits(model, str(recording), ALIGN.chunk_seconds, ALIGN.stride_seconds)
        ids, _ = align.targets(" ".join(said[p] for p in paths), model.vocab, model.hparams.language)
        aligned = align.align(torch.log_softmax(logits.float(), dim=-1), ids, model.vocab,
                              model.geometry.seconds_per_frame)
    print(f"{len(paths)} clips joined with {args.gap:g} s of silence; {args.model_path}\n")
    print(f"{'clip':<34} {'speech s':>13} {'words s':>13} {'start':>6} {'end':>6}  aligned outside")
    starts, ends, with_echo, outside, at, placed = [], [], [], 0, 0, 0
    frame = model.geometry.seconds_per_frame
    for path, (start, end, speech_start, speech_end, echo_end) in zip(paths, spans):
        inside = [w for w in timed.words if start <= (w["start"] + w["end"]) / 2 <= end]
        words = aligned[at : at + len(said[path].split())]
        at += len(words)
        # outside: none of the word's first or last frame is in the clip (a frame: 20 ms from its start time)
        out = sum(not (start - frame < w["start"] < w["end"] < end + frame) for w in words)
        outside += out
        if inside:
            starts.append(inside[0]["start"] - speech_start)
            ends.append(inside[-1]["end"] - speech_end)
            with_echo.append(inside[-1]["end"] - echo_end)
            placed += abs(starts[-1]) <= args.tolerance and abs(ends[-1]) <= args.tolerance
        first, last = (f"{inside[0]['start']:.2f}-{inside[-1]['end']:.2f}", f"{starts[-1]:+.2f} {ends[-1]:+.2f}") \
            if inside else ("none", "-")
        echo = f"  (its echo to {echo_end:.2f} left out)" if echo_end > speech_end else ""
        print(f"{Path(path).name:<34} {speech_start:>6.2f}-{speech_end:<6.2f} {first:>13} {last:>13}  "
              f"{out} of {len(words)}{echo}")
    result = {"worst_start": max(map(abs, starts), default=None), "worst_end": max(map(abs, ends), default=None),
              "worst_end_with_echo": max(map(abs, with_echo), default=None),
              "echoes": sum(b > e for *_, e, b in spans), "aligned_outside": outside, "aligned_words": len(aligned),
              "placed": placed, "pause_seconds": model.hparams.pause_seconds}
    print(f"\nworst difference from the speech: first word's start {result['worst_start']:.2f} s, last word's end "
          f"{result['worst_end']:.2f} s ({result['worst_end_with_echo']:.2f} s to the end of the {result['echoes']} "
          f"echoes left out); aligned words outside their clip: {outside} of {len(aligned)}\n"
          f"clips whose first word starts and last word ends within {args.tolerance:g} s of the speech: {placed} of "
          f"{len(paths)} (decode.pause_seconds={model.hparams.pause_seconds})")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
