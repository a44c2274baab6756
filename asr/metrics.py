"""Corpus-level error rates: total edits / total reference units, as jiwer and torchmetrics compute them.

WER counts words (split on spaces), CER characters (spaces included, as jiwer), MER the mixed units of
code-switched Mandarin-English (each Han character, each English word; `text.mixed_tokens`). Counts are
kept per language tag, so ASCEND's zh / en / mixed utterances get their own figures.
"""

from collections import defaultdict

from torchaudio.functional import edit_distance

from asr.text import mixed_tokens

UNITS = {"wer": str.split, "cer": list, "mer": mixed_tokens}


def utterance_cer(reference: str, hypothesis: str) -> float:
    """One utterance's CER (character edits / reference characters); an empty reference: 1 if anything
    was transcribed, else 0."""
    if not reference:
        return float(bool(hypothesis))
    return edit_distance(list(reference), list(hypothesis)) / len(reference)


class ErrorRates:
    def __init__(self):
        # (tag, metric) -> [edits, reference units]
        self.counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.utterances: dict[str, int] = defaultdict(int)

    def update(self, references: list[str], hypotheses: list[str], tags: list[str] | None = None) -> None:
        for i, (reference, hypothesis) in enumerate(zip(references, hypotheses, strict=True)):
            tag = tags[i] if tags else ""
            self.utterances[tag] += 1
            for metric, units in UNITS.items():
                ref = units(reference)
                count = self.counts[tag, metric]
                count[0] += edit_distance(ref, units(hypothesis))
                count[1] += len(ref)

    def rates(self, tag: str | None = None) -> dict[str, float]:
        """{"wer", "cer", "mer"} over every utterance, or over those of one language tag."""
        result = {}
        for metric in UNITS:
            edits = sum(c[0] for (t, m), c in self.counts.items() if m == metric and tag in (None, t))
            total = sum(c[1] for (t, m), c in self.counts.items() if m == metric and tag in (None, t))
            result[metric] = edits / total if total else float("nan")
        return result

    def by_tag(self) -> dict[str, dict]:
        """Rates and utterance count per language tag."""
        return {tag: {**self.rates(tag), "n_utterances": n} for tag, n in sorted(self.utterances.items())}
