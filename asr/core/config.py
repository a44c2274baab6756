"""The composed config, checked against the code it configures, before anything runs.

Every default lives in the YAML under conf/. The Python side gives names and types only: a node with a
`_target_` is checked against the signature of what it builds (`SpeechDataModule`, `CTCModel`,
`lightning.Trainer`, the logger and callbacks), `optim` against `asr.model.module.adamw` and `sched` against its
function in `asr.model.schedules`. `checked(cfg)` runs right after Hydra composes: a key the code does not take,
or a value of the wrong type, stops the run with the valid keys named, before any data or weights load.
"""

import dataclasses
import difflib
import inspect
import os
from functools import lru_cache
from typing import Any

from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from asr import REPO_DIR, SetupError, quote_numeric_choices, run_dir_name

# Arguments the scripts pass at the call site (built from other nodes or from the data); never in the YAML.
CALL_SITE = {
    "asr.model.module.CTCModel": ("vocab", "language", "optim", "sched", "pause_seconds"),
    "lightning.Trainer": ("callbacks", "logger", "plugins"),
    "asr.model.module.adamw": ("model",),
    "asr.model.schedules.linear": ("optimizer", "total_steps"),
    "asr.model.schedules.tristage": ("optimizer", "total_steps"),
    "asr.data.augment.Augment": ("seed",),
    "asr.data.module.SpeechDataModule": ("geometry", "vocab"),
}


def train_settings(seed: int, run_dir: str, ckpt_path: str | None, update_clips: int | None,
                   update_seconds: float | None, val_every_updates: int | None):
    """train.py's own top-level settings (conf/train.yaml); its nodes are checked against their code."""


def decode_settings(pause_seconds: float | None):
    """How CTC outputs become text on the one model path (conf/train.yaml's `decode`; saved with the model)."""


def evaluate_settings(ckpt_path: str, seed: int, split: str, device: str, run_dir: str, decoder: str,
                      beam_width: int, alpha: float, beta: float, lm_path: str | None, lm_order: int,
                      worst_utterances: int, corpus: str | None, base: str | None):
    """evaluate.py's own top-level settings (conf/evaluate.yaml)."""


NODES = {"train": ("data", "model", "optim", "sched", "trainer", "logger", "callbacks", "decode"),
         "evaluate": ("data", "logger")}


def _script_keys(script: str) -> list[str]:
    """The top-level settings of train.py or evaluate.py (not its nodes)."""
    return [f.name for f in dataclasses.fields(schema(f"asr.core.config.{script}_settings")[0])]


def _not_a_setting(key: str, owner: str, valid: list[str], prefix: str = "",
                   listed: str = "Its settings") -> SetupError:
    """The error for a key nobody takes: the closest valid one suggested (as `prefix` + name), all listed."""
    close = difflib.get_close_matches(key.removeprefix(prefix).split(".")[0], valid, n=1)
    hint = f" Did you mean {prefix}{close[0]}?" if close else ""
    return SetupError(f"{key} is not a setting of {owner}.{hint} {listed}: {', '.join(valid)}.")


def _omegaconf_type(annotation) -> Any:
    """The annotation if OmegaConf can enforce it, else Any (OmegaConf has no unions of classes)."""
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return Any
    try:
        OmegaConf.structured(dataclasses.make_dataclass("Probe", [("x", annotation, MISSING)]))
        return annotation
    except Exception:  # noqa: BLE001 (unsupported types fail in several ways, forward references too)
        return Any


@lru_cache
def schema(target: str) -> tuple[type, bool]:
    """(a dataclass of `target`'s keyword parameters less those passed at the call site, whether it takes
    **kwargs).

    `target` is a dotted path to a class or function. Parameters without a default are required; a default
    is kept only for third-party code (Lightning's own defaults): ours have none, the YAML gives them.
    """
    parameters = inspect.signature(get_object(target)).parameters.values()
    fields = []
    for p in parameters:
        if p.name in CALL_SITE.get(target, ()) or p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = MISSING if p.default is p.empty else p.default
        if isinstance(default, (list, tuple, dict, set)):
            default = dataclasses.field(default_factory=lambda d=default: d)
        elif default is not MISSING and not isinstance(default, (str, int, float, bool, type(None))):
            default = None  # an object default (a Path, an enum): the key exists, its value is free
        fields.append((p.name, _omegaconf_type(p.annotation), default))
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in parameters)
    return dataclasses.make_dataclass(target.rsplit(".", 1)[-1], fields), takes_kwargs


