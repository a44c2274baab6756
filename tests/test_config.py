"""Every option of every config group composes and instantiates; every default has one home (the YAML),
each group writes only where train.yaml says, and a wrong key or type stops a run naming the valid keys;
the offline failure is a message."""

import inspect
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import asr
from asr import SetupError
from asr.core import config
from asr.core.frames import WAV2VEC2
from asr.data.augment import Augment
from asr.data.module import SpeechDataModule
from asr.model import schedules
from asr.model.encoder import check_pretrained
from asr.model.module import CTCModel, adamw
from tests.conftest import compose_config

GROUPS = {
    "lang": ["demo", "hy", "pt", "es", "zh_cn", "ko", "zh_en", "custom"],
    "finetune": ["full", "adapters", "lora"],
    "model": ["tiny", "xlsr_300m", "xlsr_1b"],
    "sched": ["linear", "tristage"],
    "precision": ["32", "16", "bf16"],
    "logger": ["csv", "wandb", "none"],
    "callbacks": ["default"],
    "search": ["demo_lr", "cv7_pt_300m_lr"],
    "augment": ["none", "speed", "silence", "concat", "long_form", "noise", "speed_noise"],
}


def test_inference_builds_the_model_with_every_setting_from_the_files_or_conf():
    """An exported model is built with what its files say (vocab, language, the weights' directory) and the rest
    from conf/inference.yaml: together exactly CTCModel's settings, so a new one cannot be missed silently."""
    from asr.model import inference

    from_files = {"vocab", "pretrained", "arch", "config", "language", "optim", "sched", "finetune"}
    from_conf = set(inference.settings()["export"])
    assert not from_files & from_conf
    assert from_files | from_conf == set(inspect.signature(CTCModel).parameters)
    assert set(inference.settings()["older_checkpoints"]) <= set(inspect.signature(CTCModel).parameters)


def test_groups_list_every_shipped_option():
    for group, options in GROUPS.items():
        shipped = sorted(p.stem for p in (asr.REPO_DIR / "conf" / group).glob("*.yaml"))
        assert shipped == sorted(options), group


def test_default_is_tiny_on_the_demo():
    cfg = compose_config(overrides=["run_dir=/tmp/unused"])
    assert cfg.data.lang == "demo" and cfg.model.pretrained is None
    data = SpeechDataModule.from_config(cfg.data, WAV2VEC2)
    assert data.check() is None
    data.setup("fit")  # the committed demo: every clip of its train and dev splits usable
    assert {split: (r["kept"], r["dropped"]) for split, r in data.report.items()} == {"train": (520, {}),
                                                                                   "dev": (50, {})}


@pytest.mark.parametrize("lang", GROUPS["lang"])
def test_lang(lang):
    cfg = compose_config(overrides=[f"lang={lang}"])
    data = SpeechDataModule.from_config(cfg.data, WAV2VEC2)
    assert data.hparams.lang == lang
    problem = data.check()
    if lang == "demo":
        assert problem is None
    else:
        assert f"lang={lang} needs its corpus: pass data.root=" in problem


# Parameter counts of the published checkpoints' architectures (HF model cards: 300M, 1B).
@pytest.mark.parametrize("name,low,high", [("tiny", 0.5e6, 1.5e6), ("xlsr_300m", 300e6, 330e6),
                                          ("xlsr_1b", 950e6, 980e6)])
def test_model(name, low, high):
    cfg = compose_config(overrides=[f"model={name}", "model.pretrained=null"])
    vocab = list("abc") + ["|", "[UNK]", "[PAD]"]
    with torch.device("meta"):  # the real architecture, without allocating 4 GB for the 1B model
        model = CTCModel.from_config(cfg, vocab)
    assert isinstance(model, CTCModel)
    assert low < sum(p.numel() for p in model.parameters()) < high
    assert model.model.lm_head.out_features == len(vocab)
    assert model.model.config.pad_token_id == len(vocab) - 1  # the blank
    assert model.model.config.ctc_zero_infinity
    assert model.model.config._attn_implementation == "sdpa"
    frozen = not any(p.requires_grad for p in model.model.wav2vec2.feature_extractor.parameters())
    assert frozen == (name != "tiny")


