"""The model cards' runs as experiments, and the fine-tuning behaviour they rely on: schedules stepped
per optimizer update under accumulation, freeze-then-unfreeze, a separate head learning rate, and
non-finite updates skipped, counted, and stopping the run when they do not end."""

import json
import os
import re
import shutil
import subprocess
import sys

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import asr
from asr import cluster, schedules
from asr.model import CTCModel
from asr.report import hyperparameters
from tests.callbacks import RecordUpdates
from tests.conftest import SHRUNK, assembled, compose_config

SEEDS = asr.REPO_DIR.parent / "shared" / "seeds"
EXPERIMENTS = {  # experiment -> (card, lang, model)
    "cv_zh_cn_300m": ("000_8c86dbb991c43477.txt", "zh_cn", "facebook/wav2vec2-xls-r-300m"),
    "ascend_300m": ("001_7c8729a573a10e50.txt", "zh_en", "facebook/wav2vec2-xls-r-300m"),
    "zeroth_ko_300m": ("002_96ec550e2fafce3e.txt", "ko", "facebook/wav2vec2-xls-r-300m"),
    "cv7_pt_300m": ("003_1b6568c2e395e784.txt", "pt", "facebook/wav2vec2-xls-r-300m"),
    "cv8_hy_1b": ("004_64e0dd707224cdd1.txt", "hy", "facebook/wav2vec2-xls-r-1b"),
}
# The cards' hyper-parameter lines, as of this repository (shared/ may be absent where the repo is alone).
CARD_LINES = {
    "000_8c86dbb991c43477.txt": ["learning_rate: 7.5e-05", "train_batch_size: 8", "eval_batch_size: 8", "seed: 42",
                                 "gradient_accumulation_steps: 4", "total_train_batch_size: 32",
                                 "lr_scheduler_type: linear", "lr_scheduler_warmup_steps: 2000", "num_epochs: 100",
                                 "mixed_precision_training: Native AMP"],
    "001_7c8729a573a10e50.txt": ["learning_rate: 0.0003", "train_batch_size: 8", "eval_batch_size: 1", "seed: 42",
                                 "gradient_accumulation_steps: 2", "total_train_batch_size: 16",
                                 "lr_scheduler_type: linear", "lr_scheduler_warmup_steps: 500", "num_epochs: 20",
                                 "mixed_precision_training: Native AMP"],
    "002_96ec550e2fafce3e.txt": ["learning_rate: 0.0003", "train_batch_size: 8", "eval_batch_size: 8", "seed: 42",
                                 "gradient_accumulation_steps: 4", "total_train_batch_size: 32",
                                 "lr_scheduler_type: linear", "lr_scheduler_warmup_steps: 2000", "num_epochs: 50",
                                 "mixed_precision_training: Native AMP"],
    "003_1b6568c2e395e784.txt": ["learning_rate: 7.5e-05", "train_batch_size: 16", "eval_batch_size: 8", "seed: 42",
                                 "gradient_accumulation_steps: 4", "total_train_batch_size: 64",
                                 "lr_scheduler_type: linear", "lr_scheduler_warmup_steps: 2000",
                                 "training_steps: 40000", "mixed_precision_training: Native AMP"],
    "004_64e0dd707224cdd1.txt": ["learning_rate: 8e-05", "train_batch_size: 16", "eval_batch_size: 64", "seed: 42",
                                 "gradient_accumulation_steps: 8", "total_train_batch_size: 128",
                                 "lr_scheduler_type: tristage", "lr_scheduler_ratios: [0.1, 0.4, 0.5]",
                                 "training_steps: 1400", "mixed_precision_training: Native AMP"],
}
BETAS = {"004_64e0dd707224cdd1.txt": "(0.9,0.98)"}


