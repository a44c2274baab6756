"""MMS in miniature: a Portuguese base adapted to a second language, by adapters, LoRA and full fine-tuning,
against training from scratch, all for the same number of updates on the same batches; and what each costs.

    python benchmarks/adapt.py                                  # the demo model as the base, Spanish, 600 updates
    python benchmarks/adapt.py base=<run>/model updates=300 methods=[adapters,lora]

The base: `base`, an exported model directory, or (null) the demo's tiny model trained as `make demo` trains it
(`python train.py`, 1,500 updates), once, into $ASR_CACHE_DIR/adapt/base. The second language: `asr.tools.synth`'s
`corpus` (es: Spanish sentences of the demo's shape; its dev and test voices unseen in training), generated
once into $ASR_CACHE_DIR/corpora/. Each method is one `train.py` run with the tiny recipe's learning rates and
batches, `updates` updates, dev evaluated every `updates` / 6, then `evaluate.py` on the test split with its
best checkpoint. Printed per method: test CER and WER, the fit loop's seconds, seconds per update (the fit
loop over its updates, the dev evaluations included), trainable and total parameters, optimizer-state and
checkpoint bytes, and the run's peak resident memory (the whole process: data and libraries included).
Settings and defaults: conf/bench/adapt.yaml (`--help`); any other key=value goes to every run's train config.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from asr.tools import cli, synth  # noqa: E402

METHODS = {"adapters": ["finetune=adapters"], "lora": ["finetune=lora"], "full": ["finetune=full"],
           "scratch": ["finetune=full", "model.pretrained=null"]}


def cache() -> Path:
    return Path(os.environ.get("ASR_CACHE_DIR", "~/.cache/asr")).expanduser()


def corpus(name: str) -> Path:
    root = cache() / "corpora" / name
    if not (root / "clip_durations.tsv").is_file():
        print(f"generating {root} ...", flush=True)
        synth.make(name, root)
    return root


def demo_base() -> Path:
    """The demo's tiny model as `make demo` trains it, trained once."""
    run_dir = cache() / "adapt" / "base"
    if not (run_dir / "results.json").is_file() or json.loads((run_dir / "results.json").read_text()).get(
            "state") != "complete":
        print(f"training the base (python train.py, the demo) into {run_dir} ...", flush=True)
        subprocess.run([sys.executable, "train.py", "logger=none", f"hydra.run.dir={run_dir}"], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    return run_dir / "model"


def run(method: str, base: Path, root: Path, lang: str, updates: int, overrides: list[str], out: Path) -> dict:
    run_dir = out / method
    command = [sys.executable, "train.py", f"lang={lang}", f"data.root={root}", "logger=none",
               f"model.pretrained={base}", *METHODS[method], f"trainer.max_steps={updates}",
               f"trainer.val_check_interval={max(1, updates // 6)}", *overrides, f"hydra.run.dir={run_dir}"]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = json.loads((run_dir / "results.json").read_text())
    subprocess.run([sys.executable, "evaluate.py", f"ckpt_path={results['best_checkpoint']}", "split=test",
                    f"hydra.run.dir={run_dir}/test"], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    test = json.loads((run_dir / "test" / "metrics.json").read_text())
    return {"method": method, **results, "test": test}


def main(argv: list[str]) -> None:
    args, overrides = cli.parse("bench/adapt", argv, passthrough=True)  # the others: every run's train config
    if args.corpus not in synth.CORPORA:
        sys.exit(f"error: corpus={args.corpus}: expected one of {', '.join(sorted(synth.CORPORA))}")
    if unknown := [m for m in args.methods if m not in METHODS]:
        sys.exit(f"error: methods: {', '.join(unknown)}: expected some of {', '.join(METHODS)}")
    base = Path(args.base).expanduser() if args.base else demo_base()
    root = corpus(args.corpus)
    out = Path(tempfile.mkdtemp(prefix="adapt-"))
    rows = [run(m, base, root, args.lang, args.updates, list(overrides), out) for m in args.methods]
    print(f"\nbase {base}; {args.corpus} ({root}); {args.updates} updates each; {os.cpu_count()} CPUs -> {out}")
    print(f"{'method':<9} {'test CER':>8} {'test WER':>8} {'fit s':>6} {'s/update':>8} {'trainable':>10} "
          f"{'of':>9} {'share':>6} {'optim MB':>8} {'ckpt MB':>7} {'peak RSS GB':>11}")
    for r in rows:
        test = r["test"]
        print(f"{r['method']:<9} {test['cer']:>8.3f} {test['wer']:>8.3f} {r['train_seconds']:>6.0f} "
              f"{r['train_seconds'] / args.updates:>8.3f} {r['trainable_parameters']:>10,} {r['total_parameters']:>9,} "
              f"{r['trainable_parameters'] / r['total_parameters']:>6.1%} {r['optimizer_state_bytes'] / 1e6:>8.2f} "
              f"{r['checkpoint_bytes'] / 1e6:>7.2f} {r['peak_memory_bytes'] / 1e9:>11.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
