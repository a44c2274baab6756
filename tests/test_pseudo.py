"""Pseudo-labels (python -m asr.tools.pseudo): transcripts of unlabelled audio filtered into a Common Voice-layout
corpus that train.py reads."""

import json

import pytest

from asr.data import pseudo
from asr.tools import pseudo as pseudo_tool
from tests.conftest import in_process

WORDS = [{"word": "o", "confidence": 0.9}, {"word": "gato", "confidence": 0.5}]
RULES = {"min_confidence": 0.6, "how": "mean", "rate": (5.0, 20.0), "max_repeats": 3}


def test_a_transcript_s_confidence_is_the_mean_the_least_or_the_character_weighted_mean_of_its_words():
    assert pseudo.utterance_confidence(WORDS, "mean") == pytest.approx(0.7)
    assert pseudo.utterance_confidence(WORDS, "min") == pytest.approx(0.5)
    assert pseudo.utterance_confidence(WORDS, "chars") == pytest.approx((0.9 * 1 + 0.5 * 4) / 5)
    assert pseudo.utterance_confidence([], "mean") == 0.0


def test_repeated_ngrams_are_found_in_a_row_only():
    assert pseudo.repeated_ngram("a a a casa", 3) == "a"
    assert pseudo.repeated_ngram("de la de la de la casa", 3) == "de la"
    assert pseudo.repeated_ngram("a casa a casa a", 3) is None  # twice in a row, not three times
    assert pseudo.repeated_ngram("o gato e o cão e o rato", 3) is None


@pytest.mark.parametrize("line, reason", [
    ({"path": "a.wav", "error": "unreadable"}, "failed"),
    ({"path": "a.wav", "seconds": 1.0, "text": "", "words": []}, "empty"),
    ({"path": "a.wav", "seconds": 1.0, "text": "o gato", "words": [{**WORDS[0], "confidence": 0.2}, WORDS[1]]},
     "low_confidence"),
    ({"path": "a.wav", "seconds": 0.1, "text": "o gato", "words": WORDS}, "speaking_rate"),  # 60 chars/s
    ({"path": "a.wav", "seconds": 3.0, "text": "o gato", "words": WORDS}, "speaking_rate"),  # 2 chars/s
    ({"path": "a.wav", "seconds": 1.0, "text": "o o o gato", "words": WORDS * 2}, "repeated_ngram"),
    ({"path": "a.wav", "seconds": 0.5, "text": "o gato", "words": WORDS}, None),  # 12 chars/s, confidence 0.7
])
def test_each_line_is_kept_or_dropped_for_one_reason(line, reason):
    assert pseudo.why_dropped(line, **RULES) == reason


@pytest.mark.slow  # two transcribe.py processes, ~20 s: make test stays under 8 minutes on 2 cores
def test_the_tool_writes_a_corpus_that_train_py_reads_and_a_rerun_resumes_its_archive(barely_trained, cv_corpus,
                                                                                        tmp_path):
    from tests.conftest import data_module

    ckpt = barely_trained / "checkpoints" / "last.ckpt"
    audio = cv_corpus / "clips"
    out = tmp_path / "pseudo"
    common = [f"model_path={ckpt}", f"audio={audio}", f"out={out}", f"labelled={cv_corpus}", "language=pt",
              "num_workers=0", "min_confidence=0", "rate_quantiles=[0,1]", "max_repeats=1000"]
    result = in_process(pseudo_tool.main, common)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "pseudo_report.json").read_text())
    archive = [json.loads(line) for line in (out / "archive.jsonl").read_text().splitlines()[1:]]
    assert report["files"] == len(archive) == len(list(audio.iterdir())) == 20
    assert report["kept"] + sum(report["dropped"].values()) == 20 and report["kept"] > 0
    rows = [line.split("\t") for line in (out / "train.tsv").read_text().splitlines()[1:]]
    texts = {line["path"]: line["text"] for line in archive}
    assert len(rows) == report["kept"]
    assert all(texts[str((out / "clips" / name).resolve())] == sentence for _, name, sentence in rows)
    train = data_module("lang=pt", f"data.root={out}", "data.num_workers=0").raw("train")
    assert len(train) == report["kept"] and train.column("duration").min() > 0  # clip_durations.tsv
    strict = in_process(pseudo_tool.main, [*common[:-3], "min_confidence=1.01", "rate_quantiles=[0,1]"])
    assert strict.returncode == 0 and "kept 0 of 20" in strict.stdout  # the archive resumed: nothing transcribed
    assert json.loads((out / "pseudo_report.json").read_text())["dropped"]["low_confidence"] > 0
    assert len((out / "archive.jsonl").read_text().splitlines()) == 21  # its first line, and each file once
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    refused = in_process(pseudo_tool.main, [*common[:2], f"out={mine}", *common[3:]])
    assert refused.returncode == 1 and "is not a corpus of pseudo-labels" in refused.stderr
