"""Fine-tuning wav2vec2 / XLS-R speech encoders with CTC."""

from pathlib import Path

from omegaconf import OmegaConf

REPO_DIR = Path(__file__).resolve().parent.parent  # where the embedded demo lives

# `${repo:}` in configs: paths inside this checkout, whatever the working directory.
OmegaConf.register_new_resolver("repo", lambda: str(REPO_DIR), replace=True)


class SetupError(Exception):
    """A problem the user fixes with an override or a file; reported without a traceback."""


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
