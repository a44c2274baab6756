"""Transcribing audio files through the model path validation and evaluate.py take (`CTCModel.forward`, then
`CTCModel.decoded`): files batched by duration by the data layer's sampler, as training and evaluation batch
clips (`asr.data.batching.DurationBatchSampler`, each file its windows as rows), decoded by loader workers.

A file longer than `chunk_seconds` is cut into overlapping windows as transformers' ASR pipeline cuts it
(`chunk_iter`, `rescale_stride`): windows of chunk_seconds that overlap by stride_seconds on each side, each
normalised on its own; the frames of each window's strides are dropped and the rest joined before decoding,
so a window's edge never decides a character. tests/test_transcribe.py holds the two to the same transcripts.

Timestamps come from the CTC frames of the joined logits (one frame per hop: 20 ms for wav2vec2; frame t
starts at t x hop samples, as transformers' word offsets count): on the greedy path a character spans its
run of frames, a word its characters; with a beam decoder the words and their frames are the best beam's
(pyctcdecode's). A word's (character's) confidence is the least, over its frames, of each frame's confidence
(`frame_confidence`: NeMo's default measure, exp(-H) of the frame's Tsallis entropy H, rescaled to [0, 1]). Measured
against the mean best-token probability by how well it tells wrong words from right ones
(benchmarks/confidence.py, docs/performance.md).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from asr import SetupError
from asr.core import audio, text
from asr.core.frames import Geometry
from asr.data.batching import DurationBatchSampler, Planned


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

    def __getitems__(self, batch: list) -> list[dict]:
        """The files of a batch (a DataLoader's batched fetch); a `Planned` batch's shape goes on with them."""
        items = [self[i] for i in batch]
        return Planned(items, batch.shape) if isinstance(batch, Planned) else items


def collate(items: list[dict]) -> dict:
    """The windows of a batch's files as rows padded with zeros, (rows, samples), with their `lengths`; `files`
    are (item, its first row, its rows). A `Planned` batch is padded to its planned samples (or, where a file's
    header understated its length, to its longest window)."""
    files, rows = [], []
    for item in items:
        if "windows" in item:
            files.append((item, len(rows), len(item["windows"])))
            rows += item["windows"]
    lengths = [len(w.wave) for w in rows]
    planned = items.shape[1] if isinstance(items, Planned) else 0
    batch = np.zeros((len(rows), max(planned, *lengths) if rows else 0), np.float32)
    for row, window in zip(batch, rows):
        row[: len(window.wave)] = window.wave
    return {"items": items, "files": files, "audio": torch.from_numpy(batch), "lengths": lengths, "windows": rows}


def window_count(samples: int, chunk: int, left: int, right: int) -> int:
    """How many windows `windows` cuts a file of `samples` samples into (at least 1)."""
    if not chunk or samples <= chunk:
        return 1
    return math.ceil((samples - chunk) / (chunk - left - right)) + 1


def sampler(seconds: list[float | None], geometry: Geometry, *, chunk_seconds: float, stride_seconds: float,
            batch_seconds: float, num_buckets: int) -> DurationBatchSampler:
    """The batch plan of files of these header `seconds` (None: unknown, planned as the shortest: its decoding then
    says why): the data layer's sampler (`asr.data.batching.DurationBatchSampler`), in duration order, each file
    its windows (`rows`) at the width of its widest, `batch_seconds` of padded audio a batch (windows x the
    longest; a file wider than that is a batch of its own), at one of `num_buckets` padded lengths."""
    chunk, stride = geometry.whole_hops(chunk_seconds), geometry.whole_hops(stride_seconds)
    shortest = geometry.receptive_field
    samples = [max(shortest, round((s or 0.0) * audio.SAMPLE_RATE)) for s in seconds]
    widths = np.array([min(n, chunk) if chunk else n for n in samples]) / audio.SAMPLE_RATE
    rows = [window_count(n, chunk, stride, stride) for n in samples]
    budget = max(batch_seconds, float(widths.max(initial=0.0)))  # a file longer than the budget: alone
    return DurationBatchSampler(widths, budget, max_batch_size=None, num_buckets=num_buckets, attention_q=None, seed=0,
                                shuffle=False, geometry=geometry, rows=rows)


def header_seconds(path: str) -> float | None:
    try:
        return audio.duration(path)
    except Exception:  # noqa: BLE001 (decoding the file names its problem)
        return None


@dataclass
class Transcript:
    """One file transcribed: its seconds, text and (with timestamps) its `words` or characters as
    {"word" (or "char"), "start", "end" (seconds), "confidence"}; or the `error` that stopped it."""

    index: int
    path: str
    seconds: float | None = None
    text: str | None = None
    words: list[dict] | None = None
    error: str | None = None


TSALLIS_ALPHA = 0.33  # the order of `frame_confidence`'s Tsallis entropy (NeMo's default)


def frame_confidence(logits: torch.Tensor, alpha: float = TSALLIS_ALPHA) -> torch.Tensor:
    """(..., T) confidence of each frame of (..., T, V) logits, in [0, 1]: exp(-H) rescaled so that a one-hot
    frame gives 1 and a uniform one 0, where H = (1 - sum_v p_v^alpha) / (alpha - 1) is the frame's Tsallis entropy
    of order `alpha` (NeMo's `entropy_tsallis_exp`; Laptev and Ginsburg, "Fast entropy-based methods of
    word-level confidence estimation for end-to-end ASR", 2023). Unlike the best token's probability it looks at
    the whole distribution: a frame torn between two tokens scores low even when one of them is ahead."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    vocab = log_probs.shape[-1]
    neg_entropy = (1 - (log_probs * alpha).exp().sum(-1)) / (1 - alpha)  # -H
    uniform = math.exp((1 - vocab ** (1 - alpha)) / (1 - alpha))  # exp(-H) of the uniform distribution
    return ((neg_entropy.exp() - uniform) / (1 - uniform)).clamp(0.0, 1.0)


def greedy_spans(best: np.ndarray, confidence: np.ndarray, tokens: list[str], blank: int, level: str,
                 seconds_per_frame: float) -> list[dict]:
    """The characters (level="char") or words (level="word") of a greedy CTC path, with their times and
    confidence. best: (T,) the best token of each frame; confidence: (T,) each frame's (`frame_confidence`). A
    character is a run of frames of one token (the run of blanks between two of the same character separates
    them), a space the first of the word delimiters (`|`) between two words; a word is the characters between
    two word delimiters, from its first character's first frame to its last character's last. A unit's
    confidence is the least of its frames'."""
    chars = []  # (token, first frame, last frame)
    for t, token in enumerate(best.tolist()):
        if token == blank:
            continue
        if chars and chars[-1][0] == token and chars[-1][2] == t - 1:
            chars[-1][2] = t
        else:
            chars.append([token, t, t])
    units, current = [], []
    for token, first, last in chars:
        if level == "char":
            if tokens[token] == text.WORD_DELIMITER and (not units or units[-1][0] == text.WORD_DELIMITER):
                continue  # one space between words, none before the first: as the transcript has them
            units.append((tokens[token], first, last))
        elif tokens[token] == text.WORD_DELIMITER:
            if current:
                units.append(("".join(tokens[c[0]] for c in current), current[0][1], current[-1][2]))
            current = []
        else:
            current.append((token, first, last))
    if current:
        units.append(("".join(tokens[c[0]] for c in current), current[0][1], current[-1][2]))
    if units and units[-1][0] == text.WORD_DELIMITER:
        units.pop()
    key = "char" if level == "char" else "word"
    return [{key: " " if unit == text.WORD_DELIMITER else unit, "start": round(first * seconds_per_frame, 3),
             "end": round((last + 1) * seconds_per_frame, 3),
             "confidence": round(float(confidence[first : last + 1].min()), 4)} for unit, first, last in units]


def beam_spans(word_frames: list[tuple[str, tuple[int, int]]], confidence: np.ndarray,
               seconds_per_frame: float) -> list[dict]:
    """The words of a beam decoder's best beam (pyctcdecode: (word, (first frame, frame after the last))), each
    with the least confidence of its frames (`frame_confidence`)."""
    return [{"word": word, "start": round(first * seconds_per_frame, 3), "end": round(end * seconds_per_frame, 3),
             "confidence": round(float(confidence[first:end].min()), 4) if end > first else 0.0}
            for word, (first, end) in word_frames]


@dataclass
class Recognizer:
    """A loaded model and how it decodes, for transcribing. `model`: a `CTCModel` in evaluation mode on its device,
    or `asr.model.onnx.OnnxModel` (`asr.model.inference.load`, `OnnxModel.load`); `decoder`: an exported LM's beam
    search keeping `beam_width` beams, or None (greedy); `timestamps`: none, word or char (char: greedy decoding
    only). `transcribe(batch)` is the one step from a batch of windows to each file's text: the forward pass,
    each file's windows joined, decoding, timing."""

    model: object
    decoder: object | None
    beam_width: int | None
    timestamps: str

    def __post_init__(self):
        if self.timestamps == "char" and self.decoder is not None:
            raise SetupError("timestamps=char comes from the greedy path; this model decodes with its language model "
                             "(its words have timestamps: timestamps=word)")

    def transcribe(self, batch: dict) -> list[tuple[str, list[dict] | None]]:
        """(text, words or characters with their times, or None) of each file of a `collate`d batch."""
        logits, frames = joined_logits(self.model, batch)
        decoded = self.model.decoded(logits, frames, self.decoder, self.beam_width)
        spans = _spans(self.model, logits, frames, decoded, self.timestamps) if self.timestamps != "none" else None
        return [(hypothesis, spans[i] if spans else None) for i, hypothesis in enumerate(decoded.hypotheses)]


def transcribe(recognizer: Recognizer, paths: list[str], *, chunk_seconds: float, stride_seconds: float,
               batch_seconds: float, num_buckets: int, num_workers: int, progress=None,
               seconds: list[float | None] | None = None):
    """Yields a `Transcript` for each of `paths`, in their order: files batched by `sampler`, read and cut into
    windows by `num_workers` loader processes, transcribed by `recognizer`. progress: called with the header
    seconds of each batch as it is done (a progress bar's update). seconds: each file's from its header
    (`header_seconds`), if the caller has them."""
    geometry = recognizer.model.geometry
    chunk, stride = geometry.whole_hops(chunk_seconds), geometry.whole_hops(stride_seconds)
    seconds = seconds or [header_seconds(p) for p in paths]
    plan = sampler(seconds, geometry, chunk_seconds=chunk_seconds, stride_seconds=stride_seconds,
                   batch_seconds=batch_seconds, num_buckets=num_buckets)
    loader = DataLoader(Files(paths, chunk, stride, stride, geometry), batch_sampler=plan, collate_fn=collate,
                        num_workers=num_workers, prefetch_factor=2 if num_workers else None)
    done, turn = {}, 0
    with torch.inference_mode():
        for batch in loader:
            for item in batch["items"]:
                if "error" in item:
                    done[item["index"]] = Transcript(item["index"], paths[item["index"]], error=item["error"])
            if batch["files"]:
                for (item, _, _), (hypothesis, spans) in zip(batch["files"], recognizer.transcribe(batch)):
                    done[item["index"]] = Transcript(item["index"], paths[item["index"]], item["seconds"], hypothesis,
                                                     spans)
            if progress is not None:  # in the headers' seconds, which the total is counted in
                progress(sum(seconds[item["index"]] or 0.0 for item in batch["items"]))
            while turn in done:
                yield done.pop(turn)
                turn += 1


def joined_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, T, V) logits of the F files of a `collate`d batch, each file's windows joined with their strides
    dropped, and the (F,) frames of each."""
    out = model({"audio": batch["audio"].to(model.device, non_blocking=True), "lengths": batch["lengths"]})
    kept = [out.logits[r, w.first : n if w.last is None else min(w.last, n)]
            for r, (w, n) in enumerate(zip(batch["windows"], out.frames.tolist()))]
    joined = [torch.cat(kept[first : first + count]) for _, first, count in batch["files"]]
    return torch.nn.utils.rnn.pad_sequence(joined, batch_first=True), torch.tensor([len(j) for j in joined])


def file_logits(model, path: str, chunk_seconds: float, stride_seconds: float) -> tuple[torch.Tensor, float]:
    """(T, V) logits of one file (in windows as `transcribe` cuts them) and its seconds; `audio.AudioError`
    for a file that does not decode."""
    geometry = model.geometry
    chunk, stride = geometry.whole_hops(chunk_seconds), geometry.whole_hops(stride_seconds)
    item = Files([path], chunk, stride, stride, geometry)[0]
    if "error" in item:
        raise audio.AudioError(audio.UNREADABLE, item["error"])
    with torch.inference_mode():
        logits, frames = joined_logits(model, collate([item]))
    return logits[0, : int(frames[0])], item["seconds"]


def _spans(model, logits: torch.Tensor, frames: torch.Tensor, decoded, level: str) -> list[list[dict]]:
    """Each file's words or characters with their times (`greedy_spans` of the best path with its pauses made word
    boundaries, `Vocabulary.paused`; `beam_spans`)."""
    confidence, best = frame_confidence(logits).cpu().numpy(), logits.argmax(dim=-1).cpu()
    seconds_per_frame = model.geometry.seconds_per_frame
    out = []
    for i, n in enumerate(frames.tolist()):
        if decoded.word_frames is not None:
            out.append(beam_spans(decoded.word_frames[i], confidence[i, :n], seconds_per_frame))
        else:
            path = model.vocab.paused(best[i, :n], model.pause_frames).numpy()
            out.append(greedy_spans(path, confidence[i, :n], model.vocab.tokens, model.vocab.blank_id, level,
                                    seconds_per_frame))
    return out


def subtitles(words: list[dict], max_line_seconds: float, max_line_chars: int) -> list[tuple[float, float, str]]:
    """Subtitle lines (start, end, text) of timed words: a line ends before the word that would make it longer
    than `max_line_chars` characters or `max_line_seconds` seconds (a word longer than either is a line)."""
    lines, current = [], []
    for word in words:
        if current and (len(" ".join(w["word"] for w in current + [word])) > max_line_chars
                        or word["end"] - current[0]["start"] > max_line_seconds):
            lines.append(current)
            current = []
        current.append(word)
    if current:
        lines.append(current)
    return [(line[0]["start"], line[-1]["end"], " ".join(w["word"] for w in line)) for line in lines]


def subtitle_file(lines: list[tuple[float, float, str]], kind: str) -> str:
    """SubRip (srt) or WebVTT (vtt) text of subtitle lines."""
    def clock(seconds: float) -> str:
        ms = int(round(seconds * 1000))
        stamp = f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}"
        return f"{stamp}{',' if kind == 'srt' else '.'}{ms % 1000:03d}"

    cues = [f"{clock(start)} --> {clock(end)}\n{words}\n" for start, end, words in lines]
    if kind == "srt":
        return "\n".join(f"{n}\n{cue}" for n, cue in enumerate(cues, 1))
    return "WEBVTT\n\n" + "\n".join(cues)

