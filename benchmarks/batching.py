"""Batch shapes, padding and fill of four batchings on the same durations: random clip-count batches (the HF
Trainer's default), the HF Trainer's length-grouped sampler (`train_sampling_strategy="group_by_length"`,
transformers' own LengthGroupedSampler), ours before fixed shapes (main at 8f8c191: 100 quantile buckets,
each batch padded to its longest clip) and ours now (asr.data.batching.DurationBatchSampler: every batch padded
to one of at most data.num_buckets + 1 shapes).

    python benchmarks/batching.py [budgets=[30,200]]

shapes: distinct (clips, samples) batch shapes in an epoch (each costs a cuDNN plan and a compiled graph on
a GPU). Padded to the longest clip, a batch is (clips, longest clip's samples).
padding: padded audio / all audio the encoder computes on (1 - real / padded), over an epoch.
fill: audio in a batch / the batch budget, averaged over batches. Our budget is data.max_batch_seconds;
a clip-count batching has no budget, so its budget is the largest padded batch of the epoch (the
memory it must be given). The clip-count samplers use the batch size that gives the same number of
batches per epoch as ours, so every sampler puts the same audio into an average optimizer step.
The settings and their defaults: conf/bench/batching.yaml (`--help`).
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from asr.core.audio import SAMPLE_RATE  # noqa: E402
from asr.core.frames import WAV2VEC2  # noqa: E402
from asr.data.batching import DurationBatchSampler  # noqa: E402
from asr.tools import cli  # noqa: E402


def demo_durations() -> np.ndarray:
    import csv
    tsv = Path(__file__).resolve().parents[1] / "demo" / "cv-pt" / "clip_durations.tsv"
    with open(tsv) as f:
        durations = {row["clip"]: int(row["duration[ms]"]) / 1000 for row in csv.DictReader(f, delimiter="\t")}
    with open(tsv.parent / "train.tsv") as f:
        return np.array([durations[row["path"]] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)])


def common_voice_like(n: int = 20_000) -> np.ndarray:
    """Log-normal, mean about 5 s, clipped to 1-10 s (Common Voice clips are capped at 10 s)."""
    return np.random.default_rng(0).lognormal(np.log(4.6), 0.4, n).clip(1.0, 10.0)


def corpora() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "demo train (520)": demo_durations(),
        "short, asr.tools.synth-like (800)": rng.normal(2.3, 0.5, 800).clip(1, 4),
        "CV-like (800)": common_voice_like(800),
        "CV-like (100,000)": common_voice_like(100_000),
        "lognormal 1-15 s (800)": rng.lognormal(np.log(4.5), 0.5, 800).clip(1, 15),
        "lognormal 1-15 s (100,000)": rng.lognormal(np.log(4.5), 0.5, 100_000).clip(1, 15),
        "uniform 1-15 s (800)": rng.uniform(1, 15, 800),
        "uniform 1-15 s (100,000)": rng.uniform(1, 15, 100_000),
    }


def before(durations: np.ndarray, budget: float, num_buckets: int = 100) -> list[list[int]]:
    """Epoch 0 of main's sampler at 8f8c191: equal-count (quantile) buckets, as many clips per batch as fit at
    the bucket's longest clip, leftovers carried to the next bucket; each batch padded to its longest clip."""
    boundaries = np.unique(np.quantile(durations, np.linspace(0, 1, num_buckets + 1)[1:-1]))
    bucket = np.searchsorted(boundaries, durations, side="right")
    counts = np.bincount(bucket, minlength=len(boundaries) + 1)
    longest = np.zeros(len(counts))
    np.maximum.at(longest, bucket, durations)
    with np.errstate(divide="ignore"):
        fits = np.where(counts > 0, np.floor(budget / longest), 1).astype(int)
    sizes, carry = [], 0
    for count, fit in zip(counts.tolist(), fits.tolist()):
        if count:
            sizes += [fit] * ((carry + count) // fit)
            carry = (carry + count) % fit
    sizes += [carry] if carry else []
    order = np.lexsort((np.random.default_rng([0, 0]).permutation(len(durations)), bucket))
    ends = np.cumsum(sizes)
    return [order[e - n : e].tolist() for e, n in zip(ends, sizes)]


def longest_shapes(batches: list[list[int]], durations: np.ndarray) -> list[tuple[int, int]]:
    """(clips, samples) of batches padded to their longest clip."""
    return [(len(b), int(round(durations[b].max() * SAMPLE_RATE))) for b in batches]


def measure(shapes: list[tuple[int, int]], batches: list[list[int]], durations: np.ndarray,
            budget: float | None) -> tuple[int, float, float]:
    """(distinct shapes, padding, fill) of an epoch whose batches have these shapes."""
    real = np.array([durations[b].sum() for b in batches])
    padded = np.array([clips * samples / SAMPLE_RATE for clips, samples in shapes])
    budget = budget or padded.max()
    return len(set(shapes)), 1 - real.sum() / padded.sum(), float(np.mean(real / budget))


def fixed_size(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def main(argv: list[str]) -> None:
    args, _ = cli.parse("bench/batching", argv)
    from transformers.trainer_pt_utils import LengthGroupedSampler

    print(f"{'durations':<28} {'budget s':>8} {'sampler':<40} {'batches':>7} {'clips/b':>7} {'shapes':>6} "
          f"{'padding':>8} {'fill':>6}")
    for name, durations in corpora().items():
        for budget in cli.values(args, "budgets"):
            sampler = DurationBatchSampler(durations, budget, max_batch_size=None, num_buckets=19, attention_q=None,
                                           seed=0, geometry=WAV2VEC2)
            ours = sampler.batches(0)
            size = round(len(durations) / len(ours))
            torch.manual_seed(0)
            random_batches = fixed_size(torch.randperm(len(durations)).tolist(), size)
            grouped = fixed_size(list(LengthGroupedSampler(size, lengths=(durations * 16000).astype(int).tolist())),
                                 size)
            main_batches = before(durations, budget)
            rows = {
                f"random, {size} clips": (random_batches, longest_shapes(random_batches, durations), None),
                f"HF group_by_length, {size} clips": (grouped, longest_shapes(grouped, durations), None),
                "before: main 8f8c191, 100 buckets": (main_batches, longest_shapes(main_batches, durations), budget),
                "now: fixed shapes, 19 buckets": (ours, sampler.batch_shapes(0), budget),
            }
            for label, (batches, shapes, limit) in rows.items():
                distinct, padding, fill = measure(shapes, batches, durations, limit)
                print(f"{name:<28} {budget:>8.0f} {label:<40} {len(batches):>7} "
                      f"{len(durations) / len(batches):>7.1f} {distinct:>6} {padding:>8.1%} {fill:>6.1%}")
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
