"""Word n-gram language models for CTC beam search.

Estimation is interpolated modified Kneser-Ney as KenLM's lmplz does it (Chen & Goodman 1998; Heafield
et al. 2013), written as ARPA, which KenLM (the `kenlm` module, pyctcdecode) loads. PyPI's ARPA builders
were checked: `arpabo` implements Kneser-Ney with one fixed absolute discount and Katz-style backoff,
not modified Kneser-Ney with discounts estimated from the counts; KenLM's own builder (lmplz) needs a
C++ build with Boost. Text is normalised with the same rules as the transcripts (`asr.core.text.normalize`).

The command: `python -m asr.tools.lm` (asr/tools/).
"""

import math
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

from asr.core import outputs, text

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
# lmplz --discount_fallback: used for an order whose count-of-counts cannot estimate discounts
# (small corpora: no n-gram seen exactly 3 or 4 times, say).
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)


def _discounts(adjusted: Counter) -> tuple[float, float, float]:
    """D1, D2, D3+ from the count-of-counts t_k of one order's adjusted counts (Chen & Goodman)."""
    t = Counter(min(c, 5) for c in adjusted.values())
    if any(t[k] == 0 for k in (1, 2, 3, 4)):
        return FALLBACK_DISCOUNTS
    y = t[1] / (t[1] + 2 * t[2])
    d = (1 - 2 * y * t[2] / t[1], 2 - 3 * y * t[3] / t[2], 3 - 4 * y * t[4] / t[3])
    return d if all(0 < d[k] < k + 1 for k in range(3)) else FALLBACK_DISCOUNTS


def estimate(sentences: list[list[str]], order: int) -> list[dict[tuple, tuple[float, float | None]]]:
    """Per order n (index n-1): {n-gram: (log10 p(w | h), log10 backoff or None)}.

    p(w | h) = (a(hw) - D(a(hw))) / sum_x a(hx) + gamma(h) p(w | h'), gamma(h) = sum_k D_k N_k(h.) / sum_x a(hx),
    with a the raw counts at the highest order and n-grams that start with <s>, and the number of distinct
    left extensions otherwise; unigrams interpolate with the uniform distribution over the vocabulary
    (<unk> and </s> included, <s> never predicted). An unlisted n-gram's probability is backoff(h) x p(w | h').
    """
    raw = [Counter() for _ in range(order)]
    for words in sentences:
        tokens = [BOS, *words, EOS]
        for n in range(1, order + 1):
            for i in range(len(tokens) - n + 1):
                raw[n - 1][tuple(tokens[i:i + n])] += 1
    adjusted = [Counter() for _ in range(order)]
    adjusted[-1] = raw[-1]
    for n in range(1, order):
        for gram in raw[n]:  # gram of order n+1: one more distinct left extension of gram[1:]
            adjusted[n - 1][gram[1:]] += 1
        for gram, count in raw[n - 1].items():
            if gram[0] == BOS:  # nothing precedes <s>: its counts stay raw
                adjusted[n - 1][gram] = count
    adjusted[0].pop((BOS,), None)  # <s> is never predicted

    vocab = sorted({g[0] for g in raw[0]} - {BOS} | {EOS, UNK})
    models: list[dict] = [dict() for _ in range(order)]
    gammas: list[dict] = [dict() for _ in range(order)]
    lower: dict[tuple, float] = {}  # p(w | h') of the order below, for interpolation
    for n in range(1, order + 1):
        d = _discounts(adjusted[n - 1])
        totals, kinds = defaultdict(float), defaultdict(lambda: [0, 0, 0])
        for gram, count in adjusted[n - 1].items():
            totals[gram[:-1]] += count
            kinds[gram[:-1]][min(count, 3) - 1] += 1
        gamma = {h: sum(d[k] * kinds[h][k] for k in range(3)) / totals[h] for h in totals}
        probs = {}
        for gram, count in adjusted[n - 1].items():
            h = gram[:-1]
            backed = 1 / len(vocab) if n == 1 else lower[gram[1:]] if gram[1:] in lower else _backoff(
                gram[1:], models, gammas, len(vocab))
            probs[gram] = (count - d[min(count, 3) - 1]) / totals[h] + gamma[h] * backed
        if n == 1:
            probs[(UNK,)] = gamma[()] / len(vocab)
        models[n - 1], gammas[n - 1] = probs, gamma
        lower = probs
    arpa = []
    for n in range(1, order + 1):
        entries = {g: (math.log10(p), None) for g, p in models[n - 1].items()}
        if n == 1:
            entries[(BOS,)] = (-99.0, None)
        if n < order:  # contexts of the order above get their backoff weight
            for h, g in gammas[n].items():
                if h in entries:
                    entries[h] = (entries[h][0], math.log10(g) if g > 0 else -99.0)
        arpa.append(dict(sorted(entries.items())))
    return arpa


