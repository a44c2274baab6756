"""Several corpora in one run, the tiny model from scratch, every run the same updates:

1. one language, two corpora: the demo (demo/cv-pt) and asr.tools.synth's `short` (Portuguese short sentences, other
   words and voices; lang=pt) together, at demo weights 0.5 and 0.8, against each alone, per seed of `seeds`.
   Expected: each corpus's test CER with the mix no worse than alone, beyond the spread between seeds.
2. two languages: the demo's Portuguese and asr.tools.synth's `es` (Spanish; lang=es) in one run, a joint vocabulary,
   against one run each (Portuguese alone: part 1's demo run of the seed), per seed of `language_seeds`.
3. the average of the `average_best` best checkpoints against the best one: every run is trained with
   callbacks.average.best; printed for the runs of one corpus (demo, short, es), the mixes' in mix.json.

    python benchmarks/mix.py                                    # 10 runs of 600 updates
    python benchmarks/mix.py seeds=[0,1,2] language_seeds=[] out=/data/mix

Each run is `python train.py` (the tiny recipe, model.pretrained=null) with its data, seed=<seed>, logger=none,
`updates` updates and dev evaluated every `updates` / 10, into <out>/seed<seed>/<run>/; then `evaluate.py` on the
test split with its best checkpoint and with checkpoints/average-best<N>.ckpt (a run of two corpora: each
corpus's test split on its own, metrics.json's by_corpus). The generated corpora are made once into
$ASR_CACHE_DIR/corpora/. A rerun with the same `out` and settings skips the complete runs and their
evaluations and resumes a stopped run from its last.ckpt; `out` holding runs of other settings stops it.
Written: <out>/mix.json (every run's test CER and WER per corpus for both checkpoints, its results.json
`average` block, fit seconds). Printed last: test CER per run and corpus, a column per seed with their mean
and spread (max - min); each mix against each corpus alone; the best checkpoint against the average, dev
(results.json) and test. Settings and defaults: conf/bench/mix.yaml (`--help`); any other key=value goes to
every run's train config.
"""

import difflib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from asr import SetupError  # noqa: E402
from asr.core.config import check_overrides, compose  # noqa: E402
from asr.tools import cli, synth  # noqa: E402

LANGS = {"demo": "demo", "short": "pt", "es": "es"}  # each corpus's lang group (conf/lang/): its reader and text rules
# Keys each run gets from the benchmark, and the setting that gives them (None: the run's corpora)
SET_PER_RUN = {"seed": "seeds", "trainer.max_steps": "updates", "callbacks.average.best": "average_best",
               "hydra.run.dir": "out", "lang": None, "data.root": None, "data.corpora": None}
EVALUATIONS = 10  # dev evaluations per run (at least average_best): the checkpoints the average picks from


@dataclass(frozen=True)
class Run:
    """One train.py run: its name (its row; its directory <out>/seed<seed>/<name>), seed, the corpora it trains
    on (its test CER is given on each) and the overrides that give it its data."""

    name: str
    seed: int
    corpora: tuple[str, ...]
    data: tuple[str, ...]


def cache() -> Path:
    return Path(os.environ.get("ASR_CACHE_DIR", "~/.cache/asr")).expanduser()


def corpus(name: str) -> Path:
    """The directory of a corpus: the embedded demo, or an asr.tools.synth corpus generated once."""
    if name == "demo":
        return REPO / "demo" / "cv-pt"
    root = cache() / "corpora" / name
    if not (root / "clip_durations.tsv").is_file():
        print(f"generating {root} ...", flush=True)
        synth.make(name, root)
    return root


def alone(name: str, seed: int, roots: dict[str, Path]) -> Run:
    return Run(name, seed, (name,), (f"lang={LANGS[name]}", f"data.root={roots[name]}"))


def together(name: str, seed: int, roots: dict[str, Path], weights: dict[str, float | None]) -> Run:
    """A run of data.corpora: the corpora of `weights` (None: no weight, every clip drawn once an epoch)."""
    entries = [f"name:{c},lang:{LANGS[c]},root:'{roots[c]}'" + (f",weight:{w}" if w is not None else "")
               for c, w in weights.items()]
    return Run(name, seed, tuple(weights), ("data.corpora=[" + ",".join(f"{{{e}}}" for e in entries) + "]",))


