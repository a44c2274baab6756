"""The LightningDataModule: corpus splits -> checked utterances -> duration-bucketed padded batches."""

import functools
import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from asr import SetupError
from asr.core import audio, text
from asr.core.frames import Geometry
from asr.data import cache, corpora, mixing
from asr.data.augment import Augment
from asr.data.batching import DurationBatchSampler
from asr.data.listing import characters, check_split, durations, example, format_report, prepare
from asr.data.loading import SpeechLoader, TrainingLoader, UtteranceDataset, _one_thread, collate, workers

log = logging.getLogger(__name__)
LISTING_VERSION = 2  # of the prepared listing's columns; a change makes every cached listing stale


class SpeechDataModule(L.LightningDataModule):
    """Reads a corpus' train/dev/test splits, builds the vocabulary from train, batches by duration.

    Split names are the release's (`train_split`, `dev_split`, `test_split`); a corpus without a dev
    split (Zeroth) gets one carved from train by `dev_speakers` held-out speakers (`dev_split=None`).
    `train_extra` adds release splits to training (Common Voice `validated`) minus dev/test speakers.
    The vocabulary is built from the training transcripts unless one is given (evaluation uses the
    model's own). Every argument comes from conf/data/default.yaml and conf/lang/ (their comments say what
    each does); there are no defaults here. But two come from the call site (`asr.run.training.assemble`,
    `asr.run.evaluation.assemble_evaluation`), as they are the model's: `geometry`, its frames
    (`asr.core.frames`), which the checks and the batch shapes follow; `vocab`, its vocabulary (evaluation, a
    resumed run), or None to build one from the training transcripts.

    Several corpora (`corpora`: a list of {name, lang, root, weight, ...}, `asr.data.mixing`): each is read and
    checked by a SpeechDataModule of its own (`parts`), with its own text rules; the vocabulary is the union of
    their training transcripts, and the splits are their clips together, tagged with the corpus's name (the
    `corpus` column, `batch["corpora"]`). Training draws each corpus's share of an epoch (its weight, or with
    `temperature` T its hours^(1/T)); an epoch has as many clips as the corpora's training splits together.
    corpus, root, language and lang are then the run's own `lang=` and unused but for the model's text rules
    (`language`: the first corpus's). A corpus whose dev split lists no clip gets one carved from its train split
    by `dev_speakers` speakers, as Zeroth's is, and the log says so.
    """

    def __init__(self, corpus: str, root: str | None, language: str, lang: str, train_split: str,
                 dev_split: str | None, test_split: str, train_extra: list[str], dev_speakers: int,
                 columns: dict | None, max_batch_seconds: float, max_batch_size: int | None,
                 eval_max_batch_size: int | None, num_buckets: int, attention_q: float | None, min_seconds: float,
                 max_seconds: float, num_workers: int | str, max_workers: int, prefetch_factor: int, seed: int,
                 cache_dir: str, decode_cache: bool, cache_format: str, augment: dict,
                 corpora: list[dict] | None, temperature: float | None, geometry: Geometry,
                 vocab: text.Vocabulary | None):
        super().__init__()
        # The logger gets the whole run config (train.py); geometry and vocab are the model's, not settings.
        self.save_hyperparameters(ignore=["geometry", "vocab"], logger=False)
        self.splits = {"train": train_split, "dev": dev_split, "test": test_split}
        self.cache_dir = Path(cache_dir).expanduser()
        self.vocab = vocab  # None: built from the training transcripts (`load`)
        self.geometry = geometry  # the model's frame geometry (asr.core.frames)
        self.utterances: dict[str, corpora.Clips] = {}
        self.report: dict[str, dict] = {}
        self._raw: dict[str, corpora.Clips] = {}
        self._release: dict[str, corpora.Clips] = {}
        self.added: dict[str, int] = {}  # train_extra split -> utterances it added
        self._met: dict[str, set[str]] = {}  # split -> ids of clips met unreadable while loading
        self._resume: dict | None = None  # the training loader's position from a checkpoint (load_state_dict)
        self.augment = Augment(**augment, seed=seed)  # of the training clips (conf/augment/); checked here
        self.noise_skipped: dict[str, int] = {}  # noise file -> times it failed to decode (this rank)
        self._sources: list[mixing.Source] | None = None  # several corpora: what data.corpora says
        self._parts: dict[str, SpeechDataModule] | None = None  # several corpora: one module per corpus

    @staticmethod
    def from_config(node, geometry: Geometry, vocab: text.Vocabulary | None = None) -> "SpeechDataModule":
        """The data module a config's `data` node builds (its `_target_`), for the model of this `geometry` and,
        when it has one already (evaluation, a resumed run), this `vocab`: the model's facts go in at construction."""
        return instantiate(node, _partial_=True, _convert_="all")(geometry=geometry, vocab=vocab)

    @property
    def mixed(self) -> bool:
        """Whether this run reads several corpora (`data.corpora`)."""
        return bool(self.hparams.corpora)

    @property
    def sources(self) -> list[mixing.Source]:
        if self._sources is None:
            self._sources = mixing.sources(self.hparams.corpora, self.hparams.temperature)
        return self._sources

    @property
    def parts(self) -> dict[str, "SpeechDataModule"]:
        """One SpeechDataModule per corpus of `data.corpora`, with this module's batching and cache settings and
        no augmentation (the mix's own applies to the training clips together). A corpus whose dev split lists no
        clip gets a dev carved from its train split (said in the log)."""
        if self._parts is None:
            h = dict(self.hparams)
            shared = {k: v for k, v in h.items() if k not in (*mixing.CORPUS_KEYS, "corpora", "temperature", "augment")}
            off = {**h["augment"], "speed_prob": 0.0, "silence_prob": 0.0, "concat_prob": 0.0, "noise_prob": 0.0}
            self._parts = {}
            for source in self.sources:
                part = SpeechDataModule(**shared, **source.settings, augment=off, corpora=None, temperature=None,
                                        geometry=self.geometry, vocab=self.vocab)
                split = part.hparams.dev_split
                if split is not None and not len(part._read(split)):
                    part.hparams.dev_split = part.splits["dev"] = None
                    log.warning("corpus %s: its dev split (%s) lists no clip; its dev is carved from its train split: "
                                "%d speakers held out (data.corpora: dev_speakers)", source.name, split,
                                part.hparams.dev_speakers)
                self._parts[source.name] = part
        return self._parts

    @property
    def language(self) -> str:
        """The text rules of the model's output: `language`, or with several corpora the first corpus's."""
        return self.sources[0].settings["language"] if self.mixed else self.hparams.language

    def scoring(self) -> dict[str, dict] | None:
        """Several corpora: {name: {language, dev_seconds}} for per-corpus validation (`CTCModel`); else None."""
        if not self.mixed:
            return None
        dev = self.report.get("dev", {}).get("corpora", {})
        return {name: {"language": part.hparams.language, "dev_seconds": dev.get(name, {}).get("seconds", 0.0)}
                for name, part in self.parts.items()}

    def check(self) -> str | None:
        """Why this data cannot load (with the override that fixes it), or None: the corpus, then the noise
        folder of augment=noise (missing, empty or unreadable)."""
        if self.mixed:
            try:
                sources = self.sources
            except SetupError as error:
                problems = [str(error)]
            else:
                problems = [f"data.corpora ({s.name}): {p}" for s in sources
                            if (p := corpora.check_root(s.settings["corpus"], s.settings["root"], s.settings["lang"]))]
        else:
            problems = [corpora.check_root(self.hparams.corpus, self.hparams.root, self.hparams.lang)]
        problems.append(self.augment.check())
        return "\n".join(p for p in problems if p) or None

    def _read(self, name: str) -> corpora.Clips:
        """A split as the release names it, read and prepared (`prepare`) once.

        The prepared listing is cached under cache_dir/listings as an Arrow file, keyed by the files the
        split is listed in (path, modification time, size) and the text rules: a later start maps it
        into memory instead of parsing and normalising every row again, and loader workers and ranks
        share its pages.
        """
        if name not in self._release:
            h = self.hparams
            files = corpora.sources(h.corpus, h.root, name)
            cached = None
            if files is not None:
                key = json.dumps([LISTING_VERSION, h.corpus, str(Path(h.root).resolve()), name, h.language,
                                  h.columns, [[str(f), cache.stamp(str(f))] for f in files]])
                cached = self.cache_dir / "listings" / f"{hashlib.sha1(key.encode()).hexdigest()}.arrow"
            if cached is not None and cached.is_file():
                table = cache.read_arrow(cached)
            else:
                table = prepare(corpora.read_split(h.corpus, h.root, name, h.language, h.columns,
                                                   cache_dir=self.cache_dir),
                                h.language)
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
        if self.mixed:
            self._raw[split] = corpora.Clips.concat([part.raw(split) for part in self.parts.values()])
            return self._raw[split]
        h = self.hparams
        if split == "dev" and h.dev_split is None:
            _, self._raw["dev"] = corpora.carve_dev(self._read(h.train_split), h.dev_speakers)
            log.info("dev: %d utterances of %d speakers held out of train", len(self._raw["dev"]), h.dev_speakers)
        elif split == "train":
            train = self._read(h.train_split)
            if h.dev_split is None:
                train, _ = corpora.carve_dev(train, h.dev_speakers)
            if h.train_extra:
                held_out = [self.raw(s) for s in ("dev", "test")]
                speakers = pa.chunked_array([c for part in held_out for c in part.arrow("speaker").chunks])
                ids = [c for part in [*held_out, train] for c in part.arrow("id").chunks]
                parts = [train]
                for name in h.train_extra:
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

    def load(self, split: str) -> corpora.Clips:
        """Checked clips of `split` (train, dev or test); reads and checks once."""
        if self.vocab is None and split != "train":
            self.load("train")  # the vocabulary comes from the training transcripts
        if split not in self.utterances and self.mixed:
            self._load_mix(split)
        if split not in self.utterances:
            h = self.hparams
            raw = self.raw(split)
            if split == "train" and self.vocab is None:
                self.vocab = text.Vocabulary.from_transcripts([characters(raw)])
            seconds, problems = durations(raw, self.cache_dir / "durations" / f"{self.corpus_key}.json",
                                          self.num_workers)
            kept, report = check_split(raw, seconds, problems, self.vocab, h.min_seconds, h.max_seconds,
                                       training=split == "train", geometry=self.geometry)
            if h.decode_cache:
                kept, report = self._decoded(kept, report)
            if split == "train" and self.added:
                report["added_from"] = dict(self.added)
            if split == "train" and self.augment.active and len(kept):
                report["augment"] = self.augment.summary(kept.seconds)
            self.utterances[split], self.report[split] = kept, report
            if not len(kept):
                dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
                raise SetupError(f"no usable utterance in the {split} split of {h.root} (dropped: {dropped})")
            report["batches"] = self.sampler(split).summary()  # the shapes and what padding them costs
        return self.utterances[split]

    def _load_mix(self, split: str) -> None:
        """Several corpora: each corpus's checked clips (its own module), together, with its name in a `corpus`
        column; the report has the totals and each corpus's report under `corpora`."""
        parts = self.parts
        if self.vocab is None:  # the union of the corpora's training transcripts
            self.vocab = text.Vocabulary.from_transcripts([characters(p.raw("train")) for p in parts.values()])
        for part in parts.values():  # the union, known only now
            part.vocab = self.vocab
        kept = {name: part.load(split) for name, part in parts.items()}
        names = next(iter(kept.values())).table.column_names
        tables = [k.table.take(k.rows).select(names) for k in kept.values()]
        table = pa.concat_tables(tables, promote_options="permissive").replace_schema_metadata(None)
        table = table.append_column("corpus",
                                    pa.array([n for n, k in kept.items() for _ in range(len(k))], pa.string()))
        clips = corpora.Clips(table, seconds=np.concatenate([k.seconds for k in kept.values()]))
        reports = {}
        for name, part in parts.items():
            reports[name] = part.report[split]
            reports[name].pop("batches", None)  # the mix is batched together (below)
        report = {"kept": len(clips), "dropped": {}, "examples": {},
                  "unk_characters": sum(r["unk_characters"] for r in reports.values()),
                  "unk_examples": list(dict.fromkeys(c for r in reports.values() for c in r["unk_examples"]))[:10],
                  "seconds": round(float(clips.seconds.sum()), 2)}
        for name, r in reports.items():
            for reason, n in r["dropped"].items():
                report["dropped"][reason] = report["dropped"].get(reason, 0) + n
                report["examples"].setdefault(reason, []).extend(f"{name}: {e}" for e in r["examples"].get(reason, []))
        report["examples"] = {reason: e[:5] for reason, e in report["examples"].items()}
        if split == "train" and self.augment.active:
            report["augment"] = self.augment.summary(clips.seconds)
        report["corpora"] = reports
        self.utterances[split], self.report[split] = clips, report
        sampler = self.sampler(split)
        report["batches"] = sampler.summary()
        if split == "train":  # what each corpus is of an epoch: its weight, and its shares of the drawn clips and audio
            drawn, audio = sampler.drawn_clips(), sampler.drawn_seconds()
            shares = self._shares()
            for c, r in enumerate(reports.values()):
                r["share"] = {"weight": round(float(shares[c]), 4), "clips_per_epoch": int(drawn[c]),
                              "of_clips": round(float(drawn[c] / drawn.sum()), 4),
                              "of_audio": round(float(audio[c] / audio.sum()), 4)}

    def _shares(self) -> np.ndarray:
        """Each corpus's share of the clips of a training epoch (`mixing.shares`), from the checked train split."""
        reports = self.report["train"]["corpora"].values()
        return mixing.shares([r["kept"] for r in reports], [r["seconds"] for r in reports],
                             [s.weight for s in self.sources], self.hparams.temperature)

    def _corpus_index(self, clips: corpora.Clips) -> np.ndarray:
        """Each clip's corpus as its position in `data.corpora` (0, 1, ...)."""
        names = {name: i for i, name in enumerate(self.parts)}
        return np.array([names[n] for n in clips.column("corpus")], dtype=np.int64)

    def _decoded(self, kept: corpora.Clips, report: dict) -> tuple[corpora.Clips, dict]:
        """Point the kept clips at 16 kHz copies; drop and count those that do not decode."""
        copies = cache.decoded_copies(kept.column("path"), self.cache_dir, self.num_workers,
                                      self.hparams.cache_format)
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

    def count_dropped(self, split: str, dropped: list[tuple[str, str]]) -> None:
        """Clips met unreadable while loading (missing, or corrupt past their name where no header was
        read): each counted once in the split's report, by reason, and taken out of its kept count."""
        report, seen = self.report[split], self._met.setdefault(split, set())
        for utt_id, reason in dropped:
            if utt_id not in seen:
                seen.add(utt_id)
                report["dropped"][reason] = report["dropped"].get(reason, 0) + 1
                report["kept"] -= 1
                clips = self.utterances.get(split)
                where = pc.index(clips.arrow("id"), utt_id).as_py() if clips is not None else -1
                if where >= 0:  # its seconds too (rare: a lookup by id)
                    report["seconds"] = round(report["seconds"] - float(clips.seconds[where]), 2)
                    if "corpora" in report:  # several corpora: in its corpus's report too
                        own = report["corpora"][clips.arrow("corpus")[where].as_py()]
                        own["dropped"][reason] = own["dropped"].get(reason, 0) + 1
                        own["kept"] -= 1
                        own["seconds"] = round(own["seconds"] - float(clips.seconds[where]), 2)
                examples = report["examples"].setdefault(reason, [])
                if len(examples) < 5:
                    examples.append(example(utt_id, clips.arrow("path")[where].as_py() if where >= 0 else None, reason))
                report["met_while_loading"] = report.get("met_while_loading", 0) + 1

    @property
    def num_workers(self) -> int:
        """Loader processes per rank: `num_workers` by the one rule of `asr.data.loading.workers` (auto: this
        rank's share of the cores less one, at most `max_workers`), with this run's ranks."""
        return workers(self.hparams.num_workers, self.hparams.max_workers,
                       self.trainer.num_devices if self.trainer else 1, key="data.num_workers")

    @property
    def ring(self) -> int:
        """Shared-memory buffer sets per loader worker (`_SharedPool`): a set is reused after the copy of the
        batch it held, which is at most prefetch_factor + 1 batches behind."""
        return self.hparams.prefetch_factor + 2

    @property
    def corpus_key(self) -> str:
        """The corpus directory's short hash: names its duration cache and its set-up lock."""
        if self.mixed:  # the corpora's directories together
            roots = sorted(str(Path(s.settings["root"]).resolve()) for s in self.sources)
            return hashlib.sha1("\n".join(roots).encode()).hexdigest()[:16]
        return hashlib.sha1(str(Path(self.hparams.root).resolve()).encode()).hexdigest()[:16]

    def setup(self, stage: str | None = None) -> None:
        """Reads and checks train and dev. Processes started together (ranks under srun or torchrun) take
        turns: the first reads headers, decodes and extracts, the others then find it all in the cache."""
        if stage in (None, "fit"):
            with cache.one_at_a_time(self.cache_dir / "locks" / f"{self.corpus_key}.lock"):
                self.load("train")
                self.load("dev")

    def write_report(self, path: str | Path) -> None:
        """data_report.json, and the same as a table in the log."""
        if "noise" in self.report.get("train", {}).get("augment", {}):
            self.report["train"]["augment"]["noise"]["skipped"] = dict(self.noise_skipped)
        Path(path).write_text(json.dumps(self.report, indent=1, ensure_ascii=False))
        log.info("data report (%s):\n%s", path, format_report(self.report))

    def sampler(self, split: str, whole: bool = False) -> DurationBatchSampler:
        """The batch plan of `split` for this rank (`whole`: the whole split, for a rank that evaluates alone):
        fixed shapes from its durations and the budget."""
        utterances = self.load(split)
        training = split == "train"
        h = self.hparams
        world = self.trainer.world_size if self.trainer and not whole else 1
        rank = self.trainer.global_rank if self.trainer and not whole else 0
        size = h.max_batch_size if training or h.eval_max_batch_size is None else h.eval_max_batch_size
        augmented = training and self.augment.active
        # Speed perturbation and silence: a clip lasts its duration / its epoch's factor plus its silence. The
        # plan is made on the longest each clip can last (duration / the slowest factor + the most silence), so
        # every epoch's clips fit their planned shapes and budget, and the batches per epoch stay the same; the
        # cost is padding (docs/augment.md).
        seconds = self.augment.longest(utterances.seconds) if augmented else utterances.seconds
        mix = {}
        if training and self.mixed:  # each corpus's share of an epoch of as many clips as the corpora hold together
            mix = {"corpus": self._corpus_index(utterances), "draws": mixing.apportion(len(utterances), self._shares())}
        return DurationBatchSampler(
            seconds, h.max_batch_seconds, max_batch_size=size, num_buckets=h.num_buckets,
            attention_q=h.attention_q, seed=h.seed, shuffle=training, num_replicas=world, rank=rank,
            tag_epoch=augmented, audio_seconds=self.augment.expected(utterances.seconds) if augmented else None,
            geometry=self.geometry, **mix)

    def dataloader(self, split: str, whole: bool = False) -> DataLoader:
        """The loader of `split`: this rank's batches, or with `whole` every batch of the split (`sampler`)."""
        training = split == "train"
        sampler = self.sampler(split, whole)
        if training and self._resume is not None:
            sampler.load_state_dict(self._resume)
            self._resume = None
        workers = self.num_workers
        return (TrainingLoader if training else SpeechLoader)(
            UtteranceDataset(self.load(split), self.vocab, self.augment if training else None), batch_sampler=sampler,
            collate_fn=functools.partial(collate, ring=self.ring if workers else 0, hop=self.geometry.hop),
            # kept between epochs, and between evaluations (Lightning reuses the dev loader)
            num_workers=workers, persistent_workers=workers > 0,
            prefetch_factor=self.hparams.prefetch_factor if workers else None,
            worker_init_fn=_one_thread, pin_memory=torch.cuda.is_available(),
        )

    def state_dict(self) -> dict:
        """The training loader's position, in every checkpoint: the epoch and the number of batches the
        training loop has processed in it, which Lightning counts (the sampler itself runs ahead by what
        the workers and Lightning prefetch, and may already be in the next epoch)."""
        if self.trainer is None:
            return {}
        return {"epoch": self.trainer.current_epoch,
                "position": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                **({"noise_skipped": dict(self.noise_skipped)} if self.augment.noise_prob > 0 else {})}

    def load_state_dict(self, state: dict) -> None:
        """A resumed run continues with exactly the next batch. Lightning restores the datamodule before it
        builds the loaders, so the position is handed to the training sampler when it is made (a loader's
        own state would come too late: Lightning builds the training loader early, to count the steps of
        the schedule, and then never applies it)."""
        self._resume = state or None
        self.noise_skipped = dict((state or {}).get("noise_skipped", {}))

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Counts the noise files that failed to decode in a training batch (its clips stayed clean): the data
        report's `augment.noise.skipped`, per file (this rank's count)."""
        for name in batch.get("noise_skipped", ()):
            self.noise_skipped[name] = self.noise_skipped.get(name, 0) + 1
        return batch

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("dev")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def audio_seconds(self, split: str) -> float:
        return float(self.load(split).seconds.sum())

