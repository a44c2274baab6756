"""Transcript normalisation, the character vocabulary and greedy CTC decoding.

Conventions of HF `run_speech_recognition_ctc.py` (REFERENCE.md, "Text and vocabulary"): one token
per character seen in training, the space becomes the word delimiter `|`, then `[UNK]` and `[PAD]`
are appended; `[PAD]` is the CTC blank.
"""

import json
import re
from pathlib import Path

import torch

# The robust-speech-event set of characters removed from transcripts.
CHARS_TO_IGNORE = [",", "?", ".", "!", "-", ";", ":", '"', "“", "%", "‘", "”", "�", "—", "’", "…", "–"]
# re.escape escapes `-` (and the rest) so the set is safe inside a character class.
_IGNORE = re.compile(f"[{re.escape(''.join(CHARS_TO_IGNORE))}]")
_SPACES = re.compile(r"\s+")

WORD_DELIMITER, UNK, PAD = "|", "[UNK]", "[PAD]"


def normalize(text: str, language: str | None = None) -> str:
    """Remove `CHARS_TO_IGNORE`, lower-case, collapse whitespace. Used for labels and references alike.

    `language` is the hook for per-language rules; every language uses the HF rules for now.
    """
    return _SPACES.sub(" ", _IGNORE.sub("", text).lower()).strip()


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

    def greedy_decode(self, logits: torch.Tensor, frames: torch.Tensor) -> list[str]:
        """Best-path decoding. logits: (B, T, V); frames: (B,) valid frames per utterance."""
        best = logits.argmax(dim=-1).cpu()  # one host sync per batch
        texts = []
        for row, n in zip(best, frames.tolist()):
            ids = torch.unique_consecutive(row[:n])
            texts.append(_SPACES.sub(" ", self.decode_ids(ids[ids != self.blank_id].tolist())))
        return texts
