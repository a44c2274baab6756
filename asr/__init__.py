"""Fine-tuning wav2vec2 / XLS-R speech encoders with CTC."""

import os
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent  # where the embedded demo lives


def slurm_job_id() -> str | None:
    """The SLURM job this process runs in, as scontrol names it (`<array job>_<task>` in an array job)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def run_dir_name(otherwise: str) -> str:
    """A run's directory under outputs/ (`${run_dir_name:<otherwise>}` in conf/train.yaml): the SLURM job's, so
    that every task of the job and the job requeued agree on it; torchrun's rendezvous id; else `otherwise`
    (Hydra's date and time)."""
    env = os.environ
    if env.get("SLURM_JOB_ID") and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return f"slurm-{slurm_job_id()}"
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    return otherwise


def device(choice: str):
    """A torch device from a config's `device`: auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:1..."""
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice)


class SetupError(Exception):
    """A problem the user fixes with an override or a file; reported without a traceback."""


class Requeued(Exception):
    """The run was signalled, saved where it was and (under SLURM) requeued; see `asr.run.cluster.Requeue`."""


class Complete(Exception):
    """A resumed run has nothing left to train; `results` are its results.json as they were."""

    def __init__(self, message: str, results: dict):
        super().__init__(message)
        self.results = results


class TrainingStopped(Exception):
    """Training could not go on (e.g. non-finite gradients update after update); a checkpoint was kept."""


def quote_numeric_choices(argv: list[str], groups=("precision",)) -> list[str]:
    """`precision=32` -> `precision='32'`: Hydra parses 32 as an int and rejects it as a group choice
    (hydra#1401 territory); users type the option names as the docs show them. Sweeps too: 32,bf16."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+~") in groups:
            value = ",".join(f"'{v}'" if v.isdigit() else v for v in value.split(","))
        out.append(f"{key}{eq}{value}")
    return out
