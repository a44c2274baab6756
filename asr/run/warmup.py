"""Before the first update: every batch shape of the run through the model once, the worst first.

`WorstBatchFirst` (callbacks.worst_batch_first), before the first update:
- Out of memory at the first step, not hours in: a forward and backward pass on the training plan's shape of
  most padded audio (clips x samples) and on its shape of highest attention cost (clips x samples^2), with
  room held for AdamW's two moments. Every batch of every epoch has one of the plan's shapes
  (`asr.data.batching`), so a run that fits these fits them all. An out-of-memory error there stops the run at
  once, naming the shape and the overrides that make it fit.
- Per-shape costs in the first minute, not spread through the run (`every_shape`): then every other
  training shape (forward and backward) and every evaluation shape (forward, in evaluation mode). On a GPU
  each new shape costs once: cuDNN's execution plans (with `cudnn.benchmark`, turned on here because the
  shapes repeat), the allocator's segments, a compiled graph (`model.compile=encoder`). What the warm-up
  adds to the start is logged (seconds, shapes) and kept in `warmup`.
- The attention kernel from measurement (`choose_attention`, CUDA with SDPA): cuDNN, flash and
  memory-efficient attention timed forward and backward on the plan's commonest training shape with its
  padding mask; the fastest is kept and those measured slower are switched off for the run (the math
  kernel stays as the fallback).

Each batch is random audio of its shape with the clip lengths of a real batch of that shape (frame masks
and SpecAugment's spans as in training) and labels of 15 characters per second. Then everything is put
back: gradients cleared, random states (torch, numpy, Python) restored, the loader untouched.
"""

import logging
import random
import time
from collections.abc import Callable
from contextlib import nullcontext

import lightning as L
import numpy as np
import torch

from asr import SetupError
from asr.core import audio
from asr.model.speed import PRECISION_DTYPE

log = logging.getLogger(__name__)

Shape = tuple[int, int]  # (clips, samples at 16 kHz)
LABELS_PER_SECOND = 15  # characters of a transcript per second of speech, an upper end for read speech


def worst_shapes(shapes: list[Shape]) -> list[Shape]:
    """The shape of most padded audio (clips x samples) and of highest attention cost (clips x samples^2);
    one if it is both."""
    if not shapes:
        return []
    padded = max(shapes, key=lambda s: s[0] * s[1])
    attention = max(shapes, key=lambda s: s[0] * s[1] ** 2)
    return [padded] if padded == attention else [padded, attention]


def warmup_order(shapes: list[Shape], every_shape: bool) -> list[Shape]:
    """The worst shapes first (an out-of-memory error shows before anything else ran), then the others."""
    worst = worst_shapes(shapes)
    return worst + [s for s in shapes if s not in worst] if every_shape else worst


def shape_lengths(sampler, seconds: np.ndarray) -> dict[Shape, list[int]]:
    """For each shape of the sampler's plan, the clip lengths (samples, at most the shape's) of the first batch
    of that shape in its current epoch; and how many batches have it (the dict is in order of that count)."""
    lengths, counts = {}, {}
    for batch in sampler.batches(sampler.epoch):  # each `Planned` with its shape
        counts[batch.shape] = counts.get(batch.shape, 0) + 1
        if batch.shape not in lengths:
            lengths[batch.shape] = [min(int(round(seconds[i] * audio.SAMPLE_RATE)), batch.shape[1]) for i in batch]
    return {s: lengths[s] for s in sorted(lengths, key=counts.get, reverse=True)}


def warmup_batch(lengths: list[int], samples: int, vocab_size: int, generator: torch.Generator) -> dict:
    """A batch as `asr.data.loading.collate` lays it out: noise of `lengths` padded with zeros to `samples`, labels of
    `LABELS_PER_SECOND` random non-blank ids (the blank is the last id)."""
    clips = len(lengths)
    mask = torch.arange(samples)[None, :] < torch.tensor(lengths)[:, None]
    label_lengths = [max(1, int(LABELS_PER_SECOND * n / audio.SAMPLE_RATE)) for n in lengths]
    labels = torch.randint(0, vocab_size - 1, (clips, max(label_lengths)), generator=generator)
    labels[torch.arange(labels.shape[1])[None, :] >= torch.tensor(label_lengths)[:, None]] = -100
    noise = torch.randn(clips, samples, generator=generator) * mask
    return {"ids": [f"warmup-{i}" for i in range(clips)], "audio": noise, "labels": labels, "lengths": list(lengths),
            "label_lengths": label_lengths, "shape": (clips, samples),
            "audio_seconds": sum(lengths) / audio.SAMPLE_RATE, "padded_seconds": clips * samples / audio.SAMPLE_RATE}


# SDPA's kernels that `choose_attention` times (the math kernel is the fallback, never chosen)
ATTENTION_BACKENDS = ("cudnn", "flash", "efficient")


