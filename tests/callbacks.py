"""Callbacks the tests add to real runs (`+callbacks.<name>._target_=tests.callbacks.<Class>`): what each
rank trained on and what each optimizer update changed, written per rank as JSON."""

import json
from pathlib import Path

import lightning as L
import torch


class RecordUpdates(L.Callback):
    """Per rank, into `<out_dir>/rank<r>.json`: the clip ids and audio seconds of each training batch, and
    for each optimizer update the names of the parameters it changed and the learning rates."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.ids, self.seconds, self.changed, self.lrs = [], [], [], []
        self.before = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.append(batch["ids"])
        self.seconds.append(batch["audio_seconds"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is not None:  # an optimizer update happened in this batch
            self.changed.append(sorted(n for n, p in pl_module.named_parameters()
                                       if not torch.equal(p, self.before[n])))
            self.before = None

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"ids": self.ids, "seconds": self.seconds, "changed": self.changed, "lrs": self.lrs}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
