"""CTCModel: a pretrained directory's architecture and weights, HF's CTC loss without device reads, and its
fine-tuning behaviour in a run."""

import json
import os
import shutil
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

import asr
from asr.core.frames import WAV2VEC2
from asr.data.loading import UtteranceDataset, collate
from asr.model import schedules
from asr.model.module import CTCModel, adamw
from tests.callbacks import RecordUpdates
from tests.conftest import SHRUNK, assembled, attention_mask, compose_config, data_module

VOCAB = list("abc") + ["|", "[UNK]", "[PAD]"]


def test_pretrained_directory_keeps_its_architecture_and_weights(tmp_path):
    """An XLS-R-style pretraining checkpoint (no CTC head) loads from a local directory: its own
    architecture and weights, our regularisation overrides, a new CTC head of our vocabulary size."""
    arch = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=[16] * 7, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    pretrained = Wav2Vec2ForPreTraining(arch)
    pretrained.save_pretrained(tmp_path / "xlsr")
    cfg = compose_config(overrides=["model=xlsr_300m", f"model.pretrained={tmp_path / 'xlsr'}",
                                    "model.config.layerdrop=0.05"])
    model = CTCModel.from_config(cfg, VOCAB).model
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2  # not xlsr_300m's arch
    assert model.config.layerdrop == 0.05
    assert model.lm_head.out_features == len(VOCAB)
    ours, theirs = model.wav2vec2.state_dict(), pretrained.wav2vec2.state_dict()
    for name in ("feature_extractor.conv_layers.0.conv.weight", "encoder.layers.1.attention.q_proj.weight"):
        assert torch.equal(ours[name], theirs[name]), name
    assert not any(p.requires_grad for p in model.wav2vec2.feature_extractor.parameters())


def test_head_init_xavier_starts_a_new_head_and_keeps_a_trained_one(tmp_path):
    """model.head_init=xavier: a new CTC head (random weights, or a checkpoint's head of another
    vocabulary) gets Xavier-uniform weights and zero bias; a checkpoint's head of this vocabulary is kept."""
    import math

    from asr.core.text import Vocabulary
    from asr.model.encoder import build_wav2vec2

    vocab = Vocabulary(VOCAB)
    arch = dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                conv_dim=[16] * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    normal = build_wav2vec2(vocab, None, arch, {}, "sdpa", "normal").lm_head
    xavier = build_wav2vec2(vocab, None, arch, {}, "sdpa", "xavier").lm_head
    bound = math.sqrt(6 / (128 + len(VOCAB)))
    assert abs(normal.weight.std().item() - 0.02) < 0.003  # HF's initializer_range
    assert xavier.weight.abs().max() <= bound and xavier.weight.std().item() > 0.8 * bound / math.sqrt(3)
    assert not xavier.bias.any()

    trained = build_wav2vec2(vocab, None, arch, {}, "sdpa", "normal")
    torch.nn.init.constant_(trained.lm_head.weight, 0.5)
    trained.save_pretrained(tmp_path / "same")
    kept = build_wav2vec2(vocab, str(tmp_path / "same"), arch, {}, "sdpa", "xavier").lm_head
    assert torch.equal(kept.weight, trained.lm_head.weight)
    other = build_wav2vec2(Vocabulary(list("abcd") + VOCAB[3:]), str(tmp_path / "same"), arch, {}, "sdpa",
                           "xavier").lm_head  # another vocabulary: a new head, started as asked
    assert other.weight.abs().max() <= math.sqrt(6 / (128 + len(VOCAB) + 1)) and not other.bias.any()
    composed = CTCModel.from_config(compose_config(overrides=["model.head_init=xavier"]), VOCAB).model.lm_head
    assert composed.weight.std().item() > 0.8 * math.sqrt(6 / (128 + len(VOCAB))) / math.sqrt(3)  # the tiny model
    with pytest.raises(asr.SetupError, match="model.head_init='uniform'"):
        build_wav2vec2(vocab, None, arch, {}, "sdpa", "uniform")


