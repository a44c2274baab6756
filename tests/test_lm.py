"""The n-gram estimator against hand-computed modified Kneser-Ney probabilities and KenLM's reading of
its ARPA file; beam search with the LM against greedy decoding on posteriors with word-level errors."""

import math
import random

import kenlm
import numpy as np
import pytest
import torch

from asr.core import text
from asr.core.text import Vocabulary
from asr.model import lm
from asr.model.metrics import ErrorRates
from asr.tools import synth

# <s> a b </s> / <s> a c </s> / <s> b a </s>, order 2. Every order falls back to discounts 0.5, 1, 1.5
# (no n-gram is seen 3 and 4 times). Unigram adjusted counts (distinct left neighbours): a 2, b 2, c 1,
# </s> 3; total 8; gamma = (0.5*1 + 1*2 + 1.5*1) / 8 = 0.5 spread over |V| = 5 (a b c </s> <unk>).
UNIGRAM = {"a": 1 / 8 + 0.1, "b": 1 / 8 + 0.1, "c": 0.5 / 8 + 0.1, "</s>": 1.5 / 8 + 0.1, "<unk>": 0.1}
BIGRAM = {  # context a: b, c, </s> once each: gamma(a) = 0.5 * 3 / 3
    ("a", "b"): 0.5 / 3 + 0.5 * UNIGRAM["b"], ("a", "c"): 0.5 / 3 + 0.5 * UNIGRAM["c"],
    ("a", "</s>"): 0.5 / 3 + 0.5 * UNIGRAM["</s>"],
    # context <s>: a twice, b once: gamma(<s>) = (1 * 1 + 0.5 * 1) / 3
    ("<s>", "a"): 1 / 3 + 0.5 * UNIGRAM["a"], ("<s>", "b"): 0.5 / 3 + 0.5 * UNIGRAM["b"],
    # context b: a, </s> once each: gamma(b) = 0.5 * 2 / 2
    ("b", "a"): 0.5 / 2 + 0.5 * UNIGRAM["a"], ("b", "</s>"): 0.5 / 2 + 0.5 * UNIGRAM["</s>"],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = lm.write_arpa(lm.estimate([["a", "b"], ["a", "c"], ["b", "a"]], 2), tmp_path_factory.mktemp("lm") / "t.arpa")
    return path, kenlm.Model(str(path))


def test_probabilities_equal_hand_computed_modified_kneser_ney(tiny):
    path, _ = tiny
    listed = {}
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            listed[tuple(parts[1].split())] = float(parts[0])
    for word, p in UNIGRAM.items():
        assert listed[(word,)] == pytest.approx(math.log10(p), abs=1e-6), word
    for gram, p in BIGRAM.items():
        assert listed[gram] == pytest.approx(math.log10(p), abs=1e-6), gram
    assert sum(UNIGRAM.values()) == pytest.approx(1.0)


def test_kenlm_reads_it_with_backoff(tiny):
    _, model = tiny
    sentence = math.log10(BIGRAM[("<s>", "a")] * BIGRAM[("a", "b")] * BIGRAM[("b", "</s>")])
    assert model.score("a b", bos=True, eos=True) == pytest.approx(sentence, abs=1e-5)
    # "a a" was never seen: p(a | a) = gamma(a) * p(a); "c a": gamma(c) = 1, c was never a context
    unseen = math.log10(BIGRAM[("<s>", "a")] * 0.5 * UNIGRAM["a"] * BIGRAM[("a", "</s>")])
    assert model.score("a a", bos=True, eos=True) == pytest.approx(unseen, abs=1e-5)
    assert model.score("zzz", bos=False, eos=False) == pytest.approx(math.log10(UNIGRAM["<unk>"]), abs=1e-5)


def test_every_context_sums_to_one(tmp_path):
    rng = random.Random(0)
    words = "o gato come pão a menina vê flores".split()
    model = kenlm.Model(str(lm.write_arpa(
        lm.estimate([[rng.choice(words) for _ in range(rng.randint(1, 6))] for _ in range(300)], 3),
        tmp_path / "m.arpa")))
    vocab = words + ["</s>", "<unk>"]
    for context in ([], ["o"], ["o", "gato"], ["zzz", "o"], ["flores", "flores"]):
        state = kenlm.State()
        model.BeginSentenceWrite(state) if not context else model.NullContextWrite(state)
        for word in context:
            out = kenlm.State()
            model.BaseScore(state, word, out)
            state = out
        total = sum(10 ** model.BaseScore(state, w, kenlm.State()) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-5), context


def noisy_posteriors(sentence: str, vocab: Vocabulary, rng: random.Random, flip: float) -> np.ndarray:
    """(T, V) log-probabilities of a CTC model that hears every character, but prefers a wrong letter for
    a fraction `flip` of them: what a weak acoustic model gives and a word LM can correct."""
    letters = [i for t, i in vocab.ids.items() if t.isalpha()]
    rows = []
    for token in vocab.encode(sentence):
        row = np.full(len(vocab), -4.0)
        row[token] = 2.0
        if token in letters and rng.random() < flip:
            row[rng.choice(letters)] = 2.5
        blank = np.full(len(vocab), -4.0)
        blank[vocab.blank_id] = 3.0
        rows += [row, blank]
    return torch.log_softmax(torch.tensor(np.array(rows)), -1).numpy().astype(np.float32)


def test_lm_beam_search_beats_greedy_on_a_word_level_pattern(tmp_path):
    rng = random.Random(0)
    sentences = [text.normalize(s, "pt") for s in synth.demo_sentences(320, rng)]
    train, test = sentences[:300], sentences[300:]  # test sentences: new combinations of known words
    vocab = Vocabulary.from_transcripts(train)
    decoder = lm.beam_decoder(vocab.tokens, lm.build(train, tmp_path, order=3, language="pt"), alpha=0.5, beta=1.0)
    plain = lm.beam_decoder(vocab.tokens, None, alpha=0.5, beta=1.0)
    greedy, beam, with_lm = ErrorRates(), ErrorRates(), ErrorRates()
    for sentence in test:
        log_probs = noisy_posteriors(sentence, vocab, rng, flip=0.15)
        frames = torch.tensor([len(log_probs)])
        greedy.update([sentence], vocab.greedy_decode(torch.from_numpy(log_probs)[None], frames, None))
        beam.update([sentence], [text.normalize(plain.decode(log_probs), "pt")])
        with_lm.update([sentence], [text.normalize(decoder.decode(log_probs), "pt")])
    assert beam.rates()["wer"] == pytest.approx(greedy.rates()["wer"], abs=0.05)  # no LM: no help
    assert greedy.rates()["wer"] > 0.3
    assert with_lm.rates()["wer"] < 0.3 * greedy.rates()["wer"]
    assert with_lm.rates()["cer"] < 0.3 * greedy.rates()["cer"]


@pytest.mark.slow  # 9-13 s of processes: make test stays under 8 minutes on 2 cores
def test_lm_command_names_a_missing_or_empty_text(tmp_path):
    import subprocess
    import sys

    import asr

    (tmp_path / "empty.txt").write_text("?!\n", encoding="utf-8")
    for text_file in (tmp_path / "nope.txt", tmp_path / "empty.txt"):
        result = subprocess.run([sys.executable, "-m", "asr.tools.lm", f"text={text_file}", f"out={tmp_path / 'lm'}"],
                                cwd=asr.REPO_DIR, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "error: " in result.stderr and f"text={text_file}" in result.stderr
