"""A trained model loaded to score and transcribe: from a train.py checkpoint (`from_checkpoint`), or from
any of what the tools take as `model_path` (`load`): a checkpoint, a directory `python -m asr.tools.export`
wrote (HF layout, with its LM if it has one) or a directory of MMS adapters. The LightningModule
(`asr.model.module.CTCModel`) trains and decodes; reading what training and export wrote lives here, for
evaluate.py, transcribe.py, align, export and averaging alike. What the inference model is built with, where
the files say nothing: conf/inference.yaml."""

import json
from functools import cache
from pathlib import Path

import torch
from omegaconf import OmegaConf

from asr import REPO_DIR, SetupError
from asr.core import checkpoints
from asr.model.encoder import check_pretrained
from asr.model.lm import exported_decoder
from asr.model.module import CTCModel


@cache
def settings() -> dict:
    """conf/inference.yaml: `export` (an exported model's build settings), `older_checkpoints` (what a
    checkpoint written before a setting existed trained with)."""
    return OmegaConf.to_container(OmegaConf.load(REPO_DIR / "conf" / "inference.yaml"))


def from_checkpoint(path: str | Path, map_location="cpu", base: str | None = None) -> CTCModel:
    """The model a train.py checkpoint holds: its architecture from the checkpoint (not from the pretrained
    weights it started from), adapters or LoRA completed with their base (its hash checked), its counters.
    `base`: where the base of an adapters or LoRA checkpoint is now, when it moved (None: where it was)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    written = checkpoint.get("base")  # adapters or LoRA: the base comes from its path, the rest from the file
    if base is not None and not written:
        raise SetupError(f"base={base}: {path} holds every weight of its model (finetune=full); base= is for "
                         f"adapters or LoRA checkpoints: leave it out")
    pretrained = (base or written["pretrained"]) if written else None
    hparams = {**settings()["older_checkpoints"], **checkpoint["hyper_parameters"], "pretrained": pretrained,
               "arch": checkpoint["wav2vec2_config"], "compile": False}
    if written and (problem := check_pretrained(pretrained)):
        moved = "" if base else " (if it moved: base=<where it is now>)"
        raise SetupError(f"{path} holds adapters or LoRA weights of the base {pretrained}, which cannot "
                         f"be loaded{moved}: {problem}")
    model = CTCModel(**hparams)
    if unknown := sorted(set(checkpoint["state_dict"]) - set(model.state_dict())):
        raise SetupError(f"{path} holds {len(unknown)} parameters this code's model does not have "
                         f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): written by other code")
    model.on_load_checkpoint(checkpoint)  # a base's weights filled in (its hash checked), the counters
    model.load_state_dict(checkpoint["state_dict"])
    return model


def load(path: str | Path, target_lang: str | None = None, base: str | None = None) -> tuple[CTCModel, object]:
    """(model, its beam decoder or None) from a checkpoint of train.py (verified: `asr.core.checkpoints`) or a
    directory `asr.model.export` wrote; an exported directory with an LM (language_model/) brings its
    pyctcdecode decoder, with the alpha and beta it was exported with. A directory of MMS adapters
    (`asr.model.export.export_adapters`) gives `target_lang`'s (None: its one language). SetupError for anything
    else. `base`: where a checkpoint's base now is (`from_checkpoint`); an export holds its base.
    """
    path = Path(path).expanduser()
    if path.is_file() or path.suffix == ".ckpt":
        if target_lang is not None:
            raise SetupError(f"target_lang={target_lang} picks a language of an exported adapters directory; "
                             f"{path} is a checkpoint of one language")
        return from_checkpoint(checkpoints.verified(str(path), "model_path"), base=base), None
    if base is not None:
        raise SetupError(f"base={base}: {path} is an export, which holds its base; base= is for checkpoints of "
                         f"adapters or LoRA")
    if not (path / "config.json").is_file():
        if (path / "model.onnx").is_file():
            raise SetupError(f"model_path={path} is an ONNX export (model.onnx): backend=onnx runs it")
        raise SetupError(f"model_path={path} is neither a checkpoint (.ckpt) nor an exported model directory "
                         f"(train.py writes <run>/model/ and <run>/checkpoints/)")
    rules = json.loads((path / "asr.json").read_text()) if (path / "asr.json").is_file() else {}
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    languages = rules.get("adapters")
    if languages is not None:
        if target_lang is None and len(languages) > 1:
            raise SetupError(f"{path} has adapters for {', '.join(languages)}: pick one with target_lang=<lang>")
        target_lang = target_lang or next(iter(languages))
        if target_lang not in languages:
            raise SetupError(f"target_lang={target_lang}: {path} has adapters for {', '.join(languages)} only")
        vocab, rules = vocab[target_lang], languages[target_lang]
    elif target_lang is not None:
        raise SetupError(f"target_lang={target_lang}: {path} is a model of one language, without adapters")
    written = {k: rules[k] for k in ("pause_seconds",) if k in rules}  # asr.json's, over an older export's defaults
    model = CTCModel(vocab=sorted(vocab, key=vocab.get), pretrained=str(path), arch={}, config={},
                     language=rules.get("language"), optim={}, sched={}, finetune=None,
                     **{**settings()["export"], **written})
    if target_lang is not None:
        model.model.load_adapter(target_lang)  # its adapters and CTC head (adapter.<lang>.safetensors)
    return model, exported_decoder(path)
