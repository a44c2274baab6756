"""Transcription speed on a CPU: the torch model against its ONNX export in onnxruntime, float32 and int8, side by
side in one run. (Not benchmarks/onnx.py: a script's directory comes first on sys.path, so that name would stand
in for the onnx package in every benchmark.)

    python benchmarks/inference.py                                  # the tiny model, random weights, 50 demo clips
    python benchmarks/inference.py model=xlsr_300m clips=8          # XLS-R 300M's shape, random weights
    python benchmarks/inference.py ckpt_path=<run>/checkpoints/last.ckpt split=test

Exports the model as `python -m asr.tools.export format=onnx quantize=int8` does, into a temporary directory, then
times the three in turns, `repeats` times each, and keeps each one's fastest: model-only (the forward pass over
the same padded batches, decoded and collated beforehand, as `asr.model.transcription` plans them) and end to end
(`asr.model.transcription.transcribe` over the files: decoding the audio in `num_workers` loader processes, the
forward pass, greedy decoding). Prints audio-seconds per second and the ratio to torch's, the CER of each
against the clips' references, and the CER of each against torch's transcripts (how far an export strays).
torch and onnxruntime get `threads` intra-op threads each. Without ckpt_path the model is the train config's
with random weights (model.pretrained=null); any other key=value overrides that config (model=xlsr_300m). The
settings and their defaults: conf/bench/inference.yaml (`--help`).
"""

import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from asr.core import audio, text
from asr.core.config import compose
from asr.core.text import Vocabulary
from asr.data import corpora
from asr.data.loading import workers
from asr.model import inference
from asr.model.export import export
from asr.model.metrics import ErrorRates
from asr.model.module import CTCModel
from asr.model.onnx import FILES, OnnxModel
from asr.model.transcription import Files, Recognizer, collate, header_seconds, sampler, transcribe
from asr.tools import cli

TRANSCRIBE = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "transcribe.yaml")  # its windows, buckets
CHUNK_SECONDS, STRIDE_SECONDS = TRANSCRIBE.chunk_seconds, TRANSCRIBE.stride_seconds


def model_only(model, batches: list[dict]) -> float:
    """Seconds of `model`'s forward pass over `batches`."""
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model({"audio": batch["audio"], "lengths": batch["lengths"]})
    return time.perf_counter() - started


def end_to_end(model, paths: list[str], batch_seconds: float, num_workers: int) -> tuple[float, list[str]]:
    """Seconds of `asr.model.transcription.transcribe` over `paths`, and the transcripts."""
    started = time.perf_counter()
    out = [hypothesis for *_, hypothesis, _ in transcribe(Recognizer(model, None, None, "none"), paths,
                                                          chunk_seconds=CHUNK_SECONDS, stride_seconds=STRIDE_SECONDS,
                                                          batch_seconds=batch_seconds,
                                                          num_buckets=TRANSCRIBE.num_buckets, num_workers=num_workers)]
    return time.perf_counter() - started, out


def cer(references: list[str], hypotheses: list[str]) -> float:
    rates = ErrorRates()
    rates.update(references, hypotheses)
    return rates.rates()["cer"]


def main(argv: list[str]) -> None:
    args, overrides = cli.parse("bench/inference", argv, passthrough=True)
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    clips = corpora.read_common_voice(root, args.split, "")
    rows = [clips[i] for i in range(min(args.clips, len(clips)))]
    paths = [row.path for row in rows]
    if args.ckpt_path:
        model = inference.from_checkpoint(Path(args.ckpt_path).expanduser())
        name = Path(args.ckpt_path).name
    else:  # random weights of the train config's model; the characters of the corpus's train split as the vocabulary
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = compose("train", ["model.pretrained=null", *overrides, f"run_dir={run_dir}"])
        language = cfg.data.language
        vocab = Vocabulary.from_transcripts(text.normalize(row.text, language)
                                            for row in corpora.read_common_voice(root, "train", language))
        model = CTCModel.from_config(cfg, vocab.tokens)
        name = " ".join(overrides) or "the train config's model"
    model.eval()
    language = model.hparams.language
    references = [text.normalize(row.text, language) for row in rows]
    num_workers = workers(args.num_workers)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        export(model, Path(out), format="onnx", quantize="int8", overwrite=False, source=None)
        exported = time.perf_counter() - started
        backends = {"torch fp32": model, **{f"onnx {kind}": OnnxModel(Path(out) / FILES[quantize], args.threads)
                                            for kind, quantize in (("fp32", None), ("int8", "int8"))}}
        files = Files(paths, 0, 0, 0, model.geometry)  # whole files: the demo's clips are short
        plan = sampler([header_seconds(p) for p in paths], model.geometry, chunk_seconds=CHUNK_SECONDS,
                       stride_seconds=STRIDE_SECONDS, batch_seconds=args.batch_seconds,
                       num_buckets=TRANSCRIBE.num_buckets)
        batches = [collate(files.__getitems__(batch)) for batch in plan]
        seconds = sum(len(w.wave) for batch in batches for w in batch["windows"]) / audio.SAMPLE_RATE
        fastest = {backend: {"model": float("inf"), "end": float("inf")} for backend in backends}
        transcripts = {}
        for _ in range(args.repeats):
            for backend, runner in backends.items():
                fastest[backend]["model"] = min(fastest[backend]["model"], model_only(runner, batches))
                took, transcripts[backend] = end_to_end(runner, paths, args.batch_seconds, num_workers)
                fastest[backend]["end"] = min(fastest[backend]["end"], took)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(paths)} clips "
          f"({args.split}), {seconds:.0f} s of audio in {len(batches)} batches of <= {args.batch_seconds:g} s; "
          f"threads {args.threads}, loader workers {num_workers}; export {exported:.0f} s\n")
    print(f"{'backend':<11} {'model-only audio-s/s':>21} {'x torch':>8} {'end-to-end audio-s/s':>21} {'x torch':>8} "
          f"{'CER':>7} {'CER vs torch':>13}")
    torch_rates = {kind: seconds / fastest["torch fp32"][kind] for kind in ("model", "end")}
    for backend in backends:
        model_rate, end_rate = (seconds / fastest[backend][kind] for kind in ("model", "end"))
        print(f"{backend:<11} {model_rate:>21.4g} {model_rate / torch_rates['model']:>8.2f} {end_rate:>21.4g} "
              f"{end_rate / torch_rates['end']:>8.2f} {cer(references, transcripts[backend]):>7.3f} "
              f"{cer(transcripts['torch fp32'], transcripts[backend]):>13.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
