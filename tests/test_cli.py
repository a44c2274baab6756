"""The one command grammar of the tools: key=value over conf/<tool>.yaml, --help listing each setting."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import asr
from asr import cli
from tests.conftest import in_process

TOOLS = ["transcribe", "sweep", "export", "lm", "memory", "synth"]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_lists_every_setting_with_its_default(tool):
    settings = OmegaConf.load(asr.REPO_DIR / "conf" / f"{tool}.yaml")
    listed = {line.split()[0]: line.split()[1] for line in cli.help_text(tool).splitlines()
              if line.startswith("  ") and len(line.split()) > 2 and line.split()[0] in settings.keys()}
    assert listed == {key: str(value).replace("None", "null").replace("False", "false").replace("True", "true")
                      for key, value in OmegaConf.to_container(settings).items()}


def test_settings_take_overrides_and_missing_or_unknown_keys_are_named(monkeypatch):
    settings, rest = cli.parse("sweep", ["dir=~/runs", "key=val_wer"])
    assert (settings.dir, settings.key) == (str(Path.home() / "runs"), "val_wer")  # as a shell would expand it
    monkeypatch.setenv("RUNS", "/scratch/me")
    assert cli.parse("sweep", ["dir=$RUNS/sweep"])[0].dir == "/scratch/me/sweep"
    with pytest.raises(SystemExit, match=r"^error: dir is needed \(dir=\.\.\.\)"):
        cli.parse("sweep", ["key=val_wer"])
    with pytest.raises(SystemExit, match=r"^error: foo is not a setting of python -m asr.sweep; its settings: dir, key"):
        cli.parse("sweep", ["dir=x", "foo=1"])
    with pytest.raises(SystemExit, match=r"^error: 'x' is not key=value"):
        cli.parse("sweep", ["x"])
    settings, rest = cli.parse("memory", ["cards=true", "model=xlsr_1b", "precision=bf16"], passthrough=True)
    assert settings.cards is True and rest == ["model=xlsr_1b", "precision=bf16"]  # the train config's


def test_every_tool_answers_help_with_its_settings():
    """transcribe.py as a user runs it; the `python -m asr.<tool>` entry points' `main` in this process (each
    module's `__main__` line calls it with sys.argv[1:])."""
    import importlib

    result = subprocess.run([sys.executable, "transcribe.py", "--help"], cwd=asr.REPO_DIR, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "settings (key=value; defaults in conf/transcribe.yaml)" in result.stdout
    for tool in ("sweep", "export", "lm", "memory", "synth"):
        module = importlib.import_module(f"asr.{tool}")
        assert "main(sys.argv[1:])" in Path(module.__file__).read_text().split('if __name__ == "__main__":')[1]
        result = in_process(module.main, ["--help"])
        assert result.returncode == 0 and f"settings (key=value; defaults in conf/{tool}.yaml)" in result.stdout, tool
