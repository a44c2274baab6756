"""From a batch plan to padded batches: the dataset that decodes each clip, `collate` with its shared-memory
buffers in loader workers, and the loaders."""

import dataclasses
import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from asr import SetupError
from asr.core import audio, text
from asr.data import corpora
from asr.data.augment import NONE, Augment, Choice, mix
from asr.data.batching import Planned

log = logging.getLogger(__name__)
CODEC_SLACK = 0.1  # seconds a clip may decode longer than stated and be cut to fit its batch (MP3 codec padding)


class UtteranceDataset(Dataset):
    """Decodes one clip per item: 16 kHz normalised audio, its transcript (normalised when the split was
    listed, `SpeechDataModule.raw`), label ids and the clip's `seconds` as the batch plan saw them (the
    release's or the header's; None for clips not checked).

    A clip that cannot be read (missing, or corrupt: headers are not read where the release states the
    durations) gives {"id", "dropped": reason}: `collate` leaves it out and passes the reason on, so one
    bad file never stops a long run and every one is counted in the data report.

    augment (training): items are asked for as (epoch, clip) (`DurationBatchSampler(tag_epoch=True)`), or (epoch,
    clip, n) for its n-th repeat in an epoch, and the clip is perturbed as `augment.choose(epoch, clip, repeat=n)`
    says; `seconds` is then its duration / speed factor plus
    its silence and the clip after it, `text` and `labels` the two transcripts joined by a space,
    `augment` what was done. A noise file that fails to decode leaves the clip clean and is named in
    `noise_skipped` (counted in the data report, `SpeechDataModule.on_before_batch_transfer`).
    """

    def __init__(self, clips: corpora.Clips, vocab: text.Vocabulary, augment: Augment | None = None,
                 corpus_of: tuple[list[str], np.ndarray] | None = None):
        self.clips, self.vocab = clips, vocab
        self.augment = augment if augment is not None and augment.active else None
        self.partners = augment.partners(clips.seconds) if self.augment else None  # those a clip may be followed by
        self._columns = {name: clips.table.column(name) for name in ("id", "path", "text", "language")}
        self.corpus_of = corpus_of  # (names, each clip's place in names) of a run's corpora: items name theirs

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int | tuple[int, int] | tuple[int, int, int]) -> dict:
        """Clip `index`, or (epoch, clip) perturbed as that epoch draws it, or (epoch, clip, n): its n-th repeat."""
        epoch, i, *again = index if isinstance(index, tuple) else (None, index)
        if self.augment is None or epoch is None:
            return self.item(i, NONE)
        return self.item(i, self.augment.choose(epoch, i, repeat=again[0] if again else 0))

    def __getitems__(self, batch: list) -> list[dict]:
        """The clips of a batch (a DataLoader's batched fetch); a `Planned` batch's shape goes on with them."""
        items = [self[index] for index in batch]
        return Planned(items, batch.shape) if isinstance(batch, Planned) else items

    def _partner(self, choice: Choice) -> int | None:
        """The clip that follows this one (`Choice.partner`: its place among `partners`), or None."""
        if choice.partner is None or self.partners is None or not len(self.partners):
            return None
        return int(self.partners[int(choice.partner * len(self.partners))])

    def item(self, i: int, choice: Choice) -> dict:
        """Clip i as `choice` (`Augment.choose`) perturbs it: at its speed, followed by its partner, in its
        silence, under its noise, then normalised."""
        row = int(self.clips.rows[i])
        utt_id, path, transcript, language = (self._columns[n][row].as_py() for n in ("id", "path", "text", "language"))
        try:
            wave = audio.load(path, speed=choice.factor)
        except audio.AudioError as error:
            log.warning("skipping %s: %s", utt_id, error)
            return {"id": utt_id, "dropped": error.reason}
        seconds = None if self.clips.seconds is None else float(self.clips.seconds[i]) / choice.factor
        wave, transcript, seconds, choice = self._followed(utt_id, wave, transcript, seconds, choice)
        clip = wave  # the speech's power sets the noise's level, whatever the silence around it
        if choice.before or choice.after:
            wave = np.concatenate([np.zeros(round(choice.before * audio.SAMPLE_RATE), np.float32), wave,
                                   np.zeros(round(choice.after * audio.SAMPLE_RATE), np.float32)])
            seconds = None if seconds is None else seconds + choice.before + choice.after
        item = {"id": utt_id, "audio": wave, "text": transcript, "labels": self.vocab.encode(transcript),
                "language": language, "seconds": seconds}
        if self.corpus_of is not None:
            names, index = self.corpus_of
            item["corpus"] = names[index[i]]
        if choice != NONE:
            item["augment"] = choice.describe(self.augment)
            if choice.noise is not None:
                self._noised(item, clip, choice)
        audio.normalize(wave)  # in place, after the noise
        return item

    def _followed(self, utt_id: str, wave: np.ndarray, transcript: str, seconds: float | None,
                  choice: Choice) -> tuple[np.ndarray, str, float | None, Choice]:
        """The clip followed by its partner (`_partner`) after `choice.gap` of zeros, at the clip's speed, and the
        two transcripts joined by a space; a partner that does not decode leaves the clip alone, and the choice
        then says that nothing followed."""
        followed = self._partner(choice)
        if followed is not None:  # another clip after a pause: one recording of two sentences
            row = int(self.clips.rows[followed])
            partner_path, partner_text = (self._columns[n][row].as_py() for n in ("path", "text"))
            try:
                second = audio.load(partner_path, speed=choice.factor)
            except audio.AudioError as error:  # the partner is counted where it is trained on alone
                log.warning("%s is not followed by %s: %s", utt_id, partner_path, error)
                followed = None
            else:
                wave = np.concatenate([wave, np.zeros(round(choice.gap * audio.SAMPLE_RATE), np.float32), second])
                transcript = f"{transcript} {partner_text}"
                if seconds is not None:
                    seconds += choice.gap + float(self.clips.seconds[followed]) / choice.factor
        if followed is None and choice.partner is not None:
            choice = dataclasses.replace(choice, partner=None, gap=0.0)  # no clip could follow: say so
        return wave, transcript, seconds, choice

    def _noised(self, item: dict, clip: np.ndarray, choice: Choice) -> None:
        """Adds `choice`'s noise to item["audio"] in place at its SNR against `clip`'s power (the speech without
        its silence); a noise file that does not decode leaves the clip clean and is named in `noise_skipped`."""
        try:
            mix(item["audio"], self.augment.noise(choice, len(item["audio"])), choice.snr_db, reference=clip)
        except Exception as error:  # noqa: BLE001 (a noise file that does not decode: the clip stays clean)
            name = self.augment.noise_name(choice.noise)
            log.warning("noise file %s skipped (%s): %s stays clean", name, error, item["id"])
            item["noise_skipped"] = name


