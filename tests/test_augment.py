"""Training augmentation (asr/data/augment.py): decided by (seed, epoch, clip), so a resume and every DDP rank replay
it; speed-perturbed and silence-padded durations known before batching, within the plan's shapes and budget;
noise at the SNR asked for; a bad noise folder stops the start, a bad noise file is skipped and counted."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import asr
from asr.core import audio
from asr.core.text import Vocabulary
from asr.data import corpora, listing, loading
from asr.data.augment import NONE, Augment, mix
from tests.conftest import data_module

OFF = {"speed_prob": 0.0, "speed_factors": [0.9, 1.0, 1.1], "silence_prob": 0.0, "silence_seconds": [0.0, 1.0],
       "concat_prob": 0.0, "concat_seconds": 4.0, "concat_gap": [0.2, 1.0], "noise_prob": 0.0, "noise_dir": None,
       "noise_snr_db": [10.0, 20.0], "noise_weights": {"noise": 1.0, "music": 1.0, "babble": 1.0}}


@pytest.fixture
def noise_dir(tmp_path):
    """white noise (16 kHz, 3 s) at the top, a 0.5 s tone at 44.1 kHz in music/ (shorter than any clip)."""
    rng = np.random.default_rng(0)
    (tmp_path / "noise" / "music").mkdir(parents=True)
    sf.write(tmp_path / "noise" / "white.wav", 0.1 * rng.standard_normal(48_000).astype(np.float32), 16_000)
    t = np.arange(22_050) / 44_100
    sf.write(tmp_path / "noise" / "music" / "tone.wav", 0.2 * np.sin(2 * np.pi * 330 * t).astype(np.float32), 44_100)
    return tmp_path / "noise"


def batches(loader, count=None):
    """(ids, audio as numpy, augment descriptions) of the loader's batches."""
    out = []
    for batch in loader:
        out.append((batch["ids"], batch["audio"].numpy().copy(), batch.get("augment")))
        if count is not None and len(out) == count:
            break
    return out


def test_speed_perturbed_durations_match_the_decoded_audio(tmp_path):
    """The seconds the batch plan and collate use (duration / factor) are the decoded clip's length: exactly
    for WAV (16 kHz and 48 kHz), within the codec's padding for the demo's MP3."""
    records = []
    for i, (rate, seconds) in enumerate([(16_000, 2.0), (48_000, 3.1), (16_000, 1.37)]):
        path = tmp_path / f"c{i}.wav"
        sf.write(path, np.random.default_rng(i).standard_normal(int(rate * seconds)).astype(np.float32) * 0.1, rate)
        records.append(corpora.Utterance(f"c{i}", str(path), "texto", seconds, "s", "pt"))
    clips = corpora.Clips(listing.prepare(corpora.Clips.from_records(records), "pt"))
    clips.seconds = clips.column("duration")
    augment = Augment(**{**OFF, "speed_prob": 1.0}, seed=3)
    dataset = loading.UtteranceDataset(clips, Vocabulary.from_transcripts(["texto"]), augment)
    factors = set()
    for epoch in range(6):
        for i in range(len(clips)):
            item = dataset[(epoch, i)]
            factor = augment.choose(epoch, i).factor
            factors.add(factor)
            assert abs(len(item["audio"]) - item["seconds"] * audio.SAMPLE_RATE) <= 1
            assert item["seconds"] == pytest.approx(clips.seconds[i] / factor)
    assert factors == {0.9, 1.0, 1.1}
    demo = data_module("data.num_workers=0", "augment=speed")
    train = demo.load("train")
    dataset = loading.UtteranceDataset(train, demo.vocab, demo.augment)
    for i in range(0, len(train), 50):
        item = dataset[(1, i)]
        assert 0 <= len(item["audio"]) / audio.SAMPLE_RATE - item["seconds"] < 0.06  # MP3 codec padding


