"""The bucketed batch sampler: coverage, budgets, epochs, DDP ranks and an exact mid-epoch resume,
alone and inside a real Lightning run; every batch padded to one of a few fixed shapes."""

import itertools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import asr
from asr.core import audio
from asr.core.frames import WAV2VEC2
from asr.data.batching import DurationBatchSampler, Planned
from asr.data.loading import collate
from tests.conftest import data_module, recorded_fit

DURATIONS = np.random.default_rng(0).lognormal(np.log(4.5), 0.4, 500).clip(1, 10)
NUM_BUCKETS = OmegaConf.load(asr.REPO_DIR / "conf" / "data" / "default.yaml").num_buckets  # what runs use


def make_sampler(durations, max_batch_seconds, **options) -> DurationBatchSampler:
    """The sampler with this test's settings: no clip cap, the YAML's buckets, no attention cost, seed 0."""
    settings = {"max_batch_size": None, "num_buckets": NUM_BUCKETS, "attention_q": None, "seed": 0,
                "geometry": WAV2VEC2, **options}
    return DurationBatchSampler(durations, max_batch_seconds, **settings)


def padded_seconds(sampler, batches) -> np.ndarray:
    """Seconds each batch's planned shape holds: clips x padded length."""
    shapes = sampler.batch_shapes(sampler.epoch) if batches is None else batches
    return np.array([clips * samples / audio.SAMPLE_RATE for clips, samples in shapes])


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


