"""Export a trained model (`asr.model.export`) as an HF directory or an ONNX graph.

    python -m asr.tools.export ckpt_path=<run>/checkpoints/last.ckpt out=<directory> [lm_path=<arpa> alpha=... beta=...]
    python -m asr.tools.export ckpt_path=<run>/checkpoints/last.ckpt out=<directory> format=onnx [quantize=int8]

alpha and beta default to evaluate.py's (conf/evaluate.yaml); pass the ones your sweep found. Settings:
conf/export.yaml (`--help`).
"""

import sys
from pathlib import Path

from asr import SetupError
from asr.core import checkpoints
from asr.core.config import decoding_defaults
from asr.model import inference
from asr.model.export import export
from asr.tools import cli


def main(argv: list[str]) -> None:
    args, _ = cli.parse("export", argv)
    (format,) = cli.values(args, "format", ("hf", "onnx"))
    if args.quantize not in (None, "int8"):
        sys.exit(f"error: quantize={args.quantize}: expected int8 or null")
    if args.quantize and format != "onnx":
        sys.exit(f"error: quantize={args.quantize} quantises the ONNX graph: add format=onnx")
    ckpt_path, lm_path = Path(args.ckpt_path).expanduser(), args.lm_path and Path(args.lm_path).expanduser()
    if not ckpt_path.is_file():
        sys.exit(f"error: ckpt_path={ckpt_path} does not exist (train.py writes <run>/checkpoints/*.ckpt)")
    if why := checkpoints.problem(ckpt_path):
        sys.exit(f"error: {why}")
    if lm_path and not lm_path.is_file():
        sys.exit(f"error: lm_path={lm_path} does not exist (python -m asr.tools.lm text=<file> out=<dir> builds one)")
    defaults = decoding_defaults()  # alpha and beta as evaluate.py's
    alpha, beta = (defaults[k] if args[k] is None else args[k] for k in ("alpha", "beta"))
    try:
        out = export(inference.from_checkpoint(ckpt_path), Path(args.out).expanduser(), lm_path, float(alpha),
                     float(beta), format=format, quantize=args.quantize, target_lang=args.target_lang)
    except SetupError as error:
        sys.exit(f"error: {error}")
    print(f"exported to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
