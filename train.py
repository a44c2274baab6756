"""Fine-tune a wav2vec2 / XLS-R encoder with CTC.

    python train.py                                        # tiny model on the embedded demo
    python train.py lang=hy model=xlsr_1b sched=tristage data.root=<cv-corpus/hy-AM>
    python train.py hydra.run.dir=<run> ckpt_path=last     # resume a run where it stopped

Writes into the run directory: config.yaml, vocab.json, data_report.json, checkpoints/ (last and
best by dev CER), model/ (the best model, HF format), results.md and results.json.
"""

import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from asr import SetupError, TrainingStopped, quote_numeric_choices
from asr.config import check_overrides, checked
from asr.export import export
from asr.model import CTCModel, check_pretrained
from asr.report import RunReport, framework_versions, model_card


def train(cfg: DictConfig) -> dict:
    cfg = checked(cfg, "train")  # resolved, and every key and type checked against the code
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True)

    data = instantiate(cfg.data, _convert_="all")
    problems = [p for p in (data.check(), check_pretrained(cfg.model.pretrained)) if p]
    if problems:
        raise SetupError("\n".join(problems))
    data.setup("fit")
    data.vocab.save(run_dir / "vocab.json")
    data.write_report(run_dir / "data_report.json")

    model = CTCModel.from_config(cfg, data.vocab.tokens)
    report = RunReport(run_dir)
    logger = instantiate(cfg.logger) if cfg.logger else False
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] + [report]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    trainer.fit(model, datamodule=data, ckpt_path=cfg.ckpt_path)
    if model.stop_reason:  # every rank stops alike; the state is kept for a look or a restart
        stopped = run_dir / "checkpoints" / f"stopped-step{trainer.global_step}.ckpt"
        trainer.save_checkpoint(stopped)
        if trainer.is_global_zero:
            report.write_results(stopped_checkpoint=str(stopped), stop_reason=model.stop_reason)
        raise TrainingStopped(f"{model.stop_reason} Its state: {stopped}")

    if not trainer.is_global_zero:
        return {}
    data.write_report(run_dir / "data_report.json")  # with the clips met unreadable while training
    checkpoints = trainer.checkpoint_callback  # callbacks.checkpoint; without it, the final weights
    best = checkpoints and (checkpoints.best_model_path or checkpoints.last_model_path)
    export(CTCModel.from_checkpoint(best) if best else model.cpu(), run_dir / "model")
    results = report.write_results(best_checkpoint=best or None)
    card = model_card(OmegaConf.to_container(cfg, resolve=True), results, framework_versions())
    (run_dir / "model" / "README.md").write_text(card, encoding="utf-8")
    return results


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        results = train(cfg)
    except (SetupError, TrainingStopped) as error:
        sys.exit(f"error: {error}")
    if results:
        print(f"dev WER {results.get('val_wer', float('nan')):.4f}  CER {results.get('val_cer', float('nan')):.4f}"
              f"  after {results['train_seconds']:.0f} s -> {cfg.run_dir}")


if __name__ == "__main__":
    sys.argv = quote_numeric_choices(sys.argv)
    try:
        check_overrides(sys.argv[1:], "train")  # a mistyped key, named with the valid ones
    except SetupError as error:
        sys.exit(f"error: {error}")
    main()
