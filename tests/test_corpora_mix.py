"""Several corpora in one run (data.corpora, asr/data/mixing.py): shares, the fixed plan, (seed, epoch)
determinism, resume and DDP, the union vocabulary, the data report's per-corpus rows, the errors."""

import logging
import random
import subprocess
import sys

import numpy as np
import pytest

import asr
from asr import SetupError
from asr.core.frames import WAV2VEC2
from asr.data import mixing
from asr.data.batching import DurationBatchSampler
from asr.data.listing import format_report
from asr.tools import synth
from tests.conftest import data_module


def mixed_sampler(shares, sizes=(600, 200), seed=3, **kwargs) -> DurationBatchSampler:
    """A training sampler over two corpora of 1-10 s clips (the second's longer on average)."""
    rng = np.random.default_rng(0)
    durations = np.concatenate([rng.uniform(1, 8, sizes[0]), rng.uniform(3, 10, sizes[1])])
    corpus = np.repeat([0, 1], sizes)
    return DurationBatchSampler(durations, 40.0, max_batch_size=None, num_buckets=6, attention_q=None, seed=seed,
                                geometry=WAV2VEC2,
                                corpus=corpus, draws=mixing.apportion(len(durations), shares), **kwargs)


def corpus_shares(sampler, epoch) -> np.ndarray:
    clips = np.concatenate([np.asarray(b) for b in sampler.batches(epoch)])
    return np.bincount(sampler.corpus[clips], minlength=2) / len(clips)


def test_weights_give_the_shares_of_drawn_clips_in_a_fixed_plan():
    sampler = mixed_sampler([0.2, 0.8])  # the smaller corpus drawn less than its 75% of the clips
    assert sampler.drawn_clips().tolist() == [160, 640]  # an epoch: as many clips as the corpora hold (800)
    for epoch in range(3):
        assert corpus_shares(sampler, epoch) == pytest.approx([0.2, 0.8], abs=0.005)
        batches = sampler.batches(epoch)
        assert len(batches) == len(sampler) and sorted(b.shape for b in batches) == sorted(sampler.batch_shapes(0))
        assert {b.shape for b in batches} <= set(sampler.shapes)
        for b in batches:  # every batch within its shape and the budget
            assert len(b) == b.shape[0] and sampler.durations[b].max() * 16000 <= b.shape[1] <= 40.0 * 16000 / len(b)
    assert any(len(set(sampler.corpus[b])) == 2 for b in sampler.batches(0))  # a batch may mix corpora
    second = corpus_shares(mixed_sampler([0.5, 0.5]), 0)
    assert second == pytest.approx([0.5, 0.5], abs=0.005)
    # the oversampled corpus (200 clips, 400 draws) has every clip drawn, twice
    clips = np.concatenate([np.asarray(b) for b in mixed_sampler([0.5, 0.5]).batches(0)])
    assert np.bincount(clips[clips >= 600] - 600).tolist() == [2] * 200


