"""The LightningDataModule: corpus splits -> checked utterances -> duration-bucketed padded batches."""

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from asr import SetupError, audio, cache, corpora, text
from asr.batching import DurationBatchSampler
from asr.corpora import Utterance

log = logging.getLogger(__name__)


class UtteranceDataset(Dataset):
    """Decodes one clip per item: 16 kHz normalised audio, normalised transcript and its label ids.

    A clip that fails to decode (corrupt past its header) gives None: `collate` leaves it out and
    counts it, so one bad file never stops a long run.
    """

    def __init__(self, utterances: list[Utterance], vocab: text.Vocabulary, language: str | None = None):
        self.utterances, self.vocab, self.language = utterances, vocab, language

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, i: int) -> dict | None:
        utt = self.utterances[i]
        try:
            wave = audio.normalize(audio.load(utt.path))
        except Exception as error:  # libsndfile raises several types
            log.warning("skipping %s: %s does not decode (%s)", utt.id, utt.path, error)
            return None
        transcript = text.normalize(utt.text, self.language)
        return {"id": utt.id, "audio": wave, "text": transcript, "labels": self.vocab.encode(transcript),
                "language": utt.language}


def collate(items: list[dict | None]) -> dict | None:
    """Pad a batch. audio: (B, S) float32 at 16 kHz; attention_mask: (B, S) 1 on real samples;
    labels: (B, L) ids padded with -100 (ignored by the CTC loss). lengths (samples) and label_lengths
    are host lists, which Lightning leaves on the host: the loss needs them there. Clips that failed to decode (None)
    are left out and counted in `skipped`; a batch of nothing but those is None."""
    skipped = sum(item is None for item in items)
    items = [item for item in items if item is not None]
    if not items:
        return None
    lengths = [len(item["audio"]) for item in items]
    batch_audio = torch.zeros(len(items), max(lengths))
    mask = torch.zeros(len(items), max(lengths), dtype=torch.long)
    labels = torch.full((len(items), max(1, max(len(x["labels"]) for x in items))), -100)
    for i, item in enumerate(items):
        batch_audio[i, : lengths[i]] = torch.from_numpy(item["audio"])
        mask[i, : lengths[i]] = 1
        labels[i, : len(item["labels"])] = torch.tensor(item["labels"], dtype=torch.long)
    return {
        "audio": batch_audio,
        "attention_mask": mask,
        "labels": labels,
        "lengths": lengths,
        "label_lengths": [len(item["labels"]) for item in items],
        "ids": [item["id"] for item in items],
        "texts": [item["text"] for item in items],
        "languages": [item.get("language", "") for item in items],
        # seconds, as host floats so that logging them never waits on the GPU
        "audio_seconds": sum(lengths) / audio.SAMPLE_RATE,
        "padded_seconds": len(items) * max(lengths) / audio.SAMPLE_RATE,
        "skipped": skipped,
    }


def ctc_feasible(labels: list[int], seconds: float) -> bool:
    """CTC needs a frame per label plus a blank between repeated labels."""
    repeats = sum(a == b for a, b in zip(labels, labels[1:]))
    return len(labels) + repeats <= audio.encoder_frames(int(seconds * audio.SAMPLE_RATE))


def check_split(utterances: list[Utterance], probed: list[float | str], vocab: text.Vocabulary,
                language: str | None, min_seconds: float, max_seconds: float,
                training: bool) -> tuple[list[Utterance], dict]:
    """Drop and count what cannot train or be scored; the run goes on with the rest.

    probed: per utterance, seconds read from its header or why it cannot be read (`asr.cache.durations`).
    Transcripts longer than the encoder's frames (infinite CTC loss) are dropped from training only:
    in dev and test they are scored, as any other utterance, and unseen characters count as `[UNK]`.

    Returns the kept utterances (with durations filled in) and a report
    {"kept": n, "dropped": {reason: n}, "examples": {reason: [ids]}, "unk_characters": n, "seconds": s}.
    """
    kept, dropped, examples = [], Counter(), defaultdict(list)
    unk = 0

    def drop(reason, utt):
        dropped[reason] += 1
        if len(examples[reason]) < 5:
            examples[reason].append(utt.id)

    for utt, header in zip(utterances, probed, strict=True):
        if isinstance(header, str):  # missing or unreadable
            drop(header, utt)
            continue
        seconds = utt.duration if utt.duration is not None else header  # the release's figure first
        transcript = text.normalize(utt.text, language)
        if seconds < min_seconds:
            drop("too_short", utt)
        elif seconds > max_seconds:
            drop("too_long", utt)
        elif not transcript:
            drop("empty_transcript", utt)
        elif training and not ctc_feasible(vocab.encode(transcript), seconds):
            drop("transcript_longer_than_frames", utt)
        else:
            unk += vocab.encode(transcript).count(vocab.unk_id)
            kept.append(replace(utt, duration=seconds))
    report = {"kept": len(kept), "dropped": dict(dropped), "examples": dict(examples), "unk_characters": unk,
              "seconds": round(sum(u.duration for u in kept), 2)}
    return kept, report


