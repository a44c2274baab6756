"""Batches of clips of similar duration, filled to a budget of padded audio seconds.

A batch costs `longest clip x clips` seconds of padded audio (what the encoder computes on). Clips are
grouped into duration buckets whose boundaries are quantiles of the corpus' durations; each epoch the
clips within every bucket are shuffled, the buckets are packed in duration order (a bucket's last
partial batch continues with the next, similar, bucket instead of leaving a half-empty batch), and the
batch order is shuffled. Padding is then bounded by the buckets' widths.
"""

import numpy as np
from torch.utils.data import Sampler


class DurationBatchSampler(Sampler[list[int]]):
    """Index batches for a DataLoader's `batch_sampler`.

    durations: seconds per clip. max_batch_seconds: the budget of a batch, `longest x clips` seconds (with
    `attention_q`, `(longest + longest^2 / attention_q) x clips`: self-attention grows with the square
    of a clip's frames, so long clips get smaller batches). max_batch_size: cap on clips per batch
    (None: no cap). num_buckets: duration quantiles; more buckets, less padding, less randomness.

    Epochs: `shuffle` draws a new order per epoch from (seed, epoch). Lightning calls `set_epoch` on
    `batch_sampler.sampler` only, so `sampler` is this object itself; used on its own the sampler also
    moves to the next epoch after a complete pass.

    DDP (num_replicas > 1): every rank builds the same batches and takes every num_replicas-th. In
    training the last `len % num_replicas` batches of each shuffled epoch are left out (a different few
    each epoch), so every rank runs the same number of steps: unequal counts hang DDP. Evaluation keeps
    every batch; ranks then differ by at most one batch (no collective runs per validation step).

    Resuming: `state_dict()` is (epoch, position); `load_state_dict` makes the next pass over that epoch
    start at batch `position` of this rank, so a run resumed mid-epoch continues with exactly the next
    batch.
    """

    def __init__(self, durations, max_batch_seconds: float, *, max_batch_size: int | None, num_buckets: int,
                 attention_q: float | None, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        super().__init__()
        self.durations = np.asarray(durations, dtype=np.float64)
        self.max_batch_seconds, self.max_batch_size, self.attention_q = max_batch_seconds, max_batch_size, attention_q
        if len(self.durations) and self.cost(self.durations.max(), 1) > max_batch_seconds:
            raise ValueError(f"a {self.durations.max():.1f} s clip exceeds data.max_batch_seconds="
                             f"{max_batch_seconds}; raise it or lower data.max_seconds")
        self.shuffle, self.seed = shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        # Boundaries between equal-count duration buckets, estimated from this corpus.
        quantiles = np.linspace(0, 1, num_buckets + 1)[1:-1]
        self.boundaries = np.unique(np.quantile(self.durations, quantiles)) if len(self.durations) else np.array([])
        self.bucket = np.searchsorted(self.boundaries, self.durations, side="right")
        self.epoch, self.position, self._start = 0, 0, 0

    @property
    def sampler(self) -> "DurationBatchSampler":
        return self  # Lightning's `_set_sampler_epoch` looks for `batch_sampler.sampler.set_epoch`

    def cost(self, longest: float, clips: int) -> float:
        """Budget a batch of `clips` clips padded to `longest` seconds uses."""
        return clips * (longest + longest**2 / self.attention_q if self.attention_q else longest)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0  # a resume position belongs to its own epoch
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._start = int(state["epoch"]), int(state["position"])
        if self._start >= len(self):  # saved at the end of an epoch
            self.epoch, self._start = self.epoch + 1, 0
        self.position = self._start

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of an epoch, before the split across ranks."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.shuffle:  # buckets in duration order, clips shuffled within each
            order = np.lexsort((rng.permutation(len(self.durations)), self.bucket))
        else:  # evaluation: plain duration order, the least padding
            order = np.argsort(self.durations, kind="stable")
        batches, batch, longest = [], [], 0.0
        for i in order.tolist():
            longest_if_added = max(longest, self.durations[i])
            full = self.max_batch_size is not None and len(batch) >= self.max_batch_size
            if batch and (full or self.cost(longest_if_added, len(batch) + 1) > self.max_batch_seconds):
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
        batches = self._rank_batches()
        self.position, self._start = self._start, 0
        while self.position < len(batches):
            self.position += 1  # batches handed out this epoch, the one being yielded included
            yield batches[self.position - 1]
        if self.shuffle:  # a complete pass: the next one is a new epoch, unless set_epoch says otherwise
            self.epoch += 1
            self.position = 0

    def __len__(self) -> int:
        return len(self._rank_batches())
