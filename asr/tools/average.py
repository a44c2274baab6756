"""Average checkpoints of a run into one (`asr.run.average`).

    python -m asr.tools.average run=<run> best=5                  # -> <run>/checkpoints/average-best5.ckpt
    python -m asr.tools.average run=<run> last=5 out=<file.ckpt>
    python -m asr.tools.average ckpts=[<a.ckpt>,<b.ckpt>] out=<file.ckpt>

Settings: conf/average.yaml (`--help`).
"""

import sys
from pathlib import Path

from asr import SetupError
from asr.core import checkpoints, outputs
from asr.run.average import averaged, chosen, source, write
from asr.tools import cli

AVERAGE = outputs.Output(tool="python -m asr.tools.average", purpose="an average of checkpoints", directory=False,
                         example="<dir>/average.ckpt", own=checkpoints.is_average, appends=False)


def main(argv: list[str]) -> None:
    args, _ = cli.parse("average", argv)
    asked = [k for k in ("best", "last", "ckpts") if args[k] is not None]
    if len(asked) != 1:
        sys.exit("error: give one of best=N or last=N (with run=<run dir>), or ckpts=[<a.ckpt>,<b.ckpt>,...]"
                 + (f", not {' and '.join(asked)}" if asked else ""))
    (how,) = asked
    if how != "ckpts" and (not isinstance(args[how], int) or args[how] < 1):
        sys.exit(f"error: {how}={args[how]}: give the number of checkpoints to average")
    if how != "ckpts" and args.run is None:
        sys.exit(f"error: {how}={args[how]} picks from a run's checkpoints: add run=<run dir>")
    if how == "ckpts" and args.out is None:
        sys.exit("error: out=<file.ckpt> is needed with ckpts=[...]")
    out = Path(args.out or Path(args.run) / "checkpoints" / f"average-{how}{args[how]}.ckpt").expanduser()
    if out.name in ("last.ckpt", checkpoints.REQUEUE_CHECKPOINT) or out.name.startswith("best-"):
        sys.exit(f"error: out={out}: train.py writes and reads that name; give another")
    try:
        outputs.claim(out, AVERAGE, args.overwrite)  # its own earlier average is replaced
        sources = ([source(p) for p in cli.values(args, "ckpts")] if how == "ckpts"
                   else chosen(args.run, **{how: args[how]}))
        if out.absolute() in {s.path.absolute() for s in sources}:
            sys.exit(f"error: out={out} is one of the checkpoints to average; give another")
        write(averaged(sources), out)
    except SetupError as error:
        sys.exit(f"error: {error}")
    print(f"averaged {len(sources)} checkpoint{'s' * (len(sources) != 1)}:")
    for s in sources:
        print(f"  {s.line()}")
    print(f"-> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