def format_report(report: dict[str, dict]) -> str:
    """The data report as a short table: one row per split, one column per drop reason."""
    reasons = sorted({r for split in report.values() for r in split["dropped"]})
    header = ["split", "kept", "hours", *reasons, "[UNK] chars"]
    rows = [[split, r["kept"], f"{r['seconds'] / 3600:.2f}", *(r["dropped"].get(k, 0) for k in reasons), r["unk_characters"]]
            for split, r in report.items()]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(x).rjust(w) for x, w in zip(line, widths)) for line in [header, *rows])


class SpeechDataModule(L.LightningDataModule):
    """Reads a corpus' train/dev/test splits, builds the vocabulary from train, batches by duration.

    Split names are the release's (`train_split`, `dev_split`, `test_split`); a corpus without a dev
    split (Zeroth) gets one carved from train by `dev_speakers` held-out speakers (`dev_split=None`).
    `train_extra` adds release splits to training (Common Voice `validated`) minus dev/test speakers.
    The vocabulary is built from the training transcripts unless one is given (evaluation uses the
    model's own). Every argument comes from conf/data/default.yaml and conf/lang/ (their comments say what
    each does); there are no defaults here.
    """

    def __init__(self, corpus: str, root: str | None, language: str, lang: str, train_split: str,
                 dev_split: str | None, test_split: str, train_extra: list[str], dev_speakers: int,
                 columns: dict | None, max_batch_seconds: float, max_batch_size: int | None,
                 eval_max_batch_size: int | None, num_buckets: int, attention_q: float | None, min_seconds: float,
                 max_seconds: float, num_workers: int, seed: int, cache_dir: str, decode_cache: bool,
                 cache_format: str):
        super().__init__()
        self.save_hyperparameters()
        self.splits = {"train": train_split, "dev": dev_split, "test": test_split}
        self.cache_dir = Path(cache_dir).expanduser()
        self.vocab: text.Vocabulary | None = None
        self.utterances: dict[str, list[Utterance]] = {}
        self.report: dict[str, dict] = {}
        self._raw: dict[str, list[Utterance]] = {}
        self._release: dict[str, list[Utterance]] = {}
        self.added: dict[str, int] = {}  # train_extra split -> utterances it added

    def check(self) -> str | None:
        """Why this data cannot load (with the override that fixes it), or None."""
        return corpora.check_root(self.hparams.corpus, self.hparams.root, self.hparams.lang)

    def _read(self, name: str) -> list[Utterance]:
        """A split as the release names it, read once."""
        if name not in self._release:
            h = self.hparams
            self._release[name] = corpora.read_split(h.corpus, h.root, name, h.language, h.columns, self.cache_dir)
        return self._release[name]

    def raw(self, split: str) -> list[Utterance]:
        """Utterances of `split` (train, dev or test) as the release lists them, before any check."""
        if split in self._raw:
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
                held_out = [u for s in ("dev", "test") for u in self.raw(s)]
                speakers, ids = {u.speaker for u in held_out}, {u.id for u in held_out + train}
                for name in h.train_extra:
                    extra = corpora.without_speakers(self._read(name), speakers, ids)
                    ids |= {u.id for u in extra}
                    log.info("train: %d utterances added from %s (dev/test speakers and repeats left out)",
                             len(extra), name)
                    train = train + extra
                    self.added[name] = len(extra)
            self._raw["train"] = train
        else:
            self._raw[split] = self._read(self.splits[split])
        return self._raw[split]

    def load(self, split: str) -> list[Utterance]:
        """Checked utterances of `split` (train, dev or test); reads and checks once (durations cached)."""
        if self.vocab is None and split != "train":
            self.load("train")  # the vocabulary comes from the training transcripts
        if split not in self.utterances:
            h = self.hparams
            raw = self.raw(split)
            if split == "train" and self.vocab is None:
                self.vocab = text.Vocabulary.from_transcripts(
                    filter(None, (text.normalize(u.text, h.language) for u in raw)))
            key = hashlib.sha1(str(Path(h.root).resolve()).encode()).hexdigest()[:16]
            probed = cache.durations([u.path for u in raw], self.cache_dir / "durations" / f"{key}.json",
                                     h.num_workers)
            kept, report = check_split(raw, probed, self.vocab, h.language, h.min_seconds, h.max_seconds,
                                       training=split == "train")
            if h.decode_cache:
                kept, report = self._decoded(kept, report)
            if split == "train" and self.added:
                report["added_from"] = dict(self.added)
            self.utterances[split], self.report[split] = kept, report
            if not kept:
                dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
                raise SetupError(f"no usable utterance in the {split} split of {h.root} (dropped: {dropped})")
        return self.utterances[split]

    def _decoded(self, kept: list[Utterance], report: dict) -> tuple[list[Utterance], dict]:
        """Point the kept utterances at 16 kHz copies; drop and count those that do not decode."""
        copies = cache.decoded_copies([u.path for u in kept], self.cache_dir, self.hparams.num_workers,
                                      self.hparams.cache_format)
        unreadable = [u for u, c in zip(kept, copies) if c is None]
        if unreadable:
            report["dropped"][cache.UNREADABLE] = report["dropped"].get(cache.UNREADABLE, 0) + len(unreadable)
            report["examples"].setdefault(cache.UNREADABLE, []).extend(u.id for u in unreadable[:5])
        kept = [replace(u, path=c) for u, c in zip(kept, copies) if c is not None]
        report["kept"] = len(kept)
        report["seconds"] = round(sum(u.duration for u in kept), 2)
        return kept, report

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.load("train")
            self.load("dev")

    def write_report(self, path: str | Path) -> None:
        """data_report.json, and the same as a table in the log."""
        Path(path).write_text(json.dumps(self.report, indent=1, ensure_ascii=False))
        log.info("data report (%s):\n%s", path, format_report(self.report))

    def dataloader(self, split: str) -> DataLoader:
        utterances = self.load(split)
        training = split == "train"
        h = self.hparams
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        size = h.max_batch_size if training or h.eval_max_batch_size is None else h.eval_max_batch_size
        sampler = DurationBatchSampler(
            [u.duration for u in utterances], h.max_batch_seconds, max_batch_size=size, num_buckets=h.num_buckets,
            attention_q=h.attention_q, seed=h.seed, shuffle=training, num_replicas=world, rank=rank,
        )
        workers = h.num_workers
        return (ResumableLoader if training else DataLoader)(
            UtteranceDataset(utterances, self.vocab, h.language), batch_sampler=sampler, collate_fn=collate,
            num_workers=workers, persistent_workers=training and workers > 0,
            worker_init_fn=_one_thread, pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        loader = self.dataloader("train")
        loader.trainer = self.trainer  # its checkpointed position is the loop's count of batches
        return loader

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("dev")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def audio_seconds(self, split: str) -> float:
        return float(np.sum([u.duration for u in self.load(split)]))


class ResumableLoader(DataLoader):
    """The training loader, checkpointed with the run: Lightning saves and restores the state of loaders
    that have `state_dict` / `load_state_dict`, so a run resumed mid-epoch continues with the next batch.

    The position saved is the number of batches the training loop has processed this epoch, which
    Lightning counts; the batch sampler itself runs ahead by what the workers and Lightning prefetch
    (and may already be in the next epoch).
    """

    def state_dict(self) -> dict:
        state = self.batch_sampler.state_dict()
        trainer = getattr(self, "trainer", None)
        if trainer is not None:  # the sampler may already be in the next epoch
            state = {"epoch": trainer.current_epoch,
                     "position": trainer.fit_loop.epoch_loop.batch_progress.current.processed}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


def _one_thread(_worker_id: int) -> None:
    # Each loader worker decodes one clip at a time; torch's intra-op threads would only contend.
    torch.set_num_threads(1)