def _backoff(gram: tuple, models: list[dict], gammas: list[dict], vocab_size: int) -> float:
    """p(w | h) of an n-gram not seen at its order: gamma(h) x p(w | h'), recursively (gamma 1 if h unseen)."""
    n = len(gram)
    if n == 1:
        return models[0].get(gram, models[0].get((UNK,), 1 / vocab_size))
    if gram in models[n - 1]:
        return models[n - 1][gram]
    return gammas[n - 1].get(gram[:-1], 1.0) * _backoff(gram[1:], models, gammas, vocab_size)


def write_arpa(model: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\\data\\\n")
        for n, grams in enumerate(model, 1):
            f.write(f"ngram {n}={len(grams)}\n")
        for n, grams in enumerate(model, 1):
            f.write(f"\n\\{n}-grams:\n")
            for gram, (logp, backoff) in grams.items():
                f.write(f"{logp:.7f}\t{' '.join(gram)}" + (f"\t{backoff:.7f}" if backoff is not None else "") + "\n")
        f.write("\n\\end\\\n")
    return path


def build(texts, out_dir: str | Path, order: int, language: str | None) -> Path:
    """An ARPA model (and KenLM's binary format when `build_binary` is on the PATH) of the normalised
    `texts` in `out_dir`, with unigrams.txt; returns the path decoders should load. Each file is written whole
    before it is renamed into `out_dir` (`asr.core.outputs.staged`)."""
    sentences = [s.split() for s in (text.normalize(t, language) for t in texts) if s]
    if not sentences:
        raise ValueError("no text to build a language model from")
    model = estimate(sentences, order)
    with outputs.staged(out_dir) as staging:  # each file renamed into out_dir once written whole
        arpa = write_arpa(model, staging / f"{order}gram.arpa")
        # the words of the model, for decoders loading a binary (an ARPA file lists them itself)
        (staging / "unigrams.txt").write_text("\n".join(g[0] for g in model[0] if g[0] not in (BOS, EOS, UNK)),
                                              encoding="utf-8")
        if binary := shutil.which("build_binary"):  # KenLM's tool: faster loading, less memory
            subprocess.run([binary, str(arpa), str(arpa.with_suffix(".bin"))], check=True, capture_output=True)
    written = Path(out_dir) / arpa.name
    return written.with_suffix(".bin") if binary else written




def ctc_labels(tokens: list[str]) -> list[str]:
    """Our vocabulary as pyctcdecode's labels: the word delimiter is a space, the blank is ''."""
    return ["" if t == text.PAD else " " if t == text.WORD_DELIMITER else "⁇" if t == text.UNK else t for t in tokens]


def exported_decoder(directory: Path):
    """The beam decoder of a directory `asr.model.export` wrote with an LM (language_model/: pyctcdecode's, with the
    alpha and beta it was exported with), or None without one."""
    if not (directory / "language_model").is_dir():
        return None
    from transformers import Wav2Vec2ProcessorWithLM

    return Wav2Vec2ProcessorWithLM.from_pretrained(str(directory)).decoder


def beam_decoder(tokens: list[str], lm_path: str | Path | None, alpha: float, beta: float):
    """pyctcdecode's CTC prefix beam search, with a KenLM word model when `lm_path` is given (ARPA, or a
    KenLM binary with unigrams.txt beside it). alpha weighs the LM, beta is the bonus per word (both unused
    without an LM)."""
    from pyctcdecode import build_ctcdecoder

    unigrams = None
    if lm_path is not None and Path(lm_path).suffix != ".arpa":
        unigrams = (Path(lm_path).parent / "unigrams.txt").read_text(encoding="utf-8").split()
    return build_ctcdecoder(ctc_labels(tokens), kenlm_model_path=str(lm_path) if lm_path else None,
                            unigrams=unigrams, alpha=alpha, beta=beta)
