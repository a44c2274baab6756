"""Batches of clips of similar duration, each padded to one of a few fixed (clips, samples) shapes.

Why fixed shapes: on a GPU each new input shape costs once per shape. cuDNN builds an execution plan
(published: ~0.44 s forward + 0.55 s backward for attention), torch.compile and CUDA graphs record one.
Batches padded to their longest clip have a new shape nearly every batch, so those costs recur all run
long. Here every batch of an epoch has one of at most `num_buckets + 1` shapes.

The plan is fixed once, a pure function of the durations and the settings, so it is the same on every
DDP rank, in every epoch and in a resumed run:
- Durations are rounded up to the conv encoder's hop (`asr.core.frames`; 320 samples, 20 ms, for wav2vec2):
  every padded length is a whole number of encoder frames.
- `num_buckets` upper lengths are chosen to minimise the padded audio (each clip padded to its bucket's
  upper length). This is an exact dynamic programme over the distinct rounded lengths (~1,000 for clips
  up to 20 s, a few ms). Equal-count (quantile) buckets would waste their widths where clips are rare.
- A bucket's batch size is as many clips as fit in the budget at its upper length: `cost(upper, clips)
  <= max_batch_seconds`, at most `max_batch_size`. The padded shape is then within the budget, and so is
  every batch.
- Buckets are packed in length order. A bucket's leftover clips (fewer than its batch size) join the next,
  longer, bucket and are padded to its length. The last leftover is the epoch's one partial batch, whose
  (fewer clips, longest length) shape is the `+ 1`.

Every batch row is a real clip. No clip rows are padded, so the loss, the metrics and the per-clip
`lengths` (SpecAugment, frame masks) need no row mask. Padding is therefore audio only:
1 - clips' audio / (clips x padded length), summed over an epoch.

Each batch is yielded as a `Planned` list of clip indices that carries its planned (clips, samples)
shape: the loader's dataset passes it on with the decoded clips, and `asr.data.loading.collate` pads to it.

Each epoch the clips within every bucket are shuffled and the batch order is shuffled, seeded by
(seed, epoch). The batch sizes, and so the number of batches per epoch, do not change between epochs:
Lightning's count of batches, the schedule's total updates and DDP's equal steps hold exactly.
Planning per epoch is vectorised: a sort and a split (~0.2 s for a million clips). With several corpora, keeping
an oversampled corpus's repeats out of their clips' batches adds a loop over the clashes: 0.02-0.16 s an epoch
for 200,000 clips of two corpora (1 CPU thread).
"""

import math

import numpy as np
from torch.utils.data import Sampler

from asr.core.audio import SAMPLE_RATE
from asr.core.frames import Geometry
from asr.data import mixing

# The dynamic programme holds a (lengths x lengths) table. Above this many distinct lengths, the
# lengths are rounded to a coarser multiple of the hop (clips over ~20 s at 20 ms steps).
_MAX_GRID = 1024


class Planned(list):
    """The items of one batch (clip indices, or the clips a dataset decoded from them) and `shape`, the
    (clips, samples) the plan gave it. A list, so a DataLoader sends it to its workers as it is."""

    def __init__(self, items, shape: tuple[int, int]):
        super().__init__(items)
        self.shape = shape


