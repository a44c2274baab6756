"""Build a word n-gram LM (ARPA) for beam search from a text file (`asr.model.lm.build`).

    python -m asr.tools.lm text=<file, one sentence per line> out=<dir> [order=5] [language=hy]

order defaults to evaluate.py's lm_order (conf/evaluate.yaml). An out= that holds something this command did not
write is refused (overwrite=true writes into it; `asr.core.outputs`). Settings: conf/lm.yaml (`--help`).
"""

import sys
from pathlib import Path

from asr import SetupError
from asr.core import outputs
from asr.core.config import decoding_defaults
from asr.model.lm import build
from asr.tools import cli

LM = outputs.Output(tool="python -m asr.tools.lm", purpose="a language model", directory=True, example="<dir>/lm",
                    appends=False, own=lambda out: (out / "unigrams.txt").is_file() and any(out.glob("*gram.arpa")))


def main(argv: list[str]) -> None:
    args, _ = cli.parse("lm", argv)
    text_file, out = Path(args.text).expanduser(), Path(args.out).expanduser()
    if not text_file.is_file():
        sys.exit(f"error: text={text_file} does not exist (a text file, one sentence per line)")
    try:
        outputs.claim(out, LM, args.overwrite)
    except SetupError as error:
        sys.exit(f"error: {error}")
    lines = text_file.read_text(encoding="utf-8").splitlines()
    order = int(args.order or decoding_defaults().lm_order)
    try:
        written = build(lines, out, order, args.language)
    except ValueError as error:  # nothing left after normalisation
        sys.exit(f"error: {error}: text={args.text} has no words after the text rules")
    print(f"wrote {written}")


if __name__ == "__main__":
    main(sys.argv[1:])
