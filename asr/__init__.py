"""Fine-tuning wav2vec2 / XLS-R speech encoders with CTC."""

from pathlib import Path

from omegaconf import OmegaConf

REPO_DIR = Path(__file__).resolve().parent.parent  # where the embedded demo lives

# `${repo:}` in configs: paths inside this checkout, whatever the working directory.
OmegaConf.register_new_resolver("repo", lambda: str(REPO_DIR), replace=True)


class SetupError(Exception):
    """A problem the user fixes with an override or a file; reported without a traceback."""
