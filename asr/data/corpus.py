"""One corpus of a run: its train, dev and test splits read from the release, prepared and checked, each once.

A run reads a mix of corpora (`asr.data.module.SpeechDataModule`); a single `data.root` is a mix of one. Each
corpus keeps its own reader, text rules, split names and report; the mix joins their checked clips.
"""

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from asr import SetupError
from asr.core import audio, text
from asr.core.frames import Geometry
from asr.data import cache, corpora
from asr.data.listing import check_split, durations, prepare

log = logging.getLogger(__name__)
LISTING_VERSION = 2  # of the prepared listing's columns; a change makes every cached listing stale


class Corpus:
    """One corpus: `settings` are its reader's (`asr.data.mixing.CORPUS_KEYS`: corpus, root, language, split
    names, dev_speakers, train_extra, columns); the checks (`min_seconds`, `max_seconds`), the caches and the
    model's `geometry` are the run's.

    Split names are the release's; a corpus without a dev split (Zeroth, `dev_split: null`) gets one carved from
    train by `dev_speakers` held-out speakers. `train_extra` adds release splits to training (Common Voice
    `validated`) minus dev/test speakers and repeats.
    """

    def __init__(self, name: str, settings: dict, *, cache_dir: Path, min_seconds: float, max_seconds: float,
                 decode_cache: bool, cache_format: str, geometry: Geometry, listed: bool):
        self.name, self.listed = name, listed  # listed: an entry of data.corpora, shown on its own
        self.corpus, self.root, self.language, self.lang = (settings[k] for k in ("corpus", "root", "language", "lang"))
        self.train_split, self.dev_split, self.test_split = (settings[k] for k in ("train_split", "dev_split",
                                                                                   "test_split"))
        self.dev_speakers, self.train_extra, self.columns = (settings[k] for k in ("dev_speakers", "train_extra",
                                                                                   "columns"))
        self.cache_dir, self.geometry = cache_dir, geometry
        self.min_seconds, self.max_seconds = min_seconds, max_seconds
        self.decode_cache, self.cache_format = decode_cache, cache_format
        self.clips: dict[str, corpora.Clips] = {}  # checked, per split (train, dev, test)
        self.report: dict[str, dict] = {}
        self.added: dict[str, int] = {}  # train_extra split -> utterances it added
        self._raw: dict[str, corpora.Clips] = {}
        self._release: dict[str, corpora.Clips] = {}

    @property
    def splits(self) -> dict[str, str | None]:
        return {"train": self.train_split, "dev": self.dev_split, "test": self.test_split}

    @property
    def key(self) -> str:
        """The corpus directory's short hash: names its duration cache."""
        return hashlib.sha1(str(Path(self.root).resolve()).encode()).hexdigest()[:16]

    def carve_empty_dev(self) -> None:
        """A dev split that lists no clip is replaced by one carved from train (`dev_speakers`), said in the log."""
        split = self.dev_split
        if split is not None and not len(self._read(split)):
            self.dev_split = None
            log.warning("corpus %s: its dev split (%s) lists no clip; its dev is carved from its train split: %d "
                        "speakers held out (data.corpora: dev_speakers)", self.name, split, self.dev_speakers)

    def _read(self, name: str) -> corpora.Clips:
        """A split as the release names it, read and prepared (`prepare`) once.

        The prepared listing is cached under cache_dir/listings as an Arrow file, keyed by the files the
        split is listed in (path, modification time, size) and the text rules: a later start maps it
        into memory instead of parsing and normalising every row again, and loader workers and ranks
        share its pages.
        """
        if name not in self._release:
            files = corpora.sources(self.corpus, self.root, name)
            cached = None
            if files is not None:
                key = json.dumps([LISTING_VERSION, self.corpus, str(Path(self.root).resolve()), name, self.language,
                                  self.columns, [[str(f), cache.stamp(str(f))] for f in files]])
                cached = self.cache_dir / "listings" / f"{hashlib.sha1(key.encode()).hexdigest()}.arrow"
            if cached is not None and cached.is_file():
                table = cache.read_arrow(cached)
            else:
                table = prepare(corpora.read_split(self.corpus, self.root, name, self.language, self.columns,
                                                   cache_dir=self.cache_dir),
                                self.language)
                if cached is not None:
                    cache.write_arrow(table, cached)
                    table = cache.read_arrow(cached)  # mapped, as on a later start: pages shared by workers
            self._release[name] = corpora.Clips(table)
        return self._release[name]

    def raw(self, split: str) -> corpora.Clips:
        """Clips of `split` (train, dev or test) as the release lists them (transcripts normalised), before
        any check."""
        if split in self._raw:
            return self._raw[split]
        if split == "dev" and self.dev_split is None:
            _, self._raw["dev"] = corpora.carve_dev(self._read(self.train_split), self.dev_speakers)
            log.info("dev: %d utterances of %d speakers held out of train", len(self._raw["dev"]), self.dev_speakers)
        elif split == "train":
            train = self._read(self.train_split)
            if self.dev_split is None:
                train, _ = corpora.carve_dev(train, self.dev_speakers)
            if self.train_extra:
                held_out = [self.raw(s) for s in ("dev", "test")]
                speakers = pa.chunked_array([c for part in held_out for c in part.arrow("speaker").chunks])
                ids = [c for part in [*held_out, train] for c in part.arrow("id").chunks]
                parts = [train]
                for name in self.train_extra:
                    extra = corpora.without_speakers(self._read(name), speakers, pa.chunked_array(ids, pa.string()))
                    ids += extra.arrow("id").chunks
                    log.info("train: %d utterances added from %s (dev/test speakers and repeats left out)",
                             len(extra), name)
                    parts.append(extra)
                    self.added[name] = len(extra)
                train = corpora.Clips.concat(parts)
            self._raw["train"] = train
        else:
            self._raw[split] = self._read(self.splits[split])
        return self._raw[split]

    def load(self, split: str, vocab: text.Vocabulary, workers: int) -> corpora.Clips:
        """Checked clips of `split` under `vocab`, read and checked once (`workers` processes read headers and
        decode); SetupError when none is usable."""
        if split not in self.clips:
            raw = self.raw(split)
            seconds, problems = durations(raw, self.cache_dir / "durations" / f"{self.key}.json", workers)
            kept, report = check_split(raw, seconds, problems, vocab, self.min_seconds, self.max_seconds,
                                       training=split == "train", geometry=self.geometry)
            if self.decode_cache:
                kept, report = self._decoded(kept, report, workers)
            if split == "train" and self.added:
                report["added_from"] = dict(self.added)
            if not len(kept):
                dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
                raise SetupError(f"no usable utterance in the {split} split of {self.root} (dropped: {dropped})")
            self.clips[split], self.report[split] = kept, report
        return self.clips[split]

    def _decoded(self, kept: corpora.Clips, report: dict, workers: int) -> tuple[corpora.Clips, dict]:
        """Point the kept clips at 16 kHz copies; drop and count those that do not decode."""
        copies = cache.decoded_copies(kept.column("path"), self.cache_dir, workers, self.cache_format)
        readable = np.array([c is not None for c in copies], dtype=bool)
        if not readable.all():
            failed = pa.array(~readable)
            ids, paths = kept.arrow("id").filter(failed).to_pylist(), kept.arrow("path").filter(failed).to_pylist()
            for utt_id, path in zip(ids, paths):
                why, message = audio.problem(path)
                report["dropped"][why] = report["dropped"].get(why, 0) + 1
                if len(report["examples"].setdefault(why, [])) < 5:
                    report["examples"][why].append(f"{utt_id}: {message}")
        table = kept.table.take(kept.rows).filter(pa.array(readable))
        table = table.set_column(table.column_names.index("path"), "path",
                                 pa.array([c for c in copies if c is not None], pa.string()))
        kept = corpora.Clips(table, seconds=kept.seconds[readable])
        report["kept"] = len(kept)
        report["seconds"] = round(float(kept.seconds.sum()), 2)
        return kept, report