def test_an_oversampled_corpus_never_puts_a_clip_twice_in_a_batch_and_each_repeat_draws_its_own_augmentation():
    from asr.data.augment import Augment
    from tests.test_augment import OFF

    for shares in ([0.5, 0.5], [0.2, 0.8], [0.05, 0.95]):  # the 200-clip corpus drawn 2 to 4 times an epoch
        sampler = mixed_sampler(shares)
        assert sampler.strata[1].sum() / 200 == pytest.approx(4 * shares[1])  # 2, 3.2 and 3.8 draws a clip
        held = sampler.strata.copy()
        for epoch in range(4):
            batches = sampler.batches(epoch)
            assert all(len(set(b)) == len(b) for b in batches)  # 15-145 repeats beside their clip without the swaps
            for b in batches:  # every batch still within its planned shape
                assert len(b) == b.shape[0] and sampler.durations[b].max() * 16000 <= b.shape[1]
            drawn = np.concatenate([np.asarray(b) for b in batches])
            counts = np.stack([np.bincount(sampler.bucket[drawn[sampler.corpus[drawn] == c]],
                                           minlength=held.shape[1]) for c in (0, 1)])
            assert (counts == held).all()  # each stratum's count, as planned
    for shares, mixed in (([0.5, 0.5], 0.6), ([0.2, 0.8], 0.4)):  # repeats shuffled among first draws: batches of 4+
        # clips hold both corpora as often as a plain shuffle gives (0.70, 0.49); repeats kept apart, 0.52 and 0.30
        batches = [b for epoch in range(4) for b in mixed_sampler(shares).batches(epoch) if len(b) >= 4]
        sampler = mixed_sampler(shares)
        assert np.mean([len(set(sampler.corpus[b])) == 2 for b in batches]) > mixed
    tagged = mixed_sampler([0.05, 0.95], tag_epoch=True)
    tagged.set_epoch(1)
    items = [item for batch in tagged for item in batch]
    assert sorted(i for _, i, *_ in items) == sorted(np.concatenate(tagged.batches(1)).tolist())
    repeats = [(i, n) for _, i, *n in items if n]
    seen = {}
    for _, i, *n in items:
        seen.setdefault(i, []).append(n[0] if n else 0)
    assert repeats and all(sorted(n) == list(range(len(n))) for n in seen.values())  # the 1st, 2nd... draw of each
    augment = Augment(**{**OFF, "silence_prob": 1.0, "silence_seconds": [0.0, 1.0]}, seed=3)
    first = [augment.choose(1, i) for i, _ in repeats]
    again = [augment.choose(1, i, repeat=n[0]) for i, n in repeats]
    assert first == [augment.choose(1, i, repeat=0) for i, _ in repeats]
    assert sum(a.before != b.before for a, b in zip(first, again)) == len(repeats)  # silence: a new draw each


