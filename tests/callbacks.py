"""A callback the tests add to real runs, in-process or through train.py
(`+callbacks.record._target_=tests.callbacks.RecordUpdates +callbacks.record.out_dir=<dir>`): what a rank
trained on and what each optimizer update changed."""

import json
import os
import time
from pathlib import Path

import lightning as L
import torch


class RecordUpdates(L.Callback):
    """`ids` and `seconds`: the clip ids and audio seconds of each training batch; `lrs`: per optimizer
    update, the learning rate of each parameter group; `changed`: per update, the names of the parameters
    it changed; `times`: the wall clock at each batch's start. With `out_dir`, written per rank to
    `<out_dir>/rank<r>.json` after every batch (a requeued SLURM job is killed, it never ends its training),
    `rank<r>.restart<n>.json` in a job SLURM restarted."""

    def __init__(self, out_dir: str | None = None):
        self.out_dir = Path(out_dir) if out_dir else None
        self.ids, self.seconds, self.changed, self.lrs, self.times = [], [], [], [], []
        self.before = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch["ids"]:  # empty: no clip of the batch could be read
            self.times.append(time.time())
            self.ids.append(batch["ids"])
            self.seconds.append(batch["audio_seconds"])
            self.write(trainer)  # before the batch ends: a requeue may kill the process right after its update

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is not None:  # an optimizer update happened in this batch
            self.changed.append({n for n, p in pl_module.named_parameters() if not torch.equal(p, self.before[n])})
            self.before = None
        self.write(trainer)

    def write(self, trainer):
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"ids": self.ids, "seconds": self.seconds, "changed": [sorted(c) for c in self.changed],
                  "lrs": self.lrs, "times": self.times}
        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        name = f"rank{trainer.global_rank}" + (f".restart{restart}" if restart else "")
        # whole or not at all: a requeue kills the process at any point, in this write too (a truncated record
        # failed the requeue test once)
        partial = self.out_dir / f".{name}.json.{os.getpid()}"
        partial.write_text(json.dumps(record))
        os.replace(partial, self.out_dir / f"{name}.json")


class Ballast(L.Callback):
    """`megabytes` of zeros in every checkpoint (as this callback's state): a save takes long enough for a test
    to kill the process while it writes."""

    def __init__(self, megabytes: int):
        self.megabytes = megabytes

    def state_dict(self) -> dict:
        return {"ballast": torch.zeros(self.megabytes * 2**20, dtype=torch.uint8)}

    def load_state_dict(self, state: dict) -> None:
        pass
