"""Transcribe audio files with a trained model: a checkpoint of train.py or an exported directory.

    python transcribe.py model_path=<run>/model audio=clip.mp3                  # one transcript per line
    python transcribe.py model_path=<run>/checkpoints/last.ckpt audio='*.flac' json=true   # path, seconds, text

Any format soundfile reads, any sample rate (resampled to 16 kHz), any length: files longer than
chunk_seconds are cut into overlapping windows (stride_seconds of context on each side, dropped from the
output), as the transformers ASR pipeline does, which this command runs. Transcripts follow the model's
text rules (asr.text.normalize). Greedy decoding. Settings: conf/transcribe.yaml (`--help`).
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

    from asr.export import export
    from asr.model import CTCModel

    path = Path(model_path)
    if path.is_file():  # a Lightning checkpoint: export it next to nothing, in a temporary directory
        path = export(CTCModel.from_checkpoint(path), out_dir)
    if not (path / "config.json").is_file():
        sys.exit(f"error: model_path={model_path} is neither a checkpoint (.ckpt) nor an exported model directory "
                 f"(train.py writes <run>/model/ and <run>/checkpoints/)")
    rules = json.loads((path / "asr.json").read_text()) if (path / "asr.json").is_file() else {}
    return pipeline("automatic-speech-recognition", model=str(path), device=asr.device(device)), rules.get("language")


def audio_files(audio) -> list[str]:
    """The files of the `audio` setting: a path, a glob pattern, or a list of either, in the order given."""
    names = []
    for pattern in ([audio] if isinstance(audio, str) else list(audio)):
        pattern = str(Path(pattern).expanduser())
        names += sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    return names


def main(argv: list[str]) -> None:
    args, _ = cli.parse("transcribe", argv)
    files = audio_files(args.audio)
    if not files:
        sys.exit(f"error: audio={args.audio} matches no file")

    from asr import audio, text

    with tempfile.TemporaryDirectory() as tmp:
        transcriber, language = load_pipeline(str(Path(args.model_path).expanduser()), args.device, tmp)
        for name in files:
            try:
                wave = audio.load(name)
            except Exception as error:  # a bad file is reported, the others are transcribed
                print(f"error: {name} does not decode ({error})", file=sys.stderr)
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
                print(transcript)


if __name__ == "__main__":
    main(sys.argv[1:])