def test_the_same_seed_and_epoch_draw_the_same_batches_on_every_rank_and_after_a_resume():
    a, b = mixed_sampler([0.3, 0.7]), mixed_sampler([0.3, 0.7])
    assert a.batches(4) == b.batches(4) and a.batches(4) != a.batches(5)
    assert mixed_sampler([0.3, 0.7], seed=4).batches(4) != a.batches(4)
    ranks = [mixed_sampler([0.3, 0.7], num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    mine = [list(r) for r in ranks]
    assert len(mine[0]) == len(mine[1])  # equal steps on every rank
    whole = a.batches(2)
    assert sorted(map(tuple, mine[0] + mine[1])) == sorted(map(tuple, (whole + whole[:1])[: len(mine[0]) * 2]))
    run = mixed_sampler([0.3, 0.7])
    run.set_epoch(1)
    first = list(run)
    resumed = mixed_sampler([0.3, 0.7])
    resumed.load_state_dict({"epoch": 1, "position": 5})
    assert list(resumed) == first[5:]


def test_a_single_corpus_keeps_its_plan():
    """Without corpora the sampler is today's: the plan tests of test_batching.py pin it; here its draw is the
    whole corpus in the order the single-corpus code gives."""
    durations = np.random.default_rng(0).uniform(1, 8, 300)
    plain = DurationBatchSampler(durations, 40.0, max_batch_size=None, num_buckets=6, attention_q=None, seed=3,
                                 geometry=WAV2VEC2)
    assert plain.strata is None and plain.drawn_clips() is None
    assert sorted(np.concatenate(plain.batches(0)).tolist()) == list(range(300))


def test_temperature_and_apportioned_draws():
    assert mixing.shares([10, 10], [9 * 3600, 3600], [None, None], 1.0) == pytest.approx([0.9, 0.1])
    assert mixing.shares([10, 10], [9 * 3600, 3600], [None, None], 2.0) == pytest.approx([0.75, 0.25])
    assert mixing.shares([30, 10], [1, 1], [None, None], None) == pytest.approx([0.75, 0.25])  # every clip once
    assert mixing.shares([30, 10], [1, 1], [4.0, 1.0], None) == pytest.approx([0.8, 0.2])
    assert mixing.apportion(10, [1 / 3, 1 / 3, 1 / 3]).tolist() == [4, 3, 3]
    assert mixing.apportion(100, [0.999, 0.001]).tolist() == [99, 1]  # a corpus with a weight is never left out


@pytest.mark.parametrize("entries, temperature, message", [
    ([{"name": "a", "lang": "pt"}, {"name": "a", "lang": "es"}], None, "entries 0 and 1 are both named a"),
    ([{"name": "a", "lang": "pt", "weight": 0}], None, r"data.corpora\[0\] \(a\): weight=0"),
    ([{"name": "a", "lang": "pt", "weight": -1}], None, "weight=-1"),
    ([{"name": "a", "lang": "pt", "weight": 1}, {"name": "b", "lang": "es"}], None, "b has no weight"),
    ([{"name": "a", "lang": "pt", "weight": 1}], 2.0, "leave out the corpora's weights"),
    ([{"name": "a", "lang": "pt"}], 0.0, "data.temperature=0.0"),
    ([{"lang": "pt"}], None, r"data.corpora\[0\]: give each corpus a name"),
    ([{"name": "a/b", "lang": "pt"}], None, "give each corpus a name"),
    ([{"name": "a", "lang": "pt", "rooot": "/x"}], None, "rooot is not a setting of a corpus"),
    ([{"name": "a", "lang": "xx"}], None, "lang=xx is not one of"),
    ([{"name": "a"}], None, "give its lang"),
    ([{"name": "a", "lang": "pt", "dev_speakers": "two"}], None,  # typed before any data is read
     r"data.corpora\[0\].dev_speakers='two': .* \(asr.data.module.SpeechDataModule takes int\)"),
])
def test_bad_corpora_stop_in_one_line(entries, temperature, message):
    with pytest.raises(SetupError, match=message) as error:
        mixing.sources(entries, temperature)
    assert "\n" not in str(error.value)


def test_an_entry_takes_its_lang_files_settings_then_its_own():
    ko, es = mixing.sources([{"name": "ko", "lang": "ko", "root": "/z"},
                             {"name": "es", "lang": "es", "root": "/e", "test_split": "other"}], None)
    assert ko.settings["corpus"] == "zeroth" and ko.settings["dev_split"] is None and ko.settings["language"] == "ko"
    assert es.settings == {**es.settings, "corpus": "common_voice", "language": "es", "dev_split": "dev",
                           "test_split": "other", "train_split": "train", "root": "/e", "lang": "es"}


@pytest.fixture(scope="module")
def es_corpus(tmp_path_factory):
    """8 Spanish train clips (tones: cheap) of 4 speakers, an empty dev split, 2 test clips."""
    root = tmp_path_factory.mktemp("cv") / "es"
    rng = random.Random(5)
    sentences = synth.spanish_sentences(10, rng)
    voices = synth.ES_TRAIN_VOICES[:4]
    splits = {"train": [(s, voices[i % 4]) for i, s in enumerate(sentences[:8])], "dev": [],
              "test": [(s, synth.ES_TEST_VOICES[0]) for s in sentences[8:]]}

    def tone(i, sentence, voice):
        t = np.arange(int(48_000 * (1.5 + 0.1 * len(sentence) / 10))) / 48_000
        return (0.2 * np.sin(2 * np.pi * (200 + 20 * i) * t)).astype(np.float32)

    synth.write_common_voice(root, splits, locale="es", audio_for=tone)
    return root


def test_two_corpora_load_with_a_union_vocabulary_and_a_report_per_corpus(cv_corpus, es_corpus, caplog):
    corpora = (f"data.corpora=[{{name:pt,lang:pt,root:{cv_corpus},weight:0.75}},"
               f"{{name:es,lang:es,root:{es_corpus},weight:0.25,dev_speakers:1}}]")
    data = data_module(corpora, "data.max_batch_seconds=20", "data.num_workers=0")
    assert data.check() is None
    with caplog.at_level(logging.WARNING):
        data.setup("fit")
    assert ("corpus es: its dev split (dev) lists no clip; its dev is carved from its train split: 1 speakers"
            in caplog.text)
    pt_only = set("".join(data.parts["pt"].raw("train").column("text")))
    es_only = set("".join(data.parts["es"].raw("train").column("text")))
    assert (pt_only | es_only) - {" "} <= set(data.vocab.tokens) and es_only - pt_only  # the union
    train = data.report["train"]
    assert list(train["corpora"]) == ["pt", "es"]
    pt, es = train["corpora"]["pt"], train["corpora"]["es"]
    assert pt["kept"] == 12 and es["kept"] == 6  # es: 2 of its 8 clips (1 speaker) carved into dev
    assert train["kept"] == 18 and train["seconds"] == pytest.approx(pt["seconds"] + es["seconds"], abs=0.02)
    assert data.report["dev"]["corpora"]["es"]["kept"] == 2 and data.report["dev"]["corpora"]["pt"]["kept"] == 4
    assert pt["share"]["weight"] == 0.75 and pt["share"]["clips_per_epoch"] + es["share"]["clips_per_epoch"] == 18
    assert pt["share"]["of_clips"] == pytest.approx(14 / 18, abs=1e-3)  # 0.75 of 18 clips, rounded: 14 / 4
    assert "batches" in train and "batches" not in pt
    table = format_report(data.report)
    assert "train:pt" in table and "train:es" in table and "dev:es" in table and "share" in table
    assert data.scoring() == {"pt": {"language": "pt", "dev_seconds": data.report["dev"]["corpora"]["pt"]["seconds"]},
                              "es": {"language": "es", "dev_seconds": data.report["dev"]["corpora"]["es"]["seconds"]}}
    batch = next(iter(data.dataloader("train")))
    assert set(batch["corpora"]) <= {"pt", "es"} and len(batch["corpora"]) == len(batch["ids"])


def test_a_corpus_root_that_does_not_exist_is_named(cv_corpus, tmp_path):
    data = data_module(f"data.corpora=[{{name:pt,lang:pt,root:{cv_corpus}}},{{name:es,lang:es,root:{tmp_path}/none}}]")
    assert data.check().startswith(f"data.corpora (es): data.root={tmp_path}/none does not exist")
    assert "entries 0 and 1" in data_module("data.corpora=[{name:a,lang:pt},{name:a,lang:pt}]").check()


def mix_of(cv_corpus, es_corpus, pt_weight=0.75) -> str:
    return (f"data.corpora=[{{name:pt,lang:pt,root:{cv_corpus},weight:{pt_weight}}},"
            f"{{name:es,lang:es,root:{es_corpus},weight:{1 - pt_weight},dev_speakers:1}}]")


@pytest.mark.slow  # a training run, 22 s: make test stays under 8 minutes
def test_each_corpus_dev_split_is_scored_and_val_cer_is_their_hour_weighted_mean(cv_corpus, es_corpus, tmp_path):
    import json

    from asr.run.training import conclude
    from tests.conftest import assembled

    run = assembled(mix_of(cv_corpus, es_corpus), "data.num_workers=0", "data.max_batch_seconds=20", "logger=csv",
                    "trainer.max_steps=2", "trainer.val_check_interval=2", "+trainer.enable_progress_bar=false",
                    f"run_dir={tmp_path}", "callbacks.checkpoint.monitor=val/es/cer", accelerator="cpu")
    run.fit()
    metrics = run.trainer.callback_metrics
    hours = {n: run.data.report["dev"]["corpora"][n]["seconds"] for n in ("pt", "es")}
    mean = sum(hours[n] * float(metrics[f"val/{n}/cer"]) for n in hours) / sum(hours.values())
    assert float(metrics["val/cer"]) == pytest.approx(mean, rel=1e-5)
    assert {"val/pt/wer", "val/es/wer", "val/wer"} <= set(metrics)
    # what callbacks.average scores a checkpoint by: validation's figures, corpus by corpus and their mean
    import torch

    from asr.run.evaluation import dev_rates
    rates = dev_rates(run.model, run.data, torch.device("cpu"))
    assert rates["cer"] == pytest.approx(float(metrics["val/cer"]), rel=1e-6)
    assert rates["wer"] == pytest.approx(float(metrics["val/wer"]), rel=1e-6)
    assert rates["by_corpus"]["es"][1] == pytest.approx(float(metrics["val/es/cer"]), rel=1e-6)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["monitor"] == "val/es/cer" and results["corpora"]["es"]["val_cer"] == pytest.approx(
        float(metrics["val/es/cer"]))
    assert "| pt |" in (tmp_path / "results.md").read_text() and "| es |" in (tmp_path / "results.md").read_text()
    assert run.model.hparams.language == "pt"  # the first corpus's text rules
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/pt/cer", "val/es/cer", "val/pt/wer", "val/es/wer", "val/cer"} <= set(header)
    conclude(run)
    card = (tmp_path / "model" / "README.md").read_text()
    assert "| es |" in card and f"pt (pt, {cv_corpus}, weight 0.75)" in card
    # evaluate.py: every corpus's test split on its own, or one
    for extra, names in (([], {"pt", "es"}), (["corpus=es"], {"es"})):
        out = tmp_path / f"eval{len(extra)}"
        result = subprocess.run([sys.executable, "evaluate.py", f"ckpt_path={tmp_path}", "data.num_workers=0", *extra,
                                 f"hydra.run.dir={out}"], cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        scored = json.loads((out / "metrics.json").read_text())
        counts = {"pt": 4, "es": 2}  # test clips
        assert set(scored["by_corpus"]) == names and scored["n_utterances"] == sum(counts[n] for n in names)
        assert scored["by_corpus"]["es"]["n_utterances"] == 2 and "  es: WER" in result.stdout
        if len(names) > 1:  # as val/cer weighs dev: each corpus's CER by its hours of the split
            hours = {n: scored["data_report"]["corpora"][n]["seconds"] for n in names}
            mean = sum(hours[n] * scored["by_corpus"][n]["cer"] for n in names) / sum(hours.values())
            assert scored["hour_weighted"]["cer"] == pytest.approx(mean) and "weighted by each corpus's test hours" \
                in result.stdout
        else:
            assert "hour_weighted" not in scored
        assert scored["corpora"]["es"] == {"corpus": "common_voice", "root": str(es_corpus), "language": "es"}
        assert set(scored["corpora"]) == names and f"es (common_voice at {es_corpus})" in result.stdout
        predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert {(p["corpus"], p["root"]) for p in predictions if p["corpus"] == "es"} == {("es", str(es_corpus))}
    result = subprocess.run([sys.executable, "evaluate.py", f"ckpt_path={tmp_path}", "corpus=fr",
                             f"hydra.run.dir={tmp_path}/bad"], cwd=asr.REPO_DIR, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1 and "corpus=fr: the run's corpora are pt, es" in result.stderr
    with pytest.raises(SetupError, match=r"'fr' is not a corpus of this run; give one of val/pt/cer, val/es/cer"):
        assembled(mix_of(cv_corpus, es_corpus), "data.num_workers=0", "data.max_batch_seconds=20", "logger=none",
                  "callbacks.checkpoint.monitor=val/fr/cer")


@pytest.mark.slow  # two short training runs, ~20 s
def test_lightning_resume_of_a_mixed_run_continues_with_the_next_batch(cv_corpus, es_corpus, tmp_path):
    """A run of two corpora checkpointed mid-epoch (update 5) and resumed from it trains on the batches the
    uninterrupted run did, corpus by corpus, from update 6 on; the epochs after the first draw anew."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.conftest import recorded_fit

    def fit(callbacks, ckpt_path=None):
        return recorded_fit(tmp_path, mix_of(cv_corpus, es_corpus, 0.5), "data.max_batch_seconds=8",
                            ckpt_path=ckpt_path, callbacks=callbacks, max_steps=16)

    every_5 = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    trainer, uninterrupted = fit([every_5])
    per_epoch = trainer.num_training_batches
    assert 5 % per_epoch != 0 and 16 > 2 * per_epoch, "the checkpoint must fall mid-epoch, the run span epochs"
    checkpoint = torch.load(tmp_path / "ckpt" / "step=5.ckpt", weights_only=True)
    assert checkpoint["SpeechDataModule"] == {"epoch": 5 // per_epoch, "position": 5 % per_epoch}
    _, resumed = fit([], tmp_path / "ckpt" / "step=5.ckpt")
    assert len(uninterrupted) == 16 and resumed == uninterrupted[5:]
    es = {i for batch in uninterrupted for i in batch if i.startswith("common_voice_es")}
    # drawn again
    assert es and len(es) < sum(i.startswith("common_voice_es") for batch in uninterrupted for i in batch)
    epochs = [sorted(sum(uninterrupted[e * per_epoch:(e + 1) * per_epoch], [])) for e in (0, 1)]
    assert epochs[0] != epochs[1]  # each epoch its own draw of the oversampled corpus


@pytest.mark.slow  # two processes of one epoch, ~40 s
def test_ddp_ranks_of_a_mixed_run_train_on_the_batches_of_one_process(cv_corpus, es_corpus, tmp_path):
    """Two CPU processes (gloo) on two corpora at 0.5 / 0.5: each rank trains on every other batch of the
    epoch one process draws, so the corpora's shares hold over the ranks together."""
    import json

    done = subprocess.run([sys.executable, "tests/ddp_batches.py", str(cv_corpus), str(tmp_path),
                           mix_of(cv_corpus, es_corpus, 0.5)],
                          cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # the run's output: why a rank died
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["ids"] for r in range(2)]
    module = data_module(mix_of(cv_corpus, es_corpus, 0.5), "data.max_batch_seconds=7", "data.num_workers=0")
    module.setup("fit")
    one_process = [batch["ids"] for batch in module.train_dataloader()]
    padded = one_process + one_process[: len(one_process) % 2]  # the first batch again pads an odd epoch
    assert ranks[0] == padded[0::2] and ranks[1] == padded[1::2]
    drawn = [i for batch in one_process for i in batch]
    assert sum(i.startswith("common_voice_es") for i in drawn) == module.report["train"]["corpora"]["es"]["share"][
        "clips_per_epoch"]


def test_corpus_rates_are_each_corpus_s_and_their_dev_hour_weighted_mean():
    """What validation logs and callbacks.average scores by (asr.model.metrics.corpus_rates): each corpus's own
    rates, not the pooled counts, weighted by dev hours; a corpus none of whose characters was scored is left out."""
    from asr.model.metrics import corpus_rates

    corpora = {"a": {"dev_seconds": 3600.0}, "b": {"dev_seconds": 1200.0}, "c": {"dev_seconds": 600.0}}
    rates = corpus_rates(corpora, [[2, 10, 5, 100], [3, 5, 20, 50], [0, 0, 0, 0]])
    assert rates["by_corpus"] == {"a": (0.2, 0.05), "b": (0.6, 0.4)}
    assert (rates["cer"] == pytest.approx(0.75 * 0.05 + 0.25 * 0.4)
            and rates["wer"] == pytest.approx(0.75 * 0.2 + 0.25 * 0.6))
    assert rates["cer"] != pytest.approx(25 / 150)  # the pooled figure
    assert corpus_rates(corpora, [[0, 0, 0, 0]] * 3) == {}
    assert corpus_rates({"a": {"dev_seconds": 0.0}, "b": {"dev_seconds": 0.0}},
                        [[0, 1, 1, 10], [0, 1, 3, 10]])["cer"] == pytest.approx(0.2)  # no hours stated: equal weights


def test_evaluate_weighs_each_corpus_test_cer_by_its_test_hours():
    """evaluate.py's hour_weighted: each corpus's counts (`ErrorRates.totals`, every language tag together)
    weighted by the split's hours, as validation weighs dev."""
    from asr.model.metrics import ErrorRates, corpus_rates

    def edits(errors):
        return [*errors.totals("wer"), *errors.totals("cer")]

    a, b = ErrorRates(), ErrorRates()
    # 1 of 12 characters (spaces count), 1 of 4 words
    a.update(["o gato", "a casa"], ["o gato", "a cosa"], ["pt", "pt"])
    b.update(["el perro"], ["al pero"], ["es"])  # 2 of 8 characters, 2 of 2 words
    assert edits(a) == [1, 4, 1, 12] and edits(b) == [2, 2, 2, 8]
    rates = corpus_rates({"a": {"seconds": 900.0}, "b": {"seconds": 2700.0}}, [edits(a), edits(b)], seconds="seconds")
    assert rates["cer"] == pytest.approx(0.25 / 12 + 0.75 * 2 / 8) and rates["wer"] == pytest.approx(0.25 / 4 + 0.75)
