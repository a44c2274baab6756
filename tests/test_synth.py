"""The synthetic corpora: a Common Voice release layout whose stated durations are the audio's, spoken by
voices that no two splits share."""

import csv

import pytest
import soundfile as sf

from asr.tools import synth


def _rows(path):
    return list(csv.DictReader(path.open(encoding="utf-8"), delimiter="\t"))


def test_a_written_release_states_each_clips_duration_and_keeps_splits_apart(cv_corpus):
    stated = {row["clip"]: int(row["duration[ms]"]) for row in _rows(cv_corpus / "clip_durations.tsv")}
    splits = {split: _rows(cv_corpus / f"{split}.tsv") for split in ("train", "dev", "test")}
    assert [len(rows) for rows in splits.values()] == [12, 4, 4]
    assert sorted(stated) == sorted(row["path"] for rows in splits.values() for row in rows)
    for clip, ms in stated.items():  # MP3 adds at most a frame or two of codec delay
        decoded = sf.info(cv_corpus / "clips" / clip).duration * 1000
        assert ms == pytest.approx(decoded, abs=60), clip
    speakers = {split: {row["client_id"] for row in rows} for split, rows in splits.items()}
    assert not (speakers["train"] & speakers["dev"]) and not (speakers["train"] & speakers["test"])
    sentences = {split: {row["sentence"] for row in rows} for split, rows in splits.items()}
    assert not (sentences["train"] & sentences["test"])
    assert len(_rows(cv_corpus / "validated.tsv")) == 20 and _rows(cv_corpus / "other.tsv") == []


def test_the_two_corpora_share_no_voice_and_no_sentence():
    """The short corpus checks that a recipe learns on data it was not tuned on: nothing of the demo's."""
    import random

    demo = set(synth.demo_sentences(620, random.Random(0)))
    short = set(synth.short_sentences(800, random.Random(1)))
    assert len(demo) == 620 and len(short) == 800 and not demo & short
    demo_voices = {v.client_id for v in synth.TRAIN_VOICES + synth.DEV_VOICES + synth.TEST_VOICES}
    short_voices = {v.client_id for v in synth.SHORT_TRAIN_VOICES + synth.SHORT_DEV_VOICES + synth.SHORT_TEST_VOICES}
    assert len(demo_voices) == 12 and len(short_voices) == 10 and not demo_voices & short_voices
