"""The LightningDataModule: corpus splits -> checked utterances -> duration-bucketed padded batches."""

import functools
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset

from asr import SetupError, audio, cache, corpora, text
from asr.augment import NONE, Augment, Choice, mix
from asr.batching import DurationBatchSampler, Planned
from asr.frames import WAV2VEC2, Geometry

log = logging.getLogger(__name__)
AUDIO_PROBLEMS = (audio.MISSING, audio.EMPTY, audio.UNREADABLE)  # drop reasons of a clip's file
CODEC_SLACK = 0.1  # seconds a clip may decode longer than stated and be cut to fit its batch (MP3 codec padding)
LISTING_VERSION = 2  # of the prepared listing's columns; a change makes every cached listing stale


class UtteranceDataset(Dataset):
    """Decodes one clip per item: 16 kHz normalised audio, its transcript (normalised when the split was
    listed, `SpeechDataModule.raw`), label ids and the clip's `seconds` as the batch plan saw them (the
    release's or the header's; None for clips not checked).

    A clip that cannot be read (missing, or corrupt: headers are not read where the release states the
    durations) gives {"id", "dropped": reason}: `collate` leaves it out and passes the reason on, so one
    bad file never stops a long run and every one is counted in the data report.

    augment (training): items are asked for as (epoch, clip) (`DurationBatchSampler(tag_epoch=True)`) and the
    clip is perturbed as `augment.choose(epoch, clip)` says; `seconds` is then its duration / speed factor,
    `augment` what was done. A noise file that fails to decode leaves the clip clean and is named in
    `noise_skipped` (counted in the data report, `SpeechDataModule.on_before_batch_transfer`).
    """

    def __init__(self, clips: corpora.Clips, vocab: text.Vocabulary, augment: Augment | None = None):
        self.clips, self.vocab = clips, vocab
        self.augment = augment if augment is not None and augment.active else None
        self._columns = {name: clips.table.column(name) for name in ("id", "path", "text", "language")}

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        epoch, i = index if isinstance(index, tuple) else (None, index)
        return self.item(i, NONE if self.augment is None or epoch is None else self.augment.choose(epoch, i))

    def __getitems__(self, batch: list) -> list[dict]:
        """The clips of a batch (a DataLoader's batched fetch); a `Planned` batch's shape goes on with them."""
        items = [self[index] for index in batch]
        return Planned(items, batch.shape) if isinstance(batch, Planned) else items

    def item(self, i: int, choice: Choice) -> dict:
        """Clip i as `choice` (`Augment.choose`) perturbs it."""
        row = int(self.clips.rows[i])
        utt_id, path, transcript, language = (self._columns[n][row].as_py() for n in ("id", "path", "text", "language"))
        try:
            wave = audio.load(path, speed=choice.factor)
        except audio.AudioError as error:
            log.warning("skipping %s: %s", utt_id, error)
            return {"id": utt_id, "dropped": error.reason}
        seconds = None if self.clips.seconds is None else float(self.clips.seconds[i]) / choice.factor
        item = {"id": utt_id, "audio": wave, "text": transcript, "labels": self.vocab.encode(transcript),
                "language": language, "seconds": seconds}
        if choice != NONE:
            item["augment"] = choice.describe(self.augment)
            if choice.noise is not None:
                try:
                    mix(wave, self.augment.noise(choice, len(wave)), choice.snr_db)
                except Exception as error:  # noqa: BLE001 (a noise file that does not decode: the clip stays clean)
                    name = self.augment.noise_name(choice.noise)
                    log.warning("noise file %s skipped (%s): %s stays clean", name, error, utt_id)
                    item["noise_skipped"] = name
        audio.normalize(wave)  # in place, after the noise
        return item


