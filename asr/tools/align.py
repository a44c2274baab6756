"""Forced alignment: where each word of a known transcript is spoken in a recording, by CTC Viterbi over the
model's frames (`torchaudio.functional.forced_align`, the MMS data preparation's aligner).

    python -m asr.tools.align model_path=<run>/model audio=talk.wav text=talk.txt                 # word segments, JSON
    python -m asr.tools.align model_path=... audio=talk.wav text='o livro azul' format=textgrid out=talk.TextGrid
    python -m asr.tools.align model_path=... audio=talk.wav text=talk.txt segment=true out=<dir>  # training clips

The transcript follows the model's text rules (asr.core.text.normalize); characters its vocabulary lacks are
named and left out, the rest aligns. The recording is read in the windows transcribe.py reads it in, so an
hour aligns in the memory of 30 s. With segment=true the recording and its transcript become clips of at
most max_seconds, cut between words, in the Common Voice layout (<out>/clips/*.wav and <out>/train.tsv)
that train.py reads as its train split. An out= that holds something this command did not write (an alignment,
or a corpus of segment=true) is refused before the model loads; overwrite=true writes it (`asr.core.outputs`).
Settings: conf/align.yaml (`--help`).
"""

import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import asr
from asr.core import audio, outputs, text
from asr.data.listing import frames_needed
from asr.tools import cli


def targets(transcript: str, vocab: text.Vocabulary, language: str | None) -> tuple[list[int], list[str]]:
    """Token ids of the normalised transcript (spaces as the word delimiter) and the characters the
    vocabulary lacks, which are left out."""
    normalised = text.normalize(transcript, language)
    missing = sorted({c for c in normalised if c != " " and c not in vocab.ids})
    kept = "".join(c for c in normalised if c not in missing)
    kept = " ".join(kept.split())
    return [vocab.ids[text.WORD_DELIMITER if c == " " else c] for c in kept], missing


def align(log_probs: torch.Tensor, ids: list[int], vocab: text.Vocabulary, seconds_per_frame: float) -> list[dict]:
    """The words of `ids` with their start and end (seconds) and score (the mean probability of the aligned
    token over the word's frames), from the Viterbi path of `log_probs` (T, V)."""
    import torchaudio.functional as F

    path, scores = F.forced_align(log_probs[None].float().cpu(), torch.tensor([ids], dtype=torch.int32),
                                  blank=vocab.blank_id)
    spans = F.merge_tokens(path[0], scores[0].exp(), blank=vocab.blank_id)
    words, current = [], []
    for span in spans + [None]:
        if span is None or vocab.tokens[span.token] == text.WORD_DELIMITER:
            if current:
                frames = sum(s.end - s.start for s in current)
                words.append({"word": "".join(vocab.tokens[s.token] for s in current),
                              "start": round(current[0].start * seconds_per_frame, 3),
                              "end": round(current[-1].end * seconds_per_frame, 3),
                              "score": round(sum(s.score * (s.end - s.start) for s in current) / frames, 4)})
            current = []
        else:
            current.append(span)
    return words


def textgrid(words: list[dict], seconds: float) -> str:
    """A Praat TextGrid with one interval tier, "words": the words and the silences between them."""
    intervals, at = [], 0.0
    for word in words:
        if word["start"] > at:
            intervals.append((at, word["start"], ""))
        intervals.append((word["start"], word["end"], word["word"]))
        at = word["end"]
    if seconds > at:
        intervals.append((at, seconds, ""))
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0", f"xmax = {seconds}",
             "tiers? <exists>", "size = 1", "item []:", "    item [1]:", '        class = "IntervalTier"',
             '        name = "words"', "        xmin = 0", f"        xmax = {seconds}",
             f"        intervals: size = {len(intervals)}"]
    for n, (start, end, label) in enumerate(intervals, 1):
        lines += [f"        intervals [{n}]:", f"            xmin = {start}", f"            xmax = {end}",
                  f'            text = "{label}"']
    return "\n".join(lines) + "\n"


