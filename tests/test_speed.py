"""Speed without host syncs: a training update reads nothing back from the device between log steps, and
the FLOP count behind MFU is the model's."""

import os
import time
import warnings

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from asr.model import speed
from asr.model.module import CTCModel
from tests.conftest import assembled, compose_config
from tests.test_encoder import _model_and_batch
from tests.test_model import VOCAB, DeviceReads


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
        model.model.lm_head(torch.zeros(1, int(model.model.frames([n])[0]), model.model.config.hidden_size))
    counted = counter.get_total_flops()
    config = model.model.config
    assert speed.training_flops(config, [n], conv_trained=True) == pytest.approx(3 * counted, rel=0.01)
    with FlopCounterMode(display=False) as conv:
        model.model.wav2vec2.feature_extractor(batch["audio"][:1, :n])
    conv = conv.get_total_flops()
    assert speed.training_flops(config, [n], conv_trained=False) == pytest.approx(3 * counted - 2 * conv, rel=0.01)


def test_the_speed_figures_are_logged_per_window_with_mfu_against_a_given_peak(cv_corpus, tmp_path):
    batches = Batches()
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=0", "data.max_batch_seconds=8", f"run_dir={tmp_path}",
                    "trainer.log_every_n_steps=2", "callbacks.speed.peak_tflops=0.001", "logger=none",
                    callbacks=[batches], max_steps=4, limit_val_batches=0, accelerator="cpu", enable_progress_bar=False)
    run.fit()
    monitor = next(c for c in run.callbacks if isinstance(c, speed.SpeedMonitor))
    figures, seconds, window = monitor.last, monitor.last_window_seconds, batches.seen[-2:]  # updates 3 and 4
    assert figures["train/audio_seconds_per_second"] == pytest.approx(sum(b["audio_seconds"] for b in window) / seconds,
                                                                      rel=1e-9)
    assert figures["train/padding_fraction"] == pytest.approx(
        1 - sum(b["audio_seconds"] for b in window) / sum(b["padded_seconds"] for b in window), rel=1e-9)
    assert 0 <= figures["train/loader_wait"] < 1
    # MFU = the window's model FLOPs per second / the peak given (0.001 TFLOP/s = 1e9 FLOP/s)
    config = run.model.model.config
    conv_trained = any(p.requires_grad for p in run.model.model.wav2vec2.feature_extractor.parameters())
    flops = sum(speed.training_flops(config, b["lengths"], conv_trained) for b in window)
    assert figures["train/mfu"] == pytest.approx(flops / seconds / 1e9, rel=1e-9)


