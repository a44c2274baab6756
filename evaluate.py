"""Decode a split with a trained model and score it: greedily, by beam search, or by beam search with
an n-gram language model (pyctcdecode + KenLM).

    python evaluate.py ckpt_path=<run>                       # the run's best checkpoint, on its own test split
    python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt split=dev [lang=... data.root=...]
    python evaluate.py ckpt_path=... decoder=beam_lm [lm_path=<arpa>] alpha=0.5 beta=1.0
    python evaluate.py -m ckpt_path=... split=dev decoder=beam_lm alpha=0.3,0.5,0.8 beta=0,1,2   # a sweep

By default it scores the data the run was trained on: corpus, root, language (text rules) and split names
from the run's config.yaml beside checkpoints/. lang=... or data.* on the command line scores other data,
and says so. Split: train, dev, test, or the release's own name (ASCEND's validation).

Writes metrics.json (wer, cer, and mer for Mandarin; with a beam decoder also the greedy figures; per language tag under by_language when the corpus
tags utterances, as ASCEND does) and predictions.jsonl (id, language, reference, hypothesis per
utterance) into the run directory. Streams: one batch of logits in memory at a time. With logger=wandb,
also a W&B eval run in the training run's group (asr.tracking.log_evaluation).
"""

import heapq
import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import asr
from asr import SetupError, checkpoints, cli, lm, text, tracking
from asr.config import checked, command_line_changes, register_resolvers
from asr.metrics import ErrorRates, utterance_cer
from asr.model import CTCModel

register_resolvers()  # before Hydra composes
log = logging.getLogger("evaluate")
# What defines the data a run was trained on (its data node): what evaluate.py scores unless told otherwise.
RUN_DATA = ("corpus", "root", "language", "lang", "train_split", "dev_split", "test_split", "dev_speakers",
            "train_extra", "columns", "min_seconds", "max_seconds")


def the_runs_data(cfg: DictConfig, changes: dict, ckpt: str) -> tuple[DictConfig, dict]:
    """`cfg` with the data the checkpoint's run was trained on (`RUN_DATA` from the config.yaml beside its
    checkpoints/), except what the command line changed (`changes`), and what the scoring needs to know of
    that run: {run, group (its W&B group), other (key -> [trained on, scored]: other data, said so)}."""
    run = checkpoints.run_dir_of(ckpt)
    record = run / "config.yaml" if run else None
    if record is None or not record.is_file():
        language = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["language"]
        log.warning("%s has no config.yaml beside its checkpoints/: scoring the data as configured (lang=%s, "
                    "data.root=%s)%s", ckpt, cfg.data.lang, cfg.data.root,
                    f"; the model was trained with the text rules of {language!r}" if language != cfg.data.language
                    else "")
        return cfg, {"run": run, "group": None, "other": {}}
    trained = OmegaConf.to_container(OmegaConf.load(record))
    settings = OmegaConf.to_container(cfg)
    for key in RUN_DATA:
        if f"data.{key}" not in changes and not any(k.startswith(f"data.{key}.") for k in changes):
            settings["data"][key] = trained["data"].get(key)
    other = {k: [trained["data"].get(k), settings["data"][k]] for k in RUN_DATA
             if settings["data"][k] != trained["data"].get(k)}
    if other:
        log.warning("scoring other data than %s was trained on: %s", run,
                    ", ".join(f"data.{k}={new!r} (trained on {old!r})" for k, (old, new) in other.items()))
    group = (trained.get("logger") or {}).get("group")
    return OmegaConf.create(settings), {"run": run, "group": group, "other": other}


def split_role(split: str, data: DictConfig) -> tuple[str, str]:
    """(train, dev or test, the release's name of it) of `split`, given as either; SetupError listing both
    kinds of name otherwise. A dev split carved from train has no release name: "dev (carved from train)"."""
    names = {"train": data.train_split, "dev": data.dev_split, "test": data.test_split}
    for role, name in names.items():
        if split in (role, name):
            return role, name or f"{role} (carved from train)"
    valid = ", ".join(role + (f" ({name})" if name and name != role else "") for role, name in names.items())
    raise SetupError(f"split={split} is not a split of {data.corpus} at {data.root}: give one of {valid}.")


