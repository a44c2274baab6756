"""What a trained model is used for, through transcribe.py: word and character timestamps with a confidence,
subtitles, and a whole archive transcribed into a JSON lines file that a second run resumes."""

import json
import shutil

import numpy as np
import pytest
import torch

import transcribe
from asr.core.outputs import LEDGER
from asr.model.transcription import frame_confidence, greedy_spans, subtitle_file, subtitles
from tests.conftest import in_process
from tests.test_transcribe import assert_same_transcripts, audio_list

TOKENS = ["a", "b", "|", "[UNK]", "[PAD]"]  # blank: 4


def test_greedy_spans_time_each_character_and_word_from_its_frames():
    """A character is its run of frames; two runs of one character with a blank between are two; a word spans
    its characters; the confidence is the least of the frames it spans."""
    best = np.array([4, 0, 0, 4, 1, 2, 2, 0, 4, 0, 4])
    confidence = np.array([0.9, 0.8, 0.6, 0.5, 1.0, 0.9, 0.9, 0.7, 0.5, 0.6, 0.9])
    words = greedy_spans(best, confidence, TOKENS, 4, "word", 0.02)
    assert words == [{"word": "ab", "start": 0.02, "end": 0.1, "confidence": 0.5},
                     {"word": "aa", "start": 0.14, "end": 0.2, "confidence": 0.5}]
    chars = greedy_spans(best, confidence, TOKENS, 4, "char", 0.02)
    assert [(c["char"], c["start"], c["end"]) for c in chars] == [
        ("a", 0.02, 0.06), ("b", 0.08, 0.1), (" ", 0.1, 0.14), ("a", 0.14, 0.16), ("a", 0.18, 0.2)]


def test_a_pause_ends_a_word_in_the_timestamps_as_in_the_transcript():
    """decode.pause_seconds on transcribe.py's path (`Recognizer`'s timestamps): the words either side of a run of
    more blank frames than the rule are two words, each timed by its own characters; the pause is the space."""
    from types import SimpleNamespace

    from asr.core.frames import WAV2VEC2
    from asr.core.text import Vocabulary
    from asr.model.module import decoded
    from asr.model.transcription import _spans

    vocab = Vocabulary(TOKENS)
    best = [4, 0, 1, 4, 4, 4, 4, 4, 4, 1, 0, 4]  # "ab", 6 blank frames, "ba"
    logits = torch.nn.functional.one_hot(torch.tensor([best]), len(TOKENS)).float() * 10
    frames = torch.tensor([len(best)])
    for pause_frames, words in ((5, [("ab", 0.02, 0.06), ("ba", 0.18, 0.22)]), (None, [("abba", 0.02, 0.22)])):
        model = SimpleNamespace(vocab=vocab, pause_frames=pause_frames, geometry=WAV2VEC2)
        out = decoded(logits, frames, vocab, "pt", pause_frames)
        spans = _spans(model, logits, frames, out, "word")[0]
        assert [(w["word"], w["start"], w["end"]) for w in spans] == words
        assert out.hypotheses == [" ".join(w for w, *_ in words)]
    chars = _spans(SimpleNamespace(vocab=vocab, pause_frames=5, geometry=WAV2VEC2), logits, frames, out, "char")[0]
    assert [(c["char"], c["start"], c["end"]) for c in chars][2] == (" ", 0.06, 0.18)


def test_a_frame_s_confidence_is_its_normalised_tsallis_entropy():
    """exp(-H), H the Tsallis entropy of order 1/3 of the frame's distribution, rescaled so that a one-hot frame
    gives 1 and a uniform one 0 (NeMo's entropy_tsallis_exp); a frame torn between two tokens scores lower than
    its best token's probability says."""
    alpha, vocab = 0.33, 5
    p = np.array([[1.0, 0, 0, 0, 0], [0.2] * 5, [0.55, 0.45, 0, 0, 0], [0.55, 0.1, 0.1, 0.15, 0.1],
                  [0.7, 0.3, 0, 0, 0]])
    logits = torch.tensor(np.log(np.maximum(p, 1e-30)), dtype=torch.float32)

    def by_definition(q):
        entropy = (1 - (q ** alpha).sum()) / (alpha - 1)
        most = (1 - vocab * (1 / vocab) ** alpha) / (alpha - 1)  # the uniform distribution's
        return (np.exp(-entropy) - np.exp(-most)) / (1 - np.exp(-most))

    confidence = frame_confidence(logits, alpha).numpy()
    assert confidence == pytest.approx([by_definition(q) for q in p], abs=1e-5)
    assert confidence[0] == pytest.approx(1.0) and confidence[1] == pytest.approx(0.0, abs=1e-6)
    assert confidence[2] < confidence[4] and confidence[2] < 0.55  # torn between two: lower than p_max


