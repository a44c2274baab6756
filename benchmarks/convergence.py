"""How fast the tiny model learns: `python train.py` with the defaults (or overrides) on a generated
Common Voice layout corpus that is not the demo, for a wall-clock budget; prints dev CER per evaluation,
the update where it left the CTC blank plateau (first dev CER below 0.9) and where it ended.

    python benchmarks/convergence.py                          # 8 minutes, the short-sentence corpus
    python benchmarks/convergence.py corpus=demo minutes=0    # the demo as `make demo` runs it
    python benchmarks/convergence.py model.config.mask_time_prob=0 sched.warmup_steps=10   # any override

The corpus (`asr.tools.synth.make_short`: 800 clips of about 2.3 s, 700 train / 50 dev / 50 test, other
sentences and voices than the demo) is generated once into $ASR_CACHE_DIR/corpora/ (about a minute).
minutes=0 runs the recipe's own budget in updates. The figures depend on the machine's speed: the
updates done in the budget are printed beside the CER. The settings and their defaults:
conf/bench/convergence.yaml (`--help`); any other key=value overrides the run's train config.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from asr.tools import cli, synth  # noqa: E402


def corpus(name: str) -> Path:
    if name == "demo":
        return REPO / "demo" / "cv-pt"
    root = Path(os.environ.get("ASR_CACHE_DIR", "~/.cache/asr")).expanduser() / "corpora" / name
    if not (root / "clip_durations.tsv").is_file():
        print(f"generating {root} ...", flush=True)
        synth.make(name, root)
    return root


def main(argv: list[str]) -> None:
    args, overrides = cli.parse("bench/convergence", argv, passthrough=True)  # the others: the train config's
    if args.corpus not in synth.CORPORA:
        sys.exit(f"error: corpus={args.corpus}: expected one of {', '.join(sorted(synth.CORPORA))}")
    root = corpus(args.corpus)
    run_dir = Path(tempfile.mkdtemp(prefix="convergence-"))
    budget = ([f"trainer.max_time=00:00:{int(args.minutes):02d}:{round(args.minutes % 1 * 60):02d}"]
              if args.minutes else [])
    command = [sys.executable, "train.py", "lang=pt", f"data.root={root}", "logger=none", *budget, *overrides,
               f"hydra.run.dir={run_dir}"]
    print(" ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    results = json.loads((run_dir / "results.json").read_text())
    rows = results["evaluations"]
    print(f"\n{'update':>6} {'dev CER':>8} {'dev WER':>8}")
    for row in rows:
        print(f"{row['step']:>6} {row['val_cer']:>8.3f} {row['val_wer']:>8.3f}")
    left = next((row["step"] for row in rows if row["val_cer"] < 0.9), None)
    print(f"\nleft the blank plateau (dev CER < 0.9) at update {left}; {rows[-1]['step']} updates, "
          f"dev CER {rows[-1]['val_cer']:.3f} at the end, best {results['val_cer']:.3f}; fit loop "
          f"{results['train_seconds']:.0f} s, whole command {wall:.0f} s, {os.cpu_count()} CPUs -> {run_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
