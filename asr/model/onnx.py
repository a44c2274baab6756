"""The network as an ONNX graph for onnxruntime on a CPU (`python -m asr.tools.export format=onnx`), and that graph
behind what transcription needs of a CTCModel (`transcribe.py backend=onnx`).

model.onnx takes `audio` (B, S) float32 samples at 16 kHz, each clip normalised and zero-padded to the longest,
and `lengths` (B,) int64 samples of each clip; it gives `logits` (B, T, V) float32 and `frames` (B,) int64, the
frames of each clip. B and S are free. The graph counts frames from the lengths as `asr.core.frames` does and
masks padded frames in attention as the torch model does, so a padded batch transcribes as in torch (an
attention mask in samples would leave the frame count to the caller). Its metadata holds the frame geometry
(`conv_kernel`, `conv_stride`); vocab.json, asr.json (the text rules) and the processor files lie beside it.
"""

import contextlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from asr import SetupError
from asr.core import checkpoints
from asr.core.frames import Geometry
from asr.core.text import Vocabulary
from asr.model import finetune as tuning
from asr.model.lm import exported_decoder
from asr.model.module import CTCModel, Decoded, Output, decoded, frames_of_pause

FILES = {None: "model.onnx", "int8": "model.int8.onnx"}  # by `quantize`
# quantize=int8: the weights of the matrix products (the transformer's and the CTC head's) as signed int8, one
# scale per output channel; the convolutions stay float32. Measured (docs/performance.md), XLS-R 300M's shape on
# a 2-core Xeon with AVX-512 VNNI: signed weights ran 2.0x the float32 graph, unsigned 1.05x; one scale per
# channel as fast as one per tensor and nearer float32's logits. int8 convolutions (ConvInteger) ran slower
# than float32 ones, and their weight-normed positional convolution is not always a constant the quantiser takes.
INT8 = {"weight_type": "QInt8", "op_types_to_quantize": ["MatMul"], "per_channel": True}  # quantize_dynamic's


class Graph(torch.nn.Module):
    """What model.onnx computes: the network's logits in evaluation, from audio (B, S) and lengths (B,) as
    tensors; the frames and their mask as tensor ops where the torch model computes them on the host
    (`SyncFreeWav2Vec2ForCTC.encode`), padded frames always masked (masking a batch without padding changes
    nothing)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        network = self.network
        features = network.features(audio).transpose(1, 2)
        frames = network.geometry.frames(lengths)
        mask = torch.arange(features.shape[1], device=audio.device)[None, :] < frames[:, None]  # (B, T)
        hidden, _ = network.wav2vec2.feature_projection(features)
        return network.lm_head(network.transformer(hidden, mask)), frames


def unknown_parameters(network: torch.nn.Module) -> list[str]:
    """The names of `network`'s parameters and buffers that HF's Wav2Vec2ForCTC of its config does not have:
    the graph computes only the network's own modules, so it would leave them out. (MMS adapters are HF's own,
    with adapter_attn_dim in the config; LoRA is merged into the weights before export.)"""
    from transformers import Wav2Vec2ForCTC

    with torch.device("meta"):
        known = set(Wav2Vec2ForCTC(network.config).state_dict())
    return [f"model.{name}" for name in network.state_dict() if name not in known]


def export(model: CTCModel, out_dir: Path, quantize: str | None = None) -> Path:
    """model.onnx of `model` in `out_dir`; with quantize=int8 also model.int8.onnx: onnxruntime's dynamic
    quantisation of it (`INT8`: weights stored as int8, activations quantised per batch as they come). Returns
    the file of `quantize`; `model` is left in evaluation mode. SetupError if the model holds parameters the graph
    would leave out, or torch.onnx cannot export it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    network = model.model.eval()
    if model.finetune_method == "lora":
        network = tuning.without_lora(network, merge=True)  # the updates in the weights: a plain wav2vec2
    if unknown := unknown_parameters(network):
        raise SetupError(f"the model holds {len(unknown)} parameters a wav2vec2 CTC model does not have "
                         f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): ONNX export knows only "
                         f"wav2vec2's own modules")
    geometry = network.geometry
    hop = geometry.hop
    audio = torch.randn(2, 50 * hop)  # two clips, the second padded: the graph's mask is traced
    lengths = torch.tensor([50 * hop, 30 * hop])
    batch, samples = torch.export.Dim("batch"), torch.export.Dim("samples", min=geometry.receptive_field)
    try:
        with warnings.catch_warnings(), _quiet("torch.onnx"):
            warnings.simplefilter("ignore")  # its notes on renamed axes and deprecated tree specs
            program = torch.onnx.export(Graph(network).eval(), (audio, lengths), input_names=["audio", "lengths"],
                                        output_names=["logits", "frames"], verbose=False,
                                        dynamic_shapes={"audio": {0: batch, 1: samples}, "lengths": {0: batch}})
    except Exception as error:  # noqa: BLE001 (torch.export's and the translator's errors have no common base)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise SetupError(f"torch.onnx could not export the model: {type(error).__name__}: {first}") from error
    program.model.metadata_props.update(conv_kernel=json.dumps(list(geometry.kernels)),
                                        conv_stride=json.dumps(list(geometry.strides)))
    out_dir.mkdir(parents=True, exist_ok=True)
    program.save(str(out_dir / FILES[None]))
    if quantize == "int8":
        with _quiet(None):  # its advice to pre-process the graph (quant_pre_process: tried, the same logits)
            quantize_dynamic(out_dir / FILES[None], out_dir / FILES["int8"],
                             **{**INT8, "weight_type": QuantType[INT8["weight_type"]]})
    return out_dir / FILES[quantize]


