"""Forced alignment (python -m asr.tools.align) on recordings made of clips joined with known offsets, on the
near-random model of one update: every word of the transcript, in order, in every format; a corpus cut from
a recording. How well a trained model places the words: benchmarks/timestamps.py."""

import json
import shutil

from asr.core import audio, text
from asr.data import corpora
from asr.tools import align
from benchmarks.timestamps import joined
from tests.conftest import assembled, in_process

GAP = 0.6  # seconds of silence between two joined clips


def transcripts(root, split: str, language: str) -> dict[str, str]:
    """clip file name -> its normalised transcript, from the Common Voice TSV of `split`."""
    clips = corpora.read_split("common_voice", str(root), split, language, cache_dir=root / ".cache")
    return {p.rsplit("/", 1)[-1]: text.normalize(t, language)
            for p, t in zip(clips.column("path"), clips.column("text"))}


def run_align(*args):
    return in_process(align.main, [str(a) for a in args])


def test_a_known_transcript_aligns_word_by_word_in_every_format(barely_trained, cv_corpus, tmp_path):
    clips = sorted((cv_corpus / "clips").glob("*.mp3"))[:3]
    said = transcripts(cv_corpus, "train", "pt")
    spans = joined(clips, tmp_path / "joined.wav", GAP)
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
    assert (too_long.returncode == 1
            and too_long.stderr.strip().startswith("error: the transcript does not fit the audio"))


def test_segment_cuts_a_recording_into_a_corpus_train_py_reads(barely_trained, cv_corpus, tmp_path):
    clips = sorted((cv_corpus / "clips").glob("*.mp3"))[:4]
    said = transcripts(cv_corpus, "train", "pt")
    joined(clips, tmp_path / "long.wav", GAP)
    transcript = " ".join(said[c.name] for c in clips)
    out = tmp_path / "corpus"
    result = run_align(f"model_path={barely_trained / 'model'}", f"audio={tmp_path / 'long.wav'}",
                       f"text='{transcript}'", "segment=true", "max_seconds=5", f"out={out}")
    assert result.returncode == 0, result.stderr
    splits = {s: corpora.read_split("common_voice", str(out), s, "pt", cache_dir=tmp_path / "cache")
              for s in ("train", "dev", "test")}
    listed = corpora.Clips.concat([splits["train"], splits["dev"]])
    order = sorted(range(len(listed)), key=lambda i: listed.column("path")[i])  # <name>_<n>.wav: the clips' order
    assert len(splits["dev"]) == 1 and len(splits["train"]) >= 1  # one clip of the recording held out
    assert splits["test"].column("path") == splits["dev"].column("path")
    assert " ".join(listed.column("text")[i] for i in order) == transcript  # every word, once, in order
    lengths = [audio.duration(p) for p in listed.column("path")]
    assert max(lengths) <= 5 + 2 * GAP and sum(lengths) <= audio.duration(tmp_path / "long.wav")
    # a second recording is appended; the same one again is refused, and nothing is rewritten
    shutil.copy(tmp_path / "long.wav", tmp_path / "again.wav")
    before = (out / "train.tsv").read_text()
    second = run_align(f"model_path={barely_trained / 'model'}", f"audio={tmp_path / 'again.wav'}",
                       f"text='{transcript}'", "segment=true", "max_seconds=5", f"out={out}")
    assert second.returncode == 0, second.stderr
    assert (out / "train.tsv").read_text().startswith(before) and "again\t" in (out / "train.tsv").read_text()
    same = run_align(f"model_path={barely_trained / 'model'}", f"audio={tmp_path / 'long.wav'}",
                     f"text='{transcript}'", "segment=true", f"out={out}")
    assert same.returncode == 1 and same.stderr.strip().startswith(f"error: out={out} lists clips of long already")
    # and train.py reads it as it stands
    run = assembled(f"data.root={out}", "data.num_workers=0", "logger=none", f"run_dir={tmp_path / 'run'}")
    assert len(run.data.load("train")) >= 2 and len(run.data.load("dev")) == 2


def test_a_text_that_names_a_missing_file_or_says_nothing_stops_in_one_line(tmp_path):
    """Before the model loads (model_path names nothing here): a path-like text= that does not exist is not
    aligned as the transcript; an empty transcript says so."""
    common = [f"model_path={tmp_path / 'no-model'}", f"audio={tmp_path / 'talk.wav'}"]
    for given in (tmp_path / "talk.txt", "notes/talk"):
        result = run_align(*common, f"text={given}")
        assert result.returncode == 1
        assert result.stderr.strip() == (f"error: text={given}: no such file (text= takes a transcript file, or the "
                                          f"words themselves: text='o livro azul')")
    (tmp_path / "empty.txt").write_text("  \n")
    result = run_align(*common, f"text={tmp_path / 'empty.txt'}")
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: text={tmp_path / 'empty.txt'} is empty: give the words spoken in " \
                                    f"audio={tmp_path / 'talk.wav'}"
