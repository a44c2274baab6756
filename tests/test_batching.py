"""The bucketed batch sampler: coverage, budgets, epochs, DDP ranks and an exact mid-epoch resume,
alone and inside a real Lightning run."""

import numpy as np
import pytest
import torch

from asr.batching import DurationBatchSampler
from tests.callbacks import RecordUpdates
from tests.conftest import SHRUNK, assembled

DURATIONS = np.random.default_rng(0).lognormal(np.log(4.5), 0.4, 500).clip(1, 10)


def make_sampler(durations, max_batch_seconds, **options) -> DurationBatchSampler:
    """The sampler with this test's settings: no clip cap, 100 buckets, no attention cost, seed 0."""
    settings = {"max_batch_size": None, "num_buckets": 100, "attention_q": None, "seed": 0, **options}
    return DurationBatchSampler(durations, max_batch_seconds, **settings)


def test_sampler_covers_each_clip_once_within_budget():
    sampler = make_sampler(DURATIONS, max_batch_seconds=60, seed=1)
    batches = list(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(DURATIONS)))
    for b in batches:
        assert DURATIONS[b].max() * len(b) <= 60
    padded = sum(DURATIONS[b].max() * len(b) for b in batches)
    assert 1 - DURATIONS.sum() / padded < 0.05  # sorting by duration keeps padding small


def test_sampler_order_changes_per_epoch_and_repeats_per_seed():
    a, b = make_sampler(DURATIONS, 60, seed=3), make_sampler(DURATIONS, 60, seed=3)
    epoch0, epoch1 = list(a), list(a)  # the sampler advances its own epoch
    assert epoch0 != epoch1
    assert list(b) == epoch0 and list(b) == epoch1


def test_sampler_caps_clip_count():
    assert max(len(b) for b in make_sampler(DURATIONS, 1000, max_batch_size=8)) == 8


def test_sampler_ranks_get_every_batch_and_equal_counts():
    ranks = [make_sampler(DURATIONS, 50, seed=0, num_replicas=3, rank=r) for r in range(3)]
    seen = [list(s) for s in ranks]
    assert len({len(s) for s in seen}) == 1 and len(seen[0]) == len(ranks[0])
    epoch = ranks[0].batches(0)
    assert len(epoch) % 3 and len(seen[0]) == len(epoch) // 3 + 1  # padded with the epoch's first batches
    by_rank = [b for step in zip(*seen) for b in step]
    assert by_rank == epoch + epoch[: 3 - len(epoch) % 3]
    assert sorted({i for b in by_rank for i in b}) == list(range(len(DURATIONS)))  # no clip sits out


@pytest.mark.parametrize("shuffle", [False, True])
def test_fewer_batches_than_ranks_are_split_so_that_every_rank_has_one(shuffle):
    """4 dev clips fit one batch; on 2 ranks one rank would have no batch and DDP would wait for it."""
    ranks = [make_sampler(DURATIONS[:4], 1000, num_replicas=2, rank=r, shuffle=shuffle) for r in range(2)]
    seen = [list(s) for s in ranks]
    assert [len(s) for s in seen] == [1, 1]
    assert sorted(i for s in seen for b in s for i in b) == [0, 1, 2, 3]
    assert len(list(make_sampler(DURATIONS[:4], 1000, shuffle=shuffle))) == 1  # one process: one batch


def test_every_epoch_has_the_same_batches_count_and_no_clip_is_lost():
    """The count Lightning and the schedule take from len() holds for every epoch, and len() is free."""
    sampler = make_sampler(DURATIONS, 45, attention_q=20.0, max_batch_size=9)
    for epoch in range(6):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(DURATIONS)))
        for b in batches:
            assert sampler.cost(DURATIONS[b].max(), len(b)) <= 45 and len(b) <= 9


def test_sampler_rejects_a_clip_over_budget():
    with pytest.raises(ValueError, match="max_batch_seconds"):
        make_sampler([5.0, 30.0], max_batch_seconds=20)


def test_sampler_buckets_come_from_the_corpus_quantiles():
    sampler = make_sampler(DURATIONS, 60, num_buckets=10)
    assert len(sampler.boundaries) == 9
    counts = np.bincount(sampler.bucket)
    assert counts.min() >= 45 and counts.max() <= 55  # equal-count buckets
    padded = sum(DURATIONS[b].max() * len(b) for b in sampler)
    fine = make_sampler(DURATIONS, 60, num_buckets=100)
    assert 1 - DURATIONS.sum() / sum(DURATIONS[b].max() * len(b) for b in fine) < 1 - DURATIONS.sum() / padded