def fastest(candidates: dict[str, Callable[[], None]], timer: Callable[[Callable[[], None]], float]
            ) -> tuple[str | None, dict[str, float | None]]:
    """(the name of the fastest candidate, seconds of each by `timer(run)`). A candidate that raises a
    RuntimeError (SDPA: no kernel of that backend for these inputs) is None and not chosen."""
    times = {}
    for name, run in candidates.items():
        try:
            times[name] = timer(run)
        except RuntimeError:
            times[name] = None
    usable = {name: t for name, t in times.items() if t is not None}
    return (min(usable, key=usable.get) if usable else None), times


def keep_attention(choice: str | None, times: dict[str, float | None]) -> list[str]:
    """Switch off, for the process, the SDPA backends measured slower than `choice`; those that could not
    run on the measured inputs stay on (an unpadded batch may use them). Returns those switched off."""
    switch = {"cudnn": torch.backends.cuda.enable_cudnn_sdp, "flash": torch.backends.cuda.enable_flash_sdp,
              "efficient": torch.backends.cuda.enable_mem_efficient_sdp}
    slower = [name for name, t in times.items() if choice is not None and t is not None and name != choice]
    for name in slower:
        switch[name](False)
    return slower


def attention_candidates(config, lengths: list[int], samples: int, frames: Callable, dtype: torch.dtype,
                         device: torch.device) -> dict[str, Callable[[], None]]:
    """Per SDPA backend, one forward and backward of a transformer layer's attention on a batch of this
    shape, with the padding mask the encoder passes ((B, 1, 1, T) bool, `asr.model.encoder`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads = config.num_attention_heads
    length = int(frames([samples])[0])
    shape = (len(lengths), heads, length, config.hidden_size // heads)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    keep = torch.arange(length)[None, :] < frames(lengths)[:, None]
    mask = keep.to(device)[:, None, None, :]
    grad = torch.randn(shape, device=device, dtype=dtype)
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}

    def run(backend) -> None:
        with sdpa_kernel(backend):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)

    return {name: (lambda b=backends[name]: run(b)) for name in ATTENTION_BACKENDS}


def cuda_seconds(run: Callable[[], None], repeats: int = 3) -> float:
    """Device seconds per call of `run`, after one untimed call (plans and workspaces)."""
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


class WorstBatchFirst(L.Callback):
    """Before the first update, the worst batch shapes through forward and backward, then (every_shape)
    every shape of the training and evaluation plans (module docstring).

    when: "auto" (on a GPU only), true or false. every_shape: warm up every shape, not only the worst.
    choose_attention: time SDPA's kernels and keep the fastest (CUDA, attn_implementation=sdpa).
    """

    def __init__(self, when: bool | str, every_shape: bool, choose_attention: bool):
        if when not in (True, False, "auto"):
            raise SetupError(f"callbacks.worst_batch_first.when={when!r}: give auto, true or false.")
        self.when, self.every_shape, self.choose_attention = when, every_shape, choose_attention
        self.probed: list[dict] = []  # per shape run: split, clips, seconds, seconds taken, peak GB on CUDA
        self.warmup: dict = {}  # what it added to the start: seconds, shapes, the attention kernel

    def on_train_start(self, trainer, pl_module) -> None:
        if self.when is False or (self.when == "auto" and pl_module.device.type != "cuda"):
            return
        cuda = pl_module.device.type == "cuda"
        loader = trainer.train_dataloader
        sampler = loader.batch_sampler
        if not hasattr(sampler, "shapes"):
            return  # not a plan of fixed shapes (asr.data.batching)
        train = shape_lengths(sampler, loader.dataset.clips.seconds)
        worst = worst_shapes(list(train))
        # Under DDP the shapes beyond the worst run forward only: more than one backward pass outside DDP's
        # forward made its reducer fail the first update with LayerDrop (find_unused_parameters; the CPU
        # test of tests/test_cluster.py), for a cause not yet found.
        split = "train" if trainer.world_size == 1 else "train-forward"
        plan = [("train" if shape in worst else split, shape, train[shape])
                for shape in warmup_order(list(train), self.every_shape)]
        if self.every_shape:
            plan += [("dev", shape, lengths) for shape, lengths in self._evaluation_shapes(trainer).items()]
        if cuda:
            torch.backends.cudnn.benchmark = True  # the shapes repeat: each one's fastest algorithm, found once
        started = time.perf_counter()
        states = (random.getstate(), np.random.get_state())
        failure = None
        modes = {module: module.training for module in pl_module.modules()}  # as the training loop set them
        with torch.random.fork_rng(devices=[pl_module.device] if cuda else []):
            moments = adam_room(trainer.optimizers, pl_module)
            generator = torch.Generator().manual_seed(0)
            try:
                if self.choose_attention and cuda and train and pl_module.model.config._attn_implementation == "sdpa":
                    self._choose_attention(trainer, pl_module, next(iter(train.items())))
                for split, shape, lengths in plan:
                    batch = warmup_batch(lengths, shape[1], len(pl_module.vocab), generator)
                    self._probe(trainer, pl_module, batch, split)
            except SetupError as error:  # out of memory: every rank has to hear of it (below)
                failure = error
            finally:
                del moments
                pl_module.zero_grad(set_to_none=True)
                for module, training in modes.items():
                    module.training = training
                random.setstate(states[0])
                np.random.set_state(states[1])
        # Under DDP a rank that ran out alone would leave the others waiting in the first all-reduce:
        # all agree (one reduction, once per run), and every rank stops.
        if trainer.strategy.reduce_boolean_decision(failure is not None, all=False):
            raise failure or SetupError("another rank ran out of memory on its worst batch (its message names "
                                        "the batch and the overrides that make it fit).")
        self.warmup.update(seconds=round(time.perf_counter() - started, 2),
                           train_shapes=sum(p["split"].startswith("train") for p in self.probed),
                           dev_shapes=sum(p["split"] == "dev" for p in self.probed))
        log.info("warm-up before the first update: %d training shapes (forward and backward) and %d evaluation "
                 "shapes (forward) in %.1f s%s", self.warmup["train_shapes"], self.warmup["dev_shapes"],
                 self.warmup["seconds"],
                 f"; attention: {self.warmup['attention']}" if "attention" in self.warmup else "")

    def _evaluation_shapes(self, trainer) -> dict[Shape, list[int]]:
        """The dev plan's shapes with the clip lengths of one batch each; none where evaluation is off."""
        data = trainer.datamodule
        if not trainer.limit_val_batches or data is None or not hasattr(data, "sampler"):
            return {}
        return shape_lengths(data.sampler("dev"), data.load("dev").seconds)

    def _choose_attention(self, trainer, pl_module, commonest: tuple[Shape, list[int]]) -> None:
        (clips, samples), lengths = commonest
        dtype = PRECISION_DTYPE.get(str(trainer.precision), torch.float32)
        candidates = attention_candidates(pl_module.model.config, lengths, samples, pl_module.model.frames, dtype,
                                          pl_module.device)
        choice, times = fastest(candidates, cuda_seconds)
        off = keep_attention(choice, times)
        self.warmup["attention"] = {"chosen": choice, "switched_off": off, "shape": [clips, samples],
                                    "ms": {n: None if t is None else round(t * 1000, 3) for n, t in times.items()}}

    def _probe(self, trainer, pl_module, batch: dict, split: str) -> None:
        clips, samples = batch["shape"]
        what = {"split": split, "clips": clips, "longest_seconds": round(max(batch["lengths"]) / audio.SAMPLE_RATE, 2),
                "padded_seconds": round(batch["padded_seconds"], 1)}
        cuda = pl_module.device.type == "cuda"
        started = time.perf_counter()
        batch = trainer.strategy.batch_to_device(batch)
        model = trainer.strategy.model
        no_sync = model.no_sync() if hasattr(model, "no_sync") else nullcontext()  # DDP: no all-reduce
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            if split == "train":  # in the modes the training loop set
                with no_sync:
                    with trainer.precision_plugin.forward_context():
                        loss = pl_module(batch).loss
                    loss.backward()
            elif split == "train-forward":
                with torch.no_grad(), trainer.precision_plugin.forward_context():
                    pl_module(batch)
            else:  # as validation runs it
                pl_module.eval()
                with torch.no_grad(), trainer.precision_plugin.forward_context():
                    pl_module(batch)
            if cuda:
                torch.cuda.synchronize(pl_module.device)  # the shape's cost, here and not in the first updates
                what["peak_gb"] = round(torch.cuda.max_memory_allocated(pl_module.device) / 1e9, 2)
        except torch.OutOfMemoryError as error:
            pl_module.zero_grad(set_to_none=True)
            raise SetupError(
                f"out of memory on the epoch's worst batch, run first to find this now and not hours in: "
                f"{what['clips']} clips padded to {samples / audio.SAMPLE_RATE:.1f} s ({what['padded_seconds']} s "
                f"padded; {split}). Make it fit with any of: data.max_batch_seconds lower (now "
                f"{trainer.datamodule.hparams.max_batch_seconds}; update_seconds or update_clips keep the audio per "
                f"update), data.max_batch_size, model.gradient_checkpointing=true, precision=bf16, "
                f"data.max_seconds lower. ({error})".replace("\n", " ")[:1200]) from None
        what["seconds"] = round(time.perf_counter() - started, 3)
        self.probed.append(what)
        log.debug("warm-up shape: %s", what)
        pl_module.zero_grad(set_to_none=True)


def adam_room(optimizers, pl_module) -> list[torch.Tensor]:
    """Memory for AdamW's two moments per trainable parameter, which its first step allocates: held during
    the probe so that its peak is the first update's."""
    if any(opt.state for opt in optimizers):
        return []  # resumed: the moments exist
    return [torch.empty_like(p) for p in pl_module.parameters() if p.requires_grad for _ in range(2)]
