"""Transcript normalisation, the character vocabulary and greedy CTC decoding.

Conventions of HF `run_speech_recognition_ctc.py` (the robust-speech-event recipe): one token
per character seen in training, the space becomes the word delimiter `|`, then `[UNK]` and `[PAD]`
are appended; `[PAD]` is the CTC blank.
"""

import json
import re
import unicodedata
from pathlib import Path

import torch

# The robust-speech-event set of characters removed from transcripts.
CHARS_TO_IGNORE = [",", "?", ".", "!", "-", ";", ":", '"', "“", "%", "‘", "”", "�", "—", "’", "…", "–"]
# re.escape escapes `-` (and the rest) so the set is safe inside a character class.
_IGNORE = re.compile(f"[{re.escape(''.join(CHARS_TO_IGNORE))}]")
_SPACES = re.compile(r"\s+")
# Armenian punctuation (full stop, comma, question, exclamation and emphasis marks) and guillemets.
_ARMENIAN_PUNCTUATION = re.compile("[\u0589\u055d\u055e\u055c\u055b«»]")
# Han characters: CJK unified ideographs, extension A, compatibility ideographs, extensions B and on.
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_SPACE_BETWEEN_HAN = re.compile(f"(?<=[{HAN}]) (?=[{HAN}])")
_HAN_NEXT_TO_OTHER = re.compile(f"(?<=[{HAN}])(?=[^\\s{HAN}])|(?<=[^\\s{HAN}])(?=[{HAN}])")
_MIXED_TOKEN = re.compile(f"[{HAN}]|[^\\s{HAN}]+")

WORD_DELIMITER, UNK, PAD = "|", "[UNK]", "[PAD]"


def is_chinese(language: str | None) -> bool:
    """zh-CN (Common Voice) and zh-en (ASCEND code-switching): scored by character, and by MER."""
    return bool(language) and language.lower().startswith("zh")


def _strip_punctuation(text: str) -> str:
    # Every Unicode punctuation mark but the apostrophe, which English words keep (don't).
    return "".join(" " if unicodedata.category(c).startswith("P") and c != "'" else c for c in text)


def normalize(text: str, language: str | None = None) -> str:
    """Transcript as the model is trained on it and scored against. Used for labels, references and
    hypotheses alike.

    Everywhere (the HF recipe): NFC, remove `CHARS_TO_IGNORE`, lower-case, collapse whitespace.
    Digits are kept as digits and Latin letters as lower-case letters in every language.
    - hy: also Armenian punctuation (։ ՝ ՞ ՜ ՛) and guillemets; Armenian has case, lower() handles it.
    - ko: also every other punctuation mark (Hangul syllables stay composed, NFC); spaces delimit words.
    - zh-*: NFKC first (full-width letters and digits become ASCII), every punctuation mark removed,
      no space between two Han characters, one space between a Han character and anything else, so
      English words in code-switched speech keep their letters and boundaries.
    """
    chinese = is_chinese(language)
    text = unicodedata.normalize("NFKC" if chinese else "NFC", text)
    text = _IGNORE.sub("", text)
    if language == "hy":
        text = _ARMENIAN_PUNCTUATION.sub("", text)
    elif chinese or language == "ko":
        text = _strip_punctuation(text)
    text = _SPACES.sub(" ", text.lower()).strip()
    if chinese:
        text = _HAN_NEXT_TO_OTHER.sub(" ", _SPACE_BETWEEN_HAN.sub("", text))
    return text


def mixed_tokens(text: str) -> list[str]:
    """Units of the mixed error rate: each Han character, and each space-delimited run of anything else
    (an English word). For text without Han characters these are its words."""
    return _MIXED_TOKEN.findall(text)


class Vocabulary:
    """Character tokens; a token's id is its index."""

    def __init__(self, tokens: list[str]):
        if tokens[-1] != PAD or UNK not in tokens:
            raise ValueError(f"a vocabulary ends with {PAD} and holds {UNK}; got {tokens[-3:]}")
        self.tokens = list(tokens)
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        self.blank_id = self.ids[PAD]
        self.unk_id = self.ids[UNK]

    @classmethod
    def from_transcripts(cls, texts) -> "Vocabulary":
        """Sorted characters of normalised `texts`, space renamed `|`, then `[UNK]`, `[PAD]`."""
        chars = sorted(set().union(*map(set, texts)))
        # The HF script gives `|` the id of the space it replaces (usually 0).
        tokens = [WORD_DELIMITER if c == " " else c for c in chars]
        if WORD_DELIMITER not in tokens:
            tokens.append(WORD_DELIMITER)
        return cls(tokens + [UNK, PAD])

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        token_to_id = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(sorted(token_to_id, key=token_to_id.get))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.ids, ensure_ascii=False, indent=1), encoding="utf-8")

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Ids of a normalised transcript; unseen characters become `[UNK]`."""
        return [self.ids.get(WORD_DELIMITER if c == " " else c, self.unk_id) for c in text]

    def decode_ids(self, ids) -> str:
        """Text of already-collapsed CTC ids (blanks removed)."""
        return "".join(" " if self.tokens[i] == WORD_DELIMITER else self.tokens[i] for i in ids).strip()

    def paused(self, best: torch.Tensor, pause_frames: int | None) -> torch.Tensor:
        """A best path (T,) with each run of more than `pause_frames` blank frames made word delimiters: a pause is
        a word boundary (a CTC model trained on single clips rarely emits a delimiter in a long silence). None, or
        a vocabulary without a delimiter: the path as it is."""
        delimiter = self.ids.get(WORD_DELIMITER)
        if pause_frames is None or delimiter is None or not len(best):
            return best
        ids, counts = torch.unique_consecutive(best, return_counts=True)
        pause = (ids == self.blank_id) & (counts > pause_frames)
        return torch.repeat_interleave(torch.where(pause, delimiter, ids), counts)

    def greedy_decode(self, logits: torch.Tensor, frames: torch.Tensor, pause_frames: int | None) -> list[str]:
        """Best-path decoding, a pause of more than `pause_frames` blank frames a word boundary (`paused`; None:
        none). logits: (B, T, V); frames: (B,) valid frames per utterance."""
        best = logits.argmax(dim=-1).cpu()  # one host sync per batch
        texts = []
        for row, n in zip(best, frames.tolist()):
            ids = torch.unique_consecutive(self.paused(row[:n], pause_frames))
            texts.append(_SPACES.sub(" ", self.decode_ids(ids[ids != self.blank_id].tolist())))
        return texts
