"""Corpus readers, one per release layout, all yielding the same `Utterance` record.

Layouts are those users download (REFERENCE.md, "Data layouts"). A missing directory, split file or
column raises `SetupError` naming the path and the layout expected. Readers only list utterances;
`asr.data` checks the audio (missing, unreadable, too long...) and counts what it drops.
"""

import csv
import functools
import hashlib
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
    language: str  # per-utterance language tag (ASCEND: zh, en or mixed; otherwise the corpus language)


LAYOUTS = {
    "common_voice": "a Common Voice release locale directory (e.g. cv-corpus-17.0/hy-AM) holding clips/*.mp3 "
                    "and train.tsv, dev.tsv, test.tsv",
    "zeroth": "Zeroth-Korean: the OpenSLR 40 directory holding train_data_01/ and test_data_01/, or a local "
              "copy of kresnik/zeroth_korean (a datasets save_to_disk directory or a hub snapshot)",
    "ascend": "ASCEND: a local copy of CAiRE/ASCEND (a datasets save_to_disk directory or a hub snapshot), "
              "or a folder holding <split>.csv or <split>/metadata.csv (columns id, path, transcription, "
              "duration, language, ...) and the audio files the paths name",
    "hf_dataset": "a local datasets audio dataset (a save_to_disk directory or a folder of parquet/arrow files "
                  "as the hub stores them); name its columns with data.columns",
}
# Column names of the hub copies; `data.columns` overrides them (and names the columns of any other
# `hf_dataset`). id, speaker, duration and language are optional.
HUB_COLUMNS = {
    "zeroth": {"id": "id", "audio": "audio", "text": "text", "speaker": "speaker_id"},
    "ascend": {"id": "id", "audio": "audio", "text": "transcription", "speaker": "original_speaker_id",
               "duration": "duration", "language": "language"},
}


def check_root(corpus: str, root: str | None, lang: str) -> str | None:
    """A message saying what is missing and which override supplies it, or None if the root looks usable."""
    if corpus not in LAYOUTS:
        return f"data.corpus={corpus!r} is unknown; expected one of {sorted(LAYOUTS)}."
    if root is None:
        return f"lang={lang} needs its corpus: pass data.root=<{LAYOUTS[corpus]}>."
    if not Path(root).is_dir():
        return f"data.root={root} does not exist; expected {LAYOUTS[corpus]}."
    if corpus == "common_voice" and not (Path(root) / "clips").is_dir():
        return f"data.root={root} is not {LAYOUTS[corpus]}: {Path(root) / 'clips'} does not exist."
    return None


def read_split(corpus: str, root: str, split: str, language: str, columns: dict | None = None,
               cache_dir: str | Path = "~/.cache/asr") -> list[Utterance]:
    """Utterances of one split as the release names it (train, dev, validation, test, validated...).

    Audio held inside a `datasets` copy is written once to files under `cache_dir` (bytes as stored,
    no re-encoding), so every corpus reaches the loader as audio files.
    """
    if problem := check_root(corpus, root, language):
        raise SetupError(problem)
    root = Path(root)
    if corpus == "common_voice":
        return read_common_voice(root, split, language)
    if corpus == "zeroth" and (root / "train_data_01").is_dir():
        return read_zeroth(root, split, language)
    if corpus == "ascend" and _metadata_csv(root, split):
        return read_csv_folder(root, split, language, {**HUB_COLUMNS["ascend"], **(columns or {})})
    if corpus == "hf_dataset" and not columns:
        raise SetupError(f"data.corpus=hf_dataset needs data.columns (at least audio and text column names); "
                         f"e.g. data.columns='{{audio: audio, text: sentence}}'.")
    columns = {**HUB_COLUMNS.get(corpus, {}), **(columns or {})}
    return read_hf_dataset(root, split, language, columns, Path(cache_dir).expanduser())


def read_common_voice(root: Path, split: str, language: str) -> list[Utterance]:
    """Rows of `<root>/<split>.tsv`; durations from clip_durations.tsv when the release has it."""
    tsv = root / f"{split}.tsv"
    if not tsv.is_file():
        raise SetupError(f"{tsv} does not exist: data.root must be {LAYOUTS['common_voice']}.")
    durations = {}
    if (root / "clip_durations.tsv").is_file():
        durations = {row["clip"]: int(row["duration[ms]"]) / 1000
                     for row in _read_table(root / "clip_durations.tsv", ["clip", "duration[ms]"])}
    return [
        Utterance(id=row["path"], path=str(root / "clips" / row["path"]), text=row["sentence"],
                  duration=durations.get(row["path"]), speaker=row["client_id"], language=language)
        for row in _read_table(tsv, ["client_id", "path", "sentence"])
    ]


ZEROTH_SPLITS = {"train": "train_data_01", "test": "test_data_01"}


def read_zeroth(root: Path, split: str, language: str) -> list[Utterance]:
    """OpenSLR 40: `<part>/003/<speaker>/<speaker>_003.trans.txt` lines `<utterance-id> <text>`, audio
    `<utterance-id>.flac` beside it. Zeroth has train and test only (dev: `data.dev_split=null`)."""
    if split not in ZEROTH_SPLITS:
        raise SetupError(f"Zeroth-Korean has the splits {sorted(ZEROTH_SPLITS)}, not {split!r}; its dev set is "
                         f"carved from train by speaker (data.dev_split=null, data.dev_speakers=N).")
    part = root / ZEROTH_SPLITS[split]
    transcripts = sorted(part.glob("*/*/*.trans.txt"))
    if not transcripts:
        raise SetupError(f"{part} holds no <chapter>/<speaker>/*.trans.txt: data.root must be {LAYOUTS['zeroth']}.")
    utterances = []
    for trans in transcripts:
        speaker = trans.parent.name
        for line in trans.read_text(encoding="utf-8").splitlines():
            utt_id, _, sentence = line.strip().partition(" ")
            if utt_id:
                utterances.append(Utterance(utt_id, str(trans.parent / f"{utt_id}.flac"), sentence, None,
                                            speaker, language))
    return utterances