def test_every_shipped_experiment_is_tested():
    assert sorted(p.stem for p in (asr.REPO_DIR / "conf" / "experiment").glob("*.yaml")) == sorted(EXPERIMENTS)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_pins_its_cards_hyperparameters(experiment):
    card, lang, pretrained = EXPERIMENTS[experiment]
    cfg = compose_config(overrides=[f"experiment={experiment}", "run_dir=/tmp/unused"])
    assert cfg.data.lang == lang and cfg.model.pretrained == pretrained and cfg.seed == 42
    ours = [line[2:] for line in hyperparameters(OmegaConf.to_container(cfg, resolve=True), cluster.batch_of(cfg))]
    expected = CARD_LINES[card]
    if (SEEDS / card).is_file():  # the card itself, where shared/ sits beside the repository
        text = (SEEDS / card).read_text()
        listed = re.findall(r"^- (\w+: .+)$", text.split("### Training hyperparameters")[1].split("###")[0], re.M)
        expected = [line.replace("num_epochs: 100.0", "num_epochs: 100").replace("num_epochs: 50.0", "num_epochs: 50")
                    for line in listed if not line.startswith("optimizer")]
        assert expected == CARD_LINES[card]
    for line in expected:
        assert line in ours, line
    assert f"betas={BETAS.get(card, '(0.9,0.999)')} and epsilon=1e-08" in next(x for x in ours if x.startswith("optimizer"))
    header = (asr.REPO_DIR / "conf" / "experiment" / f"{experiment}.yaml").read_text().split("defaults:")[0]
    assert card in header and f"experiment={experiment}" in header
    # the duration cap never binds before the clip count: clips x data.max_seconds fit the budget
    assert cfg.data.max_batch_size * cfg.data.max_seconds <= cfg.data.max_batch_seconds


def _tiny_trainer(cv_corpus, tmp_path, overrides=(), callbacks=(), **trainer_args):
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=0", "data.max_batch_seconds=8", f"run_dir={tmp_path}",
                    *SHRUNK, *overrides, callbacks=callbacks, accelerator="cpu", limit_val_batches=0, **trainer_args)
    return run.cfg, run.data, run.model, run.trainer


def test_schedule_steps_once_per_optimizer_update_under_accumulation(cv_corpus, tmp_path):
    cfg, data, model, trainer = _tiny_trainer(cv_corpus, tmp_path, ["sched.warmup_steps=2"], max_epochs=3,
                                              accumulate_grad_batches=2, callbacks=[watch := RecordUpdates()])
    trainer.fit(model, datamodule=data)
    batches = trainer.num_training_batches  # 6 micro-batches an epoch
    updates = 3 * -(-batches // 2)
    assert trainer.global_step == updates == len(watch.lrs)
    lr = cfg.optim.lr
    expected = [lr * (s / 2 if s < 2 else (updates - s) / (updates - 2)) for s in range(updates)]
    assert [g[0] for g in watch.lrs] == pytest.approx(expected)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == 0.0  # decayed to 0 at the end
    clips = sorted(u.id for u in data.load("train"))
    for epoch in range(3):  # every clip of every epoch trained on: no tail lost
        assert sorted(i for b in watch.ids[epoch * batches : (epoch + 1) * batches] for i in b) == clips


def test_tristage_learning_rate_per_update_in_a_run(cv_corpus, tmp_path):
    cfg, data, model, trainer = _tiny_trainer(cv_corpus, tmp_path, ["sched=tristage"], max_steps=10,
                                              callbacks=[watch := RecordUpdates()])
    trainer.fit(model, datamodule=data)
    expected = [cfg.optim.lr * schedules.tristage_factor(s, 10, [0.1, 0.4, 0.5], 0.01, 0.05) for s in range(10)]
    assert [g[0] for g in watch.lrs] == pytest.approx(expected)


def test_freeze_finetune_updates_trains_only_the_head_first(cv_corpus, tmp_path):
    _, data, model, trainer = _tiny_trainer(cv_corpus, tmp_path, ["model.freeze_finetune_updates=2",
                                                                  "model.config.mask_time_prob=0"],
                                            max_steps=4, callbacks=[watch := RecordUpdates()])
    trainer.fit(model, datamodule=data)
    head = {"model.lm_head.weight", "model.lm_head.bias"}
    assert watch.changed[0] == head and watch.changed[1] == head
    for changed in watch.changed[2:]:
        assert head < changed and "model.wav2vec2.encoder.layers.0.attention.q_proj.weight" in changed


def test_head_learning_rate(cv_corpus, tmp_path):
    _, data, model, trainer = _tiny_trainer(cv_corpus, tmp_path, ["optim.head_lr=0.1", "optim.lr=0.001"],
                                            max_steps=1)
    trainer.fit(model, datamodule=data)
    groups = trainer.optimizers[0].param_groups
    head = {id(p) for p in model.model.lm_head.parameters()}
    for group in groups:
        is_head = {id(p) for p in group["params"]} <= head
        assert group["initial_lr"] == (0.1 if is_head else 0.001)
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])


class PlantNaN(L.Callback):
    def __init__(self, at: set[int]):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in self.at:
            batch["audio"][0, :100] = float("nan")