@pytest.mark.parametrize("option", GROUPS["augment"])
def test_augment(option, tmp_path):
    """Each option composes, instantiates and passes the start-up check (noise: with a folder of audio)."""
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "noise.wav", np.zeros(1600, np.float32) + 0.1, 16_000)
    folder = [f"data.augment.noise_dir={tmp_path}"] if "noise" in option else []
    data = SpeechDataModule.from_config(compose_config(overrides=[f"augment={option}", *folder]).data,
                                       WAV2VEC2)
    assert data.check() is None and data.augment.active == (option != "none")
    assert (data.augment.slowest < 1) == ("speed" in option) and (data.augment.noise_prob > 0) == ("noise" in option)
    assert (data.augment.silence_prob > 0) == (option in ("silence", "long_form"))
    assert (data.augment.concat_prob > 0) == (option in ("concat", "long_form"))


@pytest.mark.parametrize("sched", GROUPS["sched"])
@pytest.mark.parametrize("precision", GROUPS["precision"])
@pytest.mark.parametrize("logger", GROUPS["logger"])
def test_trainer_options(sched, precision, logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config(overrides=[f"sched={sched}", f"precision={precision}", f"logger={logger}",
                                    f"run_dir={tmp_path}", "trainer.accelerator=cpu"])
    assert cfg.sched.name == sched
    built_logger = instantiate(cfg.logger) if cfg.get("logger") else False
    assert (built_logger is False) == (logger == "none")
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert {type(c).__name__ for c in callbacks} == ({"ModelCheckpoint", "Requeue", "PredictionsTable", "SpeedMonitor",
                                                      "WorstBatchFirst", "PlateauWatch", "Progress", "AverageBest"}
                                                     | ({"LearningRateMonitor"} if built_logger else set()))
    trainer = instantiate(cfg.trainer, logger=built_logger, callbacks=callbacks)
    expected = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}[precision]
    assert cfg.trainer.precision == expected
    # Lightning runs fp16 AMP as bf16 on CPU (it says so in a warning); on GPU it is fp16.
    assert trainer.precision == ("bf16-mixed" if expected == "16-mixed" else expected)
    if built_logger and logger == "wandb":
        built_logger.experiment.finish()


def test_paper_command_composes():
    cfg = compose_config(overrides=["lang=hy", "model=xlsr_1b", "sched=tristage"])
    assert cfg.model.pretrained == "facebook/wav2vec2-xls-r-1b"
    assert cfg.model.arch.num_hidden_layers == 48 and cfg.model.arch.hidden_size == 1280
    assert cfg.model.config.mask_time_prob == 0.05  # inherited from xlsr_300m
    assert cfg.sched.ratios == [0.1, 0.4, 0.5] and cfg.data.language == "hy"


def test_check_pretrained_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert check_pretrained(None) is None
    assert check_pretrained(str(tmp_path)) is None  # a local directory is taken as is
    message = check_pretrained("facebook/wav2vec2-xls-r-1b")
    assert "model.pretrained=" in message and "facebook/wav2vec2-xls-r-1b" in message


def test_offline_without_weights_or_data_fails_fast_with_a_message(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "train.py", "lang=hy", "model=xlsr_1b", "sched=tristage", f"hydra.run.dir={tmp_path}/run"],
        cwd=asr.REPO_DIR, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "data.root=" in result.stderr and "model.pretrained=" in result.stderr
    assert time.perf_counter() - started < 60


def test_numeric_precision_choices_are_quoted_for_hydra():
    argv = ["train.py", "precision=32", "++precision=16,bf16", "trainer.devices=2"]
    assert asr.quote_numeric_choices(argv) == ["train.py", "precision='32'", "++precision='16',bf16",
                                               "trainer.devices=2"]


@pytest.mark.parametrize("lang", GROUPS["lang"])
def test_evaluate_config_composes(lang):
    cfg = compose_config("evaluate", overrides=[f"lang={lang}", "ckpt_path=x.ckpt"])
    assert SpeechDataModule.from_config(cfg.data, WAV2VEC2).hparams.lang == lang and cfg.split == "test"


