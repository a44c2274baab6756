"""Forced alignment (python -m asr.align) and word timestamps, on recordings made of test clips joined with
known offsets: the words land where each clip is. The demo model's checks are marked slow (it trains for
its 1,500 updates first); the others run on the near-random model of one update."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import asr
import transcribe
from asr import align
from asr.data import audio, corpora, text
from tests.conftest import in_process

GAP = 0.6  # seconds of silence between two joined clips


def joined(clips: list, path) -> list[tuple[float, float, float, float]]:
    """The clips one after another with GAP seconds of silence between, written to `path` (16 kHz WAV);
    for each: (its start, its end, where its speech starts, where it ends) in seconds of the joined file.
    Speech: the first and last 10 ms frame above 2% of the clip's peak amplitude."""
    waves, spans, at = [], [], GAP
    for clip in clips:
        wave = audio.load(clip)
        frames = np.abs(wave[: len(wave) // 160 * 160]).reshape(-1, 160).max(axis=1)
        loud = np.flatnonzero(frames > 0.02 * frames.max())
        seconds = len(wave) / audio.SAMPLE_RATE
        spans.append((at, at + seconds, at + loud[0] * 0.01, at + (loud[-1] + 1) * 0.01))
        waves += [np.zeros(int(GAP * audio.SAMPLE_RATE), np.float32), wave]
        at += seconds + GAP
    sf.write(path, np.concatenate([*waves, np.zeros(int(GAP * audio.SAMPLE_RATE), np.float32)]), audio.SAMPLE_RATE)
    return spans


def transcripts(root, split: str, language: str) -> dict[str, str]:
    """clip file name -> its normalised transcript, from the Common Voice TSV of `split`."""
    clips = corpora.read_split("common_voice", str(root), split, language, cache_dir=root / ".cache")
    return {p.rsplit("/", 1)[-1]: text.normalize(t, language) for p, t in zip(clips.column("path"), clips.column("text"))}


def run_align(*args):
    return in_process(align.main, [str(a) for a in args])


def test_a_known_transcript_aligns_word_by_word_in_every_format(barely_trained, cv_corpus, tmp_path):
    clips = sorted((cv_corpus / "clips").glob("*.mp3"))[:3]
    said = transcripts(cv_corpus, "train", "pt")
    spans = joined(clips, tmp_path / "joined.wav")
    words = " ".join(said[c.name] for c in clips).split()
    (tmp_path / "joined.txt").write_text(" ".join(said[c.name] for c in clips) + " 42 ß\n")
    model = barely_trained / "model"
    result = run_align(f"model_path={model}", f"audio={tmp_path / 'joined.wav'}", f"text={tmp_path / 'joined.txt'}")
    assert result.returncode == 0, result.stderr
    assert "are not in the model's vocabulary and are left out: 2 4 ß" in result.stderr
    aligned = json.loads(result.stdout)
    assert [w["word"] for w in aligned["words"]] == words  # every word, in order; what the vocabulary lacks left out
    starts = [w["start"] for w in aligned["words"]]
    assert starts == sorted(starts) and all(w["start"] < w["end"] <= spans[-1][1] + GAP for w in aligned["words"])
    labels = run_align(f"model_path={model}", f"audio={tmp_path / 'joined.wav'}", f"text={tmp_path / 'joined.txt'}",
                       "format=audacity").stdout.splitlines()
    assert [line.split("\t")[2] for line in labels] == words
    grid = run_align(f"model_path={model}", f"audio={tmp_path / 'joined.wav'}", f"text={tmp_path / 'joined.txt'}",
                     "format=textgrid").stdout
    assert grid.startswith('File type = "ooTextFile"') and grid.count('text = "') >= len(words)
    too_long = run_align(f"model_path={model}", f"audio={clips[0]}", f"text='{' '.join(words * 8)}'")
    assert too_long.returncode == 1 and too_long.stderr.strip().startswith("error: the transcript does not fit the audio")


def test_segment_cuts_a_recording_into_a_corpus_train_py_reads(barely_trained, cv_corpus, tmp_path):
    clips = sorted((cv_corpus / "clips").glob("*.mp3"))[:4]
    said = transcripts(cv_corpus, "train", "pt")
    joined(clips, tmp_path / "long.wav")
    transcript = " ".join(said[c.name] for c in clips)
    out = tmp_path / "corpus"
    result = run_align(f"model_path={barely_trained / 'model'}", f"audio={tmp_path / 'long.wav'}", f"text='{transcript}'",
                       "segment=true", "max_seconds=5", f"out={out}")
    assert result.returncode == 0, result.stderr
    listed = corpora.read_split("common_voice", str(out), "train", "pt", cache_dir=tmp_path / "cache")
    assert len(listed) >= 2 and " ".join(listed.column("text")) == transcript  # every word, once, in order
    lengths = [audio.duration(p) for p in listed.column("path")]
    assert max(lengths) <= 5 + 2 * GAP and sum(lengths) <= audio.duration(tmp_path / "long.wav")


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """The demo's tiny model as `make demo` trains it (1,500 updates, ~5 min on 2 cores)."""
    run_dir = tmp_path_factory.mktemp("demo")
    result = subprocess.run([sys.executable, "train.py", "logger=none", f"hydra.run.dir={run_dir}"], cwd=asr.REPO_DIR,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "model"


@pytest.mark.slow
def test_on_the_demo_model_words_land_in_their_clips(demo_model, tmp_path):
    """Six demo test clips joined with silences between: each clip's first transcribed word starts, and its
    last ends, within 0.1 s of where the clip's speech does; forced alignment of their transcripts puts
    every word inside its clip."""
    root = asr.REPO_DIR / "demo" / "cv-pt"
    said = transcripts(root, "test", "pt")
    clips = [root / "clips" / name for name in sorted(said)[:6]]
    spans = joined(clips, tmp_path / "joined.wav")
    timed = json.loads(in_process(transcribe.main, [f"model_path={demo_model}", f"audio={tmp_path / 'joined.wav'}",
                                                    "format=json", "timestamps=word"]).stdout)
    for start, end, speech_start, speech_end in spans:
        inside = [w for w in timed["words"] if start <= (w["start"] + w["end"]) / 2 <= end]
        assert inside, (start, end, timed["words"])
        assert abs(inside[0]["start"] - speech_start) <= 0.1 and abs(inside[-1]["end"] - speech_end) <= 0.1, \
            (speech_start, speech_end, inside)
    aligned = json.loads(run_align(f"model_path={demo_model}", f"audio={tmp_path / 'joined.wav'}",
                                   f"text='{' '.join(said[c.name] for c in clips)}'").stdout)["words"]
    at = 0
    for clip, (start, end, _, _) in zip(clips, spans):
        words = aligned[at : at + len(said[clip.name].split())]
        at += len(words)
        assert all(start <= w["start"] < w["end"] <= end for w in words), (clip.name, start, end, words)