def collate(items: list[dict], *, hop: int, ring: int = 0) -> dict:
    """Pad a batch. audio: (B, S) float32 at 16 kHz, zeros past each clip; labels: (B, L) ids padded with -100
    (ignored by the CTC loss). lengths (samples) and label_lengths are host lists, which Lightning leaves on
    the host: the encoder pass and the loss take them there, so no (B, S) mask is built or sent to the device
    (tests/conftest.py's `attention_mask` makes HF's from them). `shape` is (B, S), its samples a multiple of
    `hop`, the model's (`asr.core.frames`).

    A `Planned` batch (`asr.data.batching`: what the batch sampler yields, passed on by the dataset) is padded to
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
    width = max(1, *label_lengths)  # the batch's longest transcript: asr.model.ctc's cost grows with it
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
        **({"corpora": [item["corpus"] for item in items]} if "corpus" in items[0] else {}),  # a run's corpora
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


def workers(setting: int | str, max_workers: int | None = None, ranks: int = 1, key: str = "num_workers") -> int:
    """Loader processes for `key`=`setting`, training's (`SpeechDataModule.num_workers`) and inference's
    (transcribe.py, align, the benchmarks) alike: a number as given; auto: the CPU cores of this process's share,
    less one for the loop that takes the batches, at least 1 and at most `max_workers`. A process's share is the
    cores of its SLURM task (`--cpus-per-task`), else the cores it may run on divided among the node's `ranks`."""
    if setting != "auto":
        if not str(setting).isdigit():
            raise SetupError(f"{key}={setting!r}: give a number of loader processes per rank (0: load in the "
                             f"process itself) or auto.")
        return int(setting)
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        cores = int(os.environ["SLURM_CPUS_PER_TASK"])
    else:
        cores = len(os.sched_getaffinity(0)) // max(1, ranks)
    return max(1, min(max_workers or cores, cores - 1))


def _one_thread(_worker_id: int) -> None:
    # Each loader worker decodes one clip at a time; torch's intra-op threads would only contend.
    torch.set_num_threads(1)
