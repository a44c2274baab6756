"""The LightningDataModule: corpus splits -> checked utterances -> duration-bucketed padded batches."""

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from asr import SetupError, audio, corpora, text
from asr.batching import DurationBatchSampler
from asr.corpora import Utterance

log = logging.getLogger(__name__)


class UtteranceDataset(Dataset):
    """Decodes one clip per item: 16 kHz normalised audio, normalised transcript and its label ids."""

    def __init__(self, utterances: list[Utterance], vocab: text.Vocabulary):
        self.utterances, self.vocab = utterances, vocab

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, i: int) -> dict:
        utt = self.utterances[i]
        transcript = text.normalize(utt.text, utt.language)
        return {
            "id": utt.id,
            "audio": audio.normalize(audio.load(utt.path)),
            "text": transcript,
            "labels": self.vocab.encode(transcript),
        }


def collate(items: list[dict]) -> dict:
    """Pad a batch. audio: (B, S) float32 at 16 kHz; attention_mask: (B, S) 1 on real samples;
    labels: (B, L) ids padded with -100 (ignored by the CTC loss)."""
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
        "ids": [item["id"] for item in items],
        "texts": [item["text"] for item in items],
        # seconds, as host floats so that logging them never waits on the GPU
        "audio_seconds": sum(lengths) / audio.SAMPLE_RATE,
        "padded_seconds": len(items) * max(lengths) / audio.SAMPLE_RATE,
    }


def ctc_feasible(labels: list[int], seconds: float) -> bool:
    """CTC needs a frame per label plus a blank between repeated labels."""
    repeats = sum(a == b for a, b in zip(labels, labels[1:]))
    return len(labels) + repeats <= audio.encoder_frames(int(seconds * audio.SAMPLE_RATE))


def check_split(utterances: list[Utterance], vocab: text.Vocabulary, min_seconds: float,
                max_seconds: float, training: bool) -> tuple[list[Utterance], dict]:
    """Drop and count what cannot train or be scored; the run goes on with the rest.

    Transcripts longer than the encoder's frames (infinite CTC loss) are dropped from training only:
    in dev and test they are scored, as any other utterance, and unseen characters count as `[UNK]`.

    Returns the kept utterances (with durations filled in) and a report
    {"kept": n, "dropped": {reason: n}, "examples": {reason: [ids]}, "unk_characters": n}.
    """
    kept, dropped, examples = [], Counter(), defaultdict(list)
    unk = 0

    def drop(reason, utt):
        dropped[reason] += 1
        if len(examples[reason]) < 5:
            examples[reason].append(utt.id)

    for utt in utterances:
        if not Path(utt.path).is_file():
            drop("missing_file", utt)
            continue
        seconds = utt.duration
        if seconds is None:
            try:
                seconds = audio.duration(utt.path)
            except Exception:  # libsndfile raises several types for corrupt files
                drop("unreadable_audio", utt)
                continue
        transcript = text.normalize(utt.text, utt.language)
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
            kept.append(Utterance(utt.id, utt.path, utt.text, seconds, utt.speaker, utt.language))
    report = {"kept": len(kept), "dropped": dict(dropped), "examples": dict(examples), "unk_characters": unk}
    return kept, report


class SpeechDataModule(L.LightningDataModule):
    """Reads a corpus' train/dev/test splits, builds the vocabulary from train, batches by duration.

    The vocabulary is built by `setup()` from the training transcripts unless one is given (evaluation
    of a trained model uses the model's own).
    """

    def __init__(self, corpus: str, root: str | None, language: str, lang: str = "",
                 train_split: str = "train", dev_split: str = "dev", test_split: str = "test",
                 max_batch_seconds: float = 200.0, max_batch_size: int | None = None,
                 min_seconds: float = 0.0, max_seconds: float = 20.0, num_workers: int = 2, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.splits = {"train": train_split, "dev": dev_split, "test": test_split}
        self.vocab: text.Vocabulary | None = None
        self.utterances: dict[str, list[Utterance]] = {}
        self.report: dict[str, dict] = {}

    def check(self) -> str | None:
        """Why this data cannot load (with the override that fixes it), or None."""
        return corpora.check_root(self.hparams.corpus, self.hparams.root, self.hparams.lang)

    def load(self, split: str) -> list[Utterance]:
        """Checked utterances of `split` (train, dev or test); reads and checks once."""
        if self.vocab is None and split != "train":
            self.load("train")  # the vocabulary comes from the training transcripts
        if split not in self.utterances:
            h = self.hparams
            raw = corpora.read_split(h.corpus, h.root, self.splits[split], h.language)
            if split == "train" and self.vocab is None:
                self.vocab = text.Vocabulary.from_transcripts(
                    filter(None, (text.normalize(u.text, u.language) for u in raw)))
            self.utterances[split], self.report[split] = check_split(
                raw, self.vocab, h.min_seconds, h.max_seconds, training=split == "train")
            dropped = ", ".join(f"{k} {v}" for k, v in self.report[split]["dropped"].items()) or "none"
            log.info("%s: kept %d utterances, dropped: %s", split, self.report[split]["kept"], dropped)
            if not self.utterances[split]:
                raise SetupError(f"no usable utterance in the {split} split of {h.root} "
                                         f"(dropped: {dropped})")
        return self.utterances[split]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.load("train")
            self.load("dev")

    def write_report(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.report, indent=1, ensure_ascii=False))

    def dataloader(self, split: str) -> DataLoader:
        utterances = self.load(split)
        training = split == "train"
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        sampler = DurationBatchSampler(
            [u.duration for u in utterances], self.hparams.max_batch_seconds, self.hparams.max_batch_size,
            shuffle=training, seed=self.hparams.seed, num_replicas=world, rank=rank,
        )
        workers = self.hparams.num_workers
        return DataLoader(
            UtteranceDataset(utterances, self.vocab), batch_sampler=sampler, collate_fn=collate,
            num_workers=workers, persistent_workers=training and workers > 0,
            worker_init_fn=_one_thread, pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("dev")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def audio_seconds(self, split: str) -> float:
        return float(np.sum([u.duration for u in self.load(split)]))


def _one_thread(_worker_id: int) -> None:
    # Each loader worker decodes one clip at a time; torch's intra-op threads would only contend.
    torch.set_num_threads(1)
