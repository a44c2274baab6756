"""Which word confidence tells a model's wrong words from its right ones.

    python benchmarks/confidence.py model_path=<run>/checkpoints/best-step600.ckpt
    python benchmarks/confidence.py model_path=<model> root=<cv-es> language=es

Every clip of `splits` is transcribed greedily, one file at a time, as transcribe.py timestamps=word does (its
words: `asr.model.transcription.greedy_spans`). A word is right when the alignment of the hypothesis with the reference
(jiwer) matches it to the same reference word, else wrong (a substitution or an insertion). Each word gets a
confidence from its frames (its first character's first frame to its last character's last) in several ways:

- a frame's measure: `max_prob`, the best token's probability, or `tsallis`, transcribe.py's: the frame's
  Tsallis entropy of order `alpha`, exponentially normalised to [0, 1] (`asr.model.transcription.frame_confidence`:
  NeMo's `entropy_tsallis_exp`, from Laptev and Ginsburg's "Fast entropy-based methods of word-level confidence
  estimation", 2023);
- over the word's frames: `mean` or `min`; over all of them, or only those whose best token is not the blank
  (`nonblank`: NeMo's exclude_blank). transcribe.py's is `tsallis min all`; before it was `max_prob mean all`.

Printed: the words, how many are wrong, and for each way its AUROC (the chance that a right word has a higher
confidence than a wrong one: 0.5 is chance) and the mean confidence of right and of wrong words. The settings
and their defaults: conf/bench/confidence.yaml (`--help`).
"""

import sys
import tempfile
from pathlib import Path

import jiwer
import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from asr.core import text  # noqa: E402
from asr.data import corpora  # noqa: E402
from asr.model import (
    inference,  # noqa: E402
    transcription,  # noqa: E402
)
from asr.tools import cli  # noqa: E402

# python -m asr.tools.align's windows over a long file (conf/align.yaml; transcribe.py's are the same)
ALIGN = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "align.yaml")


def frame_measures(logits: torch.Tensor, alpha: float) -> dict[str, np.ndarray]:
    """(T,) confidence of each frame of (T, V) logits: the best token's probability, and transcribe.py's
    (`asr.model.transcription.frame_confidence`, of order `alpha`)."""
    return {"max_prob": torch.softmax(logits.float(), dim=-1).max(-1).values.numpy(),
            "tsallis": transcription.frame_confidence(logits, alpha).numpy()}


def word_confidences(frames: dict[str, np.ndarray], nonblank: np.ndarray, first: int, last: int) -> dict[str, float]:
    """Every way of one word spanning frames first..last."""
    out = {}
    for measure, values in frames.items():
        span, kept = values[first : last + 1], nonblank[first : last + 1]
        for over, chosen in (("all", span), ("nonblank", span[kept] if kept.any() else span)):
            out[f"{measure} mean {over}"] = float(chosen.mean())
            out[f"{measure} min {over}"] = float(chosen.min())
    return out


def right_words(reference: str, hypothesis: str) -> list[bool]:
    """For each hypothesis word: whether the alignment matches it to the same reference word."""
    words = hypothesis.split()
    if not words:
        return []
    if not reference.split():
        return [False] * len(words)
    right = [False] * len(words)
    for chunk in jiwer.process_words(reference, hypothesis).alignments[0]:
        if chunk.type == "equal":
            right[chunk.hyp_start_idx : chunk.hyp_end_idx] = [True] * (chunk.hyp_end_idx - chunk.hyp_start_idx)
    return right


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The chance that a positive scores above a negative (ties count half): the Mann-Whitney statistic."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def main(argv: list[str]) -> dict:
    args, _ = cli.parse("bench/confidence", argv)
    model = inference.load(args.model_path)[0].eval()
    blank, spf = model.vocab.blank_id, model.geometry.seconds_per_frame
    rows, right = [], []
    for split in args.splits:
        clips = corpora.read_split("common_voice", args.root, split, args.language,
                                   cache_dir=Path(tempfile.gettempdir()) / "asr-bench-confidence")
        for path, reference in zip(clips.column("path"), clips.column("text")):
            logits, _ = transcription.file_logits(model, path, ALIGN.chunk_seconds, ALIGN.stride_seconds)
            best = logits.argmax(-1).numpy()
            words = transcription.greedy_spans(best, np.ones(len(best)), model.vocab.tokens, blank, "word", spf)
            hypothesis = text.normalize(" ".join(w["word"] for w in words), args.language)
            if hypothesis.split() != [w["word"] for w in words]:  # the text rules changed a word: not comparable
                continue
            frames, nonblank = frame_measures(logits, args.alpha), best != blank
            for word in words:
                first, last = round(word["start"] / spf), round(word["end"] / spf) - 1
                rows.append(word_confidences(frames, nonblank, first, last))
            right += right_words(text.normalize(reference, args.language), hypothesis)
    right = np.array(right, dtype=bool)
    print(f"{args.model_path} on {args.root} ({', '.join(args.splits)}): {len(right)} words, "
          f"{int((~right).sum())} wrong\n")
    print(f"{'confidence':<24} {'AUROC':>6} {'right':>6} {'wrong':>6}")
    result = {"words": len(right), "wrong": int((~right).sum()), "auroc": {}}
    for way in rows[0] if rows else []:
        scores = np.array([row[way] for row in rows])
        result["auroc"][way] = auroc(scores, right)
        print(f"{way:<24} {result['auroc'][way]:>6.3f} {scores[right].mean():>6.3f} "
              f"{scores[~right].mean() if (~right).any() else float('nan'):>6.3f}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