def test_trainer_overrides_as_users_type_them(tmp_path):
    cfg = compose_config(overrides=["++trainer.max_steps=7", "++trainer.max_time=00:00:05:00", "lang=pt",
                                    f"run_dir={tmp_path}"])
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.max_steps == 7 and cfg.trainer.max_time == "00:00:05:00"


def leaves(node, prefix: str = "") -> dict:
    """{dotted key: value} of a YAML file's settings (lists are values)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        if key != "defaults":
            out |= leaves(value, f"{prefix}.{key}" if prefix else key)
    return out


def option_writes(group: str, option: str) -> dict:
    """The dotted keys an option's file sets, under its package (`# @package`, else the group)."""
    path = asr.REPO_DIR / "conf" / group / f"{option}.yaml"
    text = path.read_text()
    package = re.search(r"^# @package (\S+)", text, re.M)
    package = package.group(1) if package else group
    body = leaves(OmegaConf.to_container(OmegaConf.load(path)))
    return {k if package == "_global_" else f"{package}.{k}": v for k, v in body.items()}


def declared_writes() -> dict[str, list[str]]:
    """train.yaml's table: group -> the keys it may write."""
    lines = re.findall(r"^#   (\w+) +-> (.+)$", (asr.REPO_DIR / "conf" / "train.yaml").read_text(), re.M)
    return {group: [k.strip() for k in keys.split(",")] for group, keys in lines}


def test_each_group_writes_only_the_keys_train_yaml_declares():
    declared = declared_writes()
    assert set(GROUPS) | {"data"} <= set(declared)
    for group in [*GROUPS, "data"]:
        for option in (p.stem for p in (asr.REPO_DIR / "conf" / group).glob("*.yaml")):
            for key in option_writes(group, option):
                assert any(key == d or key.startswith(d + ".") for d in declared[group]), (group, option, key)


def test_no_python_default_for_a_setting_the_yaml_gives():
    """The code configured by conf/ takes every setting from it: a default here would be a second home."""
    for target, skip in [(SpeechDataModule, ()), (CTCModel, ()), (adamw, ("model",)),
                         (schedules.linear, ()), (schedules.tristage, ()), (config.train_settings, ()),
                         (config.evaluate_settings, ()), (Augment, ())]:
        defaults = [p.name for p in inspect.signature(target).parameters.values()
                    if p.default is not p.empty and p.name not in skip]
        assert defaults == [], (target.__qualname__, defaults)


def test_experiments_override_only_what_their_card_changed():
    """Each value an experiment sets differs from what its groups give without it; the card's learning
    rate is pinned even where it equals the model's (a model's default may change, a card's run not)."""
    for path in sorted((asr.REPO_DIR / "conf" / "experiment").glob("*.yaml")):
        groups = [f"{k.removeprefix('override /')}={v}" for item in OmegaConf.load(path).defaults
                  for k, v in item.items()]
        base = leaves(OmegaConf.to_container(compose_config(overrides=groups)))
        for key, value in option_writes("experiment", path.stem).items():
            assert key == "optim.lr" or base.get(key) != value, f"{path.name} restates {key}: {value}"
        assert "sched=linear" not in groups, f"{path.name} restates the default schedule"


@pytest.mark.parametrize("override,message", [
    ("data.max_batch_secs=3", "data.max_batch_secs is not a setting of data (asr.data.module.SpeechDataModule). "
                              "Did you mean data.max_batch_seconds? Its settings: attention_q, augment, cache_dir"),
    ("trainer.max_step=3", "Did you mean trainer.max_steps?"),
    ("optim.learning_rate=1", "optim.learning_rate is not a setting of optim (asr.model.module.adamw)."),
    ("sed=3", "sed is not a setting of train.py. Did you mean seed?"),
])
def test_a_mistyped_key_is_named_with_the_valid_ones(override, message):
    with pytest.raises(SetupError, match=re.escape(message)):
        config.check_overrides([override], "train")


