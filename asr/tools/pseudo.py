"""Pseudo-labels: transcribe unlabelled audio with a trained model and keep what it is sure of, as a training
corpus in the Common Voice layout (`asr.data.pseudo`).

    python -m asr.tools.pseudo model_path=<run>/model audio=<dir> out=<corpus dir> labelled=<cv-corpus/pt> language=pt

The audio is transcribed by transcribe.py into <out>/archive.jsonl with word timestamps and confidences (a rerun
resumes it, and retries the files that failed); the transcripts are then filtered (confidence, speaking rate,
repeated n-grams) and the kept files written as a corpus that `data.corpora` mixes with the labelled one. An
out= that holds something this command did not write is refused (overwrite=true writes into it;
`asr.core.outputs`). Settings: conf/pseudo.yaml (`--help`).
"""

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from asr import REPO_DIR, SetupError
from asr.core import outputs
from asr.data import corpora, pseudo
from asr.data.listing import durations, prepare
from asr.data.loading import workers
from asr.tools import cli

PSEUDO = outputs.Output(tool="python -m asr.tools.pseudo", purpose="a corpus of pseudo-labels", directory=True,
                        example="<dir>/pseudo", own=None, appends=False)


def labelled_rate(root: Path, language: str, quantiles: tuple[float, float], num_workers: int) -> tuple[float, float]:
    """The characters-per-second range of the labelled corpus's train split (`pseudo.speaking_rate_range`), read
    as training reads it (`asr.data.listing`: transcripts under the text rules, durations as the release states
    them, else from the headers, read by `num_workers` processes and cached); clips that cannot be used left out."""
    cache_dir = Path(tempfile.gettempdir()) / "asr-pseudo"
    clips = corpora.Clips(prepare(corpora.read_split("common_voice", str(root), "train", language,
                                                     cache_dir=cache_dir), language))
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    seconds, problems = durations(clips, cache_dir / "durations" / f"{key}.json", num_workers)
    usable = [i for i in range(len(clips)) if i not in problems]
    texts = clips.column("text")
    return pseudo.speaking_rate_range([texts[i] for i in usable], [float(seconds[i]) for i in usable], quantiles)


def transcribed(args, archive: Path) -> list[dict]:
    """transcribe.py over `args.audio` into `archive` (resumed); its transcript lines, the last line of each file."""
    files = args.audio if isinstance(args.audio, str) else "[" + ",".join(f"'{a}'" for a in args.audio) + "]"
    result = subprocess.run([sys.executable, str(REPO_DIR / "transcribe.py"), f"model_path={args.model_path}",
                             f"audio={files}", f"out={archive}", "timestamps=word", f"num_workers={args.num_workers}",
                             f"device={args.device}"], cwd=REPO_DIR, stderr=subprocess.PIPE, text=True)
    if not archive.is_file() or result.returncode and "files failed" not in result.stderr:
        sys.exit(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "error: transcribe.py failed")
    lines = [json.loads(line) for line in archive.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return list({line["path"]: line for line in lines}.values())  # a file retried: its last line


def main(argv: list[str]) -> None:
    args, _ = cli.parse("pseudo", argv)
    out, labelled = Path(args.out).expanduser(), Path(args.labelled).expanduser()
    (how,) = cli.values(args, "confidence", pseudo.HOW)
    if not (labelled / "train.tsv").is_file():
        sys.exit(f"error: labelled={labelled} is not a Common Voice locale directory (no train.tsv): its speaking "
                 f"rate bounds the pseudo-labels'")
    try:
        if not outputs.claim(out, PSEUDO, args.overwrite):  # a new corpus: marked as this command's
            outputs.mark(out, PSEUDO)
        rate = labelled_rate(labelled, args.language, tuple(OmegaConf.to_container(args.rate_quantiles)),
                             workers(args.num_workers))
    except (SetupError, ValueError) as error:
        sys.exit(f"error: {error}")
    lines = transcribed(args, out / "archive.jsonl")
    kept, report = pseudo.select(lines, min_confidence=args.min_confidence, how=how, rate=rate,
                                 max_repeats=args.max_repeats)
    report["rules"] = {"min_confidence": args.min_confidence, "confidence": how,
                       "chars_per_second": [round(r, 2) for r in rate], "max_repeats": args.max_repeats,
                       "model": str(args.model_path), "labelled": str(labelled)}
    pseudo.write_corpus(out, kept, report)
    dropped = ", ".join(f"{reason} {n}" for reason, n in report["dropped"].items() if n) or "none"
    print(f"kept {report['kept']} of {report['files']} files ({report['kept_hours']:.2f} h) -> {out}; dropped: "
          f"{dropped} ({out / 'pseudo_report.json'})")


if __name__ == "__main__":
    main(sys.argv[1:])