@contextlib.contextmanager
def _quiet(logger: str | None):
    """Log records of `logger` (None: the root logger) below ERROR dropped while in the block."""
    logger = logging.getLogger(logger)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_command(path: Path) -> tuple[str, Path]:
    """The ckpt_path= and out= of the export that makes `path` (a model_path of backend=onnx without its graph)
    runnable: a checkpoint's graph goes to its run's onnx/ (else beside it, <name>-onnx), never onto the file; an
    export directory (or a missing .onnx file's) gains one."""
    if path.is_file():
        run = checkpoints.run_dir_of(path)
        return str(path), run / "onnx" if run else path.with_name(f"{path.stem}-onnx")
    return "<checkpoint>", path.parent if path.suffix == ".onnx" else path


class OnnxModel:
    """An exported graph in an onnxruntime session on the CPU, with what `asr.model.transcription.transcribe` needs
    of a CTCModel: `geometry`, `device`, a forward pass giving `Output` (logits, frames) and `decoded`.
    threads: onnxruntime's intra-op threads; None: torch's (`torch.get_num_threads()`), as the torch backend uses."""

    device = torch.device("cpu")

    def __init__(self, path: Path, threads: int | None = None):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads or torch.get_num_threads(), 1
        # Idle pool threads sleep instead of spinning: they share the cores with the loader processes (and, on a
        # shared machine, with others). On 2 shared cores the tiny model's forward passes ran 1.6x as fast, end
        # to end 1.4x (docs/performance.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.geometry = Geometry(tuple(json.loads(meta["conv_kernel"])), tuple(json.loads(meta["conv_stride"])))
        self.vocab = Vocabulary.load(path.parent / "vocab.json")
        rules = json.loads((path.parent / "asr.json").read_text())
        self.language = rules["language"]
        self.pause_frames = frames_of_pause(rules.get("pause_seconds"), self.geometry)  # an older export's: none

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> tuple["OnnxModel", object]:
        """(model, its beam decoder or None) from a directory `python -m asr.tools.export format=onnx` wrote (its
        model.onnx) or one of its .onnx files (model.int8.onnx). SetupError, naming the command that writes one,
        otherwise."""
        path = Path(path).expanduser()
        file = path if path.suffix == ".onnx" else path / FILES[None]
        if not file.is_file():
            ckpt, out = export_command(path)
            raise SetupError(f"model_path={path}: there is no {file.name} (python -m asr.tools.export "
                             f"ckpt_path={ckpt} out={out} format=onnx writes model.onnx; quantize=int8 adds "
                             "model.int8.onnx)")
        return cls(file, threads), exported_decoder(file.parent)

    def __call__(self, batch: dict) -> Output:
        """logits (B, T, V) and frames (B,) of `batch`'s audio (B, S) and lengths (B,) samples."""
        logits, frames = self.session.run(None, {"audio": batch["audio"].numpy(),
                                                 "lengths": np.asarray(batch["lengths"], dtype=np.int64)})
        return Output(torch.from_numpy(logits), torch.from_numpy(frames))

    def decoded(self, logits: torch.Tensor, frames: torch.Tensor, decoder=None,
                beam_width: int | None = None) -> Decoded:
        """As `CTCModel.decoded`: greedy transcripts, or `decoder`'s, under the export's text rules."""
        return decoded(logits, frames, self.vocab, self.language, self.pause_frames, decoder, beam_width)