@pytest.mark.parametrize("override,message", [
    ("+data.max_batch_secs=3", "data.max_batch_secs is not a setting of data (asr.data.module.SpeechDataModule). "
                               "Did you mean data.max_batch_seconds?"),
    ("+sched.warmup=3", "sched.warmup is not a setting of sched (asr.model.schedules.linear). Did you mean "
                        "sched.warmup_steps? Its settings: warmup_ratio, warmup_steps."),
    ("data.max_batch_seconds=abc", "data.max_batch_seconds='abc': Value 'abc' of type 'str' could not be "
                                   "converted to Float"),
    ("trainer.max_steps=many", "trainer.max_steps='many'"),
    ("optim.betas=0.9", "optim.betas=0.9"),
    ("+callbacks.checkpoint.every_n_steps=3", "callbacks.checkpoint.every_n_steps is not a setting"),
    ("optim.lr=???", "optim needs optim.lr"),
])
def test_a_wrong_key_or_type_stops_before_anything_runs(override, message):
    with pytest.raises(SetupError, match=re.escape(message)):
        compose_config(overrides=[override])


def test_checked_values_take_the_types_of_the_code():
    cfg = compose_config(overrides=["data.max_batch_seconds=30", "optim.lr=1", "trainer.max_steps=5"])
    assert isinstance(cfg.data.max_batch_seconds, float) and isinstance(cfg.optim.lr, float)
    assert cfg.trainer.max_steps == 5


def test_train_py_names_the_valid_keys(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "data.max_batch_secs=3", f"hydra.run.dir={tmp_path}"],
                            cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: data.max_batch_secs is not a setting of data" in result.stderr
    assert "Did you mean data.max_batch_seconds?" in result.stderr


def test_no_python_default_for_a_setting_a_tool_yaml_gives():
    """Beyond the Hydra targets: the functions the tools' settings reach take those settings without a default
    of their own (None, "not given", aside), so conf/<tool>.yaml stays their one home."""
    from asr.data import pseudo
    from asr.model import export, lm, transcription
    from asr.model.module import decoded
    from asr.model.onnx import OnnxModel
    from asr.run import average
    from asr.tools import align, synth

    tools = ("transcribe", "align", "export", "average", "lm", "synth", "memory", "evaluate", "sweep", "pseudo")
    settings = {key for tool in tools for key in OmegaConf.load(asr.REPO_DIR / "conf" / f"{tool}.yaml")}
    settings |= {"n_train", "n_dev", "n_test", "seed"}  # synth's corpora.<name>: train, dev, test, seed
    reached = [transcription.transcribe, transcription.file_logits, transcription.subtitles, export.export,
               lm.build, lm.beam_decoder, decoded, CTCModel.decode, CTCModel.decoded, OnnxModel.decoded,
               average.chosen, align.segments, synth.make_demo, synth.make_short, synth.make_spanish,
               pseudo.utterance_confidence, pseudo.why_dropped, pseudo.repeated_ngram, pseudo.speaking_rate_range]
    found = {f.__qualname__: names for f in reached
             if (names := [p.name for p in inspect.signature(f).parameters.values()
                           if p.name in settings and p.default is not p.empty and p.default is not None])}
    assert found == {}


@pytest.mark.parametrize("value, message", [
    ("abc", r"decode.pause_seconds='abc': .* \(asr.core.config.decode_settings takes"),  # typed when composed
    ("0", r"decode.pause_seconds=0.0: give the seconds of blank frames that end a word \(above 0\), or null"),
])
def test_a_pause_that_is_not_a_positive_number_of_seconds_stops_in_one_line(value, message):
    with pytest.raises(SetupError, match=message):
        cfg = compose_config(overrides=[f"decode.pause_seconds={value}"])
        CTCModel.from_config(cfg, ["a", "|", "[UNK]", "[PAD]"])
    assert CTCModel.from_config(compose_config(overrides=["decode.pause_seconds=null"]),
                                ["a", "|", "[UNK]", "[PAD]"]).pause_frames is None
