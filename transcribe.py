"""Transcribe audio files with a trained model: a checkpoint of train.py or an exported directory.

    python transcribe.py model_path=<run>/model audio=clip.mp3                  # one transcript per line
    python transcribe.py model_path=<run>/checkpoints/last.ckpt audio='*.flac' format=json timestamps=word
    python transcribe.py model_path=<run>/model audio=talk.wav format=srt > talk.srt
    python transcribe.py model_path=<run>/model audio=<archive> out=archive.jsonl   # appended, resumable
    python transcribe.py backend=onnx model_path=<onnx export>/model.int8.onnx audio=clip.mp3

Any format soundfile reads, any sample rate (resampled to 16 kHz), any length: files longer than
chunk_seconds are cut into overlapping windows (stride_seconds of context on each side, dropped from the
output), as the transformers ASR pipeline cuts them. The model path is evaluate.py's (`asr.model.transcription`):
files batched by duration (batch_seconds of padded audio), decoded by num_workers loader processes, greedy
transcripts under the model's text rules (asr.core.text.normalize); an exported directory with an LM
(python -m asr.tools.export lm_path=...) decodes by beam search with it. Transcripts come out in the order of the files.
timestamps=word|char give each word's (character's) start and end in seconds and a confidence, from the
CTC frames (`asr.model.transcription`); format=srt|vtt cuts the words into subtitle lines. out=<file.jsonl>
appends a line per file as it is done, with a progress bar (audio-s/s, time left) on stderr, and a run
started again skips the files already there. backend=onnx runs an ONNX export (python -m asr.tools.export format=onnx)
in onnxruntime on the CPU, through the same path. An out= that holds something else (not an archive, not
subtitles transcribe.py wrote) is refused before the model loads; overwrite=true replaces it (`asr.core.outputs`).
Settings: conf/transcribe.yaml (`--help`).

A directory means its audio files, recursively, in sorted order. A file that does not exist, is empty or
does not decode is named on stderr (and in out=, as a line with its error) and the others are transcribed;
then the exit status is 1 and the last line counts the failures.
"""

import glob
import json
import os
import sys
from pathlib import Path

import asr
from asr.core import outputs
from asr.tools import cli


def audio_files(audio) -> list[str]:
    """The files of the `audio` setting: a path, a glob pattern, or a list of either, in the order given; a
    directory stands for its audio files (by extension: the formats soundfile reads), recursively, sorted."""
    import soundfile

    extensions = {f".{name.lower()}" for name in soundfile.available_formats()} | {".opus"}
    names = []
    for pattern in ([audio] if isinstance(audio, str) else list(audio)):
        pattern = str(Path(pattern).expanduser())
        for name in sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]:
            if Path(name).is_dir():
                names += sorted(str(p) for p in Path(name).rglob("*") if p.suffix.lower() in extensions and p.is_file())
            else:
                names.append(name)
    return names


FORMATS, TIMESTAMPS = ("text", "json", "srt", "vtt"), ("none", "word", "char")


def check(args, files: list[str]) -> str | None:
    """Why these settings cannot run together, or None."""
    if args.format not in FORMATS:
        return f"format={args.format}: give one of {', '.join(FORMATS)}"
    if args.timestamps not in TIMESTAMPS:
        return f"timestamps={args.timestamps}: give one of {', '.join(TIMESTAMPS)}"
    if args.chunk_seconds and args.chunk_seconds <= 2 * args.stride_seconds:
        return (f"chunk_seconds={args.chunk_seconds} leaves nothing between its two strides of "
                f"stride_seconds={args.stride_seconds}: give chunk_seconds above {2 * args.stride_seconds:g}")
    if args.format == "text" and args.timestamps != "none" and not args.out:
        return f"timestamps={args.timestamps} needs format=json (or srt, vtt for words): text is one line per file"
    if args.format in ("srt", "vtt"):
        if args.timestamps == "char":
            return f"format={args.format} makes lines of words: timestamps=word (or none)"
        if len(files) > 1 and not args.out:
            return f"format={args.format} for {len(files)} files needs out=<directory> (one subtitle file each)"
        if len(files) > 1 and Path(args.out).suffix == f".{args.format}":
            return (f"out={args.out} names one {args.format} file; {len(files)} files need out=<directory> (one "
                    f"subtitle file each)")
    return None


def is_archive(path: Path) -> bool:
    """Whether `path` is an archive of out=: its first line names the model it was transcribed with (`resume`)."""
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and isinstance(first.get("transcribed_with"), dict)


ARCHIVE = outputs.Output(tool="transcribe.py", purpose="a transcript archive", directory=False,
                         example="<dir>/archive.jsonl", own=is_archive, appends=True)
SUBTITLES = outputs.Output(tool="transcribe.py", purpose="subtitles", directory=False, example="<dir>/talk.srt",
                           own=None, appends=False)
SUBTITLE_DIRECTORY = outputs.Output(tool="transcribe.py", purpose="a directory of subtitles", directory=True,
                                    example="<dir>/subtitles", own=None, appends=False)