def test_silence_goes_around_the_clip_and_leaves_the_other_draws_as_they_were():
    """augment=silence: zeros before and after the decoded clip, each side's seconds in silence_seconds, counted
    in `seconds`; with speed on as well, the speed factors are those drawn without silence (the same first
    draws), and the two add up: duration / factor + before + after."""
    demo = data_module("data.num_workers=0", "augment=speed", "data.augment.silence_prob=1.0",
                       "data.augment.silence_seconds=[0.2,0.5]")
    train = demo.load("train")
    plain = loading.UtteranceDataset(train, demo.vocab)
    augmented = loading.UtteranceDataset(train, demo.vocab, demo.augment)
    speed_only = Augment(**{**OFF, "speed_prob": 1.0}, seed=demo.augment.seed)
    sides = []
    for i in range(0, len(train), 60):
        choice = demo.augment.choose(2, i)
        assert choice.factor == speed_only.choose(2, i).factor
        assert 0.2 <= choice.before <= 0.5 and 0.2 <= choice.after <= 0.5
        sides += [choice.before, choice.after]
        item, clip = augmented[(2, i)], loading.UtteranceDataset(train, demo.vocab, speed_only)[(2, i)]
        before, after = round(choice.before * audio.SAMPLE_RATE), round(choice.after * audio.SAMPLE_RATE)
        assert len(item["audio"]) == before + len(clip["audio"]) + after
        silence = np.concatenate([item["audio"][:before], item["audio"][len(item["audio"]) - after:]])
        assert np.ptp(silence) == 0 and np.ptp(item["audio"][before:before + 800]) > 0  # zeros, once normalised
        assert item["seconds"] == pytest.approx(clip["seconds"] + choice.before + choice.after)
        assert 0 <= len(item["audio"]) / audio.SAMPLE_RATE - item["seconds"] < 0.06  # MP3 codec padding
        assert "silence" in item["augment"] and len(plain[i]["audio"]) != len(item["audio"])
    assert len(set(sides)) == len(sides)  # drawn, not fixed


def test_concat_puts_another_clip_after_a_pause_and_joins_the_transcripts():
    """augment=concat: half the clips followed by a partner (a clip short enough for the room at the slowest
    speed) after a gap in concat_gap: the audio is clip, zeros, partner at the clip's speed; the labels are the
    two transcripts joined by a word delimiter; `seconds` counts all of it; the speed draws are unchanged."""
    demo = data_module("data.num_workers=0", "augment=speed", "data.augment.concat_prob=0.5",
                       "data.augment.concat_seconds=3.5")
    train = demo.load("train")
    augmented = loading.UtteranceDataset(train, demo.vocab, demo.augment)
    plain = loading.UtteranceDataset(train, demo.vocab)
    speed_only = loading.UtteranceDataset(train, demo.vocab,
                                          Augment(**{**OFF, "speed_prob": 1.0}, seed=demo.augment.seed))
    fits = np.flatnonzero(train.seconds / 0.9 <= 3.5 - 1.0)
    assert np.array_equal(augmented.partners, fits) and 0 < len(fits) < len(train)
    followed = repeats_differ = 0
    for i in range(0, len(train), 25):
        choice = demo.augment.choose(3, i)
        item, alone = augmented[(3, i)], speed_only[(3, i)]
        again = demo.augment.choose(3, i, repeat=1)  # its second draw this epoch (an oversampled corpus)
        assert augmented[(3, i, 1)].get("augment") == (None if again == NONE else again.describe(demo.augment))
        repeats_differ += again != choice
        assert choice.factor == demo.augment.choose(3, i).factor == speed_only.augment.choose(3, i).factor
        if choice.partner is None:
            assert np.array_equal(item["audio"], alone["audio"]) and item["labels"] == alone["labels"]
            continue
        followed += 1
        j = int(fits[int(choice.partner * len(fits))])
        second = audio.load(train[j].path, speed=choice.factor)
        gap = round(choice.gap * audio.SAMPLE_RATE)
        assert 0.2 <= choice.gap <= 1.0 and len(item["audio"]) == len(alone["audio"]) + gap + len(second)
        assert np.ptp(item["audio"][len(alone["audio"]):len(alone["audio"]) + gap]) == 0  # the pause: zeros
        assert item["text"] == f"{plain[i]['text']} {plain[j]['text']}"
        assert item["labels"] == plain[i]["labels"] + [demo.vocab.ids["|"]] + plain[j]["labels"]
        assert item["seconds"] == pytest.approx(alone["seconds"] + choice.gap + train.seconds[j] / choice.factor)
        assert "another clip after" in item["augment"]
    assert 5 <= followed <= 17  # about half of 21
    assert repeats_differ >= 10  # a repeat is perturbed anew, not as the clip's first draw


