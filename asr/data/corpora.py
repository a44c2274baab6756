"""Corpus readers, one per release layout, all giving the same columns (`Clips`).

Layouts are those users download (docs/data.md). A missing directory, split file or
column raises `SetupError` naming the path and the layout expected. Readers only list utterances;
`asr.data.module` checks the audio (missing, unreadable, too long...) and counts what it drops.
"""

import csv
import functools
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from asr import SetupError


@dataclass(frozen=True)
class Utterance:
    id: str  # unique within the corpus; for Common Voice the clip's file name
    path: str  # audio file
    text: str  # transcript as released (normalisation happens later)
    duration: float | None  # seconds, when the release states it
    speaker: str
    language: str  # per-utterance language tag (ASCEND: zh, en or mixed; otherwise the corpus language)


COLUMNS = list(Utterance.__dataclass_fields__)
SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("text", pa.string()),
                    ("duration", pa.float64()), ("speaker", pa.string()), ("language", pa.string())])


class Clips:
    """The utterances of a split in columns: a pyarrow Table (at least the `Utterance` fields; duration is
    null where the release states none) and the numbers of the rows in use.

    A million clips as Python objects cost ~58 us each per start and are copied into every loader
    worker as they are touched (reference counts and the garbage collector write to every object);
    Arrow columns are a few buffers, memory-mapped from the cache where the table comes from one, and
    selecting clips copies row numbers only. `clips[i]` is one `Utterance`; `clips.column(name)` a whole
    column of the rows in use (numpy for numbers, a list for strings). `seconds`, once the clips are
    checked (`asr.data.listing.check_split`), is every clip's duration, from the release or its header.
    """

    def __init__(self, table: pa.Table, rows: np.ndarray | None = None, seconds: np.ndarray | None = None):
        self.table = table
        self.rows = np.arange(table.num_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        self.seconds = seconds

    @classmethod
    def from_records(cls, utterances) -> "Clips":
        return cls(pa.Table.from_pylist([u.__dict__ for u in utterances], schema=SCHEMA))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Utterance:
        row = int(self.rows[i])
        utterance = Utterance(**{name: self.table.column(name)[row].as_py() for name in COLUMNS})
        return utterance if self.seconds is None else replace(utterance, duration=float(self.seconds[i]))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def arrow(self, name: str) -> pa.ChunkedArray:
        """A column of the rows in use, as Arrow (no Python objects)."""
        column = self.table.column(name)
        return column if self.covers_table() else column.take(self.rows)

    def column(self, name: str) -> np.ndarray | list:
        """A column of the rows in use: numbers as numpy (null: NaN), strings as a list."""
        values = self.arrow(name)
        if pa.types.is_floating(values.type) or pa.types.is_integer(values.type):
            return values.to_numpy(zero_copy_only=False)
        return values.to_pylist()

    def select(self, rows) -> "Clips":
        """The clips at these positions (indices or a boolean mask), sharing this table."""
        return Clips(self.table, self.rows[rows], None if self.seconds is None else self.seconds[rows])

    def covers_table(self) -> bool:
        """Whether the clips are the whole table, in its order."""
        n = self.table.num_rows
        return len(self.rows) == n and (n == 0 or bool(self.rows[0] == 0 and np.all(np.diff(self.rows) == 1)))

    @staticmethod
    def concat(parts: list["Clips"]) -> "Clips":
        """One split of several (their tables share the columns of the first); of one, that one."""
        if len(parts) == 1:
            return parts[0]
        names = parts[0].table.column_names
        tables = [p.table.select(names) for p in parts]
        offsets = np.cumsum([0] + [t.num_rows for t in tables[:-1]])
        metadata = [t.schema.metadata or {} for t in tables]  # not the first part's `characters`
        lines = [line for m in metadata for line in json.loads(m.get(b"malformed_lines", b"[]"))]
        malformed = {b"malformed_rows": str(sum(int(m.get(b"malformed_rows", 0)) for m in metadata)),
                     b"malformed_lines": json.dumps(lines)}
        table = pa.concat_tables(tables, promote_options="permissive").replace_schema_metadata(malformed)
        # before any check: no seconds
        return Clips(table, np.concatenate([p.rows + o for p, o in zip(parts, offsets)]))

    @staticmethod
    def join(parts: list["Clips"]) -> "Clips":
        """Checked clips of several corpora as one (the columns of the first, with their seconds); of one, that one,
        sharing its table (a million clips mapped from the cache are not copied)."""
        if len(parts) == 1:
            return parts[0]
        names = parts[0].table.column_names
        tables = [p.table.take(p.rows).select(names) for p in parts]
        table = pa.concat_tables(tables, promote_options="permissive").replace_schema_metadata(None)
        return Clips(table, seconds=np.concatenate([p.seconds for p in parts]))


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


def read_split(corpus: str, root: str, split: str, language: str, columns: dict | None = None, *,
               cache_dir: str | Path) -> Clips:
    """Utterances of one split as the release names it (train, dev, validation, test, validated...).

    Audio held inside a `datasets` copy is written once to files under `cache_dir` (`data.cache_dir`:
    bytes as stored, no re-encoding), so every corpus reaches the loader as audio files.
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
        raise SetupError("data.corpus=hf_dataset needs data.columns (at least audio and text column names); "
                         "e.g. data.columns='{audio: audio, text: sentence}'.")
    columns = {**HUB_COLUMNS.get(corpus, {}), **(columns or {})}
    return read_hf_dataset(root, split, language, columns, Path(cache_dir).expanduser())


def sources(corpus: str, root: str, split: str) -> list[Path] | None:
    """The files a split is listed in (their stamps key `asr.data.module`'s listing cache), or None where the
    listing also writes files (a datasets copy's audio is extracted) and is not cached."""
    root = Path(root)
    if corpus == "common_voice":
        return [root / f"{split}.tsv", root / "clip_durations.tsv"]
    if corpus == "zeroth" and (root / "train_data_01").is_dir() and split in ZEROTH_SPLITS:
        return sorted((root / ZEROTH_SPLITS[split]).glob("*/*/*.trans.txt"))
    if corpus == "ascend" and (table := _metadata_csv(root, split)):
        return [table]
    return None


def read_common_voice(root: Path, split: str, language: str) -> Clips:
    """Rows of `<root>/<split>.tsv`; durations from clip_durations.tsv when the release has it.

    Read by Arrow's CSV reader (a million rows in about a second) with quoting off: quotes are data.
    A row with another number of fields than the header is left out and counted (`malformed_rows` in
    the table's metadata, reported by `asr.data.module`).
    """
    tsv = root / f"{split}.tsv"
    if not tsv.is_file():
        raise SetupError(f"{tsv} does not exist: data.root must be {LAYOUTS['common_voice']}.")
    rows = _read_tsv(tsv, ["client_id", "path", "sentence"])
    paths = rows.column("path")
    seconds = pa.nulls(len(paths), pa.float64())
    if (root / "clip_durations.tsv").is_file():
        durations = _read_tsv(root / "clip_durations.tsv", ["clip", "duration[ms]"])
        where = pc.index_in(paths, value_set=durations.column("clip"))  # null: the release states none
        milliseconds = pc.cast(durations.column("duration[ms]"), pa.float64(), safe=False)
        seconds = pc.divide(pc.take(milliseconds, where), 1000.0)
    clips_dir = str(root / "clips") + "/"
    table = pa.table({
        "id": paths, "path": pc.binary_join_element_wise(clips_dir, paths, ""), "text": rows.column("sentence"),
        "duration": seconds, "speaker": rows.column("client_id"),
        "language": pa.array(np.full(len(paths), language, dtype=object), pa.string()),
    }, schema=SCHEMA)
    return Clips(table.replace_schema_metadata(rows.schema.metadata))


def _read_tsv(path: Path, required: list[str]) -> pa.Table:
    """The `required` columns of a Common Voice TSV, all as strings except a duration in ms."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    missing = [c for c in required if c not in header]
    if missing:
        raise SetupError(f"{path} lacks the column(s) {missing}; its header is {header}.")
    malformed = []

    def skip(row) -> str:
        malformed.append(f"{path.name}: {row.text[:80]}")  # Arrow knows no row numbers when threaded
        return "skip"

    table = pacsv.read_csv(
        path,
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                         invalid_row_handler=skip),
        convert_options=pacsv.ConvertOptions(
            include_columns=required,
            column_types={c: pa.int64() if c == "duration[ms]" else pa.string() for c in required}),
    )
    return table.replace_schema_metadata({"malformed_rows": str(len(malformed)),
                                          "malformed_lines": json.dumps(malformed[:5], ensure_ascii=False)})


ZEROTH_SPLITS = {"train": "train_data_01", "test": "test_data_01"}


def read_zeroth(root: Path, split: str, language: str) -> Clips:
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
    return Clips.from_records(utterances)


def _metadata_csv(root: Path, split: str) -> Path | None:
    for path in (root / f"{split}.csv", root / split / "metadata.csv"):
        if path.is_file():
            return path
    return None


def read_csv_folder(root: Path, split: str, language: str, columns: dict) -> Clips:
    """A folder of audio files with a metadata CSV per split; paths are relative to the CSV's folder."""
    table = _metadata_csv(root, split)
    if table is None:
        raise SetupError(f"{root} has neither {split}.csv nor {split}/metadata.csv: data.root must be "
                         f"{LAYOUTS['ascend']}.")
    path_column = "path"
    rows = _read_table(table, [path_column, columns["text"]])
    return Clips.from_records(
        Utterance(
            id=row.get(columns.get("id"), "") or row[path_column],
            path=str(table.parent / row[path_column]),
            text=row[columns["text"]],
            duration=float(row[columns["duration"]]) if row.get(columns.get("duration")) else None,
            speaker=row.get(columns.get("speaker"), "") or "",
            language=row.get(columns.get("language"), "") or language,
        )
        for row in rows
    )


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


def read_hf_dataset(root: Path, split: str, language: str, columns: dict, cache_dir: Path) -> Clips:
    """A local `datasets` copy. columns: audio and text (required), id, speaker, duration, language.

    The audio column is read as Arrow: a row's bytes become Python bytes only when its file must be
    written; a file already extracted (same size) is not read again.
    """
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
    audio = table.select_columns([present["audio"]]).with_format("arrow")[:][present["audio"]]  # struct<bytes, path>
    names = pc.struct_field(audio, "path").to_pylist()
    sizes = pc.binary_length(pc.struct_field(audio, "bytes")).to_pylist()  # None: no bytes stored
    out_dir = cache_dir / "extracted" / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16] / split
    utterances = []
    for i, (audio_name, size) in enumerate(zip(names, sizes)):
        path = _audio_file(root, audio_name or "", size, lambda i=i: audio[i]["bytes"].as_py(), out_dir, i)
        value = {key: meta[name][i] for key, name in present.items() if key != "audio"}
        utterances.append(Utterance(
            id=str(value.get("id", i)), path=path, text=value["text"] or "",
            duration=float(value["duration"]) if value.get("duration") is not None else None,
            speaker=str(value.get("speaker", "")), language=str(value.get("language") or language),
        ))
    return Clips.from_records(utterances)


def _audio_file(root: Path, name: str, size: int | None, read_bytes, out_dir: Path, index: int) -> str:
    """The file holding one row's audio: its own path if that exists, else its `size` bytes (from
    `read_bytes()`) written once. The `.partial` name carries the process id: ranks extracting at once
    never write into one file."""
    for candidate in (Path(name), root / name):
        if name and candidate.is_file():
            return str(candidate)
    if not size:
        return str(root / name)  # neither file nor bytes: reported as a missing file
    target = out_dir / f"{index:08d}_{Path(name).name or 'audio.wav'}"
    if not target.is_file() or target.stat().st_size != size:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        partial.write_bytes(read_bytes())
        partial.replace(target)  # a crash mid-write never leaves a truncated clip behind
    return str(target)


def carve_dev(train: Clips, n_speakers: int) -> tuple[Clips, Clips]:
    """(train, dev): the `n_speakers` speakers with the smallest hash of their id are held out for dev.
    Deterministic across runs and machines, independent of file order."""
    speakers = sorted(pc.unique(train.arrow("speaker")).to_pylist(),
                      key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    if len(speakers) <= n_speakers:
        raise SetupError(f"cannot hold out {n_speakers} dev speakers: train has {len(speakers)} speakers. "
                         f"Lower data.dev_speakers or name a dev split with data.dev_split.")
    held_out = _is_in(train.arrow("speaker"), speakers[:n_speakers])
    return train.select(~held_out), train.select(held_out)


def without_speakers(clips: Clips, speakers: pa.ChunkedArray, ids: pa.ChunkedArray) -> Clips:
    """Extra training rows (Common Voice validated.tsv) minus dev/test speakers and clips already used."""
    return clips.select(~(_is_in(clips.arrow("speaker"), speakers) | _is_in(clips.arrow("id"), ids)))


def _is_in(values: pa.ChunkedArray, wanted) -> np.ndarray:
    wanted = pa.chunked_array([wanted]) if isinstance(wanted, list) else wanted
    value_set = pa.concat_arrays(wanted.chunks) if wanted.num_chunks else pa.array([], values.type)
    return pc.fill_null(pc.is_in(values, value_set=value_set), False).to_numpy(zero_copy_only=False)


def _read_table(path: Path, required: list[str]) -> list[dict]:
    """Rows of a metadata CSV (quoting as CSV has it), checked for the `required` columns."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise SetupError(f"{path} lacks the column(s) {missing}; its header is {reader.fieldnames}.")
        return list(reader)