def check_node(node: dict, path: str, target: str) -> dict:
    """`node` with its values converted to the parameters' types; SetupError naming the valid keys if a key
    is unknown, a required one is missing, or a value does not convert."""
    cls, takes_kwargs = schema(target)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = {k: v for k, v in node.items() if k != "_target_"}
    for key in given:
        if key not in fields and not takes_kwargs:
            raise _not_a_setting(f"{path}.{key}", f"{path} ({target})", sorted(fields), prefix=f"{path}.")
    missing = [k for k, f in fields.items() if f.default is MISSING and f.default_factory is dataclasses.MISSING
               and (k not in given or given[k] == "???")]
    if missing:
        raise SetupError(f"{path} needs {', '.join(f'{path}.{k}' for k in missing)} ({target}); "
                         f"set it in the YAML or on the command line.")
    converted = typed_values({k: v for k, v in given.items() if k in fields}, path, target)  # **kwargs: the target's
    return {**({"_target_": node["_target_"]} if "_target_" in node else {}),
            **{k: converted[k] if k in fields else v for k, v in given.items()}}


def typed_values(values: dict, path: str, target: str) -> dict:
    """`values`, some of `target`'s parameters, converted to their types; SetupError naming the key, the value and
    the type expected otherwise."""
    cls, _ = schema(target)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    typed = OmegaConf.structured(cls)
    for key, value in values.items():
        try:
            typed[key] = value
        except OmegaConfBaseException as error:
            expected = getattr(fields[key].type, "__name__", str(fields[key].type))
            raise SetupError(f"{path}.{key}={value!r}: {str(error).splitlines()[0]} ({target} takes "
                             f"{expected}).") from None
    converted = OmegaConf.to_container(typed)
    return {key: converted[key] for key in values}


def _targeted(node: dict, path: str) -> dict:
    if "_target_" not in node:
        raise SetupError(f"{path} has no _target_ (the class it builds).")
    return check_node(node, path, node["_target_"])


