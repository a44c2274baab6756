"""The exported model in the transformers pipeline and the transcribe command: the same transcripts as
evaluate.py, long files in chunks, any sample rate; the export command."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

import asr
import transcribe
from asr.core import audio, text
from asr.model.metrics import utterance_cer
from asr.tools import export as export_tool
from tests.conftest import in_process


def assert_same_transcripts(ours: list[str], theirs: list[str], max_cer: float = 0.02) -> None:
    """The same transcripts, up to argmax near-ties: evaluate.py pads a clip into its batch's planned shape,
    the pipeline runs it alone; padded frames are masked, so the logits agree only to float rounding, and
    the near-random model of these tests has near-ties in every clip. At most one clip differs, by at most
    `max_cer` of its characters (a beam search with an LM turns a near-tie into another short word)."""
    assert len(ours) == len(theirs)
    differ = [utterance_cer(b, a) for a, b in zip(ours, theirs) if a != b]
    assert len(differ) <= 1 and all(cer <= max_cer for cer in differ), list(zip(ours, theirs))


def audio_list(paths) -> str:
    """transcribe.py's `audio` setting for several files: a list in Hydra's grammar, each path quoted."""
    return "audio=[" + ",".join(f"'{p}'" for p in paths) + "]"


def run(*args, check=True):
    """A command's result; transcribe.py and asr.tools.export run in this process (`in_process`)."""
    if args[0] == "transcribe.py":
        result = in_process(transcribe.main, args[1:])
    elif args[:2] == ("-m", "asr.tools.export"):
        result = in_process(export_tool.main, args[2:])
    else:
        result = subprocess.run([sys.executable, *args], cwd=asr.REPO_DIR, capture_output=True, text=True,
                                timeout=300, env=dict(os.environ))
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_transcribe_equals_evaluate_from_checkpoint_and_export(cv_corpus, barely_trained, tmp_path):
    ckpt = barely_trained / "checkpoints" / "last.ckpt"
    run("evaluate.py", f"ckpt_path={ckpt}", f"data.root={cv_corpus}", "split=test", "data.num_workers=0",
        f"hydra.run.dir={tmp_path}/eval")
    predictions = {p["id"]: p["hypothesis"] for p in map(json.loads, (tmp_path / "eval" / "predictions.jsonl").open())}
    clips = [str(cv_corpus / "clips" / clip) for clip in sorted(predictions)]
    assert sum(map(len, predictions.values())) > 20  # not a blank model
    run("-m", "asr.tools.export", f"ckpt_path={ckpt}", f"out={tmp_path / 'exported'}")
    expected = [predictions[clip] for clip in sorted(predictions)]
    for model in (str(ckpt), str(tmp_path / "exported"), str(barely_trained / "model")):
        out = [json.loads(line) for line in run("transcribe.py", f"model_path={model}", audio_list(clips),
                                                "format=json", "batch_seconds=10").stdout.splitlines()]
        assert [o["path"] for o in out] == clips  # in the files' order, though batched by duration
        assert_same_transcripts([o["text"] for o in out], expected)
    # the export works where transformers' own pipeline loads it
    pipe = pipeline(tmp_path / "exported")
    assert_same_transcripts([text.normalize(pipe({"raw": audio.load(c), "sampling_rate": 16000})["text"], "pt")
                             for c in clips], expected)


def pipeline(model_dir):
    from transformers import pipeline as hf_pipeline

    return hf_pipeline("automatic-speech-recognition", model=str(model_dir), device="cpu")


