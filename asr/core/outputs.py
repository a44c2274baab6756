"""What the tools write at `out=` (transcribe.py, python -m asr.tools.align, export, average and lm), under one rule:

- `claim`, before any work: an `out` that holds something (an empty file or directory holds nothing) that the
  same tool did not write for the same purpose is refused in one line naming `overwrite=true`; a directory where
  a file is written, or a file where a directory is, is refused whatever `overwrite` says. What a tool wrote is
  known by its own format where the format says so (`Output.own`: a transcript archive's first line, an average's
  `averaged`, an export's asr.json, an LM's unigrams.txt, a corpus's train.tsv header), else by the ledger
  `.asr-output.json`, a hidden JSON file in the directory written into: its "." entry names the tool and purpose
  of the directory itself (`mark`: a directory of subtitles), its entry under a file's name those of that file
  with the sha256 of what was written (`record`: a subtitle or alignment file), so that a file changed since (a
  subtitle corrected by hand) is no longer the tool's.
- Names that would collide are made unique by their path below the inputs' common folder (`targets`).
- An archive or a corpus is appended to, never rewritten: its tool opens it to append.
- Every other write goes through a temporary file in the same directory and `os.replace` (`write`, `atomic`,
  `staged`): a reader, or a process killed mid-write, finds the old file or the new one, never part of one.
  A killed writer leaves its temporary `.<name>.<pid>.partial` beside the file."""

import contextlib
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asr import SetupError

LEDGER = ".asr-output.json"


def partial_path(path: Path) -> Path:
    """The temporary name `path` is written under before it is renamed into place (run directories remove what
    a killed writer left of these: `asr.run.rundir.hold`)."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


@contextlib.contextmanager
def atomic(path: str | Path, mode: str = "w"):
    """A file object to write `path`'s new content into: a temporary file beside it, flushed to disk and renamed
    into place when the block ends without an error (removed when it raises). Its directory is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        with open(partial, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write(path: str | Path, content: str | bytes) -> None:
    """`content` (text as UTF-8) into `path`, whole (`atomic`)."""
    with atomic(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


@contextlib.contextmanager
def staged(directory: str | Path):
    """A temporary directory beside `directory` for a writer that names its own files (transformers'
    save_pretrained, an ONNX export): when the block ends, each file is renamed into `directory` at the same
    relative path (each replaced whole; the directory's other files stay); when it raises, nothing is moved."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(directory)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        for file in sorted(p for p in temporary.rglob("*") if p.is_file()):
            target = directory / file.relative_to(temporary)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


@dataclass(frozen=True)
class Output:
    """What a tool writes at an `out=`, for `claim` and its refusals."""

    tool: str  # the command, as the user types it: "python -m asr.tools.export"
    purpose: str  # what it writes there, as a refusal names it: "a transcript archive", "an MMS directory"
    directory: bool  # a directory of files (else one file)
    example: str  # a valid out= for the refusal of the wrong kind: "<dir>/average.ckpt"
    own: Callable[[Path], bool] | None  # recognises this purpose's output by its format; None: the ledger
    appends: bool  # it adds to its own output (an archive, a corpus), rather than replacing it


def holds_something(path: Path) -> bool:
    """Whether `path` exists and is not empty (a directory: nothing but a ledger)."""
    if path.is_dir():
        return any(p.name != LEDGER for p in path.iterdir())
    return path.exists() and path.stat().st_size > 0


def claim(out: Path, output: Output, overwrite: bool) -> bool:
    """Whether `out` holds `output`'s own earlier result (to replace, or to append to); False when it is to be
    written anew (it does not exist or holds nothing, or overwrite=true gives someone else's). SetupError, in
    one line naming the way out, when it holds something else, or is of the wrong kind."""
    if out.is_dir() != output.directory and out.exists():
        kind, wanted = ("a directory", "a file") if out.is_dir() else ("a file", "a directory")
        raise SetupError(f"out={out} is {kind}; {output.tool} writes {output.purpose}, {wanted}: give another "
                         f"out= ({output.example})")
    if not holds_something(out):
        return False
    if _is_own(out, output):
        return True
    if overwrite:
        return False
    into = "add to it" if output.appends and output.directory else "write into it" if output.directory else (
        "replace it")
    raise SetupError(f"out={out} exists and is not {output.purpose} that {output.tool} wrote: give another out=, "
                     f"or overwrite=true to {into}")


def _is_own(out: Path, output: Output) -> bool:
    """Whether `out` is `output`'s: by its format (`output.own`), else by its entry in the ledger."""
    if output.own is not None:
        return output.own(out)
    if output.directory:
        return _ledger(out).get(".") == _entry(output)
    return _ledger(out.parent).get(out.name) == {**_entry(output), "sha256": _sha256(out)}


def mark(out: Path, output: Output) -> None:
    """The directory `out` (created) recorded as `output.tool`'s `output.purpose` in its ledger."""
    out.mkdir(parents=True, exist_ok=True)
    _enter(out, ".", _entry(output))


def record(out: Path, output: Output) -> None:
    """The file `out`, just written, recorded as `output.tool`'s `output.purpose`, with its sha256, in the ledger
    of its directory; a file of a self-describing format (`output.own`) needs none."""
    if output.own is None:
        _enter(out.parent, out.name, {**_entry(output), "sha256": _sha256(out)})


def _entry(output: Output) -> dict:
    return {"tool": output.tool, "purpose": output.purpose}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ledger(directory: Path) -> dict:
    """The ledger of `directory`: {"." or a file's name: its entry}; empty where there is none, or it is unreadable."""
    try:
        ledger = json.loads((directory / LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return ledger if isinstance(ledger, dict) else {}


def _enter(directory: Path, name: str, entry: dict) -> None:
    write(directory / LEDGER, json.dumps({**_ledger(directory), name: entry}, ensure_ascii=False, indent=1) + "\n")


def targets(out: Path, files: list[str], suffix: str) -> dict[str, Path]:
    """Where each input file's output goes: `out` itself when it names a `suffix` file; else under the directory
    `out` at the file's path relative to the files' common folder, its extension replaced by `suffix` (a/x.mp3
    and b/x.mp3: a/x.srt and b/x.srt); where two would still collide (x.mp3 and x.wav), by the whole name
    (x.mp3.srt and x.wav.srt)."""
    if out.suffix == suffix:
        return dict.fromkeys(files, out)
    common = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    relative = {f: Path(os.path.relpath(os.path.abspath(f), common)) for f in dict.fromkeys(files)}
    replaced = {f: r.with_suffix(suffix) for f, r in relative.items()}
    taken = Counter(replaced.values())
    return {f: out / (p if taken[p] == 1 else relative[f].with_name(relative[f].name + suffix))
            for f, p in replaced.items()}
