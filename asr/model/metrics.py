"""Corpus-level error rates: total edits / total reference units, as jiwer computes them (tested). One
count (`count`) for every figure: validation's metrics (`ErrorRate`, summed over batches and ranks on the
device) and evaluate.py's (`ErrorRates`, per language tag).

WER counts words (split on spaces), CER characters (spaces included, as jiwer), MER the mixed units of
code-switched Mandarin-English (each Han character, each English word; `text.mixed_tokens`). Counts are
kept per language tag, so ASCEND's zh / en / mixed utterances get their own figures.
"""

from collections import defaultdict

import torch
from torchaudio.functional import edit_distance
from torchmetrics import Metric

from asr.core import text
from asr.core.text import mixed_tokens

UNITS = {"wer": str.split, "cer": list, "mer": mixed_tokens}


def count(reference: str, hypothesis: str, metric: str) -> tuple[int, int]:
    """(edits, reference units) of one utterance for `metric` (wer, cer or mer)."""
    units = UNITS[metric]
    ref = units(reference)
    return edit_distance(ref, units(hypothesis)), len(ref)


class ErrorRate(Metric):
    """One corpus-level rate (`metric`: wer, cer or mer) as a torchmetrics Metric: edits and reference units
    summed over batches, and over ranks at `compute`."""

    full_state_update = False

    def __init__(self, metric: str):
        super().__init__()
        if metric not in UNITS:
            raise ValueError(f"metric={metric!r}: one of {', '.join(UNITS)}")
        self.metric = metric
        self.add_state("edits", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("units", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, references: list[str], hypotheses: list[str]) -> None:
        counts = [count(r, h, self.metric) for r, h in zip(references, hypotheses, strict=True)]
        self.edits += sum(c[0] for c in counts)
        self.units += sum(c[1] for c in counts)

    def compute(self) -> torch.Tensor:
        return self.edits.float() / self.units


class Share(Metric):
    """Counted / seen, summed over batches (and ranks) on the device: no host read per update, unlike
    torchmetrics' MeanMetric (its NaN check reads the device; with the check off it drops the weights)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("counted", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("seen", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, counted: torch.Tensor | int, seen: torch.Tensor | int) -> None:
        self.counted += counted
        self.seen += seen

    def compute(self) -> torch.Tensor:
        return self.counted.float() / self.seen.clamp(min=1)


def utterance_cer(reference: str, hypothesis: str) -> float:
    """One utterance's CER (character edits / reference characters); an empty reference: 1 if anything
    was transcribed, else 0."""
    if not reference:
        return float(bool(hypothesis))
    return edit_distance(list(reference), list(hypothesis)) / len(reference)


class ErrorRates:
    """WER, CER and MER (or those of `units`) over a whole split, and per language tag (evaluate.py)."""

    def __init__(self, units: tuple[str, ...] = tuple(UNITS)):
        self.units = units
        # (tag, metric) -> [edits, reference units]
        self.counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.utterances: dict[str, int] = defaultdict(int)

    def update(self, references: list[str], hypotheses: list[str], tags: list[str] | None = None) -> None:
        for i, (reference, hypothesis) in enumerate(zip(references, hypotheses, strict=True)):
            tag = tags[i] if tags else ""
            self.utterances[tag] += 1
            for metric in self.units:
                edits, units = count(reference, hypothesis, metric)
                counts = self.counts[tag, metric]
                counts[0] += edits
                counts[1] += units

    def totals(self, metric: str, tag: str | None = None) -> tuple[int, int]:
        """(edits, reference units) of `metric` over every utterance, or over those of one language tag."""
        counted = [c for (t, m), c in self.counts.items() if m == metric and tag in (None, t)]
        return sum(c[0] for c in counted), sum(c[1] for c in counted)

    def rates(self, tag: str | None = None) -> dict[str, float]:
        """{"wer", "cer", "mer"} over every utterance, or over those of one language tag."""
        result = {}
        for metric in self.units:
            edits, total = self.totals(metric, tag)
            result[metric] = edits / total if total else float("nan")
        return result

    def by_tag(self) -> dict[str, dict]:
        """Rates and utterance count per language tag."""
        return {tag: {**self.rates(tag), "n_utterances": n} for tag, n in sorted(self.utterances.items())}


def corpus_rates(corpora: dict[str, dict], counts: list[list[float]], seconds: str = "dev_seconds") -> dict:
    """A run's dev scores as validation gives them: `by_corpus` {name: (WER, CER)} of each corpus
    with a scored character, from its (word edits, words, character edits, characters) in `counts` (one row
    per corpus of `corpora`, in order), and `wer` and `cer`, their means weighted by each corpus's dev hours
    (`corpora[name][seconds]`: evaluate.py weighs a test split by its hours; equal weights when no corpus
    states any). {} when no corpus was scored."""
    by_corpus, hours = {}, {}
    for (name, corpus), (word_edits, words, char_edits, chars) in zip(corpora.items(), counts, strict=True):
        if chars:
            by_corpus[name] = (word_edits / max(words, 1), char_edits / chars)
            hours[name] = corpus[seconds] / 3600
    if not by_corpus:
        return {}
    total = sum(hours.values())
    weight = {name: hours[name] / total if total else 1 / len(by_corpus) for name in by_corpus}
    return {"wer": sum(weight[n] * by_corpus[n][0] for n in by_corpus),
            "cer": sum(weight[n] * by_corpus[n][1] for n in by_corpus), "by_corpus": by_corpus}


class CorpusErrors:
    """A split's error counts per corpus of a run (`corpora`: {name: {language, ...}}), each hypothesis under its
    corpus's text rules, and their rates (`rates`): how validation, evaluate.py, checkpoint averaging and sweeps
    score. A batch that names no corpus (`batch["corpora"]`) is the first corpus's. `units`: the rates counted
    (`UNITS`)."""

    def __init__(self, corpora: dict[str, dict], units: tuple[str, ...]):
        self.corpora = corpora
        self.errors = {name: ErrorRates(units) for name in corpora}

    def update(self, batch: dict, hypotheses: list[str]) -> None:
        names = batch.get("corpora") or [next(iter(self.corpora))] * len(batch["texts"])
        tags = batch.get("languages") or [""] * len(batch["texts"])
        for name, reference, hypothesis, tag in zip(names, batch["texts"], hypotheses, tags, strict=True):
            self.errors[name].update([reference], [text.normalize(hypothesis, self.corpora[name]["language"])],
                                     [tag])

    def counts(self) -> torch.Tensor:
        """(corpora, 4) float64: word edits, words, character edits and characters of each corpus, in order (to be
        summed over ranks)."""
        return torch.tensor([[*e.totals("wer"), *e.totals("cer")] for e in self.errors.values()], dtype=torch.float64)

    def rates(self, seconds: str, counts: torch.Tensor | None = None) -> dict:
        """`corpus_rates` of these counts (or of `counts`, these summed over ranks), weighted by `seconds`."""
        return corpus_rates(self.corpora, (self.counts() if counts is None else counts).tolist(), seconds)