def test_sampler_attention_cost_gives_long_clips_smaller_batches():
    sampler = make_sampler(DURATIONS, 60, attention_q=5.0)
    for b in sampler:
        longest = DURATIONS[b].max()
        assert len(b) * (longest + longest**2 / 5.0) <= 60
    plain = make_sampler(DURATIONS, 60)
    assert len(list(sampler)) > len(list(plain))


def test_sampler_resumes_mid_epoch_with_the_next_batch():
    reference = make_sampler(DURATIONS, 60, seed=5)
    next(iter(reference))  # epoch 0 is not complete: it stays epoch 0
    reference.set_epoch(1)
    expected = list(reference)
    sampler = make_sampler(DURATIONS, 60, seed=5)
    sampler.set_epoch(1)
    it = iter(sampler)
    seen = [next(it) for _ in range(7)]
    state = sampler.state_dict()
    assert state == {"epoch": 1, "position": 7}
    resumed = make_sampler(DURATIONS, 60, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # as Lightning does at the start of the resumed epoch
    assert seen + list(resumed) == expected
    assert list(resumed) == make_sampler(DURATIONS, 60, seed=5).batches(2)  # then the next epoch
    at_end = make_sampler(DURATIONS, 60, seed=5)
    at_end.load_state_dict({"epoch": 1, "position": len(expected)})
    assert at_end.epoch == 2 and list(at_end) == make_sampler(DURATIONS, 60, seed=5).batches(2)


def test_sampler_is_where_lightning_sets_the_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader
    sampler = make_sampler(DURATIONS, 60)
    _set_sampler_epoch(DataLoader(range(len(DURATIONS)), batch_sampler=sampler), 4)
    assert sampler.epoch == 4


def test_lightning_resume_mid_epoch_continues_with_the_next_batch(cv_corpus, tmp_path, recwarn):
    """A run checkpointed at step 8 (mid-epoch) and resumed from it sees the batches the uninterrupted run saw."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(callbacks, ckpt_path=None):
        record = RecordUpdates()
        run = assembled(f"data.root={cv_corpus}", "data.max_batch_seconds=8", "data.num_workers=2",
                        f"run_dir={tmp_path}", *SHRUNK, f"ckpt_path='{ckpt_path}'" if ckpt_path else "ckpt_path=null",
                        callbacks=[record, *callbacks], max_steps=12, accelerator="cpu", limit_val_batches=0)
        run.fit()
        return run.trainer, record.ids

    every_8 = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1, filename="{step}")
    trainer, uninterrupted = fit([every_8])
    batches_per_epoch = trainer.num_training_batches
    assert 8 % batches_per_epoch != 0, "the checkpoint must fall mid-epoch"
    checkpoint = torch.load(tmp_path / "ckpt" / "step=8.ckpt", weights_only=True)
    assert checkpoint["SpeechDataModule"] == {"epoch": 8 // batches_per_epoch, "position": 8 % batches_per_epoch}
    _, resumed = fit([], tmp_path / "ckpt" / "step=8.ckpt")
    assert len(uninterrupted) == 12 and resumed == uninterrupted[8:]
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def test_real_ddp_ranks_see_every_clip_in_equal_counts(cv_corpus, tmp_path):
    """Two CPU processes (gloo) for one epoch: every rank the same number of batches, every clip trained
    on, and only the padding batch on both."""
    import json
    import subprocess
    import sys

    import asr

    subprocess.run([sys.executable, "tests/ddp_batches.py", str(cv_corpus), str(tmp_path)], cwd=asr.REPO_DIR,
                   check=True, capture_output=True, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["ids"] for r in range(2)]
    durations = json.loads((tmp_path / "durations.json").read_text())
    all_batches = make_sampler(list(durations.values()), 7, seed=42).batches(0)
    assert len(all_batches) % 2 == 1  # so that one batch is left over
    assert len(ranks[0]) == len(ranks[1]) == len(all_batches) // 2 + 1
    ids = list(durations)  # in the order of the split
    named = [[ids[i] for i in b] for b in all_batches]
    assert [b for step in zip(*ranks) for b in step] == named + named[:1]  # the first batch pads the epoch
