"""Padding and batch fill of three batchings on the same durations: random clip-count batches (the HF
Trainer's default), the HF Trainer's length-grouped sampler (`train_sampling_strategy="group_by_length"`,
transformers' own LengthGroupedSampler) and ours (asr.batching.DurationBatchSampler).

    python benchmarks/batching.py

padding: padded audio / all audio the encoder computes on (1 - real / padded), over an epoch.
fill: audio in a batch / the batch budget, averaged over batches. Our budget is data.max_batch_seconds;
a clip-count batching has no budget, so its budget is the largest padded batch of the epoch (the
memory it must be given). The clip-count samplers use the batch size that gives the same number of
batches per epoch as ours, so every sampler puts the same audio into an average optimizer step.
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from asr.batching import DurationBatchSampler  # noqa: E402


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


def measure(batches: list[list[int]], durations: np.ndarray, budget: float | None) -> tuple[float, float]:
    real = np.array([durations[b].sum() for b in batches])
    padded = np.array([durations[b].max() * len(b) for b in batches])
    budget = budget or padded.max()
    return 1 - real.sum() / padded.sum(), float(np.mean(real / budget))


def fixed_size(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def main() -> None:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    print(f"{'durations':<22} {'budget s':>8} {'sampler':<34} {'batches':>7} {'clips/b':>7} {'padding':>8} {'fill':>6}")
    for name, durations in (("demo train (520)", demo_durations()), ("CV-like (20,000)", common_voice_like())):
        for budget in (30.0, 200.0):
            ours = DurationBatchSampler(durations, budget, max_batch_size=None, num_buckets=100, attention_q=None,
                                        seed=0).batches(0)
            size = round(len(durations) / len(ours))
            torch.manual_seed(0)
            rows = {
                f"random, {size} clips": fixed_size(torch.randperm(len(durations)).tolist(), size),
                f"HF group_by_length, {size} clips": fixed_size(
                    list(LengthGroupedSampler(size, lengths=(durations * 16000).astype(int).tolist())), size),
                "ours, 100 buckets (default)": ours,
                "ours, 30 buckets": DurationBatchSampler(durations, budget, max_batch_size=None, num_buckets=30,
                                                         attention_q=None, seed=0).batches(0),
            }
            for sampler, batches in rows.items():
                padding, fill = measure(batches, durations, budget if sampler.startswith("ours") else None)
                print(f"{name:<22} {budget:>8.0f} {sampler:<34} {len(batches):>7} "
                      f"{len(durations) / len(batches):>7.1f} {padding:>8.1%} {fill:>6.1%}")
            print()


if __name__ == "__main__":
    main()