def test_subtitle_lines_keep_to_their_length_and_duration():
    words = [{"word": w, "start": s, "end": s + 0.4} for w, s in
             [("one", 0.0), ("two", 0.5), ("three", 1.0), ("four", 1.5), ("five", 7.0), ("six", 7.5)]]
    lines = subtitles(words, max_line_seconds=5.0, max_line_chars=14)
    assert lines == [(0.0, 1.4, "one two three"), (1.5, 1.9, "four"), (7.0, 7.9, "five six")]
    assert subtitles(words, 1.0, 100)[0] == (0.0, 0.9, "one two")  # 1.4 s would be too long
    assert subtitle_file(lines[:2], "srt") == ("1\n00:00:00,000 --> 00:00:01,400\none two three\n\n"
                                               "2\n00:00:01,500 --> 00:00:01,900\nfour\n")
    assert subtitle_file(lines[2:], "vtt") == "WEBVTT\n\n00:00:07.000 --> 00:00:07.900\nfive six\n"


def transcribe_py(*args):
    return in_process(transcribe.main, [str(a) for a in args])


def test_word_and_character_timestamps_cover_the_transcript_in_order(barely_trained, cv_corpus):
    clips = sorted((cv_corpus / "clips").glob("*.mp3"))[:4]
    model = barely_trained / "model"
    out = transcribe_py(f"model_path={model}", audio_list(clips), "format=json", "timestamps=word")
    assert out.returncode == 0, out.stderr
    for line in map(json.loads, out.stdout.splitlines()):
        words = line["words"]
        assert " ".join(w["word"] for w in words) == line["text"]  # the greedy path's words are the transcript's
        starts = [w["start"] for w in words]
        assert starts == sorted(starts) and all(w["start"] < w["end"] <= line["seconds"] + 0.03 for w in words)
        assert all(0 <= w["confidence"] <= 1 for w in words)  # a barely trained model: near 0
    chars = json.loads(transcribe_py(f"model_path={model}", f"audio={clips[0]}", "format=json",
                                     "timestamps=char").stdout)
    assert "".join(c["char"] for c in chars["chars"]) == chars["text"]


def test_subtitles_of_one_file_and_of_several(barely_trained, cv_corpus, tmp_path):
    clips = sorted((cv_corpus / "clips").glob("*.mp3"))[:2]
    model = barely_trained / "model"
    srt = transcribe_py(f"model_path={model}", f"audio={clips[0]}", "format=srt", "max_line_chars=12").stdout
    cues = srt.strip().split("\n\n")
    assert cues[0].startswith("1\n00:00:0") and all(len(c.splitlines()[2]) <= 12 or " " not in c.splitlines()[2]
                                                      for c in cues)
    several = transcribe_py(f"model_path={model}", audio_list(clips), "format=vtt")
    assert several.returncode == 1 and "needs out=<directory>" in several.stderr
    assert transcribe_py(f"model_path={model}", audio_list(clips), "format=vtt", f"out={tmp_path}").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{c.stem}.vtt" for c in clips] + [LEDGER])
    assert (tmp_path / f"{clips[0].stem}.vtt").read_text().startswith("WEBVTT\n\n00:00:0")
    # one file to a .vtt file, not a directory of that name; two files of one name apart by their folders
    one = tmp_path / "one" / "talk.vtt"
    assert transcribe_py(f"model_path={model}", f"audio={clips[0]}", "format=vtt", f"out={one}").returncode == 0
    assert one.is_file() and one.read_text().startswith("WEBVTT\n\n00:00:0")
    refused = transcribe_py(f"model_path={model}", audio_list(clips), "format=vtt", f"out={one}")
    assert refused.returncode == 1 and "names one vtt file; 2 files need out=<directory>" in refused.stderr
    for day in ("monday", "tuesday"):
        (tmp_path / "rec" / day).mkdir(parents=True)
        shutil.copy(clips[0], tmp_path / "rec" / day / "x.mp3")
    twins = [tmp_path / "rec" / day / "x.mp3" for day in ("monday", "tuesday")]
    assert transcribe_py(f"model_path={model}", audio_list(twins), "format=srt", f"out={tmp_path / 'subs'}"
                         ).returncode == 0
    assert sorted(str(p.relative_to(tmp_path / "subs")) for p in (tmp_path / "subs").rglob("*.srt")) == \
        ["monday/x.srt", "tuesday/x.srt"]