@pytest.mark.parametrize("option", ["speed", "silence", "long_form"])
def test_augmented_batches_stay_within_their_shapes_and_budget_with_the_same_counts_every_epoch(option):
    """Planned on duration / 0.9 (speed) or duration + 2 x the most silence, every epoch's perturbed clips fit:
    each batch has one of the plan's shapes, within the budget, nothing cut beyond the MP3 codec's padding, and
    every epoch has as many batches."""
    module = data_module("data.num_workers=0", f"augment={option}", "data.max_batch_seconds=30")
    module.setup("fit")
    loader = module.train_dataloader()
    sampler = loader.batch_sampler
    counts, descriptions = [], []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = list(loader)
        counts.append(len(seen))
        descriptions.append([a for b in seen for a in b["augment"]])
        for batch in seen:
            clips, samples = batch["shape"]
            assert (clips, samples) in sampler.shapes and clips * samples / audio.SAMPLE_RATE <= 30
            assert batch["truncated_seconds"] <= 0.05 * clips  # codec padding only, never speech
    assert counts[0] == counts[1] == len(sampler) == module.report["train"]["batches"]["batches"]
    assert descriptions[0] != descriptions[1]  # a new draw each epoch
    if option == "speed":
        assert {"speed 0.9", "speed 1.1", "none"} <= set(descriptions[0])
    else:
        assert all(d.startswith("silence ") for d in descriptions[0])
        assert module.report["train"]["augment"]["silence"]["planned_on"] == "durations + 2 s (the most on both sides)"
    if option == "long_form":
        assert 0.3 < np.mean(["another clip after" in d for d in descriptions[0]]) < 0.7
        assert (module.report["train"]["augment"]["concat"]["planned_on"]
                == "durations + 4 s (the room for a second clip)")


def test_a_resumed_loader_replays_the_same_augmented_batches_whatever_the_workers(noise_dir):
    """Epoch 1 resumed at batch 3 in a new data module (2 loader workers) gives the uninterrupted one's
    batches (no worker) from batch 3 on, speed and noise alike, sample for sample."""
    overrides = ("augment=speed_noise", f"data.augment.noise_dir={noise_dir}", "data.max_batch_seconds=30")
    reference = data_module("data.num_workers=0", *overrides)
    reference.setup("fit")
    loader = reference.train_dataloader()
    loader.batch_sampler.set_epoch(1)
    expected = batches(loader, 8)
    resumed = data_module("data.num_workers=2", *overrides)
    resumed.setup("fit")
    resumed.load_state_dict({"epoch": 1, "position": 3})
    replayed = batches(resumed.train_dataloader(), 5)
    assert any("dB SNR" in a for _, _, augments in expected for a in augments)
    for (ids, wave, augments), (ids2, wave2, augments2) in zip(expected[3:], replayed, strict=True):
        assert ids == ids2 and augments == augments2 and np.array_equal(wave, wave2)


