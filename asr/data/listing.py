"""A split's listing prepared and checked: transcripts normalised once, the frames CTC needs, what is dropped
and why (the data report), clip durations from the release or the headers."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asr.core import audio, text
from asr.core.frames import Geometry
from asr.data import cache, corpora

log = logging.getLogger(__name__)
AUDIO_PROBLEMS = (audio.MISSING, audio.EMPTY, audio.UNREADABLE)  # drop reasons of a clip's file


_REPEAT = re.compile(r"(.)(?=\1)")  # a character followed by the same one


def frames_needed(transcript: str) -> int:
    """Encoder frames CTC needs for a transcript: one per label, plus a blank between repeated labels."""
    return len(transcript) + len(_REPEAT.findall(transcript))


def prepare(clips: corpora.Clips, language: str | None) -> pa.Table:
    """A listing with transcripts normalised once (`text`), the frames CTC needs for each (`frames`), each
    path's directory and file name (`folder`, dictionary-encoded, and `name`: what the check for missing
    files compares), and the characters of all transcripts in the metadata (`characters`, JSON): the
    vocabulary and every check then work on columns. This is the per-clip work of a start (~8 us a
    clip), which the listing cache saves."""
    transcripts = [text.normalize(t or "", language) for t in clips.column("text")]
    table = clips.table if clips.covers_table() else clips.table.take(clips.rows)
    table = table.set_column(table.column_names.index("text"), "text", pa.array(transcripts, pa.string()))
    table = table.append_column("frames", pa.array([frames_needed(t) for t in transcripts], pa.int32()))
    paths = table.column("path")
    table = table.append_column("folder", pc.dictionary_encode(pc.replace_substring_regex(paths, r"/[^/]*$", "")))
    table = table.append_column("name", pc.replace_substring_regex(paths, r"^.*/", ""))
    metadata = {**(table.schema.metadata or {}),
                b"characters": json.dumps(sorted(set("".join(transcripts))), ensure_ascii=False).encode()}
    return table.replace_schema_metadata(metadata)


def characters(clips: corpora.Clips) -> set[str]:
    """Characters of the clips' (normalised) transcripts; from the listing's metadata when the clips are
    the whole listing."""
    metadata = clips.table.schema.metadata or {}
    if b"characters" in metadata and clips.covers_table():
        return set(json.loads(metadata[b"characters"]))
    return set("".join(clips.column("text")))


def check_split(clips: corpora.Clips, seconds: np.ndarray, problems: dict[int, str], vocab: text.Vocabulary,
                min_seconds: float, max_seconds: float, training: bool,
                geometry: Geometry) -> tuple[corpora.Clips, dict]:
    """Drop and count what cannot train or be scored; the run goes on with the rest.

    clips: a prepared listing (`prepare`: normalised `text`, `frames`). seconds: per clip, from the
    release or the header. problems: clip position -> why its audio cannot be used (missing, unreadable).
    Transcripts longer than the encoder's frames (`geometry`; infinite CTC loss) are dropped from training only:
    in dev and test they are scored, as any other utterance, and unseen characters count as `[UNK]`.

    Returns the kept clips (with `seconds`) and a report
    {"kept": n, "dropped": {reason: n}, "examples": {reason: [ids]}, "unk_characters": n, "unk_examples":
    [up to 10 of those characters], "seconds": s}. A dropped file's example is its id and why (`example`).
    """
    frames = clips.column("frames")
    samples = (np.nan_to_num(seconds) * audio.SAMPLE_RATE).astype(np.int64)
    reason = np.full(len(clips), -1, dtype=np.int8)  # index into `reasons`; the first that applies
    reasons = [*AUDIO_PROBLEMS, "too_short", "too_long", "empty_transcript", "transcript_longer_than_frames"]
    checks = [np.zeros(len(clips), bool) for _ in AUDIO_PROBLEMS]
    for i, problem in problems.items():
        checks[reasons.index(problem)][i] = True
    checks += [seconds < min_seconds, seconds > max_seconds, frames == 0,
               training & (frames > geometry.frames(samples))]
    for code, failed in reversed(list(enumerate(checks))):
        reason[failed] = code
    dropped, examples = {}, {}
    metadata = clips.table.schema.metadata or {}
    if int(metadata.get(b"malformed_rows", 0)):
        dropped["malformed_row"] = int(metadata[b"malformed_rows"])
        examples["malformed_row"] = json.loads(metadata[b"malformed_lines"])[:5]
    ids, paths = clips.arrow("id"), clips.arrow("path")
    for code, name in enumerate(reasons):
        where = np.flatnonzero(reason == code)
        if len(where):
            dropped[name] = len(where)
            examples[name] = [example(i, p, name) for i, p in zip(ids.take(where[:5]).to_pylist(),
                                                                 paths.take(where[:5]).to_pylist())]
    kept = clips.select(reason < 0)
    kept.seconds = seconds[reason < 0]
    unknown = characters(kept) - {" " if t == text.WORD_DELIMITER else t for t in vocab.tokens}
    transcripts = kept.column("text") if unknown else []
    counts = {c: sum(t.count(c) for t in transcripts) for c in unknown}
    report = {"kept": len(kept), "dropped": dropped, "examples": examples, "unk_characters": sum(counts.values()),
              # the commonest of them, most frequent first
              "unk_examples": sorted(counts, key=lambda c: (-counts[c], c))[:10],
              "seconds": round(float(kept.seconds.sum()), 2)}
    return kept, report


def example(utt_id: str, path: str | None, reason: str) -> str:
    """A data report example of a dropped clip: its id, and for a file that cannot be used the message
    transcribe.py gives (`audio.problem`: does not exist, is empty, does not decode as audio)."""
    return f"{utt_id}: {audio.problem(path)[1]}" if reason in AUDIO_PROBLEMS and path else utt_id


def durations(clips: corpora.Clips, cache_file: Path, workers: int) -> tuple[np.ndarray, dict[int, str]]:
    """Seconds per clip and the clips whose audio cannot be used (position -> reason).

    Where the release states a clip's duration, its header is not read: the clip's file is only
    looked up in a listing of its directory (one `listdir` per directory, not a `stat` per clip), and a
    clip corrupt past its name is met, skipped and counted when it is loaded. The other clips' headers
    are read once and cached in `cache_file` (`asr.data.cache.durations`).
    """
    seconds = clips.column("duration").astype(np.float64)
    problems = {}
    stated = ~np.isnan(seconds)
    if stated.any():
        mask = pa.array(stated)
        found = cache.existing(clips.arrow("folder").filter(mask), clips.arrow("name").filter(mask))
        for i in np.flatnonzero(stated)[~found]:
            problems[int(i)] = audio.MISSING
    probe = np.flatnonzero(~stated)
    if len(probe):
        probed = cache.durations(clips.arrow("path").take(probe).to_pylist(), cache_file, workers)
        for i, value in zip(probe, probed):
            if isinstance(value, str):
                problems[int(i)] = value
            else:
                seconds[i] = value
    return seconds, problems


def format_report(report: dict[str, dict]) -> str:
    """The data report as a short table: one row per split, one column per drop reason, then the batch plan:
    batches per epoch, distinct (clips, samples) shapes and the padding they cost (padded audio / all audio
    the encoder computes on). Several corpora: under each split a row per corpus (`<split>:<name>`), and a
    `share` column: each corpus's share of the clips a training epoch draws."""
    rows_of = list(report.items())
    per_corpus = any("corpora" in r for r in report.values())  # data.corpora: each corpus's rows
    if per_corpus:
        rows_of = [row for split, r in report.items()
                   for row in [(split, r), *((f"{split}:{name}", c) for name, c in r.get("corpora", {}).items())]]
    reasons = sorted({k for _, r in rows_of for k in r["dropped"]})
    header = ["split", "kept", "hours", *reasons, "[UNK] chars", "batches", "shapes", "padding",
              *(["share"] if per_corpus else [])]
    rows = [[split, r["kept"], f"{r['seconds'] / 3600:.2f}", *(r["dropped"].get(k, 0) for k in reasons),
             r["unk_characters"],
             *((r["batches"]["batches"], len(r["batches"]["shapes"]), f"{r['batches']['padding']:.1%}")
               if "batches" in r else ("-", "-", "-")),
             *([f"{r['share']['of_clips']:.1%}" if "share" in r else "-"] if per_corpus else [])]
            for split, r in rows_of]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    table = "\n".join("  ".join(str(x).rjust(w) for x, w in zip(line, widths)) for line in [header, *rows])
    augmented = report.get("train", {}).get("augment")
    return table + (f"\ntraining augmentation: {describe_augment(augmented)}" if augmented else "")


def describe_augment(summary: dict) -> str:
    """One line of `Augment.summary()` (the data report's `augment`)."""
    parts = []
    if "speed" in summary:
        speed = summary["speed"]
        parts.append(f"speed x{'/'.join(f'{f:g}' for f in speed['factors'])} (p {speed['prob']:g}; planned on "
                     f"{speed['planned_on']})")
    if "noise" in summary:
        noise = summary["noise"]
        files = ", ".join(f"{c} {n}" for c, n in noise["files"].items())
        skipped = sum(noise.get("skipped", {}).values())
        parts.append(f"noise from {noise['dir']} ({files} files; {noise['unreadable_at_start']} unreadable at start, "
                     f"{skipped} decodes failed) at {noise['snr_db'][0]:g}-{noise['snr_db'][1]:g} dB SNR "
                     f"(p {noise['prob']:g})")
    return "; ".join(parts) or "none"