def test_an_archive_stopped_half_way_is_finished_by_a_second_run_each_file_once(barely_trained, cv_corpus, tmp_path):
    """out= appends a line per file under a first line naming the model; a run killed mid-line leaves half a
    line, which the next run drops; the next run transcribes only the files not there; a bad file is a line
    with its error; a file of another model is refused."""
    clips = [str(c) for c in sorted((cv_corpus / "clips").glob("*.mp3"))[:6]]
    (tmp_path / "bad.mp3").write_bytes(b"\xff\xfb" + bytes(64))
    files = [*clips, str(tmp_path / "bad.mp3")]
    model, out = barely_trained / "model", tmp_path / "archive.jsonl"
    whole = transcribe_py(f"model_path={model}", audio_list(files), f"out={tmp_path / 'whole.jsonl'}")
    assert whole.returncode == 1 and "audio-s" in whole.stderr  # the bad file; the progress bar on stderr
    lines = (tmp_path / "whole.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"transcribed_with": {"model": str(model.resolve())}}
    # as a run killed after three files leaves it: three lines and half of the fourth
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    again = transcribe_py(f"model_path={model}", audio_list(files), f"out={out}")
    assert "3 of 7 files are in" in again.stderr and again.returncode == 1
    written = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert sorted(w["path"] for w in written) == sorted(files)  # each file once
    first = {w["path"]: w.get("text") for w in map(json.loads, lines[1:])}
    assert_same_transcripts([w.get("text") or "" for w in written], [first[w["path"]] or "" for w in written])
    assert "does not decode as audio" in next(w["error"] for w in written if w["path"].endswith("bad.mp3"))
    # a failed file is not done: each run tries it again, and says so in its last line
    retried = transcribe_py(f"model_path={model}", audio_list(files), f"out={out}")
    assert "6 of 7 files are in" in retried.stderr and retried.returncode == 1
    assert retried.stderr.strip().splitlines()[-1] == (f"error: 1 of 1 files failed (named above); the others were "
                                                       f"transcribed; out={out} holds their errors, and a rerun "
                                                       f"tries them again")
    assert len(out.read_text().splitlines()) == 9 and "error" in json.loads(out.read_text().splitlines()[-1])
    shutil.copy(clips[0], tmp_path / "bad.mp3")  # the file fixed
    fixed = transcribe_py(f"model_path={model}", audio_list(files), f"out={out}")
    assert fixed.returncode == 0
    assert_same_transcripts([json.loads(out.read_text().splitlines()[-1])["text"]], [first[clips[0]]])
    done = transcribe_py(f"model_path={model}", audio_list(files), f"out={out}")
    assert done.returncode == 0 and len(out.read_text().splitlines()) == 10  # nothing left: nothing added
    other = transcribe_py(f"model_path={barely_trained / 'checkpoints' / 'last.ckpt'}", audio_list(files), f"out={out}")
    assert (other.returncode == 1
            and other.stderr.strip().splitlines()[-1].startswith(f"error: out={out} holds "
                                                                 f"transcripts of {model.resolve()}"))


def test_text_lines_of_several_files_start_with_their_path(barely_trained, cv_corpus):
    clips = [str(c) for c in sorted((cv_corpus / "clips").glob("*.mp3"))[:3]]
    several = transcribe_py(f"model_path={barely_trained / 'model'}", audio_list(clips))
    lines = several.stdout.splitlines()
    assert several.returncode == 0 and [line.split("\t")[0] for line in lines] == clips
    one = transcribe_py(f"model_path={barely_trained / 'model'}", f"audio={clips[0]}")
    assert one.returncode == 0 and len(one.stdout.splitlines()) == 1 and "\t" not in one.stdout  # one file: no path


@pytest.mark.parametrize("args, message", [
    (["timestamps=char", "format=text"], "timestamps=char needs format=json"),
    (["format=srt", "timestamps=char"], "format=srt makes lines of words"),
    (["format=doc"], "format=doc: give one of text, json, srt, vtt"),
    (["num_workers=two"], "num_workers='two': give a number of loader processes"),  # before the model loads
])
def test_settings_that_do_not_go_together_are_named(args, message, cv_corpus):
    clip = sorted((cv_corpus / "clips").glob("*.mp3"))[0]
    result = transcribe_py("model_path=x.ckpt", f"audio={clip}", *args)
    assert result.returncode == 1 and result.stderr.strip().startswith(f"error: {message}")
