"""The one command grammar of the tools: key=value over conf/<tool>.yaml, --help listing each setting; the
start-up of train.py and evaluate.py, and train.py's --help."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import asr
from asr.tools import cli
from tests.conftest import compose_config, in_process

TOOLS = ["transcribe", "sweep", "export", "lm", "memory", "synth", "average"]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_lists_every_setting_with_its_default(tool):
    settings = OmegaConf.load(asr.REPO_DIR / "conf" / f"{tool}.yaml")
    # `in settings.keys()`, not `in settings`: a DictConfig's `in` leaves out the mandatory ('???') settings
    # a nested setting (synth's corpora.demo.train) by its dotted name
    leaves = leaf_values(OmegaConf.to_container(settings))
    listed = {line.split()[0]: line.split()[1] for line in cli.help_text(tool).splitlines()
              if line.startswith("  ") and len(line.split()) > 1 and line.split()[0] in leaves}
    assert listed == {key: str(value).replace("None", "null").replace("False", "false").replace("True", "true")
                      for key, value in leaves.items()}


def leaf_values(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out |= leaf_values(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_settings_take_overrides_and_missing_or_unknown_keys_are_named(monkeypatch):
    settings, rest = cli.parse("sweep", ["dir=~/runs", "key=val_wer"])
    assert (settings.dir, settings.key) == (str(Path.home() / "runs"), "val_wer")  # as a shell would expand it
    monkeypatch.setenv("RUNS", "/scratch/me")
    assert cli.parse("sweep", ["dir=$RUNS/sweep"])[0].dir == "/scratch/me/sweep"
    with pytest.raises(SystemExit, match=r"^error: dir is needed \(dir=\.\.\.\)"):
        cli.parse("sweep", ["key=val_wer"])
    with pytest.raises(SystemExit, match=r"^error: foo is not a setting of python -m asr.tools.sweep; "
                                         r"its settings: dir, key"):
        cli.parse("sweep", ["dir=x", "foo=1"])
    with pytest.raises(SystemExit, match=r"^error: 'x' is not key=value"):
        cli.parse("sweep", ["x"])
    settings, rest = cli.parse("memory", ["cards=true", "model=xlsr_1b", "precision=bf16"], passthrough=True)
    assert settings.cards is True and rest == ["model=xlsr_1b", "precision=bf16"]  # the train config's


def test_every_tool_answers_help_with_its_settings():
    """transcribe.py as a user runs it; the `python -m asr.tools.<tool>` entry points' `main` in this process (each
    module's `__main__` line calls it with sys.argv[1:])."""
    import importlib

    result = subprocess.run([sys.executable, "transcribe.py", "--help"], cwd=asr.REPO_DIR, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "settings (key=value; defaults in conf/transcribe.yaml)" in result.stdout
    for tool in ("sweep", "export", "lm", "memory", "synth", "average"):
        module = importlib.import_module(f"asr.tools.{tool}")
        assert "main(sys.argv[1:])" in Path(module.__file__).read_text().split('if __name__ == "__main__":')[1]
        result = in_process(module.main, ["--help"])
        assert result.returncode == 0 and f"settings (key=value; defaults in conf/{tool}.yaml)" in result.stdout, tool


def test_train_help_lists_the_groups_and_the_settings_with_their_defaults_and_comments():
    """`python train.py --help` as a user runs it: the top of train.py's docstring, each group with its options
    (the default starred), each of `KEY_SETTINGS` with the value the composed config holds and the comment of
    the file that defines the key (data/default.yaml's for data.max_batch_seconds, not model/tiny.yaml's)."""
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=asr.REPO_DIR, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary, usage, groups, settings, end = result.stdout.rstrip().split("\n\n")
    assert summary == "Fine-tune a wav2vec2 / XLS-R encoder with CTC." and usage.startswith("    python train.py ")
    groups = dict(line.split(None, 1) for line in groups.splitlines()[1:])
    assert list(groups) == ["data", "lang", "augment", "sched", "precision", "callbacks", "logger", "model",
                            "finetune", "experiment", "search"]
    assert groups["lang"] == "custom, demo*, es, hy, ko, pt, zh_cn, zh_en"
    assert groups["finetune"] == "adapters, full*, lora"
    assert (groups["precision"], groups["model"]) == ("16, 32*, bf16", "tiny*, xlsr_1b, xlsr_300m")
    assert groups["search"] == "cv7_pt_300m_lr, demo_lr  (none by default)"
    shown = {}  # key: (value as shown, comment)
    for line in settings.splitlines()[1:]:
        if line.startswith("      "):
            key = list(shown)[-1]
            shown[key] = (shown[key][0], f"{shown[key][1]} {line.strip()}".strip())
        else:
            key, value = line.strip().split("=", 1)
            shown[key] = (value, "")
    assert list(shown) == list(cli.KEY_SETTINGS["train"]) and all(comment for _, comment in shown.values())
    composed = compose_config()
    for key, (value, _) in shown.items():
        if not key.startswith("hydra."):  # resolved as train.py resolves it: ${repo:} is this checkout
            assert OmegaConf.create({"v": yaml.safe_load(value)}).v == OmegaConf.select(composed, key), key
    assert shown["data.max_batch_seconds"] == ("30", "padded audio per batch (clips x padded length), seconds; "
                                                     "from the model group")
    assert shown["optim.lr"][0] == "0.003" and shown["data.root"][0] == "${repo:}/demo/cv-pt"
    assert shown["model.pretrained"] == ("null", "hub id or local directory; null: random weights, trained from "
                                                 "scratch")
    assert shown["hydra.run.dir"][1].startswith("the run directory: one per SLURM job")
    assert end.splitlines() == ["Every setting, as composed: python train.py [key=value ...] --cfg job",
                                "Hydra's own options: python train.py --hydra-help"]


def test_start_makes_the_command_line_what_hydra_takes_or_names_a_mistyped_key(monkeypatch, tmp_path):
    """`asr.tools.cli.start`, the start-up of train.py and evaluate.py, with a stand-in for their Hydra `main`: it
    gets sys.argv with paths expanded and numeric choices quoted, Hydra's own flags as typed; a mistyped key
    stops before it with one line; train.py's and evaluate.py's --help are answered here, before Hydra."""
    argvs = []

    def start(tool: str, *argv: str):
        monkeypatch.setattr(sys, "argv", [f"{tool}.py", *argv])
        return in_process(lambda _: cli.start(tool, lambda: argvs.append(sys.argv)), argv)

    monkeypatch.setenv("HOME", str(tmp_path))
    assert start("train", "-m", "data.root=~/cv", "precision=32,bf16", "--cfg", "job").returncode == 0
    assert start("train", "--hydra-help").returncode == 0 and start("evaluate", "--help").returncode == 0
    assert argvs == [["train.py", "-m", f"data.root={tmp_path}/cv", "precision='32',bf16", "--cfg", "job"],
                     ["train.py", "--hydra-help"]]  # evaluate.py --help: answered by cli.script_help
    wrong = start("train", "sed=3")
    assert wrong.returncode == 1 and wrong.stderr.startswith(
        "error: sed is not a setting of train.py. Did you mean seed? Its settings and groups: augment, callbacks")
    wrong = start("evaluate", "splt=dev")
    assert wrong.returncode == 1 and wrong.stderr.startswith(
        "error: splt is not a setting of evaluate.py. Did you mean split?")
    helped = start("train", "-h")
    assert helped.returncode == 0 and helped.stdout == cli.script_help("train") + "\n"
    helped = start("evaluate", "--help")
    assert helped.returncode == 0 and helped.stdout == cli.script_help("evaluate") + "\n"
    assert len(argvs) == 2  # main ran for none of them
