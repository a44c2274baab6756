"""Transcribe audio files with a trained model: a checkpoint of train.py or an exported directory.

    python transcribe.py model_path=<run>/model audio=clip.mp3                  # one transcript per line
    python transcribe.py model_path=<run>/checkpoints/last.ckpt audio='*.flac' json=true   # path, seconds, text
    python transcribe.py backend=onnx model_path=<onnx export>/model.int8.onnx audio=clip.mp3

Any format soundfile reads, any sample rate (resampled to 16 kHz), any length: files longer than
chunk_seconds are cut into overlapping windows (stride_seconds of context on each side, dropped from the
output), as the transformers ASR pipeline cuts them. The model path is evaluate.py's (`asr.transcription`):
files batched by duration (batch_seconds of padded audio), decoded by num_workers loader processes, greedy
transcripts under the model's text rules (asr.data.text.normalize); an exported directory with an LM
(asr.export lm_path=...) decodes by beam search with it. Transcripts come out in the order of the files.
backend=onnx runs an ONNX export (asr.export format=onnx) in onnxruntime on the CPU, through the same path.
Settings: conf/transcribe.yaml (`--help`).

A directory means its audio files, recursively, in sorted order. A file that does not exist, is empty or
does not decode is named on stderr and the others are transcribed; then the exit status is 1 and the last
line counts the failures.
"""

import glob
import json
import sys
from pathlib import Path

import asr
from asr import cli


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


def main(argv: list[str]) -> None:
    args, _ = cli.parse("transcribe", argv)
    files = audio_files(args.audio)
    if not files:
        sys.exit(f"error: audio={args.audio} matches no file (a directory: no audio file in it)")
    if args.chunk_seconds and args.chunk_seconds <= 2 * args.stride_seconds:
        sys.exit(f"error: chunk_seconds={args.chunk_seconds} leaves nothing between its two strides of "
                 f"stride_seconds={args.stride_seconds}: give chunk_seconds above {2 * args.stride_seconds:g}")

    (backend,) = cli.values(args, "backend", ("torch", "onnx"))
    if backend == "onnx" and args.device not in ("auto", "cpu"):
        sys.exit(f"error: backend=onnx runs on the CPU (onnxruntime's CPU build): device=cpu, not {args.device}")

    from transformers.utils import logging as hf_logging

    from asr.model.module import CTCModel
    from asr.transcription import transcribe, workers

    hf_logging.disable_progress_bar()  # its "Loading weights" bar: transcripts only on stdout, errors on stderr
    try:
        if backend == "onnx":
            from asr.onnx import OnnxModel

            model, decoder = OnnxModel.load(args.model_path)
        else:
            model, decoder = CTCModel.load(args.model_path)
            model = model.to(asr.device(args.device)).eval()
    except asr.SetupError as error:
        sys.exit(f"error: {error}")
    failed = 0
    for _, name, seconds, transcript, error in transcribe(
            model, files, decoder, chunk_seconds=args.chunk_seconds, stride_seconds=args.stride_seconds,
            batch_seconds=args.batch_seconds, num_workers=workers(args.num_workers)):
        if error is not None:  # a bad file is named, the others are transcribed
            print(f"error: {error}", file=sys.stderr, flush=True)
            failed += 1
        elif args.json:
            print(json.dumps({"path": name, "seconds": round(seconds, 3), "text": transcript}, ensure_ascii=False),
                  flush=True)
        else:
            print(transcript, flush=True)
    if failed:
        sys.exit(f"error: {failed} of {len(files)} files failed (named above); the others were transcribed")


if __name__ == "__main__":
    main(sys.argv[1:])
