"""Corpus readers, one per release layout, all yielding the same `Utterance` record.

Layouts are those users download (REFERENCE.md, "Data layouts"). A missing directory, split file or
column raises `SetupError` naming the path and the layout expected.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

from asr import SetupError


@dataclass(frozen=True)
class Utterance:
    id: str  # unique within the corpus; for Common Voice the clip's file name
    path: str  # audio file
    text: str  # transcript as released (normalisation happens later)
    duration: float | None  # seconds, when the release states it
    speaker: str
    language: str  # per-utterance language tag


# Corpus layouts whose readers exist; `lang` configs name one of these in `data.corpus`.
COMMON_VOICE_LAYOUT = (
    "a Common Voice release locale directory (e.g. cv-corpus-17.0/hy-AM) holding clips/*.mp3 and "
    "train.tsv, dev.tsv, test.tsv"
)
PLANNED = {
    "zeroth": "Zeroth-Korean (OpenSLR 40)",
    "ascend": "ASCEND (CAiRE/ASCEND)",
}


def check_root(corpus: str, root: str | None, lang: str) -> str | None:
    """A message saying what is missing and which override supplies it, or None if the root looks usable."""
    if corpus in PLANNED:
        return (f"lang={lang}: the {PLANNED[corpus]} reader is not available in this version; "
                f"only the Common Voice layout is (lang=demo, hy, pt, zh_cn).")
    if corpus != "common_voice":
        return f"data.corpus={corpus!r} is unknown; expected common_voice."
    if root is None:
        return f"lang={lang} needs its corpus: pass data.root=<{COMMON_VOICE_LAYOUT}>."
    if not (Path(root) / "clips").is_dir():
        return f"data.root={root} is not {COMMON_VOICE_LAYOUT}: {Path(root) / 'clips'} does not exist."
    return None


def read_split(corpus: str, root: str, split: str, language: str) -> list[Utterance]:
    if corpus != "common_voice":
        raise SetupError(check_root(corpus, root, language))
    return read_common_voice(Path(root), split, language)


def read_common_voice(root: Path, split: str, language: str) -> list[Utterance]:
    """Rows of `<root>/<split>.tsv`; durations from clip_durations.tsv when the release has it."""
    tsv = root / f"{split}.tsv"
    if not tsv.is_file():
        raise SetupError(f"{tsv} does not exist: data.root must be {COMMON_VOICE_LAYOUT}.")
    durations = {}
    if (root / "clip_durations.tsv").is_file():
        durations = {row["clip"]: int(row["duration[ms]"]) / 1000
                     for row in _read_tsv(root / "clip_durations.tsv", ["clip", "duration[ms]"])}
    return [
        Utterance(id=row["path"], path=str(root / "clips" / row["path"]), text=row["sentence"],
                  duration=durations.get(row["path"]), speaker=row["client_id"], language=language)
        for row in _read_tsv(tsv, ["client_id", "path", "sentence"])
    ]


def _read_tsv(path: Path, required: list[str]) -> list[dict]:
    # Quoting off: Common Voice sentences contain quote characters that are data.
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise SetupError(f"{path} lacks the column(s) {missing}; its header is {reader.fieldnames}.")
        return list(reader)