@pytest.mark.slow
def test_ddp_ranks_train_on_the_augmented_batches_of_one_process(cv_corpus, tmp_path):
    """Two CPU processes (gloo), augment=speed: each rank's batches hold the clips, and the audio seconds
    (which the speed factors change), of the batches one process computes for epoch 0."""
    done = subprocess.run([sys.executable, "tests/ddp_batches.py", str(cv_corpus), str(tmp_path), "augment=speed"],
                          cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # the run's output: why a rank died
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    module = data_module(f"data.root={cv_corpus}", "data.max_batch_seconds=7", "data.num_workers=0", "augment=speed")
    module.setup("fit")
    loader = module.train_dataloader()
    one_process = [(b["ids"], b["audio_seconds"]) for b in loader]
    padded = one_process + one_process[: len(one_process) % 2]  # the first batch again pads an odd epoch
    for r, rank in enumerate(ranks):
        assert rank["ids"] == [ids for ids, _ in padded[r::2]]
        assert rank["seconds"] == pytest.approx([s for _, s in padded[r::2]], abs=1e-9)
    plain = data_module(f"data.root={cv_corpus}", "data.max_batch_seconds=7", "data.num_workers=0")
    plain.setup("fit")
    assert [b["audio_seconds"] for b in plain.train_dataloader()] != [s for _, s in one_process]


@pytest.mark.parametrize("snr_db", [0.0, 7.5, 20.0])
def test_noise_is_mixed_at_the_snr_asked_for(noise_dir, snr_db):
    """Measured on the mixed signal: 10 log10(speech power / (mixed - speech) power)."""
    augment = Augment(**{**OFF, "noise_prob": 1.0, "noise_dir": str(noise_dir), "noise_snr_db": [snr_db, snr_db]},
                      seed=0)
    assert augment.check() is None and sorted(augment.noise_categories) == ["music", "noise"]
    t = np.arange(40_000) / audio.SAMPLE_RATE
    speech = (0.3 * np.sin(2 * np.pi * 200 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    used = set()
    for clip in range(8):
        choice = augment.choose(0, clip)
        used.add(augment.noise_name(choice.noise))
        noise = augment.noise(choice, len(speech))
        assert len(noise) == len(speech) and np.abs(noise).max() > 0
        mixed = mix(speech.copy(), noise, choice.snr_db)
        added = mixed.astype(np.float64) - speech
        assert (10 * np.log10(np.sum(speech.astype(np.float64) ** 2) / np.sum(added**2))
                == pytest.approx(snr_db, abs=0.01))
    assert used == {"white.wav", "music/tone.wav"}


def test_noise_around_silence_keeps_the_speech_at_the_snr_asked_for(noise_dir):
    """With silence around the clip, the noise runs over the silence too and its level is set by the speech's
    own power: measured over the speech's samples, the SNR asked for."""
    augment = Augment(**{**OFF, "noise_prob": 1.0, "noise_dir": str(noise_dir), "noise_snr_db": [10.0, 10.0],
                         "silence_prob": 1.0, "silence_seconds": [0.5, 1.0]}, seed=0)
    augment.check()
    t = np.arange(32_000) / audio.SAMPLE_RATE
    speech = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    choice = augment.choose(0, 0)
    before, after = round(choice.before * audio.SAMPLE_RATE), round(choice.after * audio.SAMPLE_RATE)
    padded = np.concatenate([np.zeros(before, np.float32), speech, np.zeros(after, np.float32)])
    noise = augment.noise(choice, len(padded))
    mixed = mix(padded.copy(), noise, choice.snr_db, reference=speech).astype(np.float64)
    added = mixed - padded
    assert np.abs(mixed[:before]).max() > 0  # the room's noise in the silence too
    assert 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(added**2)) == pytest.approx(10.0, abs=0.01)


def test_noise_weights_choose_the_categories():
    augment = Augment(**OFF, seed=0)
    augment.noise_prob, augment.noise_weights = 1.0, {"noise": 0.0, "music": 3.0, "babble": 1.0}
    augment.noise_files = [("a", 1, 16_000), ("b", 1, 16_000), ("c", 1, 16_000)]
    augment.noise_categories = ["noise", "music", "babble"]
    augment._weighted, augment._cumulative = ["music", "babble"], np.array([0.75, 1.0])
    augment._by_category = [np.array([1]), np.array([2])]
    drawn = [augment.choose(0, clip).noise for clip in range(2000)]
    assert 0 not in drawn and abs(drawn.count(1) / 2000 - 0.75) < 0.04


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "not set"])
def test_a_bad_noise_folder_stops_the_start_naming_it(tmp_path, case):
    from asr import SetupError
    from tests.conftest import assembled

    folder = tmp_path / "noise"
    if case != "missing":
        folder.mkdir()
    if case == "unreadable":
        (folder / "readme.txt").write_text("not audio")
        (folder / "broken.wav").write_bytes(b"RIFF\x00\x00")
    directory = [] if case == "not set" else [f"data.augment.noise_dir={folder}"]
    with pytest.raises(SetupError) as error:
        assembled("augment=noise", *directory, f"run_dir={tmp_path / 'run'}", "logger=none")
    message = str(error.value)
    assert ("data.augment.noise_dir=<folder>" if case == "not set" else f"data.augment.noise_dir={folder}") in message
    assert {"missing": "no such folder", "empty": "no file", "unreadable": "2 unreadable file(s)",
            "not set": "augment=noise needs"}[case] in message