class DurationBatchSampler(Sampler[Planned]):
    """Index batches for a DataLoader's `batch_sampler`, each `Planned` with the shape `asr.data.loading.collate` pads
    it to; `shapes` is the set of them.

    durations: seconds per clip. max_batch_seconds: the budget of a batch, `padded length x clips` seconds.
    With `attention_q` it is `(length + length^2 / attention_q) x clips`: self-attention grows with the
    square of a clip's frames, so long clips get smaller batches. max_batch_size: cap on clips per batch
    (None: no cap). num_buckets: padded lengths per epoch; an epoch has at most num_buckets + 1 shapes.
    More buckets mean less padding but more shapes, each costing its own plans and graphs on the GPU.

    Epochs: `shuffle` draws a new order per epoch from (seed, epoch). Lightning calls `set_epoch` on
    `batch_sampler.sampler` only, so `sampler` is this object itself; used on its own the sampler also
    moves to the next epoch after a complete pass.

    DDP (num_replicas > 1): every rank builds the same batches and takes every num_replicas-th. In
    training the epoch is padded to a multiple of num_replicas with its first batches (a different few
    each epoch), so every rank runs the same number of steps (unequal counts hang DDP) and every clip is
    trained on. Evaluation keeps every batch once; ranks then differ by at most one batch (no collective
    runs per validation step). Fewer batches than ranks: the largest are split until each rank has one.
    Those splits are the only shapes beyond num_buckets + 1.

    Resuming: `state_dict()` is (epoch, position); `load_state_dict` makes the next pass over that epoch
    start at batch `position` of this rank, so a run resumed mid-epoch continues with exactly the next
    batch.

    Augmentation (`asr.data.augment`): `tag_epoch` yields each clip as (epoch, clip), so that the dataset draws its
    perturbation from (seed, epoch, clip); a clip drawn again in an epoch (an oversampled corpus) as (epoch, clip,
    n), its n-th repeat, which draws its own perturbation. With speed perturbation `durations` are the longest each clip
    can last (its duration / the slowest factor): every epoch's clips fit the plan. `audio_seconds` are then the clips'
    expected seconds, for the padding figure (None: `durations`).

    geometry: the model's frame geometry (`asr.core.frames`): every padded length is a whole number of its hops.

    Inference of files cut into windows (`asr.model.transcription`): `rows` gives each clip's windows, and
    `durations` each clip's widest window. A clip takes its rows at its padded length in a batch's budget, and its
    rows stay in one batch, to be joined; a clip of more rows than fit is a batch of its own. A batch's shape is
    (rows, samples). Evaluation only (shuffle=False).

    Several corpora (`asr.data.mixing`): `corpus` gives each clip's corpus (0, 1, ...) and `draws` the clips an
    epoch draws from each. The buckets and their lengths come from every clip's duration; an epoch then holds a
    fixed count from each (corpus, bucket) stratum (`mixing.strata`), so the plan, its shapes and the batches per
    epoch stay fixed. Which clips fill a stratum is drawn from (seed, epoch): a sample without replacement, or whole
    shuffled passes and then a sample where the stratum holds fewer clips than it draws. Within a bucket the drawn
    clips are shuffled together, so a batch may mix corpora; a repeat that shares a batch with its clip is
    swapped with a clip of its bucket in another batch (`_apart`). Training only (`shuffle`).
    """

    def __init__(self, durations, max_batch_seconds: float, *, max_batch_size: int | None, num_buckets: int,
                 attention_q: float | None, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 tag_epoch: bool = False, audio_seconds=None, geometry: Geometry, corpus=None, draws=None,
                 rows=None):
        super().__init__()
        self.geometry, self.hop = geometry, geometry.hop
        self.durations = np.asarray(durations, dtype=np.float64)
        self.max_batch_seconds, self.max_batch_size, self.attention_q = max_batch_seconds, max_batch_size, attention_q
        if len(self.durations) and self.cost(self.durations.max(), 1) > max_batch_seconds:
            raise ValueError(f"a {self.durations.max():.1f} s clip exceeds data.max_batch_seconds="
                             f"{max_batch_seconds}; raise it or lower data.max_seconds")
        if num_buckets < 1:
            raise ValueError(f"data.num_buckets={num_buckets}: give at least 1")
        self.shuffle, self.seed, self.tag_epoch = shuffle, seed, tag_epoch
        self.audio_seconds = float((self.durations if audio_seconds is None else np.asarray(audio_seconds)).sum())
        self.num_replicas, self.rank = num_replicas, rank
        self.rows = None  # inference: windows per clip (`rows`)
        if rows is not None:
            if shuffle:
                raise ValueError("clips of several rows are for inference (shuffle=False)")
            self.rows = np.asarray(rows, dtype=np.int64)
        self.bucket, self.upper = self._buckets(num_buckets)  # clip -> bucket; bucket -> padded samples
        self.strata = None  # several corpora: (corpora, buckets) clips an epoch draws from each
        if corpus is not None:
            if not shuffle:
                raise ValueError("drawing from several corpora is for training (shuffle=True)")
            self.corpus = np.asarray(corpus, dtype=np.int64)
            self.strata = mixing.strata(self.corpus, self.bucket, draws, len(self.upper))
            self._members = [[np.flatnonzero((self.corpus == c) & (self.bucket == b)) for b in range(len(self.upper))]
                             for c in range(len(self.strata))]
            per_clip = self.durations if audio_seconds is None else np.asarray(audio_seconds, dtype=np.float64)
            self._corpus_seconds = np.array([sum(k * per_clip[m].mean() for k, m in zip(row.tolist(), members) if k)
                                             for row, members in zip(self.strata, self._members)])
            self.audio_seconds = float(self._corpus_seconds.sum())  # an epoch's, expected
        self.sizes, self.lengths = self._plan()  # clips and padded samples per batch, in packing order
        self.ends = np.cumsum(self.sizes)
        self.batch_rows = self._rows_per_batch()  # rows of audio per batch: its clips, or their windows
        self.epoch, self.position, self._start = 0, 0, 0
        self._length = len(self._rank_batches(np.arange(len(self.sizes))))

    @property
    def sampler(self) -> "DurationBatchSampler":
        return self  # Lightning's `_set_sampler_epoch` looks for `batch_sampler.sampler.set_epoch`

    def cost(self, longest, clips):
        """Budget a batch of `clips` clips padded to `longest` seconds uses."""
        return clips * (longest + longest**2 / self.attention_q if self.attention_q else longest)

    def _samples_within_budget(self) -> int:
        """The longest padded length (samples) that one clip may have within the budget."""
        b, q = self.max_batch_seconds, self.attention_q
        seconds = (math.sqrt(q * q + 4 * q * b) - q) / 2 if q else b  # d + d^2/q = b
        samples = math.floor(seconds * SAMPLE_RATE)
        while samples > 0 and self.cost(samples / SAMPLE_RATE, 1) > b:  # float rounding
            samples -= 1
        return samples

    def _buckets(self, num_buckets: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each clip, upper length of each bucket in samples): of the least padding plans with 1 to
        num_buckets buckets (`_least_padding`), the one whose packed batches pad least, its bucket edges then
        moved where that packs with fewer leftovers (`_refine`)."""
        if not len(self.durations):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        hops = self.geometry.padded(self.durations) // self.hop  # rounded up to the hop
        step = max(1, -(-(hops.max() - hops.min() + 1) // _MAX_GRID))  # coarser grid for very long clips
        hops = -(-hops // step) * step
        values, counts = np.unique(hops, return_counts=True)
        samples = values * self.hop
        samples[-1] = min(samples[-1], self._samples_within_budget())  # within 20 ms of the budget: off the grid
        fits = self._fits(samples)
        below = np.concatenate([[0], np.cumsum(counts)])  # clips shorter than each value

        def padded(ends: np.ndarray) -> int:  # samples the packed epoch computes on (as _pack packs)
            total, carry = 0, 0
            for count, fit, length in zip(np.diff(below[[0, *(ends + 1)]]).tolist(), fits[ends].tolist(),
                                          samples[ends].tolist()):
                total += (carry + count) // fit * fit * length
                carry = (carry + count) % fit
            return total + carry * length

        ends = min(_least_padding(values, counts, num_buckets), key=padded)
        ends = _refine(ends, padded)
        return np.searchsorted(values[ends], hops), samples[ends]

    def _fits(self, samples: np.ndarray) -> np.ndarray:
        """Clips per batch at each padded length (samples): what fits in the budget, capped."""
        seconds = samples / SAMPLE_RATE
        fits = np.floor(self.max_batch_seconds / self.cost(seconds, 1))
        fits -= self.cost(seconds, fits) > self.max_batch_seconds  # rounding
        fits = np.maximum(fits, 1)
        if self.max_batch_size is not None:
            fits = np.minimum(fits, self.max_batch_size)
        return fits.astype(np.int64)

    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(clips, padded samples) of every batch of an epoch in packing order: the same every epoch."""
        if self.rows is not None:
            return self._plan_rows()
        counts = np.bincount(self.bucket, minlength=len(self.upper)) if self.strata is None else self.strata.sum(0)
        sizes, lengths = _pack(counts, self._fits(self.upper), self.upper)
        while 0 < len(sizes) < self.num_replicas and max(sizes) > 1:  # a rank without a batch would hang DDP
            i = int(np.argmax(sizes))
            sizes[i : i + 1] = [sizes[i] // 2, sizes[i] - sizes[i] // 2]
            lengths[i : i + 1] = [lengths[i]] * 2
        return np.array(sizes, dtype=np.int64), np.array(lengths, dtype=np.int64)

    def _plan_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The plan of clips of several rows (`rows`), in evaluation order, as `_pack` plans clips of one: bucket by
        bucket, the clips left over from shorter buckets first, a batch of the clips whose rows fit at the bucket's
        length (a clip of more rows than fit alone), the last leftovers the one partial batch. A clip's rows stay
        in one batch. With one row a clip, `_pack`'s plan."""
        order = np.argsort(self.durations, kind="stable")
        rows, ends = self.rows[order].tolist(), np.searchsorted(self.bucket[order], np.arange(len(self.upper)),
                                                                 side="right").tolist()
        sizes, lengths, first, start, pooled = [], [], 0, 0, 0  # the pool: clips first..end, its rows pooled
        for end, fit, length in zip(ends, self._fits(self.upper).tolist(), self.upper.tolist()):
            pooled, start = pooled + sum(rows[start:end]), end  # this bucket's clips join the leftovers
            while pooled >= fit:  # a batch of the first clips whose rows fit, at least one
                taken, used = first, 0
                while taken < end and (taken == first or used + rows[taken] <= fit):
                    used += rows[taken]
                    taken += 1
                sizes.append(taken - first)
                lengths.append(length)
                first, pooled = taken, pooled - used
        if first < len(rows):
            sizes.append(len(rows) - first)
            lengths.append(int(self.upper[-1]))
        return np.array(sizes, dtype=np.int64), np.array(lengths, dtype=np.int64)

    def _rows_per_batch(self) -> np.ndarray:
        if self.rows is None or not len(self.sizes):
            return self.sizes
        return np.add.reduceat(self.rows[np.argsort(self.durations, kind="stable")], self.ends - self.sizes)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The (clips, samples) shapes of the epoch's batches, by length then clips: what collate pads to."""
        return sorted(set(zip(self.batch_rows.tolist(), self.lengths.tolist())), key=lambda s: (s[1], s[0]))

    def padding(self) -> float:
        """Padded audio / all audio the encoder computes on, over an epoch: 1 - clips' seconds / padded seconds,
        the plan's figure from the durations (collate's padded_seconds vs audio_seconds)."""
        padded = float((self.batch_rows * self.lengths).sum()) / SAMPLE_RATE
        return 1 - self.audio_seconds / padded if padded else 0.0

    def summary(self) -> dict:
        """The plan for the data report: batches per epoch, their shapes and the padding (one process's plan)."""
        return {"batches": len(self.sizes), "shapes": [list(s) for s in self.shapes],
                "padding": round(self.padding(), 4)}

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

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(clip order, batch order, copies) of an epoch: batch j holds order[ends[j] - sizes[j] : ends[j]]; copies
        says which draw of its clip each place is (0: the first this epoch; None in evaluation)."""
        rng = np.random.default_rng([self.seed, epoch])
        if not self.shuffle:  # evaluation: plain duration order, the least padding
            return np.argsort(self.durations, kind="stable"), np.arange(len(self.sizes)), None
        drawn, copies = self._drawn(rng)
        # buckets in duration order, the clips of a bucket (of every corpus) shuffled together
        placed = np.lexsort((rng.permutation(len(drawn)), self.bucket[drawn]))
        order, copies = self._apart(drawn[placed], copies[placed])
        return order, rng.permutation(len(self.sizes)), copies

    def _drawn(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The clips an epoch draws, in clip order, and which draw of its clip each is (0: the first). Without
        corpora, or where a stratum draws as many clips as it holds, each clip once, drawing nothing from `rng`:
        so a corpus that is a mix of one gets the batches of the plain sampler. A stratum drawing fewer takes a
        sample without replacement; one drawing more, whole passes and then a sample."""
        if self.strata is None:
            return np.arange(len(self.durations)), np.zeros(len(self.durations), np.int64)
        picked, copies = [], []
        for row, members in zip(self.strata, self._members):
            for k, m in zip(row.tolist(), members):
                passes, rest = divmod(k, len(m)) if len(m) else (0, 0)
                picked += [m] * passes + ([rng.permutation(m)[:rest]] if rest else [])
                copies += [np.full(len(m), n) for n in range(passes)] + [np.full(rest, passes)]
        if not picked:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        drawn, copies = np.concatenate(picked), np.concatenate(copies).astype(np.int64)
        by_clip = np.argsort(drawn, kind="stable")
        return drawn[by_clip], copies[by_clip]

    def _apart(self, order: np.ndarray, copies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`order` with no clip twice in one batch where its bucket allows it: a clip drawn again (an oversampled
        corpus) that lands in a batch holding it already is swapped with a clip of its bucket from the next batch
        on (round the bucket) that holds neither. A batch holding clips of a bucket is at least as long as the
        bucket's clips (`_pack` packs bucket by bucket in length order), so every batch keeps its planned shape.
        The repeats are found in one sort; only they are looked at one by one."""
        if not (copies > 0).any():
            return order, copies
        batch = np.searchsorted(self.ends, np.arange(len(order)), side="right")
        key = batch * len(self.durations) + order  # one value per (batch, clip)
        by_key = np.argsort(key, kind="stable")
        repeats = np.sort(by_key[1:][key[by_key[1:]] == key[by_key[:-1]]])  # places of a clip's 2nd+ in a batch
        if not len(repeats):
            return order, copies
        order, copies = order.copy(), copies.copy()
        bucket = self.bucket[order]  # a swap stays within a bucket: the places of each bucket never change
        where = {b: np.flatnonzero(bucket == b) for b in np.unique(bucket[repeats]).tolist()}

        def members(j):
            return order[int(self.ends[j] - self.sizes[j]) : int(self.ends[j])]

        for p in repeats.tolist():
            j = batch[p]
            if (members(j) == order[p]).sum() < 2:  # an earlier swap took its twin away
                continue
            places = where[int(bucket[p])]
            start = int(np.searchsorted(places, p))
            for q in (int(places[(start + i) % len(places)]) for i in range(1, len(places))):
                k = batch[q]
                if k != j and order[q] not in members(j) and order[p] not in members(k):
                    order[[p, q]], copies[[p, q]] = order[[q, p]], copies[[q, p]]
                    break
        return order, copies

    def drawn_clips(self) -> np.ndarray | None:
        """Clips an epoch draws from each corpus (several corpora), or None."""
        return None if self.strata is None else self.strata.sum(1)

    def drawn_seconds(self) -> np.ndarray | None:
        """Audio seconds an epoch draws from each corpus, expected (several corpora), or None."""
        return None if self.strata is None else self._corpus_seconds

    def batches(self, epoch: int) -> list[Planned]:
        """All batches of an epoch, before the split across ranks, each with its planned shape."""
        order, batch_order, _ = self._order(epoch)
        return [self._batch(order, j) for j in batch_order]

    def batch_shapes(self, epoch: int) -> list[tuple[int, int]]:
        """The planned (clips, samples) of each batch of `batches(epoch)`, in the same order."""
        _, batch_order, _ = self._order(epoch)
        return [(int(self.batch_rows[j]), int(self.lengths[j])) for j in batch_order]

    def _batch(self, order: np.ndarray, j: int) -> Planned:
        """Clip indices of batch j of an epoch whose clip order is `order`, with its planned shape."""
        return Planned(order[self.ends[j] - self.sizes[j] : self.ends[j]].tolist(),
                       (int(self.batch_rows[j]), int(self.lengths[j])))

    def _rank_batches(self, batch_order: np.ndarray) -> np.ndarray:
        if self.shuffle:  # training: equal counts per rank, the epoch's first batches again where short
            batch_order = np.resize(batch_order, -(-len(batch_order) // self.num_replicas) * self.num_replicas)
        return batch_order[self.rank :: self.num_replicas]

    def __iter__(self):
        order, batch_order, copies = self._order(self.epoch)
        mine = self._rank_batches(batch_order)
        self.position, self._start = self._start, 0
        epoch = self.epoch
        while self.position < len(mine):
            j = mine[self.position]
            self.position += 1  # batches handed out this epoch, the one being yielded included
            batch = self._batch(order, j)
            if self.tag_epoch:  # (epoch, clip), and the clip's draw where it is drawn again this epoch
                again = (copies[self.ends[j] - self.sizes[j] : self.ends[j]].tolist() if copies is not None
                         else [0] * len(batch))
                batch = Planned([(epoch, i, n) if n else (epoch, i) for i, n in zip(batch, again)], batch.shape)
            yield batch
        if self.shuffle:  # a complete pass: the next one is a new epoch, unless set_epoch says otherwise
            self.epoch += 1
            self.position = 0

    def __len__(self) -> int:
        """Batches of this rank per epoch: the same every epoch, computed once."""
        return self._length


def _pack(counts, fits, lengths) -> tuple[list[int], list[int]]:
    """(clips, samples) per batch from clips per bucket, bucket by bucket in length order. A bucket's leftover
    clips (fewer than its batch) join the next, longer, bucket; the last leftover is the one partial batch."""
    sizes, padded, carry = [], [], 0
    for count, fit, length in zip(np.asarray(counts).tolist(), np.asarray(fits).tolist(), np.asarray(lengths).tolist()):
        pool = carry + count  # the previous buckets' leftover clips are shorter: they fit at this length
        sizes += [fit] * (pool // fit)
        padded += [length] * (pool // fit)
        carry = pool % fit
    if carry:
        sizes.append(carry)
        padded.append(length)
    return sizes, padded


def _least_padding(values: np.ndarray, counts: np.ndarray, buckets: int) -> list[np.ndarray]:
    """For 1 to `buckets` buckets, the indices into `values` (sorted distinct lengths, `counts` clips each)
    of the upper lengths that minimise sum(count x upper of its bucket); the last is the longest value.
    Dynamic programme over (last value of the previous bucket, last value of this one): O(buckets x G^2)."""
    g = len(values)
    below = np.concatenate([[0], np.cumsum(counts)])  # clips shorter than each value
    # span[a, b]: a bucket holding values a+1..b, padded to values[b] (a < b)
    span = values[None, :].astype(np.float64) * (below[None, 1:] - below[1:, None])
    span[np.tril_indices(g)] = np.inf
    best = values * below[1:].astype(np.float64)  # one bucket holding values 0..b
    back, plans = [], [np.array([g - 1])]
    for _ in range(min(buckets, g) - 1):
        total = best[:, None] + span  # the previous buckets end at a, this one at b
        back.append(np.argmin(total, axis=0))
        best = total[back[-1], np.arange(g)]
        ends, b = [g - 1], g - 1
        for choice in reversed(back):
            b = int(choice[b])
            ends.append(b)
        plans.append(np.array(ends[::-1]))
    return plans


def _refine(ends: np.ndarray, padded, window: int = 16) -> np.ndarray:
    """Bucket edges moved, one at a time within `window` values, while that lowers `padded(ends)`: an edge
    where a bucket's clips fill its batches leaves fewer clips to pad to the next bucket's length."""
    ends, current = ends.copy(), padded(ends)
    improved = True
    while improved:
        improved = False
        for i in range(len(ends) - 1):  # the last edge is the longest clip
            low = ends[i - 1] + 1 if i else 0
            for edge in range(max(low, ends[i] - window), min(ends[i + 1], ends[i] + window + 1)):
                trial = ends.copy()
                trial[i] = edge
                cost = padded(trial)
                if cost < current:
                    ends, current, improved = trial, cost, True
    return ends
