import random

import pytest

from asr.model.metrics import ErrorRate, ErrorRates


def test_validations_metric_summed_over_batches_and_ranks_equals_jiwer_and_evaluates():
    """The metric validation logs (`ErrorRate`, one per figure) and evaluate.py's (`ErrorRates`) are one count:
    fed in batches, and merged as two ranks' states are at `compute`, they give jiwer's corpus-level rates."""
    import jiwer

    rng = random.Random(0)
    words = ["o", "gato", "come", "pão", "a", "menina", "vê", "我", "想要", "apple"]
    refs = [" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(200)]
    hyps = [" ".join(rng.choices(words, k=rng.randint(0, 8))) for _ in range(200)]
    errors = ErrorRates()
    errors.update(refs, hyps)
    for metric, expected in (("wer", jiwer.wer(refs, hyps)), ("cer", jiwer.cer(refs, hyps))):
        ranks = [ErrorRate(metric), ErrorRate(metric)]
        for start in range(0, 200, 16):  # batches of 16, alternately on rank 0 and rank 1
            ranks[start // 16 % 2].update(refs[start:start + 16], hyps[start:start + 16])
        ranks[0].merge_state(ranks[1])  # what the sum over ranks does
        assert ranks[0].compute().item() == pytest.approx(expected, rel=1e-6)
        assert errors.rates()[metric] == pytest.approx(expected, rel=1e-9)


def test_mixed_error_rate_counts_han_by_character_and_english_by_word():
    errors = ErrorRates()
    errors.update(["我想要 apple juice", "see you"], ["我要 apple juices", "see you"], ["mixed", "en"])
    # mixed: 5 units (我 想 要 apple juice), 2 edits (想 deleted, juice -> juices); en: 2 units, 0 edits
    assert errors.rates("mixed")["mer"] == pytest.approx(2 / 5)
    assert errors.rates()["mer"] == pytest.approx(2 / 7)
    assert errors.rates("mixed")["wer"] == pytest.approx(2 / 3)  # 我想要 is one "word"
    by_tag = errors.by_tag()
    assert by_tag["en"] == {"wer": 0.0, "cer": 0.0, "mer": 0.0, "n_utterances": 1}


def test_rates_equal_jiwer_on_random_pairs_including_mandarin():
    import jiwer

    from asr.core.text import mixed_tokens
    rng = random.Random(1)
    words = ["o", "gato", "我", "想要", "apple", "juice", "谢谢", "ok"]
    refs = [" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(300)]
    hyps = [" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(300)]
    errors = ErrorRates()
    errors.update(refs, hyps)
    rates = errors.rates()
    assert rates["wer"] == pytest.approx(jiwer.wer(refs, hyps), rel=1e-9)
    assert rates["cer"] == pytest.approx(jiwer.cer(refs, hyps), rel=1e-9)
    assert rates["mer"] == pytest.approx(jiwer.wer([" ".join(mixed_tokens(r)) for r in refs],
                                                   [" ".join(mixed_tokens(h)) for h in hyps]), rel=1e-9)