class DeviceReads(TorchDispatchMode):
    """The ops dispatched while active that read tensor values back to the host: on a GPU each one waits
    for the device (`.item()`, `bool()`, `tolist()` and data-dependent shapes such as `masked_select`)."""

    READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::equal",
             "aten::unique_consecutive", "aten::_unique2"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.READS:
            self.reads.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_our_ctc_loss_equals_hf_and_reads_nothing_back_from_the_device(cv_corpus):
    """The loss computed from the collator's host lengths is HF's own (labels= path), and its gradients
    too; ours dispatches no op that reads a value back from the device, HF's does."""
    from asr.data import loading
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=0", "model.config.mask_time_prob=0", "logger=none")
    model = run.model.eval()
    dataset = loading.UtteranceDataset(run.data.load("train"), run.data.vocab)
    batch = loading.collate([dataset[i] for i in range(4)], hop=WAV2VEC2.hop)
    batch["labels"][0, 3:] = -100  # an utterance whose label is shorter
    batch["label_lengths"][0] = 3
    out = model(batch)
    logits, frames = out.logits, out.frames
    with DeviceReads() as ours_mode:
        ours = model.ctc_loss(logits, frames, batch)
        grad_ours = torch.autograd.grad(ours, model.model.lm_head.weight, retain_graph=True)[0]
    assert ours_mode.reads == []
    with DeviceReads() as hf_mode:
        theirs = model.model(batch["audio"], attention_mask=attention_mask(batch["lengths"], batch["shape"][1]),
                             labels=batch["labels"]).loss
    assert "aten::masked_select" in hf_mode.reads and "aten::_local_scalar_dense" in hf_mode.reads
    torch.testing.assert_close(ours, theirs)
    grad_theirs = torch.autograd.grad(theirs, model.model.lm_head.weight)[0]
    torch.testing.assert_close(grad_ours, grad_theirs)
    assert frames.tolist() == [WAV2VEC2.frames(n) for n in batch["lengths"]]


# Fine-tuning behaviour in a run: schedules stepped per optimizer update under accumulation, freeze-then-
# unfreeze, a separate head learning rate, non-finite updates skipped, counted, and stopping the run when
# they do not end, clipping. Compiled layers last, on the model alone: they train as the eager ones do.

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


@pytest.mark.slow  # the first compiled pass takes ~20 s on 2 cores (with a warm inductor cache)
@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on a CPU needs a C compiler")
def test_compiled_layers_train_and_compute_what_the_eager_ones_do(cv_corpus):
    """model.compile=true: every transformer layer is compiled; on a collated batch of training clips, the forward
    pass (with SpecAugment) and backward pass through them give the eager model's loss and gradients from the same
    weights and masks; the model's AdamW step on those gradients moves the weights, and the logits after it are
    the eager model's on the same weights."""
    data = data_module(f"data.root={cv_corpus}", "data.num_workers=0")
    dataset = UtteranceDataset(data.load("train"), data.vocab)
    batch = collate([dataset[i] for i in range(4)], hop=WAV2VEC2.hop)
    models = {c: CTCModel.from_config(compose_config(overrides=[f"data.root={cv_corpus}", f"model.compile={c}"]),
                                      data.vocab.tokens) for c in ("true", "false")}
    compiled, eager = models["true"], models["false"]
    eager.load_state_dict(compiled.state_dict())
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.wav2vec2.encoder.layers)
    assert all(layer._compiled_call_impl is None for layer in eager.model.wav2vec2.encoder.layers)
    losses = {}
    for name, model in models.items():
        model.train()
        np.random.seed(0)  # the same SpecAugment masks (drawn on the host, outside the compiled layers)
        losses[name] = model(batch).loss
        losses[name].backward()
    torch.testing.assert_close(losses["true"], losses["false"], atol=1e-5, rtol=1e-5)
    for (name, ours), theirs in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4, msg=name)
    before = compiled.model.wav2vec2.encoder.layers[0].attention.q_proj.weight.detach().clone()
    adamw(compiled.model, **compiled.hparams.optim).step()
    assert not torch.equal(compiled.model.wav2vec2.encoder.layers[0].attention.q_proj.weight, before)
    eager.load_state_dict(compiled.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(batch).logits, eager.eval()(batch).logits, atol=1e-4, rtol=1e-4)
