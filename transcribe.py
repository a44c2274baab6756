"""Transcribe audio files with a trained model: a checkpoint of train.py or an exported directory.

    python transcribe.py <run>/model clip.mp3 interview.wav          # one transcript per line
    python transcribe.py <run>/checkpoints/last.ckpt *.flac --json   # JSON lines: path, seconds, text

Any format soundfile reads, any sample rate (resampled to 16 kHz), any length: files longer than
--chunk-seconds are cut into overlapping windows (--stride-seconds of context on each side, dropped
from the output), as the transformers ASR pipeline does, which this command runs. Transcripts follow
the model's text rules (asr.text.normalize). Greedy decoding.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def load_pipeline(model_path: str, device: str, out_dir: str):
    """(transformers ASR pipeline, language of the text rules) for a checkpoint or an exported directory."""
    from transformers import pipeline

    from asr.export import export
    from asr.model import CTCModel

    path = Path(model_path)
    if path.is_file():  # a Lightning checkpoint: export it next to nothing, in a temporary directory
        path = export(CTCModel.from_checkpoint(path), out_dir)
    if not (path / "config.json").is_file():
        sys.exit(f"error: {model_path} is neither a checkpoint (.ckpt) nor an exported model directory "
                 f"(train.py writes <run>/model/ and <run>/checkpoints/)")
    rules = json.loads((path / "asr.json").read_text()) if (path / "asr.json").is_file() else {}
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    return pipeline("automatic-speech-recognition", model=str(path), device=device), rules.get("language")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a train.py checkpoint (.ckpt) or an exported model directory")
    parser.add_argument("audio", nargs="+", help="audio files")
    parser.add_argument("--json", action="store_true", help="print JSON lines (path, seconds, text)")
    parser.add_argument("--chunk-seconds", type=float, default=30.0, help="window for long files (s)")
    parser.add_argument("--stride-seconds", type=float, default=5.0, help="context kept on each side (s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    args = parser.parse_args()

    from asr import audio, text

    with tempfile.TemporaryDirectory() as tmp:
        transcriber, language = load_pipeline(args.model, args.device, tmp)
        for name in args.audio:
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
    main()