def evaluate(cfg: DictConfig) -> dict:
    changes, _ = command_line_changes(cfg, "evaluate")
    cfg = checked(cfg, "evaluate")
    if cfg.logger and not str(cfg.logger._target_).endswith("WandbLogger"):
        raise SetupError("evaluate.py logs to W&B only (logger=wandb); metrics.json holds its figures")
    ckpt = checkpoints.best_checkpoint(cfg.ckpt_path)  # a run directory: its best
    cfg, trained = the_runs_data(cfg, changes, ckpt)
    role, split = split_role(cfg.split, cfg.data)
    scored = {"corpus": cfg.data.corpus, "root": cfg.data.root, "split": split, "checkpoint": ckpt}
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = asr.device(cfg.device)
    model = CTCModel.from_checkpoint(ckpt).to(device).eval()

    data = instantiate(cfg.data, _convert_="all")
    if problem := data.check():
        raise SetupError(problem)
    data.vocab, data.geometry = model.vocab, model.geometry  # labels, [UNK] counts and frames: the model's own
    loader = data.dataloader(role)
    if unknown := data.report[role]["unk_characters"]:
        log.warning("%d characters of the %s transcripts are not in the model's vocabulary, among them %s: the "
                    "model cannot write them, so each is a character error (the model was trained on other text, "
                    "or these transcripts need the text rules of another lang=)", unknown, split,
                    " ".join(data.report[role]["unk_examples"]))
    decoder, lm_path = build_decoder(cfg, model, data, run_dir)
    errors, greedy_errors = ErrorRates(), ErrorRates()
    seconds, skipped = 0.0, 0
    worst = []  # with a W&B logger: (CER, line) of the worst_utterances highest, as a min-heap
    with open(run_dir / "predictions.jsonl", "w", encoding="utf-8") as out, torch.inference_mode():
        for batch in tqdm(loader, desc=f"decoding {split}", unit="batch"):
            data.count_dropped(role, batch["dropped"])
            if not batch["ids"]:
                continue
            decoded = model.decode(batch, decoder, cfg.beam_width)  # as validation decodes
            greedy, hypotheses = decoded.greedy, decoded.hypotheses
            errors.update(batch["texts"], hypotheses, batch["languages"])
            greedy_errors.update(batch["texts"], greedy, batch["languages"])
            for utt_id, tag, reference, hypothesis, best_path in zip(batch["ids"], batch["languages"], batch["texts"],
                                                                     hypotheses, greedy):
                line = {"id": utt_id, "language": tag, "reference": reference, "hypothesis": hypothesis, **scored}
                if decoder is not None:
                    line["greedy_hypothesis"] = best_path
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                if cfg.logger:
                    cer = utterance_cer(reference, hypothesis)
                    entry = (cer, len(worst), {**line, "cer": cer})
                    (heapq.heappush if len(worst) < cfg.worst_utterances else heapq.heappushpop)(worst, entry)
            seconds += batch["audio_seconds"]
            skipped += batch["skipped"]
    rates, greedy_rates = errors.rates(), greedy_errors.rates()
    if not text.is_chinese(model.hparams.language):
        rates.pop("mer")
        greedy_rates.pop("mer")
    by_language = errors.by_tag()
    decoding = {"decoder": cfg.decoder}
    if decoder is not None:
        decoding.update(beam_width=cfg.beam_width, greedy=greedy_rates)
    if cfg.decoder == "beam_lm":
        decoding.update(alpha=cfg.alpha, beta=cfg.beta, lm_path=str(lm_path))
    metrics = {**rates, **decoding, "n_utterances": sum(errors.utterances.values()), "audio_seconds": seconds,
               "skipped_clips": skipped, **scored, "language": cfg.data.language,
               "train_run": str(trained["run"]) if trained["run"] else None,
               **({"other_data": {k: {"trained": old, "scored": new} for k, (old, new) in trained["other"].items()}}
                  if trained["other"] else {}),
               **({"by_language": by_language} if len(by_language) > 1 else {}),
               "data_report": data.report[role]}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False))
    if cfg.logger:
        paths = {u.id: u.path for u in data.load(role)}
        tracking.log_evaluation(cfg, metrics, [{**row, "path": paths[row["id"]]}
                                               for _, _, row in sorted(worst, key=lambda e: -e[0])],
                                trained["run"], trained["group"])
    return metrics


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
                               data.hparams.language)
        elif not Path(lm_path).is_file():
            raise SetupError(f"lm_path={lm_path} does not exist (python -m asr.lm text=<file> out=<dir> builds one)")
    return lm.beam_decoder(model.vocab.tokens, lm_path, cfg.alpha, cfg.beta), lm_path


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        metrics = evaluate(cfg)
    except SetupError as error:
        tracking.finish(exit_code=1)
        sys.exit(f"error: {error}")
    except BaseException:
        tracking.finish(exit_code=1)
        raise
    mer = f"  MER {metrics['mer']:.4f}" if "mer" in metrics else ""
    greedy = (f"  (greedy: WER {metrics['greedy']['wer']:.4f}  CER {metrics['greedy']['cer']:.4f})"
              if "greedy" in metrics else "")
    other = " (not the data the run was trained on)" if "other_data" in metrics else ""
    print(f"{metrics['split']} {cfg.decoder}: WER {metrics['wer']:.4f}  CER {metrics['cer']:.4f}{mer}{greedy}  "
          f"({metrics['n_utterances']} utterances of {metrics['corpus']} at {metrics['root']}{other}; "
          f"{metrics['checkpoint']}) -> {cfg.run_dir}")


if __name__ == "__main__":
    cli.start("evaluate", main)
