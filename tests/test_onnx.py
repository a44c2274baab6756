"""The ONNX export (asr.model.onnx, python -m asr.tools.export format=onnx) and transcribe.py backend=onnx: the graph
computes the checkpoint's logits and transcripts on padded batches, transcribe.py gives the same transcripts
through either backend, int8 stays within a CER point of float32, and what cannot be exported or run is said."""

import json

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch

from asr import SetupError
from asr.core import audio, text
from asr.data import corpora
from asr.model import inference
from asr.model import onnx as asr_onnx
from asr.model.metrics import ErrorRates
from asr.model.onnx import OnnxModel
from asr.model.transcription import Recognizer, transcribe
from tests.test_transcribe import audio_list, run


@pytest.fixture(scope="module")
def exported(barely_trained, tmp_path_factory):
    """conftest's near-random run exported by the command, float32 and int8."""
    out = tmp_path_factory.mktemp("onnx") / "exported"
    result = run("-m", "asr.tools.export", f"ckpt_path={barely_trained / 'checkpoints' / 'last.ckpt'}", f"out={out}",
                 "format=onnx", "quantize=int8")
    assert result.stdout.strip() == f"exported to {out}"
    assert sorted(p.name for p in out.iterdir()) == [  # the processor and text rules as format=hf writes them
        "asr.json", "model.int8.onnx", "model.onnx", "preprocessor_config.json", "processor_config.json",
        "tokenizer_config.json", "vocab.json"]
    return out


def padded(waves: list[np.ndarray]) -> dict:
    """A batch as transcription collates it: (B, S) zero-padded to the longest, with the lengths."""
    batch = np.zeros((len(waves), max(map(len, waves))), np.float32)
    for row, wave in zip(batch, waves):
        row[: len(wave)] = wave
    return {"audio": torch.from_numpy(batch), "lengths": [len(w) for w in waves]}


def test_the_graph_computes_the_checkpoints_logits_and_transcripts_on_padded_batches(barely_trained, exported,
                                                                                       cv_corpus):
    model = inference.from_checkpoint(barely_trained / "checkpoints" / "last.ckpt").eval()
    graph = OnnxModel(exported / "model.onnx")
    assert graph.geometry == model.geometry and graph.vocab.tokens == model.vocab.tokens and graph.language == "pt"
    assert [i.name for i in graph.session.get_inputs()] == ["audio", "lengths"]
    assert [o.name for o in graph.session.get_outputs()] == ["logits", "frames"]
    waves = [audio.normalize(audio.load(c)) for c in sorted((cv_corpus / "clips").glob("*.mp3"))]
    transcripts = []
    for rows in (waves[:1], waves[1:8], waves[8:]):  # one clip alone; 7 and 12 clips padded to their longest
        batch = padded(rows)
        with torch.no_grad():
            ours = model(batch)
        theirs = graph(batch)
        assert (theirs.frames.tolist() == ours.frames.tolist()
                == model.geometry.frames(np.array(batch["lengths"])).tolist())
        torch.testing.assert_close(theirs.logits, ours.logits, atol=1e-4, rtol=1e-4)
        hypotheses = graph.decoded(theirs.logits, theirs.frames).hypotheses
        assert hypotheses == model.decoded(ours.logits, ours.frames).hypotheses
        transcripts += hypotheses
    assert sum(map(len, transcripts)) > 100  # not a blank model: the comparison is not trivially equal


def test_int8_holds_the_matrix_products_as_int8_and_keeps_the_interface(exported):
    fp32, int8 = (onnx.load(exported / name) for name in ("model.onnx", "model.int8.onnx"))
    ops = {node.op_type for node in int8.graph.node}
    assert "MatMulInteger" in ops and "ConvInteger" not in ops  # asr.model.onnx.INT8: the convolutions stay float32
    assert [i.name for i in int8.graph.input] == [i.name for i in fp32.graph.input]
    assert (exported / "model.int8.onnx").stat().st_size < 0.6 * (exported / "model.onnx").stat().st_size


