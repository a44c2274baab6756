"""Every option of every config group composes and instantiates; the offline failure is a message."""

import os
import subprocess
import sys
import time

import pytest
import torch
from hydra.utils import instantiate

import asr
from asr.model import CTCModel, check_pretrained
from tests.conftest import CONF, compose_config

GROUPS = {
    "lang": ["demo", "hy", "pt", "zh_cn", "ko", "zh_en", "custom"],
    "model": ["tiny", "xlsr_300m", "xlsr_1b"],
    "sched": ["linear", "tristage"],
    "precision": ["32", "16", "bf16"],
    "logger": ["csv", "wandb", "none"],
}


def test_groups_list_every_shipped_option():
    for group, options in GROUPS.items():
        shipped = sorted(p.stem for p in (asr.REPO_DIR / "conf" / group).glob("*.yaml"))
        assert shipped == sorted(options), group


def test_default_is_tiny_on_the_demo():
    cfg = compose_config(overrides=["run_dir=/tmp/unused"])
    assert cfg.data.lang == "demo" and cfg.model.pretrained is None
    assert (asr.REPO_DIR / "demo" / "cv-pt" / "clips").is_dir()
    assert instantiate(cfg.data).check() is None


@pytest.mark.parametrize("lang", GROUPS["lang"])
def test_lang(lang):
    cfg = compose_config(overrides=[f"lang={lang}"])
    data = instantiate(cfg.data)
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
        model = instantiate(cfg.model, vocab=vocab, optim=cfg.optim, sched=cfg.sched, _convert_="all")
    assert isinstance(model, CTCModel)
    assert low < sum(p.numel() for p in model.parameters()) < high
    assert model.model.lm_head.out_features == len(vocab)
    assert model.model.config.pad_token_id == len(vocab) - 1  # the blank
    assert model.model.config.ctc_zero_infinity
    assert model.model.config._attn_implementation == "sdpa"
    frozen = not any(p.requires_grad for p in model.model.wav2vec2.feature_extractor.parameters())
    assert frozen == (name != "tiny")


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
    trainer = instantiate(cfg.trainer, logger=built_logger)
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
    assert asr.quote_numeric_choices(argv) == ["train.py", "precision='32'", "++precision='16',bf16", "trainer.devices=2"]


@pytest.mark.parametrize("lang", GROUPS["lang"])
def test_evaluate_config_composes(lang):
    cfg = compose_config("evaluate", overrides=[f"lang={lang}", "ckpt_path=x.ckpt"])
    assert instantiate(cfg.data).hparams.lang == lang and cfg.split == "test"


def test_trainer_overrides_as_users_type_them(tmp_path):
    cfg = compose_config(overrides=["++trainer.max_steps=7", "++trainer.max_time=00:00:05:00", "lang=pt",
                                    f"run_dir={tmp_path}"])
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.max_steps == 7 and cfg.trainer.max_time == "00:00:05:00"