def resume(out: Path, model: str, fresh: bool) -> set[str]:
    """The files an earlier run already transcribed into the JSON lines file `out` (its lines after the first,
    which names the model); a line cut short by a killed run is cut off, and a file whose line is an error is not
    done: this run tries it again (the archive keeps the error line, and a new line follows it). A file of
    another model is refused. A `fresh` archive (`asr.core.outputs.claim`) gets its first line, replacing what
    was there."""
    if fresh:
        outputs.write(out, json.dumps({"transcribed_with": {"model": model}}, ensure_ascii=False) + "\n")
        return set()
    data = out.read_bytes()
    if not data.endswith(b"\n"):  # the last line was being written when the run stopped
        data = data[: data.rfind(b"\n") + 1]
        os.truncate(out, len(data))  # appended to, never rewritten
    lines = data.decode("utf-8").splitlines()
    theirs = json.loads(lines[0])["transcribed_with"].get("model")
    if theirs != model:
        raise asr.SetupError(f"out={out} holds transcripts of "
                             f"{theirs or 'something else (its first line names no model)'}, "
                             f"not of model_path={model}: give another out= (or that model_path to go on with it)")
    return {entry["path"] for entry in map(json.loads, filter(str.strip, lines[1:])) if "error" not in entry}


def main(argv: list[str]) -> None:
    args, _ = cli.parse("transcribe", argv)
    files = audio_files(args.audio)
    if not files:
        sys.exit(f"error: audio={args.audio} matches no file (a directory: no audio file in it)")
    if problem := check(args, files):
        sys.exit(f"error: {problem}")

    (backend,) = cli.values(args, "backend", ("torch", "onnx"))
    if backend == "onnx" and args.device not in ("auto", "cpu"):
        sys.exit(f"error: backend=onnx runs on the CPU (onnxruntime's CPU build): device=cpu, not {args.device}")

    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    # transformers and lightning take ~7 s to import (asr.model.module): not for --help or a refused setting
    from asr.data import loading
    from asr.model import inference, transcription

    hf_logging.disable_progress_bar()  # its "Loading weights" bar: transcripts only on stdout, errors on stderr
    subtitles = args.format in ("srt", "vtt")
    timestamps = "word" if subtitles else args.timestamps
    out = Path(args.out).expanduser() if args.out else None
    archive = out if out and not subtitles else None
    targets = outputs.targets(out, files, f".{args.format}") if subtitles and out else {}
    written = ARCHIVE if archive else SUBTITLES if out and out.suffix == f".{args.format}" else SUBTITLE_DIRECTORY
    try:
        num_workers = loading.workers(args.num_workers)  # a bad setting stops before the model loads
        ours = outputs.claim(out, written, args.overwrite) if out else False  # and an out= it may not write
        if backend == "onnx":
            from asr.model.onnx import OnnxModel  # onnxruntime: only for backend=onnx

            if args.base is not None:
                raise asr.SetupError("base= points a checkpoint of adapters or LoRA at its moved base (backend=torch); "
                                     "an ONNX export holds every weight")
            if args.target_lang is not None:
                raise asr.SetupError("target_lang picks the adapters of an exported MMS directory (backend=torch)")
            model, decoder = OnnxModel.load(args.model_path)
        else:
            model, decoder = inference.load(args.model_path, args.target_lang, args.base)
            model = model.to(asr.device(args.device)).eval()
        recognizer = transcription.Recognizer(model, decoder, args.beam_width, timestamps)
        done = resume(archive, str(Path(args.model_path).expanduser().resolve()), not ours) if archive else set()
    except asr.SetupError as error:
        sys.exit(f"error: {error}")
    todo = [f for f in files if f not in done]
    if done:
        print(f"{len(files) - len(todo)} of {len(files)} files are in {archive} already; transcribing the other "
              f"{len(todo)}", file=sys.stderr, flush=True)
    seconds = [transcription.header_seconds(f) for f in todo]
    bar = tqdm(total=round(sum(s or 0 for s in seconds), 1), unit="audio-s", desc="transcribing", file=sys.stderr,
               disable=archive is None, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}, "
                                                  "{rate_fmt}]")
    if written is SUBTITLE_DIRECTORY and out:
        outputs.mark(out, written)
    sink = archive.open("a", encoding="utf-8") if archive else sys.stdout
    failed = 0
    try:
        for result in transcription.transcribe(
                recognizer, todo, chunk_seconds=args.chunk_seconds, stride_seconds=args.stride_seconds,
                batch_seconds=args.batch_seconds, num_buckets=args.num_buckets, num_workers=num_workers,
                progress=bar.update, seconds=seconds):
            if result.error is not None:  # a bad file is named, the others are transcribed
                print(f"error: {result.error}", file=sys.stderr, flush=True)
                failed += 1
                if archive:
                    sink.write(json.dumps({"path": result.path, "error": result.error}, ensure_ascii=False) + "\n")
            elif subtitles:
                lines = transcription.subtitles(result.words, args.max_line_seconds, args.max_line_chars)
                subtitle = transcription.subtitle_file(lines, args.format)
                if args.out:
                    outputs.write(targets[result.path], subtitle)
                    if written is SUBTITLES:
                        outputs.record(out, written)
                else:
                    sink.write(subtitle)
            elif args.format == "json" or archive:
                line = {"path": result.path, "seconds": round(result.seconds, 3), "text": result.text}
                if result.words is not None:
                    line["words" if timestamps == "word" else "chars"] = result.words
                sink.write(json.dumps(line, ensure_ascii=False) + "\n")
            elif len(files) > 1:  # which line is which file, failures and all
                sink.write(f"{result.path}\t{result.text}\n")
            else:
                sink.write(result.text + "\n")
            sink.flush()
    finally:
        bar.close()
        if archive:
            sink.close()
    if failed:
        retried = f"; out={archive} holds their errors, and a rerun tries them again" if archive else ""
        sys.exit(f"error: {failed} of {len(todo)} files failed (named above); the others were transcribed{retried}")


if __name__ == "__main__":
    main(sys.argv[1:])