def test_bucket_lengths_minimise_padding():
    """The upper lengths are the least padding ones (checked against every choice on a small corpus), and more
    buckets pad less."""
    durations = np.random.default_rng(2).uniform(1, 3, 60)
    hops = WAV2VEC2.padded(durations) // WAV2VEC2.hop
    values = np.unique(hops)

    def length_padded(uppers):  # every clip padded to the shortest upper that holds it
        return uppers[np.searchsorted(uppers, hops)].sum()

    best = min(length_padded(np.array([*ends, values[-1]])) for ends in itertools.combinations(values[:-1], 3))
    sampler = make_sampler(durations, 1000, num_buckets=4, max_batch_size=1)  # one clip a batch: no leftovers
    assert length_padded(sampler.upper // WAV2VEC2.hop) == best
    paddings = [make_sampler(DURATIONS, 60, num_buckets=k).padding() for k in (5, 10, 19, 40)]
    assert paddings == sorted(paddings, reverse=True) and paddings[-1] < 0.03


CV_LIKE = np.random.default_rng(0).lognormal(np.log(4.5), 0.4, 100_000).clip(1, 10)  # Common Voice: ~5 s, at most 10


@pytest.mark.parametrize("name, durations", [
    ("Common Voice-like, 800", CV_LIKE[:800]),
    ("Common Voice-like, 100k", CV_LIKE),
    ("uniform 2-10 s, 800", np.random.default_rng(1).uniform(2, 10, 800)),
    ("uniform 2-10 s, 100k", np.random.default_rng(1).uniform(2, 10, 100_000)),
    ("short (asr.tools.synth short), 800", np.random.default_rng(3).normal(2.3, 0.5, 800).clip(1, 4)),
])
@pytest.mark.parametrize("shuffle", [True, False])
def test_an_epoch_uses_at_most_20_shapes_with_at_most_4_percent_padding(name, durations, shuffle):
    """The batch-shape bars (at most 20 shapes, at most 4% padding) at 30 s batches, for training and
    evaluation batches. Every clip fits its batch's
    planned shape (its duration rounded up to the encoder's hop), every padded shape is within the budget, and
    padding (1 - audio / padded audio) is counted here from the shapes, not taken from the sampler.

    The floor of any plan with 20 lengths is set by the spread of the durations (the lengths minimise padding):
    uniform 1-15 s pads 4.4%, log-normal 1-15 s with sigma 0.5 5.2%; `data.num_buckets` trades the two."""
    sampler = make_sampler(durations, 30, shuffle=shuffle, seed=4)
    batches, shapes = sampler.batches(0), sampler.batch_shapes(0)
    assert len(set(shapes)) <= 20 and set(shapes) == set(sampler.shapes)
    assert sorted(i for b in batches for i in b) == list(range(len(durations)))
    need = np.ceil(np.round(durations * audio.SAMPLE_RATE) / 320) * 320  # wav2vec2's hop
    for batch, (clips, samples) in zip(batches, shapes):
        assert len(batch) == clips and need[batch].max() <= samples and samples % 320 == 0
    padded = padded_seconds(sampler, shapes)
    assert padded.max() <= 30
    assert 1 - durations.sum() / padded.sum() <= 0.04
    assert sampler.padding() == pytest.approx(1 - durations.sum() / padded.sum())


def test_shapes_do_not_depend_on_the_corpus_size():
    """More clips, not more shapes: 2k to 1M clips of the same distribution use the same bound. With 2k clips
    in 40 batches of ~50, a bucket's leftover clips (padded to the next bucket's length) cost more."""
    many = np.random.default_rng(5).lognormal(np.log(4.5), 0.4, 1_000_000).clip(1, 10)
    for n, padding in ((2_000, 0.05), (50_000, 0.04), (1_000_000, 0.04)):
        sampler = make_sampler(many[:n], 200, max_batch_size=64)
        assert len(sampler.shapes) <= NUM_BUCKETS + 1 and sampler.padding() < padding


def test_every_rank_plans_the_same_shapes():
    """A pure function of durations and settings: ranks (and a restarted run) get the same shapes, and each
    rank's batches are the plan's."""
    ranks = [make_sampler(CV_LIKE[:3000], 60, seed=7, num_replicas=2, rank=r) for r in range(2)]
    assert ranks[0].shapes == ranks[1].shapes == make_sampler(CV_LIKE[:3000], 60, seed=8).shapes
    for sampler in ranks:
        for batch in sampler:
            clips = len(batch)
            assert clips in {c for c, _ in sampler.shapes}


def test_collate_pads_to_the_planned_shape():
    """collate pads samples to the plan's length (labels to the longest transcript); a clip decoded longer than its
    stated duration (MP3 codec padding) is cut at that length and counted; `lengths` are what the batch holds."""
    def item(seconds, decoded, labels=3):
        return {"id": f"{seconds}", "audio": np.ones(decoded, np.float32), "text": "a" * labels,
                "labels": [1] * labels, "seconds": seconds}

    def planned(items, samples):
        return Planned(items, (len(items), samples))

    batch = collate(planned([item(1.2, 19_200), item(1.9, 30_800)], 32_000), hop=WAV2VEC2.hop)
    assert batch["shape"] == (2, 32_000) == tuple(batch["audio"].shape)
    assert batch["lengths"] == [19_200, 30_800] and not batch["audio"][0, 19_200:].any()
    assert batch["labels"].shape == (2, 3) and batch["truncated_seconds"] == 0
    assert batch["audio"][0, 19_200:].abs().sum() == 0 and batch["padded_seconds"] == 4.0
    # 500 samples past it
    batch = collate(planned([item(0.9, 14_000), item(0.5, 8_000), item(0.99, 16_500)], 16_000), hop=WAV2VEC2.hop)
    assert batch["shape"] == (3, 16_000) and batch["lengths"] == [14_000, 8_000, 16_000]
    assert batch["truncated_seconds"] == 500 / 16_000
    # A stated duration that is wrong (2 s more decoded than stated): never cut, a longer batch instead
    batch = collate(planned([item(0.9, 14_000), item(0.5, 8_000), item(0.99, 48_000)], 16_000), hop=WAV2VEC2.hop)
    assert batch["lengths"] == [14_000, 8_000, 48_000] and batch["shape"] == (3, 48_000)
    assert batch["truncated_seconds"] == 0
    # a short clip in a long batch: the plan's length
    batch = collate(planned([item(0.9, 14_400)], 48_000), hop=WAV2VEC2.hop)
    assert batch["shape"] == (1, 48_000)
    batch = collate([item(1.2, 19_200), item(1.0, 16_000), item(0.5, 8_000), item(0.5, 8_000)], hop=WAV2VEC2.hop)
    assert batch["shape"] == (4, 19_200)  # no plan: padded to its longest


def test_lightning_loader_batches_have_the_planned_shapes():
    """The real training and dev loaders of the demo at 30 s batches: every batch has one of its plan's shapes
    (the shape the model sees in `batch["shape"]`), at most 20 in an epoch, padding within 4% as collate
    counts it, and the data report states the plan."""
    data = data_module("data.num_workers=0", "data.max_batch_seconds=30")
    data.setup("fit")
    for split in ("train", "dev"):
        loader = data.dataloader(split)
        batches = list(loader)
        shapes = {tuple(b["audio"].shape) for b in batches}
        assert all(tuple(b["audio"].shape) == b["shape"] for b in batches)
        assert shapes <= set(loader.batch_sampler.shapes) and len(shapes) <= 20
        report = data.report[split]["batches"]
        assert report["batches"] == len(batches) and [list(s) for s in loader.batch_sampler.shapes] == report["shapes"]
        if split == "train":
            padding = 1 - sum(b["audio_seconds"] for b in batches) / sum(b["padded_seconds"] for b in batches)
            assert padding <= 0.04 and report["padding"] <= 0.04
            assert sum(b["truncated_seconds"] for b in batches) < 0.005 * sum(b["audio_seconds"] for b in batches)
        for b in batches:
            assert all(not b["audio"][i, n:].any() for i, n in enumerate(b["lengths"]))  # zeros past each clip


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
    assert resumed.shapes == reference.shapes  # and so the shapes of the batches after the resume
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
        return recorded_fit(tmp_path, f"data.root={cv_corpus}", "data.max_batch_seconds=8", ckpt_path=ckpt_path,
                            callbacks=callbacks, max_steps=12)

    every_8 = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1, filename="{step}")
    trainer, uninterrupted = fit([every_8])
    batches_per_epoch = trainer.num_training_batches
    assert 8 % batches_per_epoch != 0, "the checkpoint must fall mid-epoch"
    checkpoint = torch.load(tmp_path / "ckpt" / "step=8.ckpt", weights_only=True)
    assert checkpoint["SpeechDataModule"] == {"epoch": 8 // batches_per_epoch, "position": 8 % batches_per_epoch}
    _, resumed = fit([], tmp_path / "ckpt" / "step=8.ckpt")
    assert len(uninterrupted) == 12 and resumed == uninterrupted[8:]
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


@pytest.mark.slow
def test_real_ddp_ranks_see_every_clip_in_equal_counts(cv_corpus, tmp_path):
    """Two CPU processes (gloo) for one epoch: every rank the same number of batches, every clip trained
    on, and only the padding batch on both."""
    import json
    import subprocess
    import sys

    import asr

    done = subprocess.run([sys.executable, "tests/ddp_batches.py", str(cv_corpus), str(tmp_path)], cwd=asr.REPO_DIR,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # the run's output: why a rank died
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["ids"] for r in range(2)]
    durations = json.loads((tmp_path / "durations.json").read_text())
    all_batches = make_sampler(list(durations.values()), 7, seed=42).batches(0)
    assert len(all_batches) % 2 == 1  # so that one batch is left over
    assert len(ranks[0]) == len(ranks[1]) == len(all_batches) // 2 + 1
    ids = list(durations)  # in the order of the split
    named = [[ids[i] for i in b] for b in all_batches]
    assert [b for step in zip(*ranks) for b in step] == named + named[:1]  # the first batch pads the epoch


def test_files_of_several_windows_are_planned_by_the_same_sampler_their_windows_in_one_batch():
    """transcribe.py's plan (`asr.model.transcription.sampler`): each file its windows as rows (`rows`). Every file
    once, in duration order; a batch's shape is its rows at a padded length that holds its widest file, within the
    budget unless one file's windows alone exceed it."""
    rng = np.random.default_rng(0)
    widths = np.concatenate([rng.uniform(1, 20, 40), np.full(6, 30.0)])  # 30 s: the windows of longer files
    rows = np.concatenate([np.ones(40, np.int64), [2, 3, 3, 5, 8, 1]])
    sampler = DurationBatchSampler(widths, 120.0, max_batch_size=None, num_buckets=4, attention_q=None, seed=0,
                                   shuffle=False, geometry=WAV2VEC2, rows=rows)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(46))
    assert [i for b in batches for i in b] == np.argsort(widths, kind="stable").tolist()
    for batch in batches:
        count, samples = batch.shape
        assert count == rows[batch].sum() and samples >= WAV2VEC2.padded(widths[batch]).max()
        assert count * samples / audio.SAMPLE_RATE <= 120.0 or len(batch) == 1
    assert [list(b) for b in batches if rows[b].max() >= 5] == [[43], [44]]  # 5 and 8 windows of 30 s: alone
    with pytest.raises(ValueError, match="inference"):
        DurationBatchSampler(widths, 120.0, max_batch_size=None, num_buckets=4, attention_q=None, seed=0,
                             geometry=WAV2VEC2, rows=rows)