def test_long_file_at_44khz_transcribes_in_chunks(cv_corpus, barely_trained, tmp_path):
    clips = sorted((cv_corpus / "clips").glob("*.mp3"))[:8]
    wave = np.concatenate([audio.load(c) for c in clips])  # ~25 s
    sf.write(tmp_path / "long.wav", torchaudio.functional.resample(torch.from_numpy(wave), 16000, 44100).numpy(),
             44100)
    model = str(barely_trained / "model")
    whole = run("transcribe.py", f"model_path={model}", f"audio={tmp_path / 'long.wav'}",
                "chunk_seconds=60").stdout.strip()
    chunked = json.loads(run("transcribe.py", f"model_path={model}", f"audio={tmp_path / 'long.wav'}", "format=json",
                             "chunk_seconds=6", "stride_seconds=1").stdout)
    assert chunked["seconds"] == pytest.approx(len(wave) / 16000, abs=0.01)
    # same model, same audio: the chunked transcript covers the file as the whole one does
    assert 0.8 < len(chunked["text"]) / len(whole) < 1.25 and chunked["text"] != whole
    # and its windows are the transformers pipeline's: the same transcript as the pipeline cutting it so
    wave_44k = sf.read(tmp_path / "long.wav", dtype="float32")[0]
    theirs = pipeline(model)({"raw": audio.resample(wave_44k, 44100, 16000), "sampling_rate": 16000},
                             chunk_length_s=6, stride_length_s=1)["text"]
    assert_same_transcripts([chunked["text"]], [text.normalize(theirs, "pt")])


def test_transcribe_reports_a_bad_file_and_goes_on(barely_trained, cv_corpus, tmp_path):
    (tmp_path / "bad.mp3").write_bytes(b"\xff\xfb" + bytes(64))
    good = str(sorted((cv_corpus / "clips").glob("*.mp3"))[0])
    result = run("transcribe.py", f"model_path={barely_trained / 'model'}", audio_list([tmp_path / "bad.mp3", good]),
                 "format=json", check=False)
    assert "bad.mp3 does not decode as audio" in result.stderr
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == [good]
    assert result.returncode == 1 and result.stderr.splitlines()[-1].startswith("error: 1 of 2 files failed")


