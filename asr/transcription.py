"""Transcribing audio files through the model path validation and evaluate.py take (`CTCModel.forward`, then
`CTCModel.decoded`): files batched by duration, decoded by loader workers.

A file longer than `chunk_seconds` is cut into overlapping windows as transformers' ASR pipeline cuts it
(`chunk_iter`, `rescale_stride`): windows of chunk_seconds that overlap by stride_seconds on each side, each
normalised on its own; the frames of each window's strides are dropped and the rest joined before decoding,
so a window's edge never decides a character. tests/test_transcribe.py holds the two to the same transcripts.
"""

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from asr.data import audio
from asr.model.frames import Geometry


@dataclass
class Window:
    """A stretch of a file: its samples (normalised), and the frames of its logits kept when the windows are
    joined, [first, last): its strides dropped, in the pipeline's count (`rescale_stride`; None: to the end)."""

    wave: np.ndarray
    first: int = 0
    last: int | None = None


def windows(wave: np.ndarray, chunk: int, left: int, right: int, hop: int) -> list[Window]:
    """`wave` (16 kHz) in windows of `chunk` samples stepping by chunk - left - right, as transformers'
    `chunk_iter`; one window of the whole file when it is no longer than `chunk` (chunk=0: never cut)."""
    if not chunk or len(wave) <= chunk:
        return [Window(audio.normalize(wave))]
    out = []
    for start in range(0, len(wave), chunk - left - right):
        end = start + chunk
        piece = wave[start:end].copy()
        last = end >= len(wave)
        stride_left, stride_right = (0 if start == 0 else left), (0 if last else right)
        if len(piece) > stride_left:
            frames = int(round(len(piece) / hop))  # the pipeline's rescale_stride
            out.append(Window(audio.normalize(piece), int(round(stride_left / len(piece) * frames)),
                              frames - int(round(stride_right / len(piece) * frames))))
        if last:
            break
    return out


class Files(Dataset):
    """Item i: file i decoded and cut into `windows`, or the reason it cannot be transcribed."""

    def __init__(self, paths: list[str], chunk: int, left: int, right: int, geometry: Geometry):
        self.paths, self.chunk, self.left, self.right, self.geometry = paths, chunk, left, right, geometry

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            wave = audio.load(path)
        except audio.AudioError as error:
            return {"index": i, "error": str(error)}
        if self.geometry.frames(len(wave)) < 1:
            return {"index": i, "error": f"{path} holds {len(wave)} samples at 16 kHz, too few for one encoder frame "
                                         f"({self.geometry.receptive_field / audio.SAMPLE_RATE * 1000:.0f} ms)"}
        return {"index": i, "seconds": len(wave) / audio.SAMPLE_RATE,
                "windows": windows(wave, self.chunk, self.left, self.right, self.geometry.hop)}


def collate(items: list[dict]) -> dict:
    """The windows of a batch's files as rows padded with zeros, (rows, samples), with their `lengths`; `files`
    are (item, its first row, its rows)."""
    files, rows = [], []
    for item in items:
        if "windows" in item:
            files.append((item, len(rows), len(item["windows"])))
            rows += item["windows"]
    lengths = [len(w.wave) for w in rows]
    batch = np.zeros((len(rows), max(lengths, default=0)), np.float32)
    for row, window in zip(batch, rows):
        row[: len(window.wave)] = window.wave
    return {"items": items, "files": files, "audio": torch.from_numpy(batch), "lengths": lengths, "windows": rows}


def plan(seconds: list[float | None], batch_seconds: float, chunk_seconds: float) -> list[list[int]]:
    """Batches of file indices in order of duration, each holding at most `batch_seconds` of padded audio
    (windows x the longest window), at least one file. `seconds` from the headers (None: unknown, planned
    as the shortest: its decoding then says why)."""
    def rows(s: float) -> int:
        return 1 if not chunk_seconds or s <= chunk_seconds else math.ceil(s / chunk_seconds) + 1

    order = sorted(range(len(seconds)), key=lambda i: seconds[i] or 0.0)
    batches, batch, count, longest = [], [], 0, 0.0
    for i in order:
        s = seconds[i] or 0.0
        width = min(s, chunk_seconds) if chunk_seconds else s
        if batch and (count + rows(s)) * max(longest, width) > batch_seconds:
            batches.append(batch)
            batch, count, longest = [], 0, 0.0
        batch.append(i)
        count, longest = count + rows(s), max(longest, width)
    return batches + ([batch] if batch else [])


def header_seconds(path: str) -> float | None:
    try:
        return audio.duration(path)
    except Exception:  # noqa: BLE001 (decoding the file names its problem)
        return None


def transcribe(model, paths: list[str], decoder=None, *, chunk_seconds: float, stride_seconds: float,
               batch_seconds: float, num_workers: int, beam_width: int = 100):
    """Yields (index, path, seconds, transcript or None, error or None) for each of `paths`, in their order.
    `model`: a `CTCModel` in evaluation mode, on its device."""
    geometry = model.geometry
    hop = geometry.hop
    chunk, stride = (int(round(s * audio.SAMPLE_RATE / hop) * hop) for s in (chunk_seconds, stride_seconds))
    loader = DataLoader(Files(paths, chunk, stride, stride, geometry),
                        batch_sampler=plan([header_seconds(p) for p in paths], batch_seconds, chunk_seconds),
                        collate_fn=collate, num_workers=num_workers, prefetch_factor=2 if num_workers else None)
    done, turn = {}, 0
    with torch.inference_mode():
        for batch in loader:
            for item in batch["items"]:
                if "error" in item:
                    done[item["index"]] = (item["index"], paths[item["index"]], None, None, item["error"])
            if batch["files"]:
                out = model({"audio": batch["audio"].to(model.device, non_blocking=True), "lengths": batch["lengths"]})
                kept = [out.logits[r, w.first : n if w.last is None else min(w.last, n)]
                        for r, (w, n) in enumerate(zip(batch["windows"], out.frames.tolist()))]
                joined = [torch.cat(kept[first : first + count]) for _, first, count in batch["files"]]
                frames = torch.tensor([len(j) for j in joined])
                logits = torch.nn.utils.rnn.pad_sequence(joined, batch_first=True)
                decoded = model.decoded(logits, frames, decoder, beam_width)
                for (item, _, _), hypothesis in zip(batch["files"], decoded.hypotheses):
                    done[item["index"]] = (item["index"], paths[item["index"]], item["seconds"], hypothesis, None)
            while turn in done:
                yield done.pop(turn)
                turn += 1


def workers(setting) -> int:
    """num_workers: a number, or auto: the cores this process may run on, less one for the model."""
    return int(setting) if setting != "auto" else max(1, len(os.sched_getaffinity(0)) - 1)
