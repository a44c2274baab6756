"""Speed without host syncs: a training update reads nothing back from the device between log steps, and
the FLOP count behind MFU is the model's."""

import numpy as np
import pytest
import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from asr import speed
from tests.conftest import assembled
from tests.test_encoder import _model_and_batch
from tests.test_model import DeviceReads


class CountReads(L.Callback):
    """Device reads dispatched during each training batch and its update (from the previous batch's end)."""

    def __init__(self, mode: DeviceReads):
        self.mode, self.per_update, self._seen = mode, [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_update.append((trainer.global_step, self.mode.reads[self._seen:]))
        self._seen = len(self.mode.reads)


def test_a_training_update_reads_nothing_back_from_the_device_between_log_steps(cv_corpus, tmp_path):
    """The training loop as train.py builds it (the config's callbacks, a CSV logger, the progress bar, a
    loader worker) on 4 updates between log steps: on a GPU each read would make the host wait for the device."""
    reads = DeviceReads()
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=1", "data.max_batch_seconds=8", f"run_dir={tmp_path}",
                    "trainer.log_every_n_steps=4", "~callbacks.requeue", callbacks=[count := CountReads(reads)],
                    max_steps=8, limit_val_batches=0, accelerator="cpu")
    with reads:
        run.fit()
    reads = {step: len(r) for step, r in count.per_update}  # from the previous batch's end to this one's
    assert list(reads) == list(range(1, 9))
    # Lightning reads the logged tensors after the log step's batch end (update 4): once per 4 updates
    assert 0 < reads[5] <= 4, reads
    assert all(reads[step] == 0 for step in (2, 3, 4, 6, 7, 8)), reads  # update 1 sets things up


def test_the_flop_count_behind_mfu_is_torchs_count_of_the_model(cv_corpus):
    """training_flops, for one clip through a trained feature encoder, is 3x the forward FLOPs torch's own
    counter sees (matmuls, convolutions, attention: eager, whose matmuls the counter sees); frozen, the
    feature encoder counts once."""
    model, batch = _model_and_batch(cv_corpus, "model.attn_implementation=eager")
    model.eval()
    n = batch["lengths"][0]
    with FlopCounterMode(display=False) as counter:
        model.model.encode(batch["audio"][:1, :n], [n])
        model.model.lm_head(torch.zeros(1, int(model.frames([n])[0]), model.model.config.hidden_size))
    counted = counter.get_total_flops()
    config = model.model.config
    assert speed.training_flops(config, [n], conv_trained=True) == pytest.approx(3 * counted, rel=0.01)
    with FlopCounterMode(display=False) as conv:
        model.model.wav2vec2.feature_extractor(batch["audio"][:1, :n])
    conv = conv.get_total_flops()
    assert speed.training_flops(config, [n], conv_trained=False) == pytest.approx(3 * counted - 2 * conv, rel=0.01)


def test_the_speed_figures_are_logged_per_window_with_mfu_against_a_given_peak(cv_corpus, tmp_path):
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=0", "data.max_batch_seconds=8", f"run_dir={tmp_path}",
                    "trainer.log_every_n_steps=2", "callbacks.speed.peak_tflops=0.001", "logger=none",
                    max_steps=4, limit_val_batches=0, accelerator="cpu", enable_progress_bar=False)
    run.fit()
    model = run.model
    figures = next(c for c in run.callbacks if isinstance(c, speed.SpeedMonitor)).last
    assert 0 < figures["train/audio_seconds_per_second"] < 10_000
    assert 0 <= figures["train/loader_wait"] < 1 and 0 <= figures["train/padding_fraction"] < 1
    # MFU = the window's model FLOPs per second / peak: 1 GFLOP/s x mfu = FLOPs per audio-second x audio-s/s
    per_audio_second = speed.flops_per_audio_second(model.model.config, 2.0, conv_trained=True)
    assert figures["train/mfu"] * 1e9 == pytest.approx(figures["train/audio_seconds_per_second"] * per_audio_second,
                                                       rel=0.5)

