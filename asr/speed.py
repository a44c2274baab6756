"""How fast training runs, measured on the host without waiting for the device.

`SpeedMonitor` logs, every `trainer.log_every_n_steps` updates: audio-seconds per second, model FLOPs
utilisation (MFU), the fraction of time spent waiting for the loader, batch padding and (CUDA) the
allocator's peak. Every figure is host arithmetic on host clocks and host lists: nothing is read back
from the GPU, so logging them never makes the host wait for queued GPU work. Over a window of updates
the host cannot run ahead of the GPU by more than its launch queue, so a window's rate is the GPU's.

`training_flops` counts the model FLOPs of a step from the architecture and the clips' lengths (per
audio-second at 50 frames: the conv feature encoder ~4.9 GFLOP forward; the transformer 2(4H^2 + 2HF) per
frame per layer; training = 3x forward, 1x for a frozen conv encoder: ~102 GFLOP for xls-r-300m, ~301 for
xls-r-1b); `peak_flops` is the device's dense peak for the
precision, from Lightning's table unless given.
"""

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops

from asr import audio

PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                   "16-true": torch.float16, "32-true": torch.float32, "64-true": torch.float64}


def conv_lengths(samples: int, config) -> list[int]:
    """The output length of each layer of the convolutional feature encoder for a clip of `samples`."""
    lengths = []
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        samples = (samples - kernel) // stride + 1
        lengths.append(max(samples, 0))
    return lengths


def training_flops(config, samples: list[int], conv_trained: bool) -> float:
    """Model FLOPs of one forward and backward pass over clips of these lengths (16 kHz samples each), real
    audio only (padding is waste, not model work; gradient checkpointing's recompute is not counted).

    Per frame of the transformer, 2 FLOP per weight forward and 4 backward: its layers (4H^2 + 2HF), the
    positional convolution, the feature projection and the CTC head; per layer, attention scores and
    their weighted sum 4HT^2 for a clip of T frames, again x3. The convolutional feature encoder: 2 FLOP per
    weight per output sample forward, x3 when it trains (x1 frozen: no gradient flows into it)."""
    h, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    dense = (layers * (4 * h * h + 2 * h * f)
             + config.num_conv_pos_embeddings * (h // config.num_conv_pos_embedding_groups) * h
             + config.conv_dim[-1] * h + h * config.vocab_size)
    channels = [1, *config.conv_dim]
    conv_per_out = [k * channels[i] * channels[i + 1] for i, k in enumerate(config.conv_kernel)]
    total = 0.0
    for n in samples:
        lengths = conv_lengths(int(n), config)
        frames = lengths[-1]
        conv = 2 * sum(w * length for w, length in zip(conv_per_out, lengths))
        total += 3 * (2 * dense * frames + 4 * h * frames * frames * layers) + (3 if conv_trained else 1) * conv
    return total


def flops_per_audio_second(config, seconds: float, conv_trained: bool) -> float:
    """Training FLOP per second of audio, for clips of `seconds` (the attention term grows with length)."""
    return training_flops(config, [int(seconds * audio.SAMPLE_RATE)], conv_trained) / seconds


def peak_flops(device: torch.device, precision: str, tflops: float | None) -> float | None:
    """The dense peak FLOP/s of `device` for the training precision: `tflops` if given, else Lightning's
    table of GPUs (None for devices it does not list, a CPU among them)."""
    if tflops:
        return tflops * 1e12
    dtype = PRECISION_DTYPE.get(str(precision), torch.float32)
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        dtype = "tfloat32"
    return get_available_flops(device, dtype) if device.type == "cuda" else None


class SpeedMonitor(L.Callback):
    """Per window of `trainer.log_every_n_steps` optimizer updates, from host clocks and the batches' host
    lists, logged by rank 0 for its own process (one GPU):

    - `train/audio_seconds_per_second`: real audio (padding excluded) per second of training time.
    - `train/mfu`: model FLOPs utilisation, `training_flops` per second / `peak_flops` (needs a known peak:
      a GPU in Lightning's table, or `peak_tflops`).
    - `train/loader_wait`: fraction of the window's time the training loop waited for its next batch
      (between the end of one batch and the start of the next; evaluations excluded).
    - `train/padding_fraction`: padded audio / all audio of the window's batches.
    - `train/gpu_memory_gb`: the CUDA allocator's peak so far (a host-side counter).

    peak_tflops: the device's dense peak for the run's precision, in TFLOP/s; null: Lightning's table.
    """

    def __init__(self, peak_tflops: float | None):
        self.peak_tflops = peak_tflops
        self.peak: float | None = None
        self.last: dict[str, float] = {}  # the latest window's figures
        self._config = None
        self._conv_trained = False
        self._reset(time.perf_counter())
        self._batch_end: float | None = None
        self._last_step = -1

    def _reset(self, now: float) -> None:
        self._window = {"audio": 0.0, "padded": 0.0, "flops": 0.0, "wait": 0.0, "excluded": 0.0}
        self._window_start = now

    def on_train_start(self, trainer, pl_module) -> None:
        self._config = pl_module.model.config
        self._conv_trained = any(p.requires_grad for p in pl_module.model.wav2vec2.feature_extractor.parameters())
        self.peak = peak_flops(pl_module.device, trainer.precision, self.peak_tflops)
        self._last_step = trainer.global_step
        self._reset(time.perf_counter())

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._batch_end = time.perf_counter()  # the first batch of the epoch waits for the workers to start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self._window["wait"] += now - self._batch_end

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        if not trainer.sanity_checking:
            self._window["excluded"] += now - self._validation_start
        self._batch_end = now  # what follows an evaluation is not waiting for data

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        window = self._window
        if batch["ids"]:
            window["audio"] += batch["audio_seconds"]
            window["padded"] += batch["padded_seconds"]
            window["flops"] += training_flops(self._config, batch["lengths"], self._conv_trained)
        if trainer.global_step != self._last_step:  # an update happened in this batch
            self._last_step = trainer.global_step
            if trainer.global_step % trainer.log_every_n_steps == 0:
                self._log(trainer, pl_module)
        self._batch_end = time.perf_counter()

    def _log(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        window = self._window
        seconds = max(now - self._window_start - window["excluded"], 1e-9)
        metrics = {"train/audio_seconds_per_second": window["audio"] / seconds,
                   "train/loader_wait": min(window["wait"] / seconds, 1.0),
                   "train/padding_fraction": 1 - window["audio"] / window["padded"] if window["padded"] else 0.0}
        if self.peak:
            metrics["train/mfu"] = window["flops"] / seconds / self.peak
        if pl_module.device.type == "cuda":
            metrics["train/gpu_memory_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 1e9
        self.last = metrics
        if trainer.is_global_zero:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning's own rows get
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self._reset(now)


class LateRead:
    """A small device tensor's value on the host, read without waiting for the device: `offer` starts a
    non-blocking copy to pinned host memory when the previous one has been read; `read` gives the copied
    values once the copy is done (at once on a CPU), else None. On a GPU the values arrive some updates
    late (how far the host runs ahead); nothing ever synchronises."""

    def __init__(self, device: torch.device, size: int):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(size, pin_memory=self.cuda)
        self._event = None
        self._waiting = False

    def offer(self, values: torch.Tensor) -> None:
        if self._waiting:
            return
        self.host.copy_(values.detach().float(), non_blocking=self.cuda)
        if self.cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._waiting = True

    def read(self) -> list[float] | None:
        if not self._waiting or (self._event is not None and not self._event.query()):
            return None
        self._waiting = False
        return self.host.tolist()
