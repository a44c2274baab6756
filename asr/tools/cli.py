"""One command grammar for every tool: `key=value` as Hydra parses it (train.py and evaluate.py are Hydra
apps, started by `start`), the defaults in conf/<tool>.yaml, and `--help` listing the tool's own settings,
each with its default and the comment beside it in the YAML. A benchmark is the tool `bench/<name>`:
benchmarks/<name>.py with its defaults in conf/bench/<name>.yaml (`# @package _global_` first: its settings
at the top level).

    python transcribe.py model_path=<run>/model audio=clip.mp3
    python -m asr.tools.sweep dir=multirun/2026-12-01/10-00-00 key=val_wer
    python benchmarks/throughput.py steps=150 profile=true
"""

import ast
import re
import sys
import textwrap
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from asr import REPO_DIR, SetupError, quote_numeric_choices
from asr.core.config import check_overrides, expand_path, expand_path_overrides, package, register_resolvers

_SETTING = re.compile(r"^( *)(\w+):\s*(.*?)\s*(?:#\s*(.*))?$")  # `key: value  # comment`, at its indentation

# The settings `python train.py --help` and `python evaluate.py --help` show (every one has a comment in conf/;
# tests/test_cli.py and tests/test_evaluate.py check).
KEY_SETTINGS = {"train": (
    "hydra.run.dir", "ckpt_path", "seed", "data.root", "data.max_batch_seconds", "data.max_batch_size",
    "data.max_seconds", "data.num_workers", "data.decode_cache", "data.corpora", "data.temperature", "update_clips",
    "update_seconds", "val_every_updates", "optim.lr", "optim.head_lr", "sched.warmup_steps", "trainer.max_steps",
    "trainer.max_time", "trainer.devices", "model.pretrained", "model.finetune.method",
    "model.freeze_finetune_updates", "model.gradient_checkpointing", "model.compile", "decode.pause_seconds"),
    "evaluate": (
    "ckpt_path", "split", "corpus", "decoder", "beam_width", "alpha", "beta", "lm_path", "lm_order",
    "worst_utterances", "device", "data.max_batch_seconds", "data.num_workers")}


def yaml_settings(path: Path, prefix: str = "") -> dict[str, tuple[str, str | None]]:
    """{dotted key: (value as written, comment)} of the `key: value  # comment` lines of a YAML file, nested
    keys by their indentation, under `prefix` (a group option's package). A list item (`- ...`) is none."""
    settings, parents = {}, []  # parents: (indentation, key) of the mappings the line is in
    for match in map(_SETTING.match, path.read_text(encoding="utf-8").splitlines()):
        if match:
            indent, key, value, comment = len(match[1]), match[2], match[3], match[4]
            parents = [(i, k) for i, k in parents if i < indent]
            settings[".".join([*filter(None, [prefix]), *(k for _, k in parents), key])] = (value, comment)
            parents.append((indent, key))
    return settings


def help_text(tool: str) -> str:
    """The header of conf/<tool>.yaml (what the tool does, how it is called), then each of its settings:
    name, default, and its comment."""
    path = REPO_DIR / "conf" / f"{tool}.yaml"
    header = [line.removeprefix("#").removeprefix(" ") for line in path.read_text(encoding="utf-8").splitlines()
              if line.startswith("#") and not line.startswith("# @package")]
    # top-level settings, and the leaves of a mapping (synth's corpora.demo.train) under their dotted names
    rows = [(key, value, comment) for key, (value, comment) in yaml_settings(path).items() if "." not in key or value]
    width = max(len(key) for key, _, _ in rows)
    values = max(len(value) for _, value, _ in rows)
    return "\n".join([*header, "", f"settings (key=value; defaults in conf/{tool}.yaml):",
                      *(f"  {key:<{width}}  {value:<{values}}  {comment or ''}".rstrip()
                        for key, value, comment in rows)])


def script_help(tool: str) -> str:
    """`--help` of a Hydra app (train.py): the top of its docstring (what it does, how it is called), its
    config groups with their options (the default starred, from the defaults list of conf/<tool>.yaml), and
    its `KEY_SETTINGS`, each with its default as composed (interpolations as written) and the comment of the
    first file of the composition that comments it: where the key is defined, not where a group sets it."""
    from hydra import compose, initialize_config_dir

    conf, command = REPO_DIR / "conf", _command(tool)
    doc = ast.get_docstring(ast.parse((REPO_DIR / f"{tool}.py").read_text(encoding="utf-8")))
    choices = {group: option for item in OmegaConf.load(conf / f"{tool}.yaml").defaults
               if isinstance(item, DictConfig) for group, option in item.items()}
    width = max(map(len, choices))
    groups = [f"  {group:<{width}}  " + ", ".join(f"{o}*" if o == choice else o for o in
                                                 sorted(p.stem for p in (conf / group).glob("*.yaml")))
              + ("" if choice else "  (none by default)") for group, choice in choices.items()]
    comments = {}
    for path, prefix in [(conf / f"{tool}.yaml", ""), *((conf / group / f"{option}.yaml", package(group, option))
                                                         for group, option in choices.items() if option)]:
        for key, (_, comment) in yaml_settings(path, prefix).items():
            if comment:
                comments.setdefault(key, comment)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(tool, return_hydra_config=True), resolve=False)
    settings = []
    for key in KEY_SETTINGS[tool]:
        node = cfg
        for part in key.split("."):
            node = node[part]
        value = yaml.safe_dump(node, default_flow_style=True, width=1000).removesuffix("...\n").strip()
        settings += [f"  {key}={value}", textwrap.fill(comments[key], 104, initial_indent=" " * 6,
                                                      subsequent_indent=" " * 6)]
    return "\n".join(["\n\n".join(doc.split("\n\n")[:2]), "",
                      "config groups (group=option; * the default; conf/<group>/<option>.yaml):", *groups, "",
                      "settings you will reach for (key=value: the default; its comment in conf/):", *settings, "",
                      f"Every setting, as composed: {command} [key=value ...] --cfg job",
                      f"Hydra's own options: {command} --hydra-help"])


def start(tool: str, main) -> None:
    """The start-up of train.py and evaluate.py (`main` is their `@hydra.main` function, which reads sys.argv):
    with `KEY_SETTINGS` for the tool, -h/--help prints `script_help`; `~` and `$VAR` in paths and numeric
    group choices (precision=32) are made what Hydra takes; a key the code does not take exits with one
    line naming the valid ones; then `main` runs, and with it Hydra's -m, --cfg, --hydra-help and launchers."""
    if tool in KEY_SETTINGS and {"-h", "--help"} & set(sys.argv[1:]):
        print(script_help(tool))
        sys.exit(0)
    sys.argv = expand_path_overrides(quote_numeric_choices(sys.argv))  # ~ and $VAR in paths, as users type them
    try:
        check_overrides(sys.argv[1:], tool)  # a mistyped key, named with the valid ones
    except SetupError as error:
        sys.exit(f"error: {error}")
    main()


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
        sys.exit(f"error: {error.full_key} is needed ({error.full_key}=...); `{_command(tool)} --help` lists "
                 f"the settings")
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
    return f"python {tool}.py" if (REPO_DIR / f"{tool}.py").is_file() else f"python -m asr.tools.{tool}"

