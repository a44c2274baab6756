"""Export a trained model (`asr.model.export`) as an HF directory or an ONNX graph.

    python -m asr.tools.export ckpt_path=<run>/checkpoints/last.ckpt out=<directory> [lm_path=<arpa> alpha=... beta=...]
    python -m asr.tools.export ckpt_path=<run>/checkpoints/last.ckpt out=<directory> format=onnx [quantize=int8]

alpha and beta default to evaluate.py's (conf/evaluate.yaml); pass the ones your sweep found. An out= that holds
something this command did not export is refused (overwrite=true writes into it), as is a language an MMS
directory holds already (`asr.core.outputs`). Settings: conf/export.yaml (`--help`).
"""

import json
import sys
from pathlib import Path

import torch

from asr import SetupError
from asr.core import checkpoints, outputs
from asr.core.config import decoding_defaults
from asr.model import inference
from asr.model.export import adapters_clash, export
from asr.tools import cli


def rules(out: Path) -> dict | None:
    """The asr.json `asr.model.export` writes into every export (text rules; an MMS directory's languages)."""
    try:
        written = json.loads((out / "asr.json").read_text())
    except (OSError, ValueError):
        return None
    return written if isinstance(written, dict) else None


TOOL, EXAMPLE = "python -m asr.tools.export", "<dir>/model"
MODEL = outputs.Output(tool=TOOL, purpose="an exported model", directory=True, example=EXAMPLE, appends=False,
                       # train.py's <run>/model too: the text rules of one language, not an MMS directory
                       own=lambda out: "language" in (rules(out) or {}) and "adapters" not in rules(out))
ADAPTERS = outputs.Output(tool=TOOL, purpose="an MMS directory of adapters", directory=True, example=EXAMPLE,
                          appends=True, own=lambda out: "adapters" in (rules(out) or {}))


def adapters_language(ckpt_path: Path, format: str, target_lang: str | None) -> str | None:
    """The language an export of this checkpoint adds to an MMS directory (`asr.model.export.export_adapters`), or
    None when it writes a model of its own (not finetune=adapters, or format=onnx); read without loading weights."""
    hparams = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]
    if format != "hf" or (hparams.get("finetune") or {}).get("method") != "adapters":
        return None
    return target_lang or hparams.get("language") or ""


def main(argv: list[str]) -> None:
    args, _ = cli.parse("export", argv)
    (format,) = cli.values(args, "format", ("hf", "onnx"))
    if args.quantize not in (None, "int8"):
        sys.exit(f"error: quantize={args.quantize}: expected int8 or null")
    if args.quantize and format != "onnx":
        sys.exit(f"error: quantize={args.quantize} quantises the ONNX graph: add format=onnx")
    ckpt_path, lm_path = Path(args.ckpt_path).expanduser(), args.lm_path and Path(args.lm_path).expanduser()
    if ckpt_path.is_dir():  # a run (or its checkpoints/): its best checkpoint, found under it as evaluate.py finds it
        try:
            ckpt_path = Path(checkpoints.best_checkpoint(str(ckpt_path)))
        except SetupError as error:
            sys.exit(f"error: {error}")
    if not ckpt_path.is_file():
        sys.exit(f"error: ckpt_path={ckpt_path} does not exist (train.py writes <run>/checkpoints/*.ckpt)")
    if why := checkpoints.problem(ckpt_path):
        sys.exit(f"error: {why}")
    if lm_path and not lm_path.is_file():
        sys.exit(f"error: lm_path={lm_path} does not exist (python -m asr.tools.lm text=<file> out=<dir> builds one)")
    defaults = decoding_defaults()  # alpha and beta as evaluate.py's
    alpha, beta = (defaults[k] if args[k] is None else args[k] for k in ("alpha", "beta"))
    out, lang = Path(args.out).expanduser(), adapters_language(ckpt_path, format, args.target_lang)
    written = MODEL if lang is None else ADAPTERS
    try:
        outputs.claim(out, written, args.overwrite)  # before the model loads
        if lang:
            adapters_clash(out, lang, ckpt_path.absolute(), args.overwrite)
        export(inference.from_checkpoint(ckpt_path), out, lm_path, float(alpha), float(beta), format=format,
               quantize=args.quantize, target_lang=args.target_lang, overwrite=args.overwrite,
               source=ckpt_path.absolute())
    except SetupError as error:
        sys.exit(f"error: {error}")
    print(f"exported to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
