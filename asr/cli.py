"""One command grammar for every tool: `key=value` as Hydra parses it (train.py and evaluate.py are Hydra
apps), the defaults in conf/<tool>.yaml, and `--help` listing the tool's own settings, each with its
default and the comment beside it in the YAML. A benchmark is the tool `bench/<name>`: benchmarks/<name>.py
with its defaults in conf/bench/<name>.yaml (`# @package _global_` first: its settings at the top level).

    python transcribe.py model_path=<run>/model audio=clip.mp3
    python -m asr.sweep dir=multirun/2026-12-01/10-00-00 key=val_wer
    python benchmarks/throughput.py steps=150 profile=true
"""

import re
import sys

from omegaconf import DictConfig, ListConfig, OmegaConf

from asr import REPO_DIR
from asr.config import expand_path, register_resolvers

_SETTING = re.compile(r"^(\w+):\s*(.*?)\s*(?:#\s*(.*))?$")  # a top-level `key: value  # comment`


def help_text(tool: str) -> str:
    """The header of conf/<tool>.yaml (what the tool does, how it is called), then each of its settings:
    name, default, and its comment."""
    lines = (REPO_DIR / "conf" / f"{tool}.yaml").read_text(encoding="utf-8").splitlines()
    header = [line.removeprefix("#").removeprefix(" ") for line in lines
              if line.startswith("#") and not line.startswith("# @package")]
    rows = [m.groups() for m in map(_SETTING.match, lines) if m]
    width = max(len(key) for key, _, _ in rows)
    values = max(len(value) for _, value, _ in rows)
    return "\n".join([*header, "", f"settings (key=value; defaults in conf/{tool}.yaml):",
                      *(f"  {key:<{width}}  {value:<{values}}  {comment or ''}".rstrip() for key, value, comment in rows)])


def parse(tool: str, argv: list[str], passthrough: bool = False) -> tuple[DictConfig, list[str]]:
    """The settings of `tool` (conf/<tool>.yaml) with the `key=value` overrides of `argv`, and, with
    `passthrough`, the overrides of keys it does not have (for the train config it builds). `--help`
    prints `help_text` and exits; a key it does not take, a missing setting (`???`) or an override that
    does not parse exits with one line saying which and how."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import MissingMandatoryValue

    if {"-h", "--help"} & set(argv):
        print(help_text(tool))
        sys.exit(0)
    own = set(OmegaConf.load(REPO_DIR / "conf" / f"{tool}.yaml"))
    mine, other = [], []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            sys.exit(f"error: {arg!r} is not key=value; `{_command(tool)} --help` lists the settings")
        arg = f"{key}={expand_path(value)}"  # ~ and $VAR, as a shell would outside key=value
        (mine if key.lstrip("+~").split(".")[0] in own else other).append(arg)
    if other and not passthrough:
        names = ", ".join(sorted(own))
        sys.exit(f"error: {other[0].partition('=')[0]} is not a setting of {_command(tool)}; its settings: {names}")
    register_resolvers()  # ${repo:} in a default path
    try:
        with initialize_config_dir(config_dir=str(REPO_DIR / "conf"), version_base="1.3"):
            cfg = compose(tool, overrides=mine)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        sys.exit(f"error: {error.full_key} is needed ({error.full_key}=...); `{_command(tool)} --help` lists the settings")
    except HydraException as error:
        first = str(error).strip().splitlines()[0]
        sys.exit(f"error: {first}. Quote a value with spaces or brackets, e.g. key='a b' (and the whole "
                 f"argument for the shell: \"key='a b'\")")
    return cfg, other


def values(settings: DictConfig, key: str, choices=None) -> list:
    """Setting `key`, which takes one value or a list (`models=xlsr_1b`, `models=[xlsr_300m,xlsr_1b]`), as a
    list. With `choices`, each value as a lowercase string (Hydra reads 16 as a number and false as a bool)
    that must be one of them, or the tool exits with one line saying which."""
    value = settings[key]
    found = list(value) if isinstance(value, ListConfig) else [value]
    if choices is None:
        return found
    found = [str(v).lower() for v in found]
    for v in found:
        if v not in choices:
            sys.exit(f"error: {key}={v}: expected one of {', '.join(choices)}")
    return found


def _command(tool: str) -> str:
    if tool.startswith("bench/"):
        return f"python benchmarks/{tool.removeprefix('bench/')}.py"
    return f"python {tool}.py" if (REPO_DIR / f"{tool}.py").is_file() else f"python -m asr.{tool}"

