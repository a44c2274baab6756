import json

import numpy as np
import pytest
import soundfile as sf
import torch

from asr import SetupError
from asr.core import audio
from asr.core.frames import WAV2VEC2, Geometry
from asr.core.text import Vocabulary
from asr.data import corpora, listing, loading
from asr.data.corpora import Utterance
from asr.data.module import SpeechDataModule
from tests.conftest import attention_mask


def test_collate_pads_audio_and_labels_with_masks():
    items = [{"id": f"u{n}", "audio": np.ones(n, dtype=np.float32), "text": "ab"[: k], "labels": [1] * k}
             for n, k in ((16000, 2), (8000, 1))]
    batch = loading.collate(items, hop=WAV2VEC2.hop)
    assert batch["audio"].shape == (2, 16000) and batch["lengths"] == [16000, 8000] and "attention_mask" not in batch
    assert attention_mask(batch["lengths"], 16000).sum(1).tolist() == [16000, 8000]
    assert batch["audio"][1, 8000:].abs().sum() == 0
    assert batch["labels"].tolist() == [[1, 1], [1, -100]]
    assert batch["audio_seconds"] == 1.5 and batch["padded_seconds"] == 2.0


def test_encoder_frames_match_the_hf_feature_encoder():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
    model = Wav2Vec2ForCTC(Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, conv_dim=[8] * 7))
    for samples in (400, 401, 16000, 48_123):
        expected = model._get_feat_extract_output_lengths(torch.tensor(samples)).item()
        assert Geometry.of(model.config).frames(samples) == expected == WAV2VEC2.frames(samples)
    assert WAV2VEC2 == Geometry.of(Wav2Vec2Config())  # XLS-R's: transformers' defaults
    assert WAV2VEC2.frames(16000) == 49 and WAV2VEC2.hop == 320  # about 50 frames per second
    odd = Geometry.of({"conv_kernel": [10, 3], "conv_stride": [5, 4]})  # another model's: its own count
    assert odd.hop == 20 and odd.frames(16000) == (((16000 - 10) // 5 + 1) - 3) // 4 + 1


def test_ctc_feasibility_counts_blanks_between_repeats():
    frames = WAV2VEC2.frames(16000)  # 49 in one second
    assert listing.frames_needed("a" * 25) == frames  # 25 labels + 24 blanks
    assert listing.frames_needed("a" * 26) == frames + 2
    assert listing.frames_needed("abcdefghij" * 4 + "a b c d e") == frames  # no repeats: one frame a label
    assert listing.frames_needed("aab b") == 6  # the space is a label (`|`) too


def test_audio_is_decoded_resampled_and_normalised(tmp_path):
    t = np.arange(48000) / 48000
    sf.write(tmp_path / "a.mp3", 0.3 * np.sin(2 * np.pi * 440 * t).astype(np.float32), 48000)
    x = audio.load(tmp_path / "a.mp3")
    assert abs(len(x) - 16000) < 1200  # MP3 adds encoder padding
    y = audio.normalize(x)
    assert abs(y.mean()) < 1e-4 and abs(y.std() - 1) < 1e-3


def test_common_voice_reader_keeps_quotes_and_reads_old_columns(tmp_path):
    (tmp_path / "clips").mkdir()
    header = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accent"]  # old release
    with open(tmp_path / "train.tsv", "w") as f:
        f.write("\t".join(header) + "\n")
        f.write('spk1\ta.mp3\tEle disse "olá\tsim"\t2\t0\t\t\t\n'.replace('\tsim"', ' sim"'))
        f.write("spk2\tb.mp3\tuma linha com campos a mais\t1\t0\t\t\t\t\t\n")  # malformed: left out, counted
    utts = corpora.read_common_voice(tmp_path, "train", "pt")
    assert utts[0].text == 'Ele disse "olá sim"' and utts[0].speaker == "spk1" and utts[0].duration is None
    assert len(utts) == 1 and utts.table.schema.metadata[b"malformed_rows"] == b"1"
    assert json.loads(utts.table.schema.metadata[b"malformed_lines"]) == [
        "train.tsv: " + "spk2\tb.mp3\tuma linha com campos a mais\t1\t0\t\t\t\t\t"]


def test_common_voice_reader_names_what_is_missing(tmp_path):
    with pytest.raises(SetupError, match="dev.tsv does not exist"):
        corpora.read_common_voice(tmp_path, "dev", "pt")
    (tmp_path / "dev.tsv").write_text("client_id\tfile\tsentence\n")
    with pytest.raises(SetupError, match=r"lacks the column\(s\) \['path'\]"):
        corpora.read_common_voice(tmp_path, "dev", "pt")


def test_check_split_drops_and_counts(tmp_path):
    def clip(name, seconds):
        sf.write(tmp_path / name, np.zeros(int(16000 * seconds), dtype=np.float32), 16000)
        return str(tmp_path / name)
    (tmp_path / "corrupt.mp3").write_bytes(b"not audio at all" * 10)
    utts = [
        Utterance("ok", clip("ok.wav", 2.0), "Um texto bom.", None, "s", "pt"),
        Utterance("missing", str(tmp_path / "nope.mp3"), "texto", None, "s", "pt"),
        Utterance("corrupt", str(tmp_path / "corrupt.mp3"), "texto", None, "s", "pt"),
        Utterance("long", clip("long.wav", 21.0), "texto", None, "s", "pt"),
        Utterance("punct", clip("p.wav", 1.0), "?!… —", None, "s", "pt"),
        Utterance("dense", clip("d.wav", 0.5), "um texto longo demais para meio segundo", None, "s", "pt"),
    ]
    vocab = Vocabulary.from_transcripts(["um texto bom longo demais para meio segundo"])

    def check(utterances, training):
        clips = corpora.Clips(listing.prepare(corpora.Clips.from_records(utterances), "pt"))
        seconds, problems = listing.durations(clips, tmp_path / "cache.json", workers=1)
        return listing.check_split(clips, seconds, problems, vocab, min_seconds=0.0, max_seconds=20.0,
                                   training=training, geometry=WAV2VEC2)

    kept, report = check(utts, training=True)
    assert [u.id for u in kept] == ["ok"] and kept[0].duration == pytest.approx(2.0)
    assert kept[0].text == "um texto bom"  # normalised once, when listed
    assert report["dropped"] == {"missing_file": 1, "unreadable_audio": 1, "too_long": 1,
                                 "empty_transcript": 1, "transcript_longer_than_frames": 1}
    assert report["examples"]["too_long"] == ["long"]
    # dev/test keep infeasible transcripts (they are scored) and count unseen characters
    kept, report = check(utts[4:] + [Utterance("x", utts[0].path, "qwy", None, "s", "pt")], training=False)
    assert [u.id for u in kept] == ["dense", "x"] and report["unk_characters"] == 3


def test_stated_durations_are_not_probed_and_unreadable_clips_are_counted_when_met(tmp_path):
    """With the release's durations no header is read: a missing file is found in its directory's listing,
    a corrupt one when it is loaded, and both end up in the report by reason."""
    sf.write(tmp_path / "ok.wav", np.zeros(16000, dtype=np.float32), 16000)
    (tmp_path / "corrupt.mp3").write_bytes(b"not audio at all" * 10)
    utts = [Utterance(name, str(tmp_path / name), "texto", 1.0, "s", "pt")
            for name in ("ok.wav", "corrupt.mp3", "gone.mp3")]
    clips = corpora.Clips(listing.prepare(corpora.Clips.from_records(utts), "pt"))
    seconds, problems = listing.durations(clips, tmp_path / "cache.json", workers=1)
    assert problems == {2: "missing_file"} and not (tmp_path / "cache.json").exists()  # no header read
    vocab = Vocabulary.from_transcripts(["texto"])
    kept, report = listing.check_split(clips, seconds, problems, vocab, 0.0, 20.0, training=True, geometry=WAV2VEC2)
    assert [u.id for u in kept] == ["ok.wav", "corrupt.mp3"] and report["dropped"] == {"missing_file": 1}
    batch = loading.collate([loading.UtteranceDataset(kept, vocab)[i] for i in range(2)], hop=WAV2VEC2.hop)
    assert batch["ids"] == ["ok.wav"] and batch["dropped"] == [("corrupt.mp3", "unreadable_audio")]
    module = SpeechDataModule.__new__(SpeechDataModule)  # only its report
    module.report, module._met, module.utterances = {"train": report}, {}, {"train": kept}
    module.count_dropped("train", batch["dropped"])
    module.count_dropped("train", batch["dropped"])  # met again next epoch: counted once
    assert report["dropped"] == {"missing_file": 1, "unreadable_audio": 1} and report["kept"] == 1
    assert report["seconds"] == 1.0  # the corrupt clip's second is out of the total


def test_num_workers_auto_is_the_ranks_cores_less_one(monkeypatch):
    """data.num_workers=auto: the cores this process may use, less one for the training loop, at most 8;
    under SLURM the task's --cpus-per-task."""
    import os

    from tests.conftest import data_module

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert data_module("data.num_workers=auto").num_workers == max(1, min(8, cores - 1))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert data_module("data.num_workers=auto").num_workers == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")
    assert data_module("data.num_workers=auto").num_workers == 8
    assert data_module("data.num_workers=2").num_workers == 2
    with pytest.raises(SetupError, match=r"data.num_workers='many': give a number of loader processes"):
        _ = data_module("data.num_workers=many").num_workers


def test_inference_picks_its_loader_workers_by_the_training_rule(monkeypatch):
    """transcribe.py's and align's num_workers=auto is training's rule (`loading.workers`), without a cap: a
    SLURM task's --cpus-per-task less one, else the cores this process may use less one."""
    import os

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")
    assert loading.workers("auto") == 31 and loading.workers("auto", max_workers=8) == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert loading.workers("auto") == 1  # at least one
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    cores = len(os.sched_getaffinity(0))
    assert loading.workers("auto") == max(1, cores - 1) and loading.workers("auto", ranks=cores) == 1
    assert loading.workers(0) == 0 and loading.workers("3") == 3
    with pytest.raises(SetupError, match=r"^num_workers='two': give a number"):
        loading.workers("two")


def test_worker_batches_equal_in_process_batches_and_stay_intact_when_held():
    """Loader workers collate into reused shared-memory buffers (`_SharedPool`); the loader copies each batch
    as it receives it. Two epochs of the demo through 2 workers, every batch held until the end, equal the
    batches collated in this process (no pool), tensor for tensor."""
    from tests.conftest import data_module

    def epochs(workers: int) -> list[dict]:
        module = data_module(f"data.num_workers={workers}", "data.max_batch_seconds=30")
        module.setup("fit")
        loader = module.train_dataloader()
        held = []
        for epoch in range(2):
            loader.batch_sampler.set_epoch(epoch)
            held += list(loader)
        return held

    in_process, workers = epochs(0), epochs(2)
    assert len(workers) == len(in_process) > 2 * (2 + 2)  # twice around each worker's ring (prefetch_factor + 2)
    for a, b in zip(in_process, workers):
        assert a.keys() == b.keys() and a["ids"] == b["ids"] and a["lengths"] == b["lengths"]
        for key in ("audio", "labels"):
            assert torch.equal(a[key], b[key]), key