def mix_name(demo_weight: float) -> str:
    return f"mix-{demo_weight:g}-{1 - demo_weight:g}"


def plan(args, roots: dict[str, Path]) -> list[Run]:
    """Every run, once: per seed of `seeds` demo, short and a mix per demo weight; per seed of `language_seeds`
    es and demo+es, and the demo alone where part 1 has no run of that seed."""
    runs = []
    for seed in args.seeds:
        runs += [alone("demo", seed, roots), alone("short", seed, roots)]
        runs += [together(mix_name(w), seed, roots, {"demo": w, "short": round(1 - w, 6)})
                 for w in args.demo_weights]
    for seed in args.language_seeds:
        runs += [] if seed in args.seeds else [alone("demo", seed, roots)]
        runs += [alone("es", seed, roots), together("demo+es", seed, roots, {"demo": None, "es": None})]
    return runs


def command(run: Run, args, overrides: list[str], run_dir: Path) -> list[str]:
    every = max(1, args.updates // max(EVALUATIONS, args.average_best))
    return [sys.executable, "train.py", *run.data, f"seed={run.seed}", "logger=none",
            f"trainer.max_steps={args.updates}", f"val_every_updates={every}",
            f"callbacks.average.best={args.average_best}", *overrides, f"hydra.run.dir={run_dir}"]


def call(argv: list[str], log: Path) -> None:
    """`argv` run in the repository, its output appended to `log`; the benchmark stops, naming the log and its last
    line, when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out:
        code = subprocess.run(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        last = (log.read_text(encoding="utf-8").strip().splitlines() or ["(no output)"])[-1]
        sys.exit(f"error: {' '.join(argv[1:2])} exited with {code}: {last} (the whole output: {log})")


def complete(run_dir: Path) -> bool:
    results = run_dir / "results.json"
    return results.is_file() and json.loads(results.read_text()).get("state") == "complete"


def train(run: Run, argv: list[str], run_dir: Path) -> dict:
    """The run's results.json, training it unless it is complete: resumed from its last.ckpt when it stopped
    after an evaluation, else started afresh (a directory without a checkpoint holds nothing to keep)."""
    if complete(run_dir):
        print(f"complete, skipped: {run_dir}", flush=True)
    else:
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            argv = [*argv, "ckpt_path=last"]
        elif run_dir.exists():
            shutil.rmtree(run_dir)
        print(" ".join(argv[1:]), flush=True)
        call(argv, run_dir / "console.log")
    return json.loads((run_dir / "results.json").read_text())


def test(run: Run, checkpoint: str, eval_dir: Path) -> dict[str, dict]:
    """{corpus: {cer, wer}} of `checkpoint` on the test split of each corpus the run trained on (evaluate.py;
    its metrics.json reused when there is one)."""
    metrics = eval_dir / "metrics.json"
    if not metrics.is_file():
        call([sys.executable, "evaluate.py", f"ckpt_path={checkpoint}", "split=test", f"hydra.run.dir={eval_dir}"],
             eval_dir.with_suffix(".log"))
    scored = json.loads(metrics.read_text())
    by_corpus = scored.get("by_corpus") or {run.corpora[0]: scored}  # one corpus: the whole split's figures
    return {name: {"cer": by_corpus[name]["cer"], "wer": by_corpus[name]["wer"]} for name in run.corpora}


def measure(run: Run, args, overrides: list[str], out: Path) -> dict:
    run_dir = out / f"seed{run.seed}" / run.name
    results = train(run, command(run, args, overrides, run_dir), run_dir)
    average = results.get("average") or {}
    return {"run": run.name, "seed": run.seed, "corpora": list(run.corpora), "dir": str(run_dir),
            "train_seconds": results["train_seconds"], "best_checkpoint": results["best_checkpoint"],
            "average": average,
            "test": {"best": test(run, results["best_checkpoint"], run_dir / "test"),
                     "average": test(run, average["checkpoint"], run_dir / "test-average")
                     if "checkpoint" in average else None}}


def check_passthrough(args, overrides: list[str]) -> None:
    """Stops in one line at an override of a key the benchmark sets for each run, or of a key train.py does not
    take (naming this benchmark's setting when it looks like one: update= for updates=)."""
    for arg in overrides:
        key = arg.partition("=")[0].lstrip("+~")
        if key in SET_PER_RUN:
            setting = SET_PER_RUN[key]
            sys.exit(f"error: {key} is set for each run by python benchmarks/mix.py"
                     + (f": give {setting}=" if setting else " (its corpora)"))
        try:
            check_overrides([arg], "train")
        except SetupError as error:
            close = difflib.get_close_matches(key, list(args), n=1)
            sys.exit(f"error: {key} is not a setting of python benchmarks/mix.py ({', '.join(args)})"
                     + (f": did you mean {close[0]}?" if close else f", nor of train.py: {error}"))


def checked_settings(args, overrides: list[str], out: Path) -> None:
    """What every run shares, written into `out` by the first call; a later call with other values stops, so that
    a complete run of other settings is never taken for one of these."""
    settings = {"updates": args.updates, "average_best": args.average_best, "overrides": overrides}
    path = out / "settings.json"
    if path.is_file() and (held := json.loads(path.read_text())) != settings:
        differ = "; ".join(f"{k}: {held.get(k)} there, {v} now" for k, v in settings.items() if held.get(k) != v)
        sys.exit(f"error: out={out} holds runs of other settings ({differ}): give another out= or remove it")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def cells(figures: dict[int, float | None], seeds: list[int]) -> list[str]:
    """A figure per seed, then, with several seeds, their mean and spread (max - min)."""
    values = [figures.get(s) for s in seeds]
    shown = [f"{v:.3f}" if v is not None else "-" for v in values]
    if len(seeds) > 1:
        known = [v for v in values if v is not None]
        shown += [f"{sum(known) / len(known):.3f}", f"{max(known) - min(known):.3f}"] if len(known) == len(values) \
            else ["-", "-"]
    return shown


def cer_table(rows: list[dict], names: list[str], corpora: list[str], seeds: list[int]) -> list[str]:
    """Test CER (best checkpoint) of each run of `names` on each of `corpora`: a column per seed, then, with several
    seeds, a mean and a spread column per corpus."""
    columns = [f"{c} s{s}" for c in corpora for s in seeds]
    columns += [f"{c} {what}" for c in corpora for what in ("mean", "spread")] if len(seeds) > 1 else []
    width = max(len(n) for n in names)
    lines = [f"{'run':<{width}} " + " ".join(f"{c:>9}" for c in columns)]
    for name in names:
        shown = {}
        for c in corpora:
            figures = {r["seed"]: r["test"]["best"][c]["cer"] for r in rows if r["run"] == name and c in r["corpora"]}
            keys = [f"{c} s{s}" for s in seeds] + ([f"{c} mean", f"{c} spread"] if len(seeds) > 1 else [])
            shown.update(zip(keys, cells(figures, seeds)))
        lines.append(f"{name:<{width}} " + " ".join(f"{shown[c]:>9}" for c in columns))
    return lines


def against_alone(rows: list[dict], mixes: list[str], seeds: list[int]) -> list[str]:
    """Each mix against each corpus alone: the difference of mean test CER, beside the larger seed spread."""
    lines = []
    for mix in mixes:
        for c in ("demo", "short"):
            mixed = [r["test"]["best"][c]["cer"] for r in rows if r["run"] == mix]
            single = [r["test"]["best"][c]["cer"] for r in rows if r["run"] == c and r["seed"] in seeds]
            difference = sum(mixed) / len(mixed) - sum(single) / len(single)
            if len(seeds) > 1:
                spread = max(max(mixed) - min(mixed), max(single) - min(single))
                verdict = "worse beyond the spread" if difference > spread else "within the spread or better"
                lines.append(f"{mix} on {c}: {difference:+.3f} against {c} alone; seed spread {spread:.3f}: {verdict}")
            else:
                lines.append(f"{mix} on {c}: {difference:+.3f} against {c} alone (one seed: no spread)")
    return lines


def average_table(rows: list[dict], best: int) -> list[str]:
    """The runs of one corpus: dev CER (results.json's average block) and test CER of the best checkpoint and of
    the average of the `best` best."""
    lines = [f"{'run':<6} {'seed':>4} {'dev best':>8} {f'dev avg{best}':>9} {'test best':>9} {f'test avg{best}':>10}"]
    for r in rows:
        if len(r["corpora"]) != 1:
            continue
        (c,) = r["corpora"]
        a = r["average"]
        if "checkpoint" not in a:
            lines.append(f"{r['run']:<6} {r['seed']:>4}  no average: {a.get('skipped', 'callbacks.average was off')}")
            continue
        lines.append(f"{r['run']:<6} {r['seed']:>4} {a['best_single_val_cer']:>8.3f} {a['val_cer']:>9.3f} "
                     f"{r['test']['best'][c]['cer']:>9.3f} {r['test']['average'][c]['cer']:>10.3f}")
    return lines


def main(argv: list[str]) -> dict:
    args, overrides = cli.parse("bench/mix", argv, passthrough=True)  # the others: every run's train config
    overrides = list(overrides)
    for key in ("seeds", "language_seeds", "demo_weights"):
        args[key] = cli.values(args, key)  # seeds=0 as [0]
    if not args.seeds and not args.language_seeds:
        sys.exit("error: seeds=[] and language_seeds=[]: nothing to run")
    if args.updates < 1 or args.average_best < 1:
        sys.exit(f"error: updates={args.updates}, average_best={args.average_best}: give numbers of 1 or more")
    if bad := [w for w in args.demo_weights if not 0 < w < 1]:
        sys.exit(f"error: demo_weights: {', '.join(map(str, bad))}: give the demo's share of a mix, between 0 and 1")
    out = Path(args.out).expanduser()
    names = ["demo", "short", *(["es"] if args.language_seeds else [])]
    check_passthrough(args, overrides)
    try:  # every run's train config composed and checked before the first is trained
        for run in plan(args, {name: out / "corpora" / name for name in names}):  # paths not read
            compose("train", [*command(run, args, overrides, out)[2:-1], f"run_dir={out}"])
    except SetupError as error:
        sys.exit(f"error: {error}")
    except Exception as error:  # noqa: BLE001 (Hydra's composition errors)
        sys.exit(f"error: {str(error).strip().splitlines()[0]}")
    checked_settings(args, overrides, out)
    rows = [measure(run, args, overrides, out) for run in plan(args, {name: corpus(name) for name in names})]
    result = {"settings": {k: v for k, v in OmegaConf.to_container(args).items() if k != "out"},
              "overrides": overrides, "cpus": os.cpu_count(), "runs": rows}
    (out / "mix.json").write_text(json.dumps(result, indent=1))

    mixes = [mix_name(w) for w in args.demo_weights]
    fits = [r["train_seconds"] for r in rows]
    print(f"\n{args.updates} updates each, the tiny model from scratch; fit loops of {min(fits):.0f}-{max(fits):.0f} s "
          f"(dev evaluations included) on {os.cpu_count()} CPUs -> {out}/mix.json")
    if args.seeds:
        print("\n1. One language, two corpora: test CER (best checkpoint)")
        print("\n".join(cer_table(rows, ["demo", "short", *mixes], ["demo", "short"], args.seeds)))
        print("\n".join(against_alone(rows, mixes, args.seeds)))
    if args.language_seeds:
        print("\n2. Two languages: test CER (best checkpoint), Portuguese (demo) and Spanish (es)")
        print("\n".join(cer_table(rows, ["demo", "es", "demo+es"], ["demo", "es"], args.language_seeds)))
    print(f"\n3. The average of the {args.average_best} best checkpoints against the best one: CER")
    print("\n".join(average_table(rows, args.average_best)))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
