"""Pseudo-labels: a transcript archive of unlabelled audio (transcribe.py out=<archive> timestamps=word) filtered
into a training corpus in the Common Voice layout (`python -m asr.tools.pseudo`).

A file is kept when its transcript is one the model is sure of and looks like speech transcribed, and each file
dropped is counted by why (`REASONS`):
- `failed`: the file did not transcribe (its archive line holds an error);
- `empty`: no word;
- `low_confidence`: its confidence (`utterance_confidence` of its words', NeMo's word confidences aggregated as
  `how` says) is under `min_confidence`;
- `speaking_rate`: its characters per second lie outside the range of the labelled corpus (a model that runs
  on or stops early writes too many or too few characters for the audio);
- `repeated_ngram`: a word n-gram repeats `max_repeats` times in a row ("a a a a", "de la de la de la"), the
  known loop of self-training.

The corpus: clips/ holds links to the kept files, train.tsv their transcripts (client_id: the folder each file
came from, standing for its speaker), clip_durations.tsv their seconds, dev.tsv and test.tsv only their header
(a corpus of `data.corpora` whose dev lists no clip gets one carved from train), and pseudo_report.json what
was kept and dropped, and why.
"""

import json
import os
from pathlib import Path

import numpy as np

from asr.core import outputs

REASONS = ("failed", "empty", "low_confidence", "speaking_rate", "repeated_ngram")
HOW = ("mean", "min", "chars")  # chars: the mean weighted by each word's characters (length-normalised)
HEADER = "client_id\tpath\tsentence\n"


def utterance_confidence(words: list[dict], how: str) -> float:
    """The confidence of a transcript from its words' (`confidence` in [0, 1], `asr.model.transcription`): their
    mean, their least, or their mean weighted by each word's characters (`chars`). 0 without a word."""
    if not words:
        return 0.0
    values = np.array([w["confidence"] for w in words], dtype=np.float64)
    if how == "mean":
        return float(values.mean())
    if how == "min":
        return float(values.min())
    if how == "chars":
        weights = np.array([len(w["word"]) for w in words], dtype=np.float64)
        return float((values * weights).sum() / weights.sum())
    raise ValueError(f"confidence={how!r}: one of {', '.join(HOW)}")


def repeated_ngram(text: str, max_repeats: int, longest: int = 4) -> str | None:
    """The first word n-gram (n up to `longest`) that `text` holds `max_repeats` times in a row, or None."""
    words = text.split()
    for n in range(1, longest + 1):
        for start in range(len(words) - n * max_repeats + 1):
            gram = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(1, max_repeats)):
                return " ".join(gram)
    return None


def speaking_rate_range(texts: list[str], seconds: list[float], quantiles: tuple[float, float]) -> tuple[float, float]:
    """(low, high) characters per second of a labelled corpus's transcripts: its `quantiles` (0.01, 0.99: the
    middle 98%)."""
    rates = np.array([len(t) / s for t, s in zip(texts, seconds) if s and s > 0], dtype=np.float64)
    if not len(rates):
        raise ValueError("no labelled clip with a duration to take a speaking rate from")
    low, high = np.quantile(rates, quantiles)
    return float(low), float(high)


def why_dropped(line: dict, *, min_confidence: float, how: str, rate: tuple[float, float],
                max_repeats: int) -> str | None:
    """Why an archive line (`{"path", "seconds", "text", "words"}` or `{"path", "error"}`) is not kept, as one of
    `REASONS`, or None to keep it."""
    if "error" in line:
        return "failed"
    text = line.get("text") or ""
    if not text.strip():
        return "empty"
    if utterance_confidence(line.get("words") or [], how) < min_confidence:
        return "low_confidence"
    per_second = len(text) / line["seconds"] if line.get("seconds") else float("inf")
    if not rate[0] <= per_second <= rate[1]:
        return "speaking_rate"
    if repeated_ngram(text, max_repeats) is not None:
        return "repeated_ngram"
    return None


def select(lines: list[dict], **rules) -> tuple[list[dict], dict]:
    """(the lines kept, the report: counts kept and dropped by reason, up to 5 examples of each) of an archive's
    transcript lines, by `why_dropped`'s `rules`."""
    kept, dropped, examples = [], dict.fromkeys(REASONS, 0), {}
    for line in lines:
        reason = why_dropped(line, **rules)
        if reason is None:
            kept.append(line)
            continue
        dropped[reason] += 1
        if len(examples.setdefault(reason, [])) < 5:
            examples[reason].append({"path": line["path"], "text": line.get("text"), "error": line.get("error")})
    seconds = sum(line["seconds"] for line in kept)
    return kept, {"files": len(lines), "kept": len(kept), "kept_hours": round(seconds / 3600, 4), "dropped": dropped,
                  "examples": examples}


def write_corpus(out: Path, kept: list[dict], report: dict) -> None:
    """The Common Voice layout of the kept lines under `out`: clips/ (links to the files, named by their place in
    the list and their suffix), train.tsv, clip_durations.tsv, dev.tsv and test.tsv (headers), pseudo_report.json,
    each written whole (`asr.core.outputs.write`). Links of an earlier corpus here are replaced."""
    clips = out / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    for old in clips.glob("pseudo_*"):
        old.unlink()
    rows, durations = [], []
    for n, line in enumerate(kept):
        source = Path(line["path"]).resolve()
        name = f"pseudo_{n:07d}{source.suffix}"
        os.symlink(source, clips / name)
        rows.append(f"{source.parent.name}\t{name}\t{line['text']}\n")
        durations.append(f"{name}\t{round(line['seconds'] * 1000)}\n")
    outputs.write(out / "train.tsv", HEADER + "".join(rows))
    outputs.write(out / "clip_durations.tsv", "clip\tduration[ms]\n" + "".join(durations))  # as Common Voice has it
    for split in ("dev", "test"):
        outputs.write(out / f"{split}.tsv", HEADER)
    outputs.write(out / "pseudo_report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