@pytest.mark.slow  # 11-14 s of processes: make test stays under 8 minutes on 2 cores
def test_lm_decoding_in_evaluate_and_in_the_exported_pipeline_agree(cv_corpus, barely_trained, tmp_path):
    ckpt = barely_trained / "checkpoints" / "last.ckpt"
    run("evaluate.py", f"ckpt_path={ckpt}", f"data.root={cv_corpus}", "split=test", "data.num_workers=0",
        "decoder=beam_lm", "alpha=0.8", "beta=2.0", "lm_order=3",
        f"hydra.run.dir={tmp_path}/eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["decoder"] == "beam_lm" and metrics["alpha"] == 0.8 and metrics["beam_width"] == 100
    assert {"wer", "cer"} <= set(metrics["greedy"]) and metrics["lm_path"].endswith("3gram.arpa")
    predictions = {p["id"]: p for p in map(json.loads, (tmp_path / "eval" / "predictions.jsonl").open())}
    assert all("greedy_hypothesis" in p for p in predictions.values())
    lm_words = {w for line in (cv_corpus / "train.tsv").read_text().splitlines()[1:]
                for w in asr.core.text.normalize(line.split("\t")[3], "pt").split()}
    hypotheses = " ".join(p["hypothesis"] for p in predictions.values()).split()
    assert hypotheses and sum(w in lm_words for w in hypotheses) / len(hypotheses) > 0.8  # the LM steers to words

    run("-m", "asr.tools.export", f"ckpt_path={ckpt}", f"out={tmp_path / 'with-lm'}", f"lm_path={metrics['lm_path']}",
        "alpha=0.8", "beta=2.0")
    assert (tmp_path / "with-lm" / "alphabet.json").is_file()
    assert (tmp_path / "with-lm" / "language_model" / "3gram.arpa").is_file()
    clips = [str(cv_corpus / "clips" / clip) for clip in sorted(predictions)]
    out = [json.loads(line) for line in run("transcribe.py", f"model_path={tmp_path / 'with-lm'}", audio_list(clips),
                                            "format=json").stdout.splitlines()]
    expected = [predictions[clip]["hypothesis"] for clip in sorted(predictions)]
    assert_same_transcripts([o["text"] for o in out], expected, max_cer=0.05)
    timed = [json.loads(line) for line in run("transcribe.py", f"model_path={tmp_path / 'with-lm'}", audio_list(clips),
                                              "format=json", "timestamps=word").stdout.splitlines()]
    for line in timed:  # the words and frames of the LM's best beam (pyctcdecode's)
        assert " ".join(w["word"] for w in line["words"]) == line["text"]
        assert all(0 <= w["start"] < w["end"] <= line["seconds"] + 0.03 for w in line["words"])
    pipe = pipeline(tmp_path / "with-lm")  # transformers' pipeline decodes with the exported LM alike
    assert_same_transcripts([text.normalize(pipe({"raw": audio.load(c), "sampling_rate": 16000})["text"], "pt")
                             for c in clips], expected, max_cer=0.05)


@pytest.mark.slow  # 9-13 s of processes: make test stays under 8 minutes on 2 cores
def test_alpha_beta_sweep_is_a_hydra_multirun(cv_corpus, barely_trained, tmp_path):
    run("evaluate.py", "-m", f"ckpt_path={barely_trained / 'checkpoints' / 'last.ckpt'}", f"data.root={cv_corpus}",
        "split=dev", "data.num_workers=0", "decoder=beam_lm", "lm_order=2", "alpha=0.2,1.5", "beta=0.0",
        f"hydra.sweep.dir={tmp_path}")
    runs = sorted(json.loads(p.read_text())["alpha"] for p in tmp_path.glob("*/metrics.json"))
    assert runs == [0.2, 1.5]


def test_a_glob_transcribes_its_files_in_order_and_a_wrong_key_is_named(barely_trained, cv_corpus):
    """audio='<dir>/*.mp3' (quoted from the shell, expanded by the tool); a key transcribe.py does not take
    is named with its settings; --help lists each setting with its default."""
    clips = sorted((cv_corpus / "clips").glob("*.mp3"))
    out = run("transcribe.py", f"model_path={barely_trained / 'model'}", f"audio='{cv_corpus / 'clips'}/*.mp3'",
              "format=json").stdout.splitlines()
    assert [json.loads(line)["path"] for line in out] == [str(c) for c in clips]
    wrong = run("transcribe.py", f"model_path={barely_trained / 'model'}", "audio=x.mp3", "chunk=10", check=False)
    assert (wrong.returncode == 1
            and wrong.stderr.strip().startswith("error: chunk is not a setting of python transcribe.py"))
    assert "chunk_seconds" in wrong.stderr
    help_lines = run("transcribe.py", "--help").stdout.splitlines()
    assert any(line.split()[:2] == ["chunk_seconds", "30.0"] for line in help_lines)
    assert any(line.split()[:2] == ["model_path", "???"] for line in help_lines)


def test_transcribe_plans_a_split_as_evaluation_plans_it():
    """One planner: transcribe.py's batches of the demo test split (`transcription.sampler`, each clip one window)
    are the data layer's evaluation batches (`SpeechDataModule.sampler`) for the same budget and buckets."""
    from asr.core.frames import WAV2VEC2
    from asr.model import transcription
    from tests.conftest import data_module

    data = data_module("data.max_batch_seconds=40", "data.num_buckets=4", "data.max_batch_size=null",
                       "data.num_workers=0")
    test = data.load("test")
    evaluation = [[test[i].path for i in batch] for batch in data.sampler("test", whole=True)]
    paths = test.column("path")
    # the seconds Common Voice states for its clips (clip_durations.tsv); transcribe.py reads them from the headers
    plan = transcription.sampler(test.seconds.tolist(), WAV2VEC2, chunk_seconds=30.0, stride_seconds=5.0,
                                 batch_seconds=40.0, num_buckets=4)
    assert len(evaluation) > 3 and [[paths[i] for i in batch] for batch in plan] == evaluation
