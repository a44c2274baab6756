"""A sweep at a glance, without W&B: the jobs of a multirun (or any directory of runs) ranked by dev CER.

    python -m asr.tools.sweep dir=<multirun dir> [key=val_cer | key=val/<corpus>/cer]

Prints one row per job (its overrides, best WER and CER, each corpus's CER in a run of several corpora, the
update of the best (marked if a search pruned the job), wall time, audio-seconds per second) and writes
<dir>/sweep.png: dev CER against update for every job.
"""

import json
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from asr.run import plots
from asr.run.report import monitored
from asr.tools import cli


def jobs(directory: Path) -> list[dict]:
    """Every run under `directory` (a directory holding results.json), with its overrides and results."""
    out = []
    for results_file in sorted(Path(directory).glob("**/results.json")):
        run = results_file.parent
        results = json.loads(results_file.read_text())
        overrides_file = run / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        seconds = results.get("train_seconds") or 0.0
        out.append({"run": str(run.relative_to(directory)) if run != Path(directory) else ".",
                    "overrides": [str(o) for o in overrides], "results": results,
                    "evaluations": results.get("evaluations", []),
                    "audio_per_second": results.get("train_audio_seconds", 0.0) / seconds if seconds else 0.0})
    return out


def ranked(found: list[dict], key: str) -> list[dict]:
    """The jobs by `key` of results.json, lowest first: a figure of it (val_cer, val_wer), or a monitor (val/cer,
    val/<name>/cer: one corpus's dev CER at the best evaluation, `asr.run.report.monitored`)."""
    figure = monitored(key) if "/" in key else (lambda results: results.get(key))

    def value(job):
        v = figure(job["results"])
        return v if isinstance(v, (int, float)) and not math.isnan(v) else math.inf
    return sorted(found, key=value)


def varying(found: list[dict]) -> list[list[str]]:
    """Each job's overrides that not every job shares: what tells the jobs apart."""
    common = set.intersection(*(set(j["overrides"]) for j in found)) if found else set()
    return [[o for o in j["overrides"] if o not in common] or j["overrides"] for j in found]


def table(found: list[dict]) -> str:
    """A row per job; runs of several corpora add each corpus's dev CER at the best evaluation (`<name> CER`)."""
    corpora = list(dict.fromkeys(name for job in found for name in job["results"].get("corpora", {})))
    header = ["#", "run", "overrides", "dev WER", "dev CER", *(f"{name} CER" for name in corpora), "step", "wall s",
              "audio-s/s"]
    rows = []
    for i, (job, names) in enumerate(zip(found, varying(found)), 1):
        r = job["results"]
        rows.append([str(i), job["run"], " ".join(names) or "-", f"{r.get('val_wer', math.nan):.4f}",
                     f"{r.get('val_cer', math.nan):.4f}",
                     *(f"{r.get('corpora', {}).get(name, {}).get('val_cer', math.nan):.4f}" for name in corpora),
                     str(r.get("step", "-")) + ("(pruned)" if r.get("pruned_at_step") is not None else ""),
                     f"{r.get('train_seconds') or 0:.0f}",
                     f"{job['audio_per_second']:.1f}"])
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [header, *rows])


def main(argv: list[str]) -> None:
    args, _ = cli.parse("sweep", argv)
    directory = Path(args.dir).expanduser()
    found = ranked(jobs(directory), args.key)
    if not found:
        raise SystemExit(f"error: no run (results.json) under dir={directory}")
    print(table(found))
    plot = directory / "sweep.png"
    plots.sweep_curves(plot, [{"name": " ".join(n) or j["run"], "evaluations": j["evaluations"]}
                              for j, n in zip(found, varying(found))])
    print(f"dev CER against update: {plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
