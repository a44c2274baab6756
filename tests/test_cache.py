"""Caches of the one-time data work: clip durations from headers, prepared listings, 16 kHz decode copies."""

import os
from pathlib import Path

import numpy as np
import soundfile as sf

from asr.core import audio
from asr.data import cache, corpora
from asr.tools import synth
from tests.conftest import data_module


def test_duration_cache_reads_each_header_once(tmp_path, monkeypatch):
    clips = []
    for n in range(3):
        sf.write(tmp_path / f"{n}.wav", np.zeros(16000 * (n + 1), dtype=np.float32), 16000)
        clips.append(str(tmp_path / f"{n}.wav"))
    index = tmp_path / "cache" / "durations.json"
    assert cache.durations(clips + [str(tmp_path / "gone.wav")], index, workers=1) == [1.0, 2.0, 3.0, audio.MISSING]
    opened = []
    monkeypatch.setattr(cache, "_header_seconds", lambda p: opened.append(p) or 9.0)
    assert cache.durations(clips, index, workers=1) == [1.0, 2.0, 3.0] and opened == []
    sf.write(clips[1], np.zeros(8000, dtype=np.float32), 16000)  # replaced: new size and time
    os.utime(clips[1], ns=(1, 1))
    assert cache.durations(clips, index, workers=1) == [1.0, 9.0, 3.0] and opened == [clips[1]]


def test_decode_cache_makes_16khz_copies_once_and_drops_what_does_not_decode(tmp_path):
    t = np.arange(48000 * 2) / 48000
    synth.write_mp3(tmp_path / "a.mp3", (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32))
    (tmp_path / "bad.mp3").write_bytes(b"ID3" + bytes(300))
    copies = cache.decoded_copies([str(tmp_path / "a.mp3"), str(tmp_path / "bad.mp3")], tmp_path / "c", workers=1,
                                  format="flac")
    assert copies[1] is None
    info = sf.info(copies[0])
    assert info.samplerate == 16000 and info.subtype == "PCM_16" and info.format == "FLAC"
    original, copy = audio.load(str(tmp_path / "a.mp3")), audio.load(copies[0])
    assert len(copy) == len(original) and np.abs(copy - original).max() < 1e-3
    stamp = os.stat(copies[0]).st_mtime_ns
    assert cache.decoded_copies([str(tmp_path / "a.mp3")], tmp_path / "c", workers=1, format="flac") == copies[:1]
    assert os.stat(copies[0]).st_mtime_ns == stamp


# --- Common Voice with the defects users meet, through a real training run ------------------------


def test_decode_cache_trains_on_16khz_copies(cv_corpus, tmp_path):
    data = data_module("lang=pt", f"data.root={cv_corpus}", "data.num_workers=1", "data.decode_cache=true",
                       "data.cache_format=wav", f"data.cache_dir={tmp_path}")
    train = data.load("train")
    assert all(Path(u.path).is_relative_to(tmp_path / "audio16k") and u.path.endswith(".wav") for u in train)
    assert all(sf.info(u.path).samplerate == 16000 for u in train)
    original = corpora.read_common_voice(cv_corpus, "train", "pt")[0]
    assert len(audio.load(train[0].path)) == len(audio.load(original.path))
    batch = next(iter(data.dataloader("train")))
    assert batch["audio"].shape[0] >= 1 and batch["skipped"] == 0


def test_a_listing_is_prepared_once_and_again_when_its_files_change(cv_corpus, tmp_path):
    """The prepared listing is cached under the stamps of the files it comes from: a second start maps the
    cache instead of parsing and normalising the TSV, and an edited TSV is read anew."""
    import shutil
    root, cache_dir = tmp_path / "pt", tmp_path / "cache"
    shutil.copytree(cv_corpus, root)

    def first_transcript() -> str:
        return data_module("lang=pt", f"data.root={root}", f"data.cache_dir={cache_dir}").raw("train")[0].text

    before = first_transcript()
    assert len(list((cache_dir / "listings").glob("*.arrow"))) == 1
    tsv = root / "train.tsv"
    header, row, *rows = tsv.read_text(encoding="utf-8").splitlines()
    fields = row.split("\t")
    fields[3] = "a" * len(fields[3].encode())  # same size in bytes
    stamp = tsv.stat()
    tsv.write_text("\n".join([header, "\t".join(fields), *rows]) + "\n", encoding="utf-8")
    os.utime(tsv, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert first_transcript() == before  # same stamp: the cached listing answers
    os.utime(tsv, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    assert first_transcript() == "a" * len(fields[3])  # edited: read and prepared again