def collate(items: list[dict], ring: int = 0, hop: int = WAV2VEC2.hop) -> dict:
    """Pad a batch. audio: (B, S) float32 at 16 kHz, zeros past each clip; labels: (B, L) ids padded with -100
    (ignored by the CTC loss). lengths (samples) and label_lengths are host lists, which Lightning leaves on
    the host: the encoder pass and the loss take them there, so no (B, S) mask is built or sent to the device
    (`attention_mask` makes HF's from them). `shape` is (B, S).

    A `Planned` batch (`asr.batching`: what the batch sampler yields, passed on by the dataset) is padded to
    the samples of its planned shape. A clip that decodes longer than its stated duration by MP3 codec
    padding (25-48 ms on the demo; at most `CODEC_SLACK`) is cut at that length, counted in
    `truncated_seconds` (results.json sums them); one longer than that (a stated duration that is wrong) is
    never cut: the batch takes the next length of whole `hop`s that holds it, a shape outside the plan, and a
    warning names the clip. `lengths` are the samples the batch holds. Labels stay padded to the batch's
    longest transcript (L varies): padding them to the shape's frames would fix their shape too, but a CTC
    over (frames, 2L + 1) states costs in proportion to L. A batch without a plan is padded to its longest clip.

    Clips that could not be read are left out, listed in `dropped` as (id, reason) and counted in
    `skipped`; a batch of nothing but those has no `audio` and empty `ids`.

    ring (a `SpeechLoader`'s workers): the tensors are views of shared-memory buffers the worker reuses, in
    turn among `ring` sets (`_SharedPool`), which the loader copies as it receives them; 0: new tensors."""
    planned = items.shape[1] if isinstance(items, Planned) else None
    dropped = [(item["id"], item["dropped"]) for item in items if "dropped" in item]
    items = [item for item in items if "dropped" not in item]
    if not items:
        return {"ids": [], "dropped": dropped, "skipped": len(dropped), "audio_seconds": 0.0, "padded_seconds": 0.0,
                "truncated_seconds": 0.0}
    decoded = [len(item["audio"]) for item in items]
    samples = max(decoded) if planned is None else _padded_length(items, decoded, planned, hop)
    lengths = [min(n, samples) for n in decoded]
    label_lengths = [len(item["labels"]) for item in items]
    width = max(1, *label_lengths)  # the batch's longest transcript: asr.ctc's cost grows with it
    pool = _SharedPool.of_this_worker(ring) if ring else None
    slot = pool.next() if pool is not None else None
    batch_audio = _empty((len(items), samples), torch.float32, slot, "audio")
    labels = _empty((len(items), width), torch.long, slot, "labels")
    # Filled through numpy views (cheaper per row than torch indexing); every element is written once.
    rows, ids = batch_audio.numpy(), labels.numpy()
    ids.fill(-100)
    for i, item in enumerate(items):
        rows[i, : lengths[i]] = item["audio"][: lengths[i]]
        rows[i, lengths[i] :] = 0
        ids[i, : label_lengths[i]] = item["labels"]
    return {
        "audio": batch_audio,
        "labels": labels,
        "lengths": lengths,
        "label_lengths": label_lengths,
        "shape": (len(items), samples),
        "ids": [item["id"] for item in items],
        "texts": [item["text"] for item in items],
        "languages": [item.get("language", "") for item in items],
        # seconds, as host floats so that logging them never waits on the GPU
        "audio_seconds": sum(lengths) / audio.SAMPLE_RATE,
        "padded_seconds": len(items) * samples / audio.SAMPLE_RATE,
        "truncated_seconds": (sum(decoded) - sum(lengths)) / audio.SAMPLE_RATE,
        "skipped": len(dropped),
        "dropped": dropped,
        # augmented training batches: what was done to each clip, and noise files that failed to decode
        **({"augment": [item.get("augment", "none") for item in items],
            "noise_skipped": [item["noise_skipped"] for item in items if "noise_skipped" in item]}
           if any("augment" in item for item in items) else {}),
    }


def attention_mask(lengths: list[int], samples: int) -> torch.Tensor:
    """(B, samples) bool, True on each clip's samples: the mask HF's Wav2Vec2 forward takes, for code that
    calls it (our encoder pass takes the host `lengths` instead)."""
    return torch.arange(samples)[None, :] < torch.tensor(lengths)[:, None]


