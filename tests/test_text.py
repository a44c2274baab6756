import random
import unicodedata

import torch
from transformers import Wav2Vec2CTCTokenizer

from asr.core import text
from asr.core.text import PAD, UNK, Vocabulary


def test_normalize_removes_the_robust_speech_event_set_and_lowercases():
    raw = '“Olá,  Mundo!” — disse-me ela; 100% ‘certo’… ok? a–b: "x"'
    assert text.normalize(raw) == "olá mundo disseme ela 100 certo ok ab x"


def test_normalize_keeps_other_characters():
    assert text.normalize("Ծաղիկ   ՄԵԾ ' é\tç") == "ծաղիկ մեծ ' é ç"


def test_vocabulary_follows_hf_conventions():
    vocab = Vocabulary.from_transcripts(["ab a", "ca"])
    # sorted characters, space renamed `|` in its place, then [UNK], [PAD] (the blank) last
    assert vocab.tokens == ["|", "a", "b", "c", UNK, PAD]
    assert vocab.blank_id == 5 and vocab.unk_id == 4
    assert vocab.encode("ab z") == [1, 2, 0, 4]


def test_vocabulary_round_trips_through_vocab_json(tmp_path):
    vocab = Vocabulary.from_transcripts(["olá mundo", "ծաղիկ"])
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").tokens == vocab.tokens


def test_greedy_decode_matches_the_hf_tokenizer(tmp_path):
    vocab = Vocabulary.from_transcripts(["o gato come pão", "a menina vê"])
    vocab.save(tmp_path / "vocab.json")
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), unk_token=UNK, pad_token=PAD,
                                     word_delimiter_token="|")
    rng = random.Random(0)
    for _ in range(50):
        # realistic paths: runs of repeated ids and blanks, never [UNK]
        ids = []
        for _ in range(rng.randint(1, 30)):
            ids += [rng.choice([vocab.blank_id, rng.randrange(len(vocab) - 2)])] * rng.randint(1, 3)
        logits = torch.nn.functional.one_hot(torch.tensor(ids), len(vocab)).float()[None]
        ours = vocab.greedy_decode(logits, torch.tensor([len(ids)]), None)[0]
        # HF keeps a double space where two delimiters sit either side of a blank; we collapse it,
        # as in the normalised references, so a stray space is not a character error.
        assert ours == " ".join(tokenizer.decode(ids).split())


def test_greedy_decode_collapses_repeats_but_not_across_blanks():
    vocab = Vocabulary.from_transcripts(["ab"])
    a, b, blank = vocab.ids["a"], vocab.ids["b"], vocab.blank_id
    ids = [a, a, blank, a, b, b, blank, blank, vocab.ids["|"], b, blank]
    logits = torch.nn.functional.one_hot(torch.tensor([ids, ids]), len(vocab)).float()
    assert vocab.greedy_decode(logits, torch.tensor([len(ids), 4]), None) == ["aab b", "aa"]


def test_a_pause_of_more_blank_frames_than_the_rule_is_a_word_boundary_greedy_and_by_beam_search():
    """decode.pause_seconds: a run of more than `pause_frames` blank frames between two characters ends a word, in
    the greedy path and, as frames of a certain delimiter, in pyctcdecode's beam search; a shorter run, or a
    pause before the first character or after the last, changes nothing."""
    from asr.model.lm import beam_decoder
    from asr.model.module import decoded

    vocab = Vocabulary.from_transcripts(["ab cd"])
    a, b, c, d, blank = (*(vocab.ids[x] for x in "abcd"), vocab.blank_id)
    ids = [blank] * 9 + [a, b] + [blank] * 6 + [c, d] + [blank] * 3 + [a] + [blank] * 9
    logits = torch.nn.functional.one_hot(torch.tensor([ids]), len(vocab)).float() * 10
    frames = torch.tensor([len(ids)])
    assert vocab.greedy_decode(logits, frames, None) == ["abcda"]
    assert vocab.greedy_decode(logits, frames, 5) == ["ab cda"]  # 6 blank frames > 5; 3 are not
    assert vocab.greedy_decode(logits, frames, 2) == ["ab cd a"]
    assert vocab.greedy_decode(logits, frames, 6) == ["abcda"]
    beam = beam_decoder(vocab.tokens, None, 0.5, 1.0)
    assert decoded(logits, frames, vocab, "pt", 5, beam, 20).hypotheses == ["ab cda"]
    assert decoded(logits, frames, vocab, "pt", None, beam, 20).hypotheses == ["abcda"]


def test_armenian_is_lower_cased_without_its_punctuation():
    assert text.normalize("Բարև, ԻՆՉՊԵ՞Ս ես։ «Լավ» 2024 OK", "hy") == "բարև ինչպես ես լավ 2024 ok"


def test_korean_keeps_syllables_and_word_spaces():
    decomposed = unicodedata.normalize("NFD", "안녕하세요")  # jamo sequences compose back
    assert text.normalize(f"{decomposed}. 「반갑습니다」 3개 ABC", "ko") == "안녕하세요 반갑습니다 3개 abc"


def test_mandarin_has_no_spaces_between_characters_and_keeps_english_words():
    assert text.normalize("我 想 要 Apple Juice，谢谢！", "zh-en") == "我想要 apple juice 谢谢"
    assert text.normalize("我想要apple juice谢谢。", "zh-CN") == "我想要 apple juice 谢谢"
    assert text.normalize("ＡＢＣ１２３ 你好", "zh-CN") == "abc123 你好"  # full-width forms folded
    assert text.normalize("that's 对的", "zh-en") == "that's 对的"
    assert text.mixed_tokens("我想要 apple juice 谢谢") == ["我", "想", "要", "apple", "juice", "谢", "谢"]
    assert text.mixed_tokens("o gato come") == ["o", "gato", "come"]


def test_other_languages_follow_the_hf_rules_exactly():
    raw = "Olá, «mundo»! Ele disse-me: 'sim'."
    assert text.normalize(raw, "pt") == text.normalize(raw) == "olá «mundo» ele disseme 'sim'"