@pytest.mark.parametrize("fused", [True, False])  # skipped on the device (found_inf), or decided on the host
def test_a_nan_batch_skips_its_update_and_is_counted(cv_corpus, tmp_path, fused):
    _, data, model, trainer = _tiny_trainer(cv_corpus, tmp_path, ["model.config.mask_time_prob=0",
                                                                  f"optim.fused={fused}"], max_steps=4,
                                            callbacks=[PlantNaN({1}), watch := RecordUpdates()])
    trainer.fit(model, datamodule=data)
    assert model.skipped_updates == 1 and model.stop_reason is None
    assert watch.changed[1] == set()  # the update of the NaN batch changed nothing
    assert watch.changed[0] and watch.changed[2] and watch.changed[3]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == 4


def test_fp16_loss_scaling_skips_an_overflowing_update_and_halves_the_scale(cv_corpus, tmp_path):
    """precision=16 as on a GPU: fp16 autocast with a real GradScaler (Lightning turns 16-mixed into bf16 on
    a CPU, so the plugin is given here). A NaN batch: its update is skipped (by the scaler and by us, and
    counted once), the loss scale halves, and the other updates train."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # low enough that only the NaN batch overflows
    _, data, model, trainer = _tiny_trainer(
        cv_corpus, tmp_path, ["model.config.mask_time_prob=0"], max_steps=4, precision=None,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[PlantNaN({1}), watch := RecordUpdates()])
    trainer.fit(model, datamodule=data)
    assert trainer.precision == "16-mixed"
    assert model.skipped_updates == 1 and model.stop_reason is None
    assert watch.changed[1] == set() and watch.changed[0] and watch.changed[2] and watch.changed[3]
    assert scaler.get_scale() == 2.0**7  # halved once; it grows back only after 2000 good updates
    assert trainer.callback_metrics["train/loss_scale"] == 2.0**7  # logged per update
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_updates_in_a_row_stop_the_run_with_a_checkpoint(cv_corpus, tmp_path):
    """lr 1e30 blows the weights up after one update; every later gradient is non-finite."""
    result = subprocess.run(
        [sys.executable, "train.py", f"data.root={cv_corpus}", "optim.lr=1e30", "model.max_consecutive_skips=3",
         "trainer.max_steps=40", "trainer.val_check_interval=20", "data.num_workers=0", "data.max_batch_seconds=8",
         "logger=none", f"hydra.run.dir={tmp_path}"],
        cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert result.returncode == 1
    assert "error: 3 updates in a row had non-finite gradients" in result.stderr and "Traceback" not in result.stderr
    stopped = list((tmp_path / "checkpoints").glob("stopped-step*.ckpt"))
    assert len(stopped) == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["skipped_updates"] == 3 and results["stopped_checkpoint"] == str(stopped[0])
    assert torch.load(stopped[0], weights_only=True)["global_step"] < 40


class PostClipNorm(L.Callback):
    """The gradient norm after clipping (the update's gradients stay until the next batch zeroes them)."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_gradients_are_clipped_to_the_trainers_norm(cv_corpus, tmp_path):
    """trainer.gradient_clip_val, by the norm the skip check took (train/grad_norm, before clipping)."""
    _, data, model, trainer = _tiny_trainer(cv_corpus, tmp_path, max_steps=3, gradient_clip_val=0.01,
                                            callbacks=[post := PostClipNorm()])
    trainer.fit(model, datamodule=data)
    assert trainer.callback_metrics["train/grad_norm"] > 0.01  # there was something to clip
    assert post.norms and all(n == pytest.approx(0.01, rel=1e-4) for n in post.norms)


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on a CPU needs a C compiler")
def test_compiled_layers_train_and_compute_what_the_eager_ones_do(cv_corpus, tmp_path):
    """model.compile=true: every transformer layer is compiled, 2 updates train through them (forward and
    backward), and their logits are the eager model's on the same weights."""
    cfg, data, model, trainer = _tiny_trainer(cv_corpus, tmp_path, ["model.compile=true"], max_steps=2)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    assert all(layer._compiled_call_impl is not None for layer in model.model.wav2vec2.encoder.layers)
    eager = CTCModel.from_config(compose_config(overrides=[f"data.root={cv_corpus}", "model.compile=false"]),
                                 data.vocab.tokens)
    eager.load_state_dict(model.state_dict())
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch).logits, eager.eval()(batch).logits, atol=1e-4, rtol=1e-4)