def audacity(words: list[dict]) -> str:
    """Audacity labels: start, end and word per line, tab-separated."""
    return "".join(f"{w['start']:.3f}\t{w['end']:.3f}\t{w['word']}\n" for w in words)


def segments(words: list[dict], max_seconds: float) -> list[list[dict]]:
    """The words in runs of at most `max_seconds` from the first's start to the last's end (a longer word
    alone)."""
    runs = []
    for word in words:
        if runs and word["end"] - runs[-1][0]["start"] <= max_seconds:
            runs[-1].append(word)
        else:
            runs.append([word])
    return runs


SPLITS = ("train", "dev", "test")
HEADER = "client_id\tpath\tsentence\n"  # of a corpus's TSV files (a Common Voice release's have more columns)


def recordings_in(out: Path) -> set[str]:
    """The recordings (client_id) a corpus directory `segment=true` wrote already lists, in any split."""
    names = set()
    for split in SPLITS:
        if (tsv := out / f"{split}.tsv").is_file():
            names |= {line.split("\t")[0] for line in tsv.read_text(encoding="utf-8").splitlines()[1:]}
    return names


def _first_line(path: Path) -> str | None:
    """A text file's first line, with its newline; None where it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline()
    except (OSError, UnicodeDecodeError):
        return None


def write_clips(wave: np.ndarray, runs: list[list[dict]], out: Path, name: str, seconds: float,
                dev_share: float) -> list[dict]:
    """Each run of words as a clip, cut halfway through the silences beside it (16 kHz WAV in out/clips), listed
    in the Common Voice layout (client_id: the recording's name) and appended to out/train.tsv, or for every
    1/dev_share-th clip (at least one of a recording of two or more) to out/dev.tsv and out/test.tsv, which hold
    the same held-out clips. Returns the rows, each with its `split`."""
    (out / "clips").mkdir(parents=True, exist_ok=True)
    every = max(2, round(1 / dev_share)) if dev_share else 0
    rows = []
    for n, run in enumerate(runs):
        start = (runs[n - 1][-1]["end"] + run[0]["start"]) / 2 if n else max(0.0, run[0]["start"] - 0.1)
        end = ((run[-1]["end"] + runs[n + 1][0]["start"]) / 2 if n + 1 < len(runs)
               else min(seconds, run[-1]["end"] + 0.1))
        clip = f"{name}_{n:04d}.wav"
        with outputs.atomic(out / "clips" / clip, "wb") as f:
            sf.write(f, wave[int(start * audio.SAMPLE_RATE) : int(end * audio.SAMPLE_RATE)], audio.SAMPLE_RATE,
                     format="WAV")
        held_out = every and len(runs) > 1 and n % every == (every // 2) % len(runs)  # 5, 15, ... (1 of 2 to 5)
        rows.append({"client_id": name, "path": clip, "sentence": " ".join(w["word"] for w in run),
                     "start": round(start, 3), "end": round(end, 3), "split": "dev" if held_out else "train"})
    for split in SPLITS:
        listed = [r for r in rows if r["split"] == ("train" if split == "train" else "dev")]
        tsv_path = out / f"{split}.tsv"
        new = not tsv_path.is_file()
        with open(tsv_path, "a", encoding="utf-8") as tsv:  # appended: the corpus grows by a recording a run
            tsv.write(HEADER if new else "")
            tsv.writelines(f"{r['client_id']}\t{r['path']}\t{r['sentence']}\n" for r in listed)
    return rows


TOOL = "python -m asr.tools.align"
ALIGNMENT = outputs.Output(tool=TOOL, purpose="an alignment", directory=False, example="<dir>/talk.TextGrid", own=None,
                           appends=False)
CORPUS = outputs.Output(tool=TOOL, purpose="a corpus of segment=true", directory=True, example="<dir>/corpus",
                        appends=True, own=lambda out: _first_line(out / "train.tsv") == HEADER)


def main(argv: list[str]) -> None:
    args, _ = cli.parse("align", argv)
    if args.format not in ("json", "textgrid", "audacity"):
        sys.exit(f"error: format={args.format}: give json, textgrid or audacity")
    if args.segment and not args.out:
        sys.exit("error: segment=true writes clips: give out=<directory>")
    name, out = Path(args.audio).stem, args.out and Path(args.out).expanduser()
    written = CORPUS if args.segment else ALIGNMENT
    try:
        if out:
            outputs.claim(out, written, args.overwrite)  # a corpus of its own is appended to
    except asr.SetupError as error:
        sys.exit(f"error: {error}")
    if args.segment and name in recordings_in(out):
        sys.exit(f"error: out={args.out} lists clips of {name} already (segment=true appends a recording a run): "
                 f"give another out=, or another name to the recording")
    transcript = str(args.text)
    try:  # a file's name, or the text itself (too long to be a name, or no such file)
        if Path(transcript).expanduser().is_file():
            transcript = Path(transcript).expanduser().read_text(encoding="utf-8")
        elif "/" in transcript or transcript.endswith(".txt"):
            sys.exit(f"error: text={transcript}: no such file (text= takes a transcript file, or the words "
                     f"themselves: text='o livro azul')")
    except OSError:
        pass
    if not transcript.strip():
        sys.exit(f"error: text={args.text} is empty: give the words spoken in audio={args.audio}")

    from transformers.utils import logging as hf_logging

    # transformers and lightning take ~7 s to import (asr.model.module): not for --help or a refused setting
    from asr.model import inference
    from asr.model.transcription import file_logits

    hf_logging.disable_progress_bar()
    try:
        model, _ = inference.load(args.model_path, args.target_lang)
        model = model.to(asr.device(args.device)).eval()
        logits, seconds = file_logits(model, str(Path(args.audio).expanduser()), args.chunk_seconds,
                                      args.stride_seconds)
    except (asr.SetupError, audio.AudioError) as error:
        sys.exit(f"error: {error}")
    ids, missing = targets(transcript, model.vocab, model.hparams.language)
    if missing:
        print(f"warning: {len(missing)} characters of the transcript are not in the model's vocabulary and are "
              f"left out: {' '.join(missing)}", file=sys.stderr)
    if not ids:
        sys.exit("error: nothing of the transcript is in the model's vocabulary")
    needed = frames_needed("".join(model.vocab.tokens[i] for i in ids))  # one token a character
    if needed > len(logits):
        sys.exit(f"error: the transcript does not fit the audio: its {len(ids)} characters need {needed} frames, "
                 f"{args.audio} ({seconds:.2f} s) has {len(logits)}")
    words = align(torch.log_softmax(logits.float(), dim=-1), ids, model.vocab, model.geometry.seconds_per_frame)
    if args.segment:
        wave = audio.load(str(Path(args.audio).expanduser()))
        rows = write_clips(wave, segments(words, args.max_seconds), out, name, seconds, args.dev_share)
        held = sum(r["split"] == "dev" for r in rows)
        print(f"{len(rows)} clips of at most {args.max_seconds:g} s in {out}/clips: {len(rows) - held} added to "
              f"{out}/train.tsv, {held} to dev.tsv and test.tsv")
        return
    alignment = {"json": lambda: json.dumps({"audio": str(args.audio), "seconds": round(seconds, 3), "words": words},
                                          ensure_ascii=False, indent=1) + "\n",
               "textgrid": lambda: textgrid(words, round(seconds, 3)),
               "audacity": lambda: audacity(words)}[args.format]()
    if out:
        outputs.write(out, alignment)
        outputs.record(out, written)
    else:
        sys.stdout.write(alignment)


if __name__ == "__main__":
    main(sys.argv[1:])