def _metadata_csv(root: Path, split: str) -> Path | None:
    for path in (root / f"{split}.csv", root / split / "metadata.csv"):
        if path.is_file():
            return path
    return None


def read_csv_folder(root: Path, split: str, language: str, columns: dict) -> list[Utterance]:
    """A folder of audio files with a metadata CSV per split; paths are relative to the CSV's folder."""
    table = _metadata_csv(root, split)
    if table is None:
        raise SetupError(f"{root} has neither {split}.csv nor {split}/metadata.csv: data.root must be "
                         f"{LAYOUTS['ascend']}.")
    path_column = "path"
    rows = _read_table(table, [path_column, columns["text"]], delimiter=",")
    return [
        Utterance(
            id=row.get(columns.get("id"), "") or row[path_column],
            path=str(table.parent / row[path_column]),
            text=row[columns["text"]],
            duration=float(row[columns["duration"]]) if row.get(columns.get("duration")) else None,
            speaker=row.get(columns.get("speaker"), "") or "",
            language=row.get(columns.get("language"), "") or language,
        )
        for row in rows
    ]


@functools.cache
def _open_dataset(root: Path):
    import datasets  # imported on use: Common Voice and Zeroth folders do not need it

    try:
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            dataset = datasets.load_from_disk(str(root))  # save_to_disk layout
        else:
            dataset = datasets.load_dataset(str(root))  # parquet/arrow files, split names from file names
    except Exception as error:  # datasets raises several types for a folder it cannot read
        raise SetupError(f"{root} does not load with datasets ({type(error).__name__}: {error}); "
                         f"expected {LAYOUTS['hf_dataset']}.") from error
    return dataset if isinstance(dataset, datasets.DatasetDict) else datasets.DatasetDict(train=dataset)


def read_hf_dataset(root: Path, split: str, language: str, columns: dict, cache_dir: Path) -> list[Utterance]:
    """A local `datasets` copy. columns: audio and text (required), id, speaker, duration, language."""
    import datasets

    dataset = _open_dataset(root)
    if split not in dataset:
        raise SetupError(f"{root} has no split {split!r}; it has {sorted(dataset)}. Name the splits with "
                         f"data.train_split / data.dev_split / data.test_split.")
    table = dataset[split]
    wanted = {key: name for key, name in columns.items() if name}
    missing = [f"{key}={name}" for key, name in wanted.items()
               if name not in table.column_names and key in ("audio", "text")]
    if missing:
        raise SetupError(f"{root} split {split} lacks the column(s) {missing}; it has {table.column_names}. "
                         f"Set data.columns.<audio|text>=<column>.")
    present = {key: name for key, name in wanted.items() if name in table.column_names}
    meta = table.select_columns([n for k, n in present.items() if k != "audio"]).to_dict()
    audio = table.select_columns([present["audio"]]).cast_column(present["audio"], datasets.Audio(decode=False))
    out_dir = cache_dir / "extracted" / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16] / split
    utterances = []
    for i, row in enumerate(audio):
        path = _audio_file(root, row[present["audio"]], out_dir, i)
        value = {key: meta[name][i] for key, name in present.items() if key != "audio"}
        utterances.append(Utterance(
            id=str(value.get("id", i)), path=path, text=value["text"] or "",
            duration=float(value["duration"]) if value.get("duration") is not None else None,
            speaker=str(value.get("speaker", "")), language=str(value.get("language") or language),
        ))
    return utterances


def _audio_file(root: Path, audio: dict, out_dir: Path, index: int) -> str:
    """The file holding one row's audio: its own path if that exists, else its bytes written once."""
    name = audio.get("path") or ""
    for candidate in (Path(name), root / name):
        if name and candidate.is_file():
            return str(candidate)
    if not audio.get("bytes"):
        return str(root / name)  # neither file nor bytes: reported as a missing file
    target = out_dir / f"{index:08d}_{Path(name).name or 'audio.wav'}"
    if not target.is_file() or target.stat().st_size != len(audio["bytes"]):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".partial")
        partial.write_bytes(audio["bytes"])
        partial.replace(target)  # a crash mid-write never leaves a truncated clip behind
    return str(target)


def carve_dev(train: list[Utterance], n_speakers: int) -> tuple[list[Utterance], list[Utterance]]:
    """(train, dev): the `n_speakers` speakers with the smallest hash of their id are held out for dev.
    Deterministic across runs and machines, independent of file order."""
    speakers = sorted({u.speaker for u in train}, key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    if len(speakers) <= n_speakers:
        raise SetupError(f"cannot hold out {n_speakers} dev speakers: train has {len(speakers)} speakers. "
                         f"Lower data.dev_speakers or name a dev split with data.dev_split.")
    held_out = set(speakers[:n_speakers])
    return [u for u in train if u.speaker not in held_out], [u for u in train if u.speaker in held_out]


def without_speakers(utterances: list[Utterance], speakers: set[str], ids: set[str]) -> list[Utterance]:
    """Extra training rows (Common Voice validated.tsv) minus dev/test speakers and clips already used."""
    return [u for u in utterances if u.speaker not in speakers and u.id not in ids]


def _read_table(path: Path, required: list[str], delimiter: str = "\t") -> list[dict]:
    # Quoting off for the TSVs: Common Voice sentences contain quote characters that are data.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise SetupError(f"{path} lacks the column(s) {missing}; its header is {reader.fieldnames}.")
        return list(reader)
