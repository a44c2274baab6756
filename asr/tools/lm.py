"""Build a word n-gram LM (ARPA) for beam search from a text file (`asr.model.lm.build`).

    python -m asr.tools.lm text=<file, one sentence per line> out=<dir> [order=5] [language=hy]

order defaults to evaluate.py's lm_order (conf/evaluate.yaml).
Settings: conf/lm.yaml (`--help`).
"""

import sys
from pathlib import Path

from asr.core.config import decoding_defaults
from asr.model.lm import build
from asr.tools import cli


def main(argv: list[str]) -> None:
    args, _ = cli.parse("lm", argv)
    text_file = Path(args.text).expanduser()
    if not text_file.is_file():
        sys.exit(f"error: text={text_file} does not exist (a text file, one sentence per line)")
    lines = text_file.read_text(encoding="utf-8").splitlines()
    order = int(args.order or decoding_defaults().lm_order)
    try:
        print(f"wrote {build(lines, Path(args.out).expanduser(), order, args.language)}")
    except ValueError as error:  # nothing left after normalisation
        sys.exit(f"error: {error}: text={args.text} has no words after the text rules")


if __name__ == "__main__":
    main(sys.argv[1:])
