"""Curves as PNG files (matplotlib, no display needed): a run's training loss, dev CER and learning rate
against update (`curves.png` in its run directory), and a sweep's dev CER against update per job."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def run_curves(path: Path, curve: dict, evaluations: list[dict]) -> None:
    """curve: {"step", "loss", "lr"} lists (training loss as logged, learning rate of the first group);
    evaluations: results.json's rows (step, val_cer)."""
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(curve["step"], curve["loss"], color="tab:blue")
    axes[0].set_ylabel("training loss")
    axes[1].plot([r["step"] for r in evaluations], [r["val_cer"] for r in evaluations], "o-", color="tab:red")
    axes[1].set_ylabel("dev CER")
    axes[2].plot(curve["step"], curve["lr"], color="tab:green")
    axes[2].set_ylabel("learning rate")
    axes[2].set_xlabel("update")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def sweep_curves(path: Path, jobs: list[dict]) -> None:
    """jobs: {"name", "evaluations"}: one dev-CER line per job."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for job in jobs:
        rows = job["evaluations"]
        ax.plot([r["step"] for r in rows], [r["val_cer"] for r in rows], "o-", label=job["name"], markersize=3)
    ax.set_xlabel("update")
    ax.set_ylabel("dev CER")
    ax.grid(alpha=0.3)
    if jobs:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    partial = Path(path).with_name(f".{Path(path).name}.partial.png")
    fig.savefig(partial, dpi=100)
    plt.close(fig)
    partial.replace(path)  # a dashboard or a browser never shows half a file