class Batches(L.Callback):
    """Each training batch's host figures, in order."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append({k: batch[k] for k in ("audio_seconds", "padded_seconds", "lengths")})



def test_the_loader_wait_is_timed_where_the_training_loop_blocks_for_its_batch(cv_corpus, tmp_path, monkeypatch):
    """A loader that takes 0.5 s per clip, on the training loop's own thread (no worker): the figure holds
    that sleep, all of it and no more."""
    from asr.data import loading

    decode = loading.UtteranceDataset.__getitem__

    def slow(self, i):
        time.sleep(0.5)
        return decode(self, i)

    monkeypatch.setattr(loading.UtteranceDataset, "__getitem__", slow)
    clips = []
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=0", "data.max_batch_seconds=8", f"run_dir={tmp_path}",
                    "trainer.log_every_n_steps=2", "logger=none", callbacks=[Clips(clips)], max_steps=4,
                    limit_val_batches=0, accelerator="cpu", enable_progress_bar=False)
    run.fit()
    monitor = next(c for c in run.callbacks if isinstance(c, speed.SpeedMonitor))
    waited = monitor.last["train/loader_wait"] * monitor.last_window_seconds
    assert waited == pytest.approx(0.5 * sum(clips[-2:]), rel=0.2)  # the last window's 2 batches
    assert monitor.last["train/loader_wait"] > 0.1, monitor.last  # ~0.8 on idle cores; busy shared ones compute slower
    assert "_on_before_fetch" not in vars(run.trainer.fit_loop.epoch_loop)  # Lightning's own hooks put back


class Clips(L.Callback):
    def __init__(self, clips):
        self.clips = clips

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clips.append(len(batch["ids"]))


def test_expandable_segments_go_to_the_allocators_environment_before_cuda_starts(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    speed.configure_cuda_allocator(False)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    speed.configure_cuda_allocator(True)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    speed.configure_cuda_allocator(True)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512,expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")  # the user's own choice stays
    speed.configure_cuda_allocator(True)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"


def _synchronise():
    warnings.warn("called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:162.)",
                  stacklevel=2)


def test_sync_sites_are_counted_by_the_innermost_frame_of_the_projects_code():
    """The warnings torch's sync debug mode gives (made here by hand: a CPU never synchronises), grouped by
    where in the project they come from; other warnings pass through."""
    with speed.SyncSites() as sites:
        for _ in range(3):
            _synchronise()
        with pytest.warns(UserWarning, match="something else"):
            warnings.warn("something else", stacklevel=2)
    assert sites.count == 3
    [((ours, library), n)] = sites.sites.items()
    assert n == 3 and ours.startswith("tests/test_speed.py:") and ours.endswith(" _synchronise")
    assert library.endswith(" _synchronise")


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_a_frozen_feature_encoder_computes_in_the_autocast_dtype_without_casts(cv_corpus, precision):
    """Its convolutions kept in bf16 (fp16): under autocast the same logits as float32 weights (which autocast
    rounds every pass), no conversion of their weights in a pass, and float32 again after the fit; outside
    autocast the features are still computed."""
    model, batch = _model_and_batch(cv_corpus, "model.freeze_feature_encoder=true")
    model.eval()
    dtype = speed.PRECISION_DTYPE[precision]
    convs = [f"wav2vec2.feature_extractor.{n}.{p}" for n, m in model.model.wav2vec2.feature_extractor.named_modules()
             if isinstance(m, torch.nn.Conv1d) for p in ("weight", "bias")]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype), ConvertedWeights(convs, model.model) as converted:
        before = model(batch).logits
    assert len(converted.weights) == len(convs) == 14  # autocast rounds each frozen conv weight and bias every pass
    names = model.model.keep_feature_encoder_in(dtype)
    assert sorted(names) == sorted(convs)
    assert names and all(model.model.get_parameter(n).dtype == dtype for n in names)
    assert all(p.dtype == torch.float32 for n, p in model.model.named_parameters() if n not in names)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype), ConvertedWeights(names, model.model) as converted:
        after = model(batch).logits
    assert converted.weights == []
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with torch.no_grad():
        assert torch.isfinite(model(batch).logits).all()  # outside autocast
    model.model.keep_feature_encoder_in(torch.float32)
    assert all(p.dtype == torch.float32 for p in model.model.parameters())


class ConvertedWeights(TorchDispatchMode):
    """Conversions (`aten::_to_copy`) of the named parameters while active."""

    def __init__(self, names, module):
        super().__init__()
        self.ids = {id(module.get_parameter(n)) for n in names}
        self.weights = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and id(args[0]) in self.ids:
            self.weights.append(args[0].shape)
        return func(*args, **(kwargs or {}))


def test_mixed_precision_keeps_the_frozen_encoder_in_bf16_for_the_fit_and_saves_float32(cv_corpus, tmp_path):
    """bf16-mixed on the CPU with the feature encoder frozen: bf16 convolutions while training, float32 in the
    checkpoint and after the fit."""
    class Dtypes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.add(pl_module.model.wav2vec2.feature_extractor.conv_layers[0].conv.weight.dtype)

    seen = set()
    run = assembled(f"data.root={cv_corpus}", "data.num_workers=0", "data.max_batch_seconds=8", f"run_dir={tmp_path}",
                    "precision=bf16", "model.freeze_feature_encoder=true", "logger=none", "~callbacks.checkpoint",
                    callbacks=[Dtypes()], max_steps=2, limit_val_batches=0, accelerator="cpu",
                    enable_progress_bar=False)
    run.fit()
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("compile", [False, True, "layers", "encoder", "all"])
def test_compile_takes_false_layers_encoder_or_all(compile):
    model = CTCModel.from_config(compose_config(overrides=[f"model.compile={str(compile).lower()}"]), VOCAB)
    encoder = model.model.wav2vec2
    layers = compile in (True, "layers", "all")
    assert all((layer._compiled_call_impl is not None) == layers for layer in encoder.encoder.layers)
    assert (encoder.feature_extractor._compiled_call_impl is not None) == (compile in ("encoder", "all"))


def test_a_compile_choice_that_is_not_one_is_named():
    cfg = compose_config(overrides=["model.compile=graphs"])
    with pytest.raises(Exception, match="model.compile='graphs': give false, layers, encoder or all"):
        CTCModel.from_config(cfg, VOCAB)
