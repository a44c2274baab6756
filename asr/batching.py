"""Batches of clips of similar duration, capped by padded audio seconds.

A batch costs `longest clip x clips` seconds of padded audio (what the encoder computes on); clips are
sorted by duration so that cost is almost all real audio. Batch order is shuffled per epoch, seeded.
"""

import numpy as np
from torch.utils.data import Sampler


class DurationBatchSampler(Sampler[list[int]]):
    """Index batches for a DataLoader's `batch_sampler`.

    durations: seconds per clip. max_batch_seconds: cap on longest x count. max_batch_size: cap on
    clips per batch (None: no cap). With `shuffle`, each epoch sorts clips by duration with a small
    random jitter (so batch composition varies) and shuffles batch order; the sampler advances its own
    epoch, since Lightning calls `set_epoch` only on samplers, not on batch samplers.

    Under DDP (num_replicas > 1) every rank builds the same batches and takes every num_replicas-th;
    when training, the last `len % num_replicas` batches of the shuffled epoch are left out so every
    rank runs the same number of steps (unequal counts hang DDP). Evaluation keeps every batch.
    """

    def __init__(self, durations, max_batch_seconds: float, max_batch_size: int | None = None,
                 shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 jitter: float = 0.02):
        super().__init__()
        self.durations = np.asarray(durations, dtype=np.float64)
        if len(self.durations) and self.durations.max() > max_batch_seconds:
            raise ValueError(f"a {self.durations.max():.1f} s clip exceeds data.max_batch_seconds="
                             f"{max_batch_seconds}; raise it or lower data.max_seconds")
        self.max_batch_seconds = max_batch_seconds
        self.max_batch_size = max_batch_size
        self.shuffle, self.seed, self.jitter = shuffle, seed, jitter
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of an epoch, before the split across ranks."""
        rng = np.random.default_rng([self.seed, epoch])
        keys = self.durations
        if self.shuffle:  # multiplicative jitter: neighbours in duration swap places between epochs
            keys = keys * (1 + self.jitter * rng.uniform(-1, 1, len(keys)))
        order = np.argsort(keys, kind="stable")
        batches, batch, longest = [], [], 0.0
        for i in order.tolist():
            longest_if_added = max(longest, self.durations[i])
            full = self.max_batch_size is not None and len(batch) >= self.max_batch_size
            if batch and (full or longest_if_added * (len(batch) + 1) > self.max_batch_seconds):
                batches.append(batch)
                batch, longest_if_added = [], self.durations[i]
            batch.append(i)
            longest = longest_if_added
        if batch:
            batches.append(batch)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        batches = self.batches(self.epoch)
        if self.shuffle:  # training: equal counts per rank
            batches = batches[: len(batches) // self.num_replicas * self.num_replicas]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self):
        yield from self._rank_batches()
        if self.shuffle:
            self.epoch += 1

    def __len__(self) -> int:
        return len(self._rank_batches())
