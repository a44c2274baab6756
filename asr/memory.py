"""Out of memory at the first step, not hours in: the worst batches of the epoch go through the model first.

`WorstBatchFirst` (callbacks.worst_batch_first) runs, before the first update, a forward and backward
pass on this rank's batch of most padded audio and on its batch of highest attention cost (clips x the
square of the longest clip), with room held for AdamW's two moments, and then puts everything back:
gradients cleared, random states (torch, numpy, Python) restored, the loader untouched. A run that fits
these fits every batch of the epoch (batch shapes repeat every epoch: `asr.batching`). An out-of-memory
error there stops the run at once, naming the batch and the overrides that make it fit.
"""

import logging
import random
from contextlib import nullcontext

import lightning as L
import numpy as np
import torch

from asr import SetupError

log = logging.getLogger(__name__)


def worst_batches(sampler, seconds: np.ndarray) -> list[list[int]]:
    """This rank's batch of most padded audio (clips x longest) and of highest attention cost (clips x
    longest^2) in the sampler's current epoch (one batch if it is both)."""
    batches = sampler.batches(sampler.epoch)
    if not batches:
        return []
    longest = np.array([seconds[b].max() for b in batches])
    clips = np.array([len(b) for b in batches])
    chosen = {int(np.argmax(clips * longest)), int(np.argmax(clips * longest**2))}
    return [batches[i] for i in sorted(chosen)]


class WorstBatchFirst(L.Callback):
    """Before the first update, the epoch's worst batches through forward and backward (module docstring).

    when: "auto" (on a GPU only), true or false.
    """

    def __init__(self, when: bool | str):
        if when not in (True, False, "auto"):
            raise SetupError(f"callbacks.worst_batch_first.when={when!r}: give auto, true or false.")
        self.when = when
        self.probed: list[dict] = []  # what ran: clips, longest and padded seconds, peak GB on CUDA

    def on_train_start(self, trainer, pl_module) -> None:
        if self.when is False or (self.when == "auto" and pl_module.device.type != "cuda"):
            return
        loader = trainer.train_dataloader
        dataset, sampler, collate = loader.dataset, loader.batch_sampler, loader.collate_fn
        seconds = dataset.clips.seconds
        states = (random.getstate(), np.random.get_state())
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            moments = _adam_room(trainer.optimizers, pl_module)
            try:
                for indices in worst_batches(sampler, seconds):
                    self._probe(trainer, pl_module, collate([dataset[i] for i in indices]))
            finally:
                del moments
                pl_module.zero_grad(set_to_none=True)
                random.setstate(states[0])
                np.random.set_state(states[1])

    def _probe(self, trainer, pl_module, batch: dict) -> None:
        if not batch["ids"]:
            return
        longest = max(batch["lengths"]) / 16_000
        what = {"clips": len(batch["ids"]), "longest_seconds": round(longest, 2),
                "padded_seconds": round(batch["padded_seconds"], 1)}
        batch = trainer.strategy.batch_to_device(batch)
        model = trainer.strategy.model
        no_sync = model.no_sync() if hasattr(model, "no_sync") else nullcontext()  # DDP: no all-reduce
        try:
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            with no_sync, trainer.precision_plugin.forward_context():
                loss = pl_module(batch).loss
            with no_sync:
                loss.backward()
            if pl_module.device.type == "cuda":
                what["peak_gb"] = round(torch.cuda.max_memory_allocated(pl_module.device) / 1e9, 2)
        except torch.OutOfMemoryError as error:
            pl_module.zero_grad(set_to_none=True)
            raise SetupError(
                f"out of memory on the epoch's worst batch, run first to find this now and not hours in: "
                f"{what['clips']} clips up to {longest:.1f} s ({what['padded_seconds']} s padded). Make it fit "
                f"with any of: data.max_batch_seconds lower (now {trainer.datamodule.hparams.max_batch_seconds}; "
                f"update_seconds or update_clips keep the audio per update), data.max_batch_size, "
                f"model.gradient_checkpointing=true, precision=bf16, data.max_seconds lower. ({error})".replace(
                    "\n", " ")[:1200]) from None
        self.probed.append(what)
        log.info("worst batch first: %s", what)
        pl_module.zero_grad(set_to_none=True)


def _adam_room(optimizers, pl_module) -> list[torch.Tensor]:
    """Memory for AdamW's two moments per trainable parameter, which its first step allocates: held during
    the probe so that its peak is the first update's."""
    if any(opt.state for opt in optimizers):
        return []  # resumed: the moments exist
    return [torch.empty_like(p) for p in pl_module.parameters() if p.requires_grad for _ in range(2)]