def test_a_noise_file_that_fails_mid_run_is_skipped_and_counted(noise_dir, tmp_path):
    """A noise file that decoded at start-up and is corrupt by the time it is used: its clips stay clean,
    the epoch runs to its end, and the data report counts the failures by file."""
    module = data_module("data.num_workers=0", "augment=noise", f"data.augment.noise_dir={noise_dir}",
                         "data.augment.noise_prob=1.0", "data.max_batch_seconds=30")
    module.setup("fit")
    (noise_dir / "music" / "tone.wav").write_bytes(b"RIFF" + bytes(100))  # corrupted after the scan
    seen = [module.on_before_batch_transfer(b, 0) for b in module.train_dataloader()]
    failed = sum(len(b["noise_skipped"]) for b in seen)
    assert failed > 0 and sum(len(b["ids"]) for b in seen) == len(module.load("train"))
    module.write_report(tmp_path / "data_report.json")
    report = json.loads((tmp_path / "data_report.json").read_text())["train"]["augment"]["noise"]
    assert report["skipped"] == {"music/tone.wav": failed} and report["files"] == {"noise": 1, "music": 1}


def test_no_augmentation_leaves_the_plan_and_the_batches_as_they_were():
    """augment=none (the default: the model cards' runs) plans on the clips' own durations and yields plain
    clip indices: the batches of the code before augmentation existed."""
    module = data_module("data.num_workers=0")
    assert not module.augment.active
    module.setup("fit")
    sampler = module.sampler("train")
    assert not sampler.tag_epoch and np.array_equal(sampler.durations, module.load("train").seconds)
    assert "augment" not in module.report["train"] and "augment" not in next(iter(module.train_dataloader()))


def test_the_predictions_table_sample_gains_an_augmented_example(noise_dir):
    """With augmentation, PredictionsTable's dev sample ends with its first clip as training perturbs it."""
    from asr.run.tracking import PredictionsTable

    module = data_module("data.num_workers=0", "augment=speed_noise", f"data.augment.noise_dir={noise_dir}")
    sample = PredictionsTable(clips=3, seed=0)._draw(module)
    assert len(sample) == 4 and [("augment" in item) for item in sample] == [False, False, False, True]
    assert sample[3]["id"] == sample[0]["id"] and "speed" in sample[3]["augment"] and "dB SNR" in sample[3]["augment"]
    assert len(sample[3]["audio"]) != len(sample[0]["audio"]) and np.abs(sample[3]["raw"]).max() == pytest.approx(1)
    assert len(PredictionsTable(clips=3, seed=0)._draw(data_module("data.num_workers=0"))) == 3


def test_a_concat_room_no_clip_fits_stops_in_one_line_and_the_report_counts_the_partners(caplog):
    """data.augment.concat_seconds too small for any demo clip to follow another (2 s, less the 1 s longest gap:
    the shortest demo clip lasts 1.5 s) would train with no concatenation at all: it stops, naming the setting
    that works; 3 s leaves a few (warned); the default's partners are in the data report."""
    import logging

    from asr import SetupError

    with pytest.raises(SetupError) as error:
        data_module("data.num_workers=0", "augment=long_form", "data.augment.concat_seconds=2.0").load("train")
    [line] = str(error.value).splitlines()
    assert line.startswith("data.augment.concat_seconds=2 leaves no training clip short enough to follow another")
    assert "give concat_seconds=2.5" in line and "or concat_prob=0" in line
    with caplog.at_level(logging.WARNING, logger="asr.data.augment"):
        few = data_module("data.num_workers=0", "augment=long_form", "data.augment.concat_seconds=3.0")
        train = few.load("train")
    partners = few.report["train"]["augment"]["concat"]["partners"]
    assert partners["clips"] == int((train.seconds <= 2.0).sum()) and 0 < partners["of_clips"] < 0.1
    assert f"only {partners['clips']} of {len(train)} training clips" in caplog.text
    default = data_module("data.num_workers=0", "augment=long_form")
    default.load("train")
    assert default.report["train"]["augment"]["concat"]["partners"]["of_clips"] > 0.3