def _empty(shape: tuple[int, ...], dtype: torch.dtype, slot: dict | None = None, name: str = "") -> torch.Tensor:
    """An uninitialised tensor; in a loader worker, in shared memory, as torch's default_collate makes its
    batches: a tensor sent to the training process is otherwise copied into shared memory first. With a
    `slot` of a `_SharedPool`, a view of its buffer `name`, grown when too small."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    size = int(np.prod(shape))
    if slot is None:
        return _new_shared(size, dtype).view(shape)
    if name not in slot or slot[name].numel() < size:
        slot[name] = _new_shared(size, dtype)
    return slot[name][:size].view(shape)


def _new_shared(size: int, dtype: torch.dtype) -> torch.Tensor:
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(size)
    return torch.empty(0, dtype=dtype).new(storage)


class _SharedPool:
    """A loader worker's shared-memory batch buffers, `ring` sets taken in turn, one set per batch.

    Why: a new shared-memory tensor per batch costs its creation and a page fault per fresh 4 KiB page,
    ~0.07 ms per audio-second in the worker (a fifth of MP3 decoding: benchmarks/loader.py); reused pages
    cost nothing. Why it is safe: a DataLoader hands a worker a new batch of indices only when the loader
    receives a batch, and keeps at most prefetch_factor batches per worker in flight; `SpeechLoader` copies
    each batch out of shared memory as it receives it (or pin_memory's thread does, before). A set is
    reused `ring` = prefetch_factor + 2 batches later (`SpeechDataModule.ring`), after the copy of the batch
    that held it."""

    _this_worker: "_SharedPool | None" = None

    def __init__(self, ring: int):
        self.slots: list[dict] = [{} for _ in range(ring)]
        self.turn = -1

    @classmethod
    def of_this_worker(cls, ring: int) -> "_SharedPool | None":
        if torch.utils.data.get_worker_info() is None:
            return None
        if cls._this_worker is None:  # the worker's own, made after the fork
            cls._this_worker = cls(ring)
        return cls._this_worker

    def next(self) -> dict:
        self.turn = (self.turn + 1) % len(self.slots)
        return self.slots[self.turn]


def _padded_length(items: list[dict], decoded: list[int], planned: int, hop: int) -> int:
    """Samples to pad a planned batch to: see `collate`."""
    if max(decoded) - planned <= CODEC_SLACK * audio.SAMPLE_RATE:
        return planned
    over = max(range(len(items)), key=lambda i: decoded[i])
    log.warning("%s decodes to %.2f s, %.2f s more than its stated duration: its batch is padded to hold it (a "
                "shape outside the plan); check the corpus' durations", items[over]["id"],
                decoded[over] / audio.SAMPLE_RATE, (decoded[over] - planned) / audio.SAMPLE_RATE)
    return -(-max(decoded) // hop) * hop


_REPEAT = re.compile(r"(.)(?=\1)")  # a character followed by the same one


def frames_needed(transcript: str) -> int:
    """Encoder frames CTC needs for a transcript: one per label, plus a blank between repeated labels."""
    return len(transcript) + len(_REPEAT.findall(transcript))


def prepare(clips: corpora.Clips, language: str | None) -> pa.Table:
    """A listing with transcripts normalised once (`text`), the frames CTC needs for each (`frames`), each
    path's directory and file name (`folder`, dictionary-encoded, and `name`: what the check for missing
    files compares), and the characters of all transcripts in the metadata (`characters`, JSON): the
    vocabulary and every check then work on columns. This is the per-clip work of a start (~8 us a
    clip), which the listing cache saves."""
    transcripts = [text.normalize(t or "", language) for t in clips.column("text")]
    table = clips.table if clips.covers_table() else clips.table.take(clips.rows)
    table = table.set_column(table.column_names.index("text"), "text", pa.array(transcripts, pa.string()))
    table = table.append_column("frames", pa.array([frames_needed(t) for t in transcripts], pa.int32()))
    paths = table.column("path")
    table = table.append_column("folder", pc.dictionary_encode(pc.replace_substring_regex(paths, r"/[^/]*$", "")))
    table = table.append_column("name", pc.replace_substring_regex(paths, r"^.*/", ""))
    metadata = {**(table.schema.metadata or {}),
                b"characters": json.dumps(sorted(set("".join(transcripts))), ensure_ascii=False).encode()}
    return table.replace_schema_metadata(metadata)


def characters(clips: corpora.Clips) -> set[str]:
    """Characters of the clips' (normalised) transcripts; from the listing's metadata when the clips are
    the whole listing."""
    metadata = clips.table.schema.metadata or {}
    if b"characters" in metadata and clips.covers_table():
        return set(json.loads(metadata[b"characters"]))
    return set("".join(clips.column("text")))


def check_split(clips: corpora.Clips, seconds: np.ndarray, problems: dict[int, str], vocab: text.Vocabulary,
                min_seconds: float, max_seconds: float, training: bool, geometry: Geometry = WAV2VEC2
                ) -> tuple[corpora.Clips, dict]:
    """Drop and count what cannot train or be scored; the run goes on with the rest.

    clips: a prepared listing (`prepare`: normalised `text`, `frames`). seconds: per clip, from the
    release or the header. problems: clip position -> why its audio cannot be used (missing, unreadable).
    Transcripts longer than the encoder's frames (`geometry`; infinite CTC loss) are dropped from training only:
    in dev and test they are scored, as any other utterance, and unseen characters count as `[UNK]`.

    Returns the kept clips (with `seconds`) and a report
    {"kept": n, "dropped": {reason: n}, "examples": {reason: [ids]}, "unk_characters": n, "unk_examples":
    [up to 10 of those characters], "seconds": s}. A dropped file's example is its id and why (`example`).
    """
    frames = clips.column("frames")
    samples = (np.nan_to_num(seconds) * audio.SAMPLE_RATE).astype(np.int64)
    reason = np.full(len(clips), -1, dtype=np.int8)  # index into `reasons`; the first that applies
    reasons = [*AUDIO_PROBLEMS, "too_short", "too_long", "empty_transcript", "transcript_longer_than_frames"]
    checks = [np.zeros(len(clips), bool) for _ in AUDIO_PROBLEMS]
    for i, problem in problems.items():
        checks[reasons.index(problem)][i] = True
    checks += [seconds < min_seconds, seconds > max_seconds, frames == 0,
               training & (frames > geometry.frames(samples))]
    for code, failed in reversed(list(enumerate(checks))):
        reason[failed] = code
    dropped, examples = {}, {}
    metadata = clips.table.schema.metadata or {}
    if int(metadata.get(b"malformed_rows", 0)):
        dropped["malformed_row"] = int(metadata[b"malformed_rows"])
        examples["malformed_row"] = json.loads(metadata[b"malformed_lines"])[:5]
    ids, paths = clips.arrow("id"), clips.arrow("path")
    for code, name in enumerate(reasons):
        where = np.flatnonzero(reason == code)
        if len(where):
            dropped[name] = len(where)
            examples[name] = [example(i, p, name) for i, p in zip(ids.take(where[:5]).to_pylist(),
                                                                 paths.take(where[:5]).to_pylist())]
    kept = clips.select(reason < 0)
    kept.seconds = seconds[reason < 0]
    unknown = characters(kept) - {" " if t == text.WORD_DELIMITER else t for t in vocab.tokens}
    transcripts = kept.column("text") if unknown else []
    counts = {c: sum(t.count(c) for t in transcripts) for c in unknown}
    report = {"kept": len(kept), "dropped": dropped, "examples": examples, "unk_characters": sum(counts.values()),
              # the commonest of them, most frequent first
              "unk_examples": sorted(counts, key=lambda c: (-counts[c], c))[:10],
              "seconds": round(float(kept.seconds.sum()), 2)}
    return kept, report


def example(utt_id: str, path: str | None, reason: str) -> str:
    """A data report example of a dropped clip: its id, and for a file that cannot be used the message
    transcribe.py gives (`audio.problem`: does not exist, is empty, does not decode as audio)."""
    return f"{utt_id}: {audio.problem(path)[1]}" if reason in AUDIO_PROBLEMS and path else utt_id


def durations(clips: corpora.Clips, cache_file: Path, workers: int) -> tuple[np.ndarray, dict[int, str]]:
    """Seconds per clip and the clips whose audio cannot be used (position -> reason).

    Where the release states a clip's duration, its header is not read: the clip's file is only
    looked up in a listing of its directory (one `listdir` per directory, not a `stat` per clip), and a
    clip corrupt past its name is met, skipped and counted when it is loaded. The other clips' headers
    are read once and cached in `cache_file` (`asr.cache.durations`).
    """
    seconds = clips.column("duration").astype(np.float64)
    problems = {}
    stated = ~np.isnan(seconds)
    if stated.any():
        mask = pa.array(stated)
        found = cache.existing(clips.arrow("folder").filter(mask), clips.arrow("name").filter(mask))
        for i in np.flatnonzero(stated)[~found]:
            problems[int(i)] = audio.MISSING
    probe = np.flatnonzero(~stated)
    if len(probe):
        probed = cache.durations(clips.arrow("path").take(probe).to_pylist(), cache_file, workers)
        for i, value in zip(probe, probed):
            if isinstance(value, str):
                problems[int(i)] = value
            else:
                seconds[i] = value
    return seconds, problems


def format_report(report: dict[str, dict]) -> str:
    """The data report as a short table: one row per split, one column per drop reason, then the batch plan:
    batches per epoch, distinct (clips, samples) shapes and the padding they cost (padded audio / all audio
    the encoder computes on)."""
    reasons = sorted({r for split in report.values() for r in split["dropped"]})
    header = ["split", "kept", "hours", *reasons, "[UNK] chars", "batches", "shapes", "padding"]
    rows = [[split, r["kept"], f"{r['seconds'] / 3600:.2f}", *(r["dropped"].get(k, 0) for k in reasons), r["unk_characters"],
             *((r["batches"]["batches"], len(r["batches"]["shapes"]), f"{r['batches']['padding']:.1%}")
               if "batches" in r else ("-", "-", "-"))]
            for split, r in report.items()]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    table = "\n".join("  ".join(str(x).rjust(w) for x, w in zip(line, widths)) for line in [header, *rows])
    augmented = report.get("train", {}).get("augment")
    return table + (f"\ntraining augmentation: {describe_augment(augmented)}" if augmented else "")


def describe_augment(summary: dict) -> str:
    """One line of `Augment.summary()` (the data report's `augment`)."""
    parts = []
    if "speed" in summary:
        speed = summary["speed"]
        parts.append(f"speed x{'/'.join(f'{f:g}' for f in speed['factors'])} (p {speed['prob']:g}; planned on "
                     f"{speed['planned_on']})")
    if "noise" in summary:
        noise = summary["noise"]
        files = ", ".join(f"{c} {n}" for c, n in noise["files"].items())
        skipped = sum(noise.get("skipped", {}).values())
        parts.append(f"noise from {noise['dir']} ({files} files; {noise['unreadable_at_start']} unreadable at start, "
                     f"{skipped} decodes failed) at {noise['snr_db'][0]:g}-{noise['snr_db'][1]:g} dB SNR (p {noise['prob']:g})")
    return "; ".join(parts) or "none"


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
                 max_seconds: float, num_workers: int | str, max_workers: int, prefetch_factor: int, seed: int,
                 cache_dir: str, decode_cache: bool, cache_format: str, augment: dict):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the logger gets the whole run config (train.py)
        self.splits = {"train": train_split, "dev": dev_split, "test": test_split}
        self.cache_dir = Path(cache_dir).expanduser()
        self.vocab: text.Vocabulary | None = None
        self.geometry = WAV2VEC2  # the model's frame geometry (asr.frames): set before setup when it differs
        self.utterances: dict[str, corpora.Clips] = {}
        self.report: dict[str, dict] = {}
        self._raw: dict[str, corpora.Clips] = {}
        self._release: dict[str, corpora.Clips] = {}
        self.added: dict[str, int] = {}  # train_extra split -> utterances it added
        self._met: dict[str, set[str]] = {}  # split -> ids of clips met unreadable while loading
        self._resume: dict | None = None  # the training loader's position from a checkpoint (load_state_dict)
        self.augment = Augment(**augment, seed=seed)  # of the training clips (conf/augment/); checked here
        self.noise_skipped: dict[str, int] = {}  # noise file -> times it failed to decode (this rank)

    def check(self) -> str | None:
        """Why this data cannot load (with the override that fixes it), or None: the corpus, then the noise
        folder of augment=noise (missing, empty or unreadable)."""
        problems = [corpora.check_root(self.hparams.corpus, self.hparams.root, self.hparams.lang), self.augment.check()]
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
                table = prepare(corpora.read_split(h.corpus, h.root, name, h.language, h.columns, cache_dir=self.cache_dir),
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
            if split == "train" and self.augment.active:
                report["augment"] = self.augment.summary()
            self.utterances[split], self.report[split] = kept, report
            if not len(kept):
                dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
                raise SetupError(f"no usable utterance in the {split} split of {h.root} (dropped: {dropped})")
            report["batches"] = self.sampler(split).summary()  # the shapes and what padding them costs
        return self.utterances[split]

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
                examples = report["examples"].setdefault(reason, [])
                if len(examples) < 5:
                    examples.append(example(utt_id, clips.arrow("path")[where].as_py() if where >= 0 else None, reason))
                report["met_while_loading"] = report.get("met_while_loading", 0) + 1

    @property
    def num_workers(self) -> int:
        """`num_workers`, or for "auto" the CPU cores of this process's share, less one for the training
        loop, at most `max_workers`: the cores of a SLURM task (`--cpus-per-task`), else the cores this process may run
        on divided among the node's ranks."""
        if self.hparams.num_workers != "auto":
            if not str(self.hparams.num_workers).isdigit():
                raise SetupError(f"data.num_workers={self.hparams.num_workers!r}: give a number of loader "
                                 f"processes per rank (0: load in the training process) or auto.")
            return int(self.hparams.num_workers)
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            cores = int(os.environ["SLURM_CPUS_PER_TASK"])
        else:
            ranks = self.trainer.num_devices if self.trainer else 1
            cores = len(os.sched_getaffinity(0)) // max(1, ranks)
        return max(1, min(self.hparams.max_workers, cores - 1))

    @property
    def ring(self) -> int:
        """Shared-memory buffer sets per loader worker (`_SharedPool`): a set is reused after the copy of the
        batch it held, which is at most prefetch_factor + 1 batches behind."""
        return self.hparams.prefetch_factor + 2

    @property
    def corpus_key(self) -> str:
        """The corpus directory's short hash: names its duration cache and its set-up lock."""
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

    def sampler(self, split: str) -> DurationBatchSampler:
        """The batch plan of `split` for this rank: fixed shapes from its durations and the budget."""
        utterances = self.load(split)
        training = split == "train"
        h = self.hparams
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        size = h.max_batch_size if training or h.eval_max_batch_size is None else h.eval_max_batch_size
        augmented = training and self.augment.active
        # Speed perturbation: a clip lasts its duration / its epoch's factor. The plan is made on the longest
        # each clip can last (duration / the slowest factor), so every epoch's clips fit their planned shapes
        # and budget, and the batches per epoch stay the same; the cost is padding (docs/augment.md).
        seconds = utterances.seconds / self.augment.slowest if augmented else utterances.seconds
        return DurationBatchSampler(
            seconds, h.max_batch_seconds, max_batch_size=size, num_buckets=h.num_buckets,
            attention_q=h.attention_q, seed=h.seed, shuffle=training, num_replicas=world, rank=rank,
            tag_epoch=augmented, audio_seconds=utterances.seconds * self.augment.mean_stretch if augmented else None,
            geometry=self.geometry)

    def dataloader(self, split: str) -> DataLoader:
        training = split == "train"
        sampler = self.sampler(split)
        if training and self._resume is not None:
            sampler.load_state_dict(self._resume)
            self._resume = None
        workers = self.num_workers
        return (TrainingLoader if training else SpeechLoader)(
            UtteranceDataset(self.load(split), self.vocab, self.augment if training else None), batch_sampler=sampler,
            collate_fn=functools.partial(collate, ring=self.ring if workers else 0, hop=self.geometry.hop),
            # kept between epochs, and between evaluations (Lightning reuses the dev loader)
            num_workers=workers, persistent_workers=workers > 0, prefetch_factor=self.hparams.prefetch_factor if workers else None,
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


class SpeechLoader(DataLoader):
    """A DataLoader whose workers collate into reused shared-memory buffers (`_SharedPool`): each batch is
    copied out of them as it is received (~0.3 ms per 60 audio-seconds in the receiving process), unless
    pin_memory's thread already copied it into pinned memory."""

    def __iter__(self):
        batches = super().__iter__()
        return batches if self.num_workers == 0 or self.pin_memory else _Copied(batches)


class _Copied:
    """The batches of a DataLoader iterator, each tensor copied out of the worker's shared memory; the rest of
    the iterator (its `_workers`, ...) as it is."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in next(self.batches).items()}

    def __len__(self) -> int:
        return len(self.batches)

    def __getattr__(self, name: str):
        return getattr(self.batches, name)


class TrainingLoader(SpeechLoader):
    """The training loader. Its position is checkpointed and restored by the datamodule
    (`SpeechDataModule.state_dict`); these two methods only tell Lightning that it is resumable, which
    Lightning otherwise warns that a run resumed mid-epoch is not."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _one_thread(_worker_id: int) -> None:
    # Each loader worker decodes one clip at a time; torch's intra-op threads would only contend.
    torch.set_num_threads(1)
