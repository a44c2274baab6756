"""Transcribe audio files with a trained model: a checkpoint of train.py or an exported directory.

    python transcribe.py model_path=<run>/model audio=clip.mp3                  # one transcript per line
    python transcribe.py model_path=<run>/checkpoints/last.ckpt audio='*.flac' json=true   # path, seconds, text

Any format soundfile reads, any sample rate (resampled to 16 kHz), any length: files longer than
chunk_seconds are cut into overlapping windows (stride_seconds of context on each side, dropped from the
output), as the transformers ASR pipeline does, which this command runs. Transcripts follow the model's
text rules (asr.text.normalize). Greedy decoding. Settings: conf/transcribe.yaml (`--help`).

A directory means its audio files, recursively, in sorted order. A file that does not exist, is empty or
does not decode is named on stderr and the others are transcribed; then the exit status is 1 and the last
line counts the failures.
"""

import glob
import json
import sys
import tempfile
from pathlib import Path

import asr
from asr import cli


def load_pipeline(model_path: str, device: str, out_dir: str):
    """(transformers ASR pipeline, language of the text rules) for a checkpoint or an exported directory."""
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from asr import checkpoints
    from asr.export import export
    from asr.model import CTCModel

    hf_logging.disable_progress_bar()  # its "Loading weights" bar: transcripts only on stdout, errors on stderr
    path = Path(model_path)
    if path.is_file():  # a Lightning checkpoint: export it next to nothing, in a temporary directory
        path = export(CTCModel.from_checkpoint(checkpoints.verified(model_path, "model_path")), out_dir)
    if not (path / "config.json").is_file():
        sys.exit(f"error: model_path={model_path} is neither a checkpoint (.ckpt) nor an exported model directory "
                 f"(train.py writes <run>/model/ and <run>/checkpoints/)")
    rules = json.loads((path / "asr.json").read_text()) if (path / "asr.json").is_file() else {}
    return pipeline("automatic-speech-recognition", model=str(path), device=asr.device(device)), rules.get("language")


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

    from asr import audio, text
    from asr.frames import WAV2VEC2

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        try:
            transcriber, language = load_pipeline(str(Path(args.model_path).expanduser()), args.device, tmp)
        except asr.SetupError as error:
            sys.exit(f"error: {error}")
        for name in files:
            try:
                wave = audio.load(name)
            except audio.AudioError as error:  # a bad file is named, the others are transcribed
                print(f"error: {error}", file=sys.stderr, flush=True)
                failed += 1
                continue
            if WAV2VEC2.frames(len(wave)) < 1:
                print(f"error: {name} holds {len(wave)} samples at 16 kHz, too few for one encoder frame (25 ms)",
                      file=sys.stderr, flush=True)
                failed += 1
                continue
            seconds = len(wave) / audio.SAMPLE_RATE
            chunking = {"chunk_length_s": args.chunk_seconds, "stride_length_s": args.stride_seconds} \
                if seconds > args.chunk_seconds else {}
            result = transcriber({"raw": wave, "sampling_rate": audio.SAMPLE_RATE}, **chunking)
            transcript = text.normalize(result["text"], language)
            if args.json:
                print(json.dumps({"path": name, "seconds": round(seconds, 3), "text": transcript},
                                 ensure_ascii=False))
            else:
                print(transcript, flush=True)
    if failed:
        sys.exit(f"error: {failed} of {len(files)} files failed (named above); the others were transcribed")


if __name__ == "__main__":
    main(sys.argv[1:])
