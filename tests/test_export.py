"""The export command: a checkpoint as a transformers directory (with an LM: tests/test_transcribe.py)."""

import json

import torch
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

from asr.core import audio
from asr.core.frames import WAV2VEC2
from asr.data import loading
from asr.model import inference
from tests.test_transcribe import run


def test_export_command_names_a_missing_checkpoint_or_one_that_is_not(tmp_path):
    result = run("-m", "asr.tools.export", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"out={tmp_path}", check=False)
    assert result.returncode == 1 and "nope.ckpt does not exist" in result.stderr
    (tmp_path / "x.ckpt").write_text("hi")
    result = run("-m", "asr.tools.export", f"ckpt_path={tmp_path / 'x.ckpt'}", f"out={tmp_path}", check=False)
    assert result.returncode == 1 and f"error: {tmp_path / 'x.ckpt'} is not a readable checkpoint" in result.stderr


def test_export_writes_what_transformers_loads_and_computes_the_checkpoints_logits(trained_run, tmp_path):
    ckpt, out = trained_run.dir / "checkpoints" / "last.ckpt", tmp_path / "exported"
    result = run("-m", "asr.tools.export", f"ckpt_path={ckpt}", f"out={out}")
    assert result.stdout.strip() == f"exported to {out}"
    model = inference.from_checkpoint(ckpt).eval()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Wav2Vec2ForCTC"]
    assert json.loads((out / "asr.json").read_text()) == {"language": "hy", "pause_seconds": 0.6}  # text rules, pauses
    assert Wav2Vec2Processor.from_pretrained(out).tokenizer.get_vocab() == model.vocab.ids
    hf = Wav2Vec2ForCTC.from_pretrained(out).eval()
    wave = audio.normalize(audio.load(next((trained_run.root / "clips").glob("*.mp3"))))
    batch = loading.collate([{"id": "x", "audio": wave, "text": "", "labels": []}], hop=WAV2VEC2.hop)
    with torch.no_grad():
        torch.testing.assert_close(hf(batch["audio"]).logits, model.decode(batch).logits, atol=1e-4, rtol=1e-4)
