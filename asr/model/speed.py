"""How fast training runs, measured on the host without waiting for the device.

`SpeedMonitor` logs, every `trainer.log_every_n_steps` updates: audio-seconds per second, model FLOPs
utilisation (MFU), the fraction of time spent waiting for the loader, batch padding and (CUDA) the
allocator's peak. Every figure is host arithmetic on host clocks and host lists: nothing is read back
from the GPU, so logging them never makes the host wait for queued GPU work. Over a window of updates
the host cannot run ahead of the GPU by more than its launch queue, so a window's rate is the GPU's.

The loader wait is timed where the training loop blocks for its next batch: around Lightning's fetch of
it from the loader (`next()` of the loader's iterator, which waits on the workers' queue), not between
one batch's end and the next one's start, which also holds the loop's own bookkeeping.

`training_flops` counts the model FLOPs of a step from the architecture and the clips' lengths (per
audio-second at 50 frames: the conv feature encoder ~4.9 GFLOP forward; the transformer 2(4H^2 + 2HF) per
frame per layer; training = 3x forward, 1x for a frozen conv encoder: ~102 GFLOP for xls-r-300m, ~301 for
xls-r-1b); `peak_flops` is the device's dense peak for the
precision, from Lightning's table unless given.
"""

import logging
import os
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops

from asr import REPO_DIR
from asr.core.frames import Geometry

log = logging.getLogger(__name__)
PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                   "16-true": torch.float16, "32-true": torch.float32, "64-true": torch.float64}


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
        lengths = Geometry.of(config).layer_lengths(int(n))
        frames = lengths[-1]
        conv = 2 * sum(w * length for w, length in zip(conv_per_out, lengths))
        total += 3 * (2 * dense * frames + 4 * h * frames * frames * layers) + (3 if conv_trained else 1) * conv
    return total


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
    - `train/loader_wait`: fraction of the window's time the training loop waited for its next batch,
      timed around the fetch itself (evaluations excluded).
    - `train/padding_fraction`: padded audio / all audio of the window's batches.
    - `train/gpu_memory_gb`: the CUDA allocator's peak so far (a host-side counter).

    peak_tflops: the device's dense peak for the run's precision, in TFLOP/s; null: Lightning's table.
    """

    def __init__(self, peak_tflops: float | None):
        self.peak_tflops = peak_tflops
        self.peak: float | None = None
        self.last: dict[str, float] = {}  # the latest window's figures
        self.last_window_seconds = 0.0  # its length (evaluations excluded)
        self._config = None
        self._conv_trained = False
        self._reset(time.perf_counter())
        self._last_step = -1
        self._fetch_started: float | None = None

    def _reset(self, now: float) -> None:
        self._window = {"audio": 0.0, "padded": 0.0, "flops": 0.0, "wait": 0.0, "excluded": 0.0}
        self._window_start = now

    def on_train_start(self, trainer, pl_module) -> None:
        self._config = pl_module.model.config
        self._conv_trained = any(p.requires_grad for p in pl_module.model.wav2vec2.feature_extractor.parameters())
        self.peak = peak_flops(pl_module.device, trainer.precision, self.peak_tflops)
        self._last_step = trainer.global_step
        self._time_fetches(trainer.fit_loop.epoch_loop)
        self._reset(time.perf_counter())

    def _time_fetches(self, loop) -> None:
        """Wrap the training epoch loop's two fetch hooks (Lightning 2.6: `_on_before_fetch` and
        `_on_after_fetch`, which it hands to its data fetcher at each epoch's start and which bracket
        `next(loader iterator)`): the time between them is the loop waiting for its next batch."""
        before, after = getattr(loop, "_on_before_fetch", None), getattr(loop, "_on_after_fetch", None)
        if before is None or after is None:
            log.warning("train/loader_wait is not measured: this Lightning has no fetch hooks to time")
            return

        def started() -> None:
            before()
            self._fetch_started = time.perf_counter()

        def ended() -> None:
            if self._fetch_started is not None:
                self._window["wait"] += time.perf_counter() - self._fetch_started
                self._fetch_started = None
            after()

        loop._on_before_fetch, loop._on_after_fetch = started, ended  # on the instance: the class's stay
        self._loop = loop

    def on_train_end(self, trainer, pl_module) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None:  # the loop's own hooks again
            for name in ("_on_before_fetch", "_on_after_fetch"):
                loop.__dict__.pop(name, None)
            self._loop = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        if not trainer.sanity_checking:
            self._window["excluded"] += now - self._validation_start

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
        self.last, self.last_window_seconds = metrics, seconds
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


def configure_cuda_allocator(expandable_segments: bool) -> None:
    """CUDA's caching allocator with expandable segments (`model.expandable_segments`): segments that grow
    in place instead of new fixed-size ones, so batches of a few fixed shapes fragment memory less (PyTorch's
    notes on CUDA memory management). Before CUDA initialises this goes through the environment the
    allocator reads at its start (PYTORCH_CUDA_ALLOC_CONF, or PYTORCH_ALLOC_CONF where that is set); after,
    through torch's setter, which affects segments allocated from then on. A setting the user gave in the
    environment is kept. False changes nothing."""
    if not expandable_segments:
        return
    setting = "expandable_segments:True"
    name = "PYTORCH_ALLOC_CONF" if "PYTORCH_ALLOC_CONF" in os.environ else "PYTORCH_CUDA_ALLOC_CONF"
    current = os.environ.get(name, "")
    if "expandable_segments" in current:
        return  # the user's own choice
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.memory._set_allocator_settings(setting)
        return
    os.environ[name] = f"{current},{setting}" if current else setting


def project_frame(frames: list[traceback.FrameSummary], root: Path) -> str:
    """`path:line function` of the innermost frame of the project's own code (under `root`, not in an installed
    package), or '-' when the stack has none."""
    for frame in reversed(frames):
        path = Path(frame.filename)
        if path.is_relative_to(root) and "site-packages" not in path.parts and ".venv" not in path.parts:
            return f"{path.relative_to(root)}:{frame.lineno} {frame.name}"
    return "-"


class SyncSites:
    """The calls that make the host wait for the GPU while active, by site: torch's sync debug mode
    (`torch.cuda.set_sync_debug_mode("warn")`) warns at each, and the Python stack of each warning is
    grouped by the innermost frame of the project's code and the innermost frame of all (the library call
    that synchronised). `sites`: Counter of (project frame, library frame); `count`: all of them. Without
    CUDA nothing warns (a CPU has nothing to wait for); the recording itself runs alike."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self, root: Path | None = None):
        self.root = Path(root or REPO_DIR).resolve()
        self.sites: Counter = Counter()
        self.count = 0

    def __enter__(self) -> "SyncSites":
        self._filters = warnings.catch_warnings()  # restores the filters and showwarning on exit
        self._filters.__enter__()
        warnings.simplefilter("always")
        self._show = warnings.showwarning
        warnings.showwarning = self._record
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
        self._filters.__exit__(*exc)

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if self.MESSAGE not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        library = frames[-1] if frames else None
        where = f"{'/'.join(Path(library.filename).parts[-2:])}:{library.lineno} {library.name}" if library else "-"
        self.sites[(project_frame(frames, self.root), where)] += 1
        self.count += 1
