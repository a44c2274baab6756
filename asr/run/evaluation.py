"""An evaluation of a checkpoint, built from the objects a run is built from: `assemble_evaluation`
(evaluate.py); a model's dev figures from a run's own data, `dev_rates` (callbacks.average)."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import asr
from asr import SetupError
from asr.core import checkpoints
from asr.core.config import checked, command_line_changes
from asr.data.module import SpeechDataModule
from asr.model import inference, lm
from asr.model.metrics import CorpusErrors
from asr.model.module import CTCModel
from asr.run import provenance

log = logging.getLogger(__name__)



@dataclass
class Evaluation:
    """What `assemble_evaluation` built: the scoring of a checkpoint on a split, ready to decode."""

    cfg: DictConfig  # resolved and checked, with the data of the checkpoint's run (`provenance.the_runs_data`)
    dir: Path
    checkpoint: str
    model: CTCModel  # in evaluation mode, on its device
    data: SpeechDataModule  # in the model's vocabulary and frame geometry
    role: str  # train, dev or test
    split: str  # the release's name of it
    decoder: object | None  # pyctcdecode's, or None: greedy
    lm_path: Path | None
    trained: dict  # the run it was trained in: {run, group, other (the data keys scored otherwise)}


def assemble_evaluation(cfg: DictConfig) -> Evaluation:
    """The evaluation an evaluate config describes: the checkpoint (a run directory: its best), the data its
    run was trained on unless the command line says otherwise, the model, the decoder. Warns about
    characters of the split that the model's vocabulary lacks."""
    changes, _ = command_line_changes(cfg, "evaluate")
    cfg = checked(cfg, "evaluate")
    if cfg.lm_path is not None and cfg.decoder != "beam_lm":  # before any weights or data load
        raise SetupError(f"lm_path={cfg.lm_path} is read by decoder=beam_lm only: add decoder=beam_lm (decoder="
                         f"{cfg.decoder} uses no LM)")
    if cfg.logger and not str(cfg.logger._target_).endswith("WandbLogger"):
        raise SetupError("evaluate.py logs to W&B only (logger=wandb); metrics.json holds its figures")
    ckpt = checkpoints.best_checkpoint(cfg.ckpt_path)
    cfg, trained = provenance.the_runs_data(cfg, changes, ckpt)
    if cfg.corpus is not None:
        cfg = one_corpus(cfg, cfg.corpus)
    role, split = split_role(cfg.split, cfg.data)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = inference.from_checkpoint(ckpt, base=cfg.base).to(asr.device(cfg.device)).eval()
    # labels, [UNK] counts and frames: the model's own
    data = SpeechDataModule.from_config(cfg.data, model.geometry, model.vocab)
    if problem := data.check():
        raise SetupError(problem)
    data.load(role)
    if unknown := data.report[role]["unk_characters"]:
        log.warning("%d characters of the %s transcripts are not in the model's vocabulary, among them %s: the "
                    "model cannot write them, so each is a character error (the model was trained on other text, "
                    "or these transcripts need the text rules of another lang=)", unknown, split,
                    " ".join(data.report[role]["unk_examples"]))
    decoder, lm_path = build_decoder(cfg, model, data, run_dir)
    return Evaluation(cfg, run_dir, ckpt, model, data, role, split, decoder, lm_path, trained)


def one_corpus(cfg: DictConfig, name: str) -> DictConfig:
    """`cfg` with only the corpus `name` of data.corpora (evaluate.py corpus=<name>); SetupError naming the
    corpora otherwise."""
    entries = OmegaConf.to_container(cfg.data.corpora) if cfg.data.corpora else []
    names = [e.get("name") for e in entries]
    if name not in names:
        raise SetupError(f"corpus={name}: " + (f"the run's corpora are {', '.join(map(str, names))}" if names else
                                                "the run has one corpus (data.corpora is not set); leave corpus out"))
    cfg = cfg.copy()
    cfg.data.corpora = [entries[names.index(name)]]
    return cfg


def split_role(split: str, data: DictConfig) -> tuple[str, str]:
    """(train, dev or test, the release's name of it) of `split`, given as either; SetupError listing both
    kinds of name otherwise. A dev split carved from train has no release name: "dev (carved from train)"."""
    names = {"train": data.train_split, "dev": data.dev_split, "test": data.test_split}
    for role, name in names.items():
        if split in (role, name):
            return role, name or f"{role} (carved from train)"
    valid = ", ".join(role + (f" ({name})" if name and name != role else "") for role, name in names.items())
    raise SetupError(f"split={split} is not a split of {data.corpus} at {data.root}: give one of {valid}.")


def build_decoder(cfg: DictConfig, model: CTCModel, data, run_dir: Path):
    """(pyctcdecode decoder or None for greedy, the LM file). Without lm_path, beam_lm builds a
    `lm_order`-gram model from the training transcripts into the run directory."""
    if cfg.decoder == "greedy":
        return None, None
    if cfg.decoder not in ("beam", "beam_lm"):
        raise SetupError(f"decoder={cfg.decoder} is unknown; expected greedy, beam or beam_lm")
    lm_path = None
    if cfg.decoder == "beam_lm":
        lm_path = cfg.lm_path
        if lm_path is None:
            lm_path = lm.build([u.text for u in data.raw("train")], run_dir / "lm", cfg.lm_order,
                               data.language)
        elif not Path(lm_path).is_file():
            raise SetupError(f"lm_path={lm_path} does not exist (python -m asr.tools.lm text=<file> out=<dir> "
                             f"builds one)")
    return lm.beam_decoder(model.vocab.tokens, lm_path, cfg.alpha, cfg.beta), lm_path


def dev_rates(model: CTCModel, data: SpeechDataModule, device) -> dict:
    """Greedy WER and CER of `model` on the whole dev split of `data`, in this process on `device`: decoded as
    validation and evaluate.py decode (`CTCModel.decode`, in float32) and scored as validation scores
    (`asr.model.metrics.CorpusErrors`): each corpus under its own text rules (`by_corpus`:
    {name: (WER, CER)}) and WER and CER their dev-hour-weighted means (of one corpus, its own)."""
    errors = CorpusErrors(data.scoring(), ("wer", "cer"))
    model = model.to(device).eval()
    with torch.inference_mode():
        for batch in data.dataloader("dev", whole=True):
            if batch["ids"]:
                errors.update(batch, model.decode(batch).hypotheses)
    return errors.rates("dev_seconds")
