"""The run's report: the model card's hyper-parameters of each shipped experiment are its source card's."""

import pytest
from omegaconf import OmegaConf

import asr
from asr.run import cluster
from asr.run.report import hyperparameters
from tests.conftest import compose_config

EXPERIMENTS = {  # experiment -> (lang, base model, a figure its card reports)
    "cv_zh_cn_300m": ("zh_cn", "facebook/wav2vec2-xls-r-300m", "CER 0.2059"),
    "ascend_300m": ("zh_en", "facebook/wav2vec2-xls-r-300m", "CER 0.9868"),
    "zeroth_ko_300m": ("ko", "facebook/wav2vec2-xls-r-300m", "CER 0.0345"),
    "cv7_pt_300m": ("pt", "facebook/wav2vec2-xls-r-300m", "WER 0.4698"),
    "cv8_hy_1b": ("hy", "facebook/wav2vec2-xls-r-1b", "CER 0.1100"),
}
CARD_LINES = {  # experiment -> its card's hyper-parameter lines, in the HF Trainer's words
    "cv_zh_cn_300m": ["learning_rate: 7.5e-05", "train_batch_size: 8", "eval_batch_size: 8", "seed: 42",
                                 "gradient_accumulation_steps: 4", "total_train_batch_size: 32",
                                 "lr_scheduler_type: linear", "lr_scheduler_warmup_steps: 2000", "num_epochs: 100",
                                 "mixed_precision_training: Native AMP"],
    "ascend_300m": ["learning_rate: 0.0003", "train_batch_size: 8", "eval_batch_size: 1", "seed: 42",
                                 "gradient_accumulation_steps: 2", "total_train_batch_size: 16",
                                 "lr_scheduler_type: linear", "lr_scheduler_warmup_steps: 500", "num_epochs: 20",
                                 "mixed_precision_training: Native AMP"],
    "zeroth_ko_300m": ["learning_rate: 0.0003", "train_batch_size: 8", "eval_batch_size: 8", "seed: 42",
                                 "gradient_accumulation_steps: 4", "total_train_batch_size: 32",
                                 "lr_scheduler_type: linear", "lr_scheduler_warmup_steps: 2000", "num_epochs: 50",
                                 "mixed_precision_training: Native AMP"],
    "cv7_pt_300m": ["learning_rate: 7.5e-05", "train_batch_size: 16", "eval_batch_size: 8", "seed: 42",
                                 "gradient_accumulation_steps: 4", "total_train_batch_size: 64",
                                 "lr_scheduler_type: linear", "lr_scheduler_warmup_steps: 2000",
                                 "training_steps: 40000", "mixed_precision_training: Native AMP"],
    "cv8_hy_1b": ["learning_rate: 8e-05", "train_batch_size: 16", "eval_batch_size: 64", "seed: 42",
                                 "gradient_accumulation_steps: 8", "total_train_batch_size: 128",
                                 "lr_scheduler_type: tristage", "lr_scheduler_ratios: [0.1, 0.4, 0.5]",
                                 "training_steps: 1400", "mixed_precision_training: Native AMP"],
}
BETAS = {"cv8_hy_1b": "(0.9,0.98)"}


def test_every_shipped_experiment_is_tested():
    assert sorted(p.stem for p in (asr.REPO_DIR / "conf" / "experiment").glob("*.yaml")) == sorted(EXPERIMENTS)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_pins_its_cards_hyperparameters(experiment):
    lang, pretrained, reported = EXPERIMENTS[experiment]
    cfg = compose_config(overrides=[f"experiment={experiment}", "run_dir=/tmp/unused"])
    assert cfg.data.lang == lang and cfg.model.pretrained == pretrained and cfg.seed == 42
    ours = [line[2:] for line in hyperparameters(OmegaConf.to_container(cfg, resolve=True), cluster.batch_of(cfg))]
    for line in CARD_LINES[experiment]:
        assert line in ours, line
    optimizer = next(x for x in ours if x.startswith("optimizer"))
    assert f"betas={BETAS.get(experiment, '(0.9,0.999)')} and epsilon=1e-08" in optimizer
    header = (asr.REPO_DIR / "conf" / "experiment" / f"{experiment}.yaml").read_text().split("defaults:")[0]
    assert reported in header and f"experiment={experiment}" in header  # what it reproduces, and how
    # the duration cap never binds before the clip count: clips x data.max_seconds fit the budget
    assert cfg.data.max_batch_size * cfg.data.max_seconds <= cfg.data.max_batch_seconds