def checked(cfg: DictConfig, script: str = "train") -> DictConfig:
    """The composed config resolved (interpolations filled in) and checked; SetupError if it does not fit
    the code. train.py and evaluate.py call this first."""
    register_resolvers()
    plain = expand_paths(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    own = _script_keys(script)
    valid = sorted([*own, *NODES[script]])
    for key in plain:
        if key not in valid:
            raise _not_a_setting(key, f"{script}.py", valid)
    out = check_node({k: plain[k] for k in own if k in plain}, script, f"asr.core.config.{script}_settings")
    out["data"] = _targeted(plain["data"], "data")
    out["data"]["augment"] = check_node(out["data"]["augment"], "data.augment", "asr.data.augment.Augment")
    out["logger"] = _targeted(plain["logger"], "logger") if plain.get("logger") else None
    if script == "train":
        out["model"] = _targeted(plain["model"], "model")
        out["trainer"] = _targeted(plain["trainer"], "trainer")
        out["callbacks"] = {name: _targeted(node, f"callbacks.{name}")
                            for name, node in (plain.get("callbacks") or {}).items() if node is not None}
        out["optim"] = check_node(plain["optim"], "optim", "asr.model.module.adamw")
        out["decode"] = check_node(plain["decode"], "decode", "asr.core.config.decode_settings")
        sched = dict(plain["sched"])
        name = sched.pop("name", None)
        if name not in (names := _options("sched")):
            raise SetupError(f"sched.name={name!r}: expected {' or '.join(names)} (conf/sched/).")
        out["sched"] = {"name": name, **check_node(sched, "sched", f"asr.model.schedules.{name}")}
    result = OmegaConf.create(out)
    OmegaConf.set_struct(result, True)
    return result


def _options(group: str) -> list[str]:
    """The options of a config group: the files of conf/<group>/ (a schedule's is the function of its name in
    `asr.model.schedules`, checked like any `_target_`)."""
    return sorted(p.stem for p in (REPO_DIR / "conf" / group).glob("*.yaml"))


def decoding_defaults() -> DictConfig:
    """alpha, beta, beam_width and lm_order as conf/evaluate.yaml sets them, for the command-line tools
    that decode or build LMs outside evaluate.py (`python -m asr.tools.export`, `python -m asr.tools.lm`)."""
    settings = OmegaConf.load(REPO_DIR / "conf" / "evaluate.yaml")
    return OmegaConf.masked_copy(settings, ["alpha", "beta", "beam_width", "lm_order"])


def check_overrides(argv: list[str], script: str) -> None:
    """Command-line overrides whose key the code does not take: SetupError naming the valid keys (Hydra
    itself would only say "not in struct"). Keys under a dict setting (model.arch.*, model.config.*) and
    new keys (`+key=`, checked by `checked` after composition) pass here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    conf = REPO_DIR / "conf"
    primary = OmegaConf.load(conf / f"{script}.yaml")
    groups = {key for item in primary.defaults if isinstance(item, DictConfig) for key in item}
    targets = {"data": OmegaConf.load(conf / "data" / "default.yaml")._target_}
    if script == "train":
        targets |= {"model": primary.model._target_, "trainer": primary.trainer._target_,
                    "optim": "asr.model.module.adamw", "decode": "asr.core.config.decode_settings"}
    top = sorted({*_script_keys(script), *NODES[script], *groups, "hydra"})
    parser, parsed = OverridesParser.create(), []
    for arg in [a for a in argv if "=" in a and not a.startswith("-")]:
        try:
            parsed += parser.parse_overrides([arg])
        except OverrideParseException:
            key, _, value = arg.partition("=")
            quote = "'" if '"' in value else '"'
            raise SetupError(f"{arg} does not parse as an override (characters such as ~ = [ ] , need quotes): "
                             f"quote the value for Hydra, and the whole for the shell: "
                             f"'{key}={quote}{value}{quote}'") from None
    for override in parsed:
        if override.is_add() or override.is_force_add() or override.is_delete():
            continue
        key = override.key_or_group.split("/")[0]
        first, *rest = key.split(".")
        if first not in top:
            raise _not_a_setting(key, f"{script}.py", top, listed="Its settings and groups")
        if rest and first in targets:
            fields = sorted(f.name for f in dataclasses.fields(schema(targets[first])[0]))
            if rest[0] not in fields:
                raise _not_a_setting(key, f"{first} ({targets[first]})", fields, prefix=f"{first}.")
        if first == "data" and rest[:1] == ["augment"] and len(rest) > 1:  # the augment group's node
            fields = sorted(f.name for f in dataclasses.fields(schema("asr.data.augment.Augment")[0]))
            if rest[1] not in fields:
                raise _not_a_setting(key, "data.augment (asr.data.augment.Augment)", fields, prefix="data.augment.")


# Settings that hold a path, by the last part of their key (data.root, ckpt_path, callbacks.*.dirpath,
# hydra.run.dir...): `~` and `$VAR` in them are expanded, as a shell would do outside `key=value`.
PATH_KEYS = ("root", "ckpt_path", "lm_path", "pretrained", "run_dir", "dirpath", "save_dir", "cache_dir", "out_dir",
             "dir")


def expand_path(value):
    """`~` and `$VAR` (not `${...}`, an interpolation) expanded in a path; anything else as it is."""
    if not isinstance(value, str) or not (value.startswith("~") or "$" in value.replace("${", "")):
        return value
    return os.path.expandvars(os.path.expanduser(value))


def expand_paths(node):
    """A plain config (dicts and lists) with its path settings (`PATH_KEYS`) expanded."""
    if isinstance(node, dict):
        return {k: expand_path(v) if str(k) in PATH_KEYS else expand_paths(v) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_paths(v) for v in node]
    return node


def expand_path_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides with `~` and `$VAR` expanded in path settings: `data.root=~/cv/pt` (bash
    leaves `~` inside `key=value` alone, and Hydra's grammar rejects it) and `hydra.run.dir=$SCRATCH/run`."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and not arg.startswith("-") and key.lstrip("+~").split(".")[-1] in PATH_KEYS:
            arg = f"{key}={expand_path(value)}"
        out.append(arg)
    return out


def _flat(node, prefix: str = "") -> dict:
    """{dotted key: value} of a plain config; a non-empty dict is a branch, anything else a leaf."""
    if isinstance(node, dict) and node:
        return {k: v for key, child in node.items() for k, v in _flat(child, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def package(group: str, option: str) -> str:
    """Where the keys of conf/<group>/<option>.yaml land: its `# @package` header, else the group's path;
    "" for `_global_` (the root)."""
    lines = (REPO_DIR / "conf" / group / f"{option}.yaml").read_text().splitlines()[:5]
    header = [line.split()[-1] for line in lines if line.startswith("# @package")]
    name = header[0] if header else group.replace("/", ".")
    return "" if name == "_global_" else name


def _written_by(group: str, option: str) -> set[str]:
    """The dotted keys a group option writes (conf/<group>/<option>.yaml, at its `# @package`)."""
    path = REPO_DIR / "conf" / group / f"{option}.yaml"
    if group.startswith("hydra") or not path.is_file():
        return set()
    prefix = package(group, option)
    node = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "defaults"}
    return {f"{prefix}.{k}" if prefix else k for k in _flat(node) if k}


def command_line_changes(cfg: DictConfig, config_name: str) -> tuple[dict, set[str]]:
    """What this Hydra job's command line set in its config: ({dotted key: value}, {keys it removed}).

    A key counts when the command line names it (`data.root=...`) or a group option chosen there writes it
    (lang=hy: data.corpus, data.language, data.lang), whatever its value, and when its value differs from
    the config composed again without the overrides (an experiment's nested choices); but not a null that
    a group choice leaves (lang=hy has no data.root). Values are resolved, paths expanded. Outside a Hydra
    app: nothing."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return {}, set()
    named = set()
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        key = override.key_or_group
        named.add(key)
        if not override.is_delete() and isinstance(override.value(), str) and "." not in key:
            named |= _written_by(key, override.value())

    def is_named(key: str) -> bool:
        return any(key == n or key.startswith(n + ".") for n in named)

    fresh = _flat(expand_paths(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)))
    default = _flat(expand_paths(OmegaConf.to_container(compose(config_name, overrides=[]), resolve=True,
                                                        throw_on_missing=False)))
    changed = {k: v for k, v in fresh.items()
               if (is_named(k) or k not in default or default[k] != v) and (v is not None or is_named(k))}
    return changed, {k for k in default if k not in fresh}


def register_resolvers() -> None:
    """The resolvers conf/ uses: `${repo:}` (this checkout, whatever the working directory),
    `${run_dir_name:<otherwise>}` (`asr.run_dir_name`) and `${either:<value>,<otherwise>}` (the value unless it is
    null). Every entry point calls this before composing."""
    OmegaConf.register_new_resolver("repo", lambda: str(REPO_DIR), replace=True)
    OmegaConf.register_new_resolver("run_dir_name", run_dir_name, replace=True)
    OmegaConf.register_new_resolver("either", lambda value, otherwise: otherwise if value is None else value,
                                    replace=True)


def compose(name: str, overrides=()) -> DictConfig:
    """conf/<name>.yaml composed with `overrides` (Hydra's grammar, as on a command line), resolved and
    checked: the config a script gets, for the code that builds runs without a command line (benchmarks,
    tests, the memory planner). A train config needs a `run_dir=` override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO_DIR / "conf"), version_base="1.3"):
        return checked(hydra_compose(name, overrides=quote_numeric_choices(list(overrides))), name)
