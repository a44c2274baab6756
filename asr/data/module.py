"""The LightningDataModule: corpus splits -> checked utterances -> duration-bucketed padded batches."""

import functools
import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from asr import SetupError
from asr.core import text
from asr.core.frames import Geometry
from asr.data import cache, corpora, mixing
from asr.data.augment import Augment
from asr.data.batching import DurationBatchSampler
from asr.data.corpus import Corpus
from asr.data.listing import characters, example, format_report
from asr.data.loading import SpeechLoader, TrainingLoader, UtteranceDataset, _one_thread, collate, workers

log = logging.getLogger(__name__)


class SpeechDataModule(L.LightningDataModule):
    """Reads a mix of corpora, builds the vocabulary from their training transcripts, batches by duration.

    The corpora are `corpora` (a list of {name, lang, root, weight, ...}, `asr.data.mixing`), or without it the
    run's own corpus (`corpus`, `root`, `language`, `lang` and the split names of its `lang=`): a mix of one, named
    by its lang. Each corpus is read and checked on its own (`parts`: `asr.data.corpus.Corpus`), with its own
    reader and text rules; the vocabulary is the union of their training transcripts, and a split is their
    checked clips together, each tagged with its corpus (`batch["corpora"]`). Training draws each corpus's
    share of an epoch (its weight, or with `temperature` T its hours^(1/T); by default every clip once); an
    epoch has as many clips as the corpora's training splits together. The model's text rules are the first
    corpus's (`language`). A corpus of data.corpora whose dev split lists no clip gets one carved from its train
    split by `dev_speakers` speakers, as Zeroth's is, and the log says so. Reports and logs show each corpus of
    data.corpora on its own (`shown`); a single data.root is the run's whole.

    Every argument comes from conf/data/default.yaml and conf/lang/ (their comments say what each does); there
    are no defaults here. But two come from the call site (`asr.run.training.assemble`,
    `asr.run.evaluation.assemble_evaluation`), as they are the model's: `geometry`, its frames
    (`asr.core.frames`), which the checks and the batch shapes follow; `vocab`, its vocabulary (evaluation, a
    resumed run), or None to build one from the training transcripts.
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
        self.cache_dir = Path(cache_dir).expanduser()
        self.vocab = vocab  # None: built from the training transcripts (`load`)
        self.geometry = geometry  # the model's frame geometry (asr.core.frames)
        self.utterances: dict[str, corpora.Clips] = {}
        self.report: dict[str, dict] = {}
        self._corpus_of: dict[str, np.ndarray] = {}  # split -> each clip's corpus, as its place in `parts`
        self._met: dict[str, set[str]] = {}  # split -> ids of clips met unreadable while loading
        self._resume: dict | None = None  # the training loader's position from a checkpoint (load_state_dict)
        self.augment = Augment(**augment, seed=seed)  # of the training clips (conf/augment/); checked here
        self.noise_skipped: dict[str, int] = {}  # noise file -> times it failed to decode (this rank)
        self._sources: list[mixing.Source] | None = None
        self._parts: dict[str, Corpus] | None = None

    @staticmethod
    def from_config(node, geometry: Geometry, vocab: text.Vocabulary | None = None) -> "SpeechDataModule":
        """The data module a config's `data` node builds (its `_target_`), for the model of this `geometry` and,
        when it has one already (evaluation, a resumed run), this `vocab`: the model's facts go in at construction."""
        return instantiate(node, _partial_=True, _convert_="all")(geometry=geometry, vocab=vocab)

    @property
    def sources(self) -> list[mixing.Source]:
        """The corpora of this run: `data.corpora`, or the run's own corpus (a mix of one)."""
        if self._sources is None:
            self._sources = mixing.sources(self.hparams.corpora, self.hparams.temperature, dict(self.hparams))
        return self._sources

    @property
    def parts(self) -> dict[str, Corpus]:
        """One `Corpus` per corpus of the run, with this run's checks and caches. A corpus of data.corpora whose dev
        split lists no clip gets a dev carved from its train split (said in the log)."""
        if self._parts is None:
            h = self.hparams
            self._parts = {s.name: Corpus(s.name, s.settings, cache_dir=self.cache_dir, min_seconds=h.min_seconds,
                                          max_seconds=h.max_seconds, decode_cache=h.decode_cache,
                                          cache_format=h.cache_format, geometry=self.geometry, listed=s.listed)
                           for s in self.sources}
            for part in self._parts.values():
                if part.listed:  # the run's own corpus keeps the dev split it names (an empty one stops the run)
                    part.carve_empty_dev()
        return self._parts

    @property
    def shown(self) -> dict[str, Corpus]:
        """The corpora whose figures reports, logs and metrics show one by one: those of data.corpora (a single
        data.root is the run's whole)."""
        return {name: part for name, part in self.parts.items() if part.listed}

    @property
    def language(self) -> str:
        """The text rules of the model's output: the first corpus's."""
        return self.sources[0].settings["language"]

    def scoring(self) -> dict[str, dict]:
        """{name: {language, dev_seconds}} of each corpus, for scoring each under its own text rules (validation,
        `asr.model.metrics.CorpusErrors`)."""
        return {name: {"language": part.language, "dev_seconds": part.report.get("dev", {}).get("seconds", 0.0)}
                for name, part in self.parts.items()}

    def check(self) -> str | None:
        """Why this data cannot load (with the override that fixes it), or None: each corpus, then the noise
        folder of augment=noise (missing, empty or unreadable)."""
        try:
            sources = self.sources
        except SetupError as error:
            problems = [str(error)]
        else:
            problems = [f"{s.where}{p}" for s in sources
                        if (p := corpora.check_root(s.settings["corpus"], s.settings["root"], s.settings["lang"]))]
        problems.append(self.augment.check())
        return "\n".join(p for p in problems if p) or None

    def raw(self, split: str) -> corpora.Clips:
        """Clips of `split` (train, dev or test) as the releases list them (transcripts normalised), before any
        check: every corpus's together."""
        return corpora.Clips.concat([part.raw(split) for part in self.parts.values()])

    def load(self, split: str) -> corpora.Clips:
        """Checked clips of `split` (train, dev or test), every corpus's; reads and checks once. The report has the
        totals, and with several corpora each corpus's report under `corpora`."""
        if split in self.utterances:
            return self.utterances[split]
        parts = self.parts
        if self.vocab is None:  # the union of the corpora's training transcripts
            self.vocab = text.Vocabulary.from_transcripts([characters(p.raw("train")) for p in parts.values()])
        kept = {name: part.load(split, self.vocab, self.num_workers) for name, part in parts.items()}
        clips = corpora.Clips.join(list(kept.values()))
        report = mixing.merged({name: part.report[split] for name, part in parts.items()}, bool(self.shown))
        if split == "train" and self.augment.active:
            report["augment"] = self.augment.summary(clips.seconds)
        self._corpus_of[split] = np.repeat(np.arange(len(kept), dtype=np.int32), [len(k) for k in kept.values()])
        self.utterances[split], self.report[split] = clips, report
        sampler = self.sampler(split)
        report["batches"] = sampler.summary()  # the shapes and what padding them costs
        if split == "train":  # what each corpus is of an epoch: its weight, and its shares of the drawn clips and audio
            drawn, audio_drawn = sampler.drawn_clips(), sampler.drawn_seconds()
            shares = self._shares()
            for c, r in enumerate(report.get("corpora", {}).values()):
                r["share"] = {"weight": round(float(shares[c]), 4), "clips_per_epoch": int(drawn[c]),
                              "of_clips": round(float(drawn[c] / drawn.sum()), 4),
                              "of_audio": round(float(audio_drawn[c] / audio_drawn.sum()), 4)}
        return clips

    def _shares(self) -> np.ndarray:
        """Each corpus's share of the clips of a training epoch (`mixing.shares`), from the checked train split."""
        reports = [part.report["train"] for part in self.parts.values()]
        return mixing.shares([r["kept"] for r in reports], [r["seconds"] for r in reports],
                             [s.weight for s in self.sources], self.hparams.temperature)

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
                        own = list(report["corpora"].values())[self._corpus_of[split][where]]
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
        """The corpora's directories together, as a short hash: names the set-up lock."""
        roots = sorted(str(Path(s.settings["root"]).resolve()) for s in self.sources)
        return hashlib.sha1("\n".join(roots).encode()).hexdigest()[:16]

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
        # training: each corpus's share of an epoch of as many clips as the corpora hold together
        mix = {"corpus": self._corpus_of[split], "draws": mixing.apportion(len(utterances), self._shares())
               } if training else {}
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
            UtteranceDataset(self.load(split), self.vocab, self.augment if training else None,
                             corpus_of=(list(self.parts), self._corpus_of[split])), batch_sampler=sampler,
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