def test_transcribe_backend_onnx_gives_the_torch_backends_transcripts(barely_trained, exported, cv_corpus, tmp_path):
    """Through the same batching and windows: the corpus's clips, and a 25 s file cut into 6 s windows."""
    clips = sorted((cv_corpus / "clips").glob("*.mp3"))
    sf.write(tmp_path / "long.wav", np.concatenate([audio.load(c) for c in clips[:8]]), 16000)
    files = [*clips, tmp_path / "long.wav"]
    common = [audio_list(files), "format=json", "batch_seconds=20", "chunk_seconds=6", "stride_seconds=1"]
    torch_out = run("transcribe.py", f"model_path={barely_trained / 'checkpoints' / 'last.ckpt'}", *common).stdout
    onnx_out = run("transcribe.py", "backend=onnx", f"model_path={exported}", *common).stdout
    assert onnx_out == torch_out and len(torch_out.splitlines()) == len(files)
    int8_out = run("transcribe.py", "backend=onnx", f"model_path={exported / 'model.int8.onnx'}", *common).stdout
    assert [json.loads(line)["path"] for line in int8_out.splitlines()] == [str(f) for f in files]


def test_what_onnx_cannot_export_or_run_is_said_in_one_line(barely_trained, exported, tmp_path):
    ckpt = barely_trained / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"]["model.wav2vec2.encoder.layers.0.adapter.weight"] = torch.zeros(4, 4)
    torch.save(checkpoint, tmp_path / "adapter.ckpt")
    result = run("-m", "asr.tools.export", f"ckpt_path={tmp_path / 'adapter.ckpt'}", f"out={tmp_path / 'x'}",
                 "format=onnx", check=False)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert ("holds 1 parameters this code's model does not have (model.wav2vec2.encoder.layers.0.adapter.weight)"
            in result.stderr)
    # a model that knows a module of its own: the graph would leave it out
    model = inference.from_checkpoint(ckpt)
    model.model.wav2vec2.encoder.layers[0].adapter = torch.nn.Linear(4, 4)
    with pytest.raises(SetupError, match=r"holds 2 parameters a wav2vec2 CTC model does not have "
                                         r"\(model\.wav2vec2\.encoder\.layers\.0\.adapter\.weight, .*adapter\.bias\)"):
        asr_onnx.export(model, tmp_path / "y")
    result = run("-m", "asr.tools.export", f"ckpt_path={ckpt}", f"out={tmp_path / 'z'}", "quantize=int8", check=False)
    assert result.returncode == 1 and "quantize=int8 quantises the ONNX graph: add format=onnx" in result.stderr
    # backend=onnx on what is not an ONNX export names the command that writes one, and the other way round
    result = run("transcribe.py", "backend=onnx", f"model_path={barely_trained / 'model'}", "audio=x.mp3", check=False)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: model_path={barely_trained / 'model'}: there is no model.onnx (python -m asr.tools.export "
        f"ckpt_path=<checkpoint> out={barely_trained / 'model'} format=onnx writes model.onnx; quantize=int8 adds "
        f"model.int8.onnx)")
    result = run("transcribe.py", f"model_path={exported}", "audio=x.mp3", check=False)
    assert result.returncode == 1 and "is an ONNX export (model.onnx): backend=onnx runs it" in result.stderr


@pytest.mark.slow
def test_int8_transcribes_within_a_cer_point_of_float32(learned_run, tmp_path):
    """On a model that transcribes (conftest's learned run: dev CER under 0.5), scored on its dev split: the int8
    graph's CER at most 0.01 above the float32 graph's."""
    [ckpt] = (learned_run.dir / "checkpoints").glob("best-step*.ckpt")
    run("-m", "asr.tools.export", f"ckpt_path={ckpt}", f"out={tmp_path}", "format=onnx", "quantize=int8")
    rows = list(corpora.read_common_voice(learned_run.root, "dev", "pt"))
    references = [text.normalize(row.text, "pt") for row in rows]
    cers = {}
    for name in ("model.onnx", "model.int8.onnx"):
        model = OnnxModel(tmp_path / name)
        hypotheses = [out.text for out in transcribe(Recognizer(model, None, None, "none"), [row.path for row in rows],
                                                     chunk_seconds=30, stride_seconds=5, batch_seconds=60,
                                                     num_buckets=19, num_workers=0)]
        rates = ErrorRates()
        rates.update(references, hypotheses)
        cers[name] = rates.rates()["cer"]
    assert cers["model.onnx"] < 0.5, cers  # it transcribes: the comparison means something
    assert cers["model.int8.onnx"] <= cers["model.onnx"] + 0.01, cers
