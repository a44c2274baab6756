"""Start-up cost and memory at corpus scale: a Common Voice layout of N train clips, trained on for one
update by `python train.py` as a user runs it, cold (empty caches) and warm (caches in place).

    python benchmarks/scale.py                       # N = 10k, 100k, 1M (the 1M layout: ~1 min to build)
    python benchmarks/scale.py clips=100000 no_train=true   # only the in-process figures
    python benchmarks/scale.py headers=true          # as if the release stated no durations: headers are read

The layout (TSVs with every release column, clip_durations.tsv, clips/ as hard links to the demo's
real MP3s, so every file check stays real) is built once under `dir`. Each train clip has its own
sentence. dev and test hold 2,000 clips each. The settings and their defaults: conf/bench/scale.yaml
(`--help`).

Printed per N:
- cold / warm: seconds to the data report and to the end of the first update (the whole command),
  peak RSS of the largest process (wait4's ru_maxrss), and clips/s of the start-up;
- in-process: seconds to load the train split (warm), to plan one epoch of batches, for `len()`,
  and the private memory (USS) of each of 4 loader workers after 30 batches and a full garbage
  collection in each worker (what any long run does: a collection writes every tracked Python
  object's header, so per-clip Python objects get copied into every worker).
"""

import csv
import gc
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from asr.core.frames import WAV2VEC2  # noqa: E402
from asr.data.module import SpeechDataModule  # noqa: E402
from asr.tools import cli, synth  # noqa: E402

DEMO = REPO / "demo" / "cv-pt"
EVAL_CLIPS = 2_000


def build(root: Path, n: int) -> Path:
    """A Common Voice locale directory with n train clips (reused if complete)."""
    if (root / "done").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "clips").mkdir(parents=True)
    with open(DEMO / "clip_durations.tsv") as f:
        durations = {r["clip"]: r["duration[ms]"] for r in csv.DictReader(f, delimiter="\t")}
    sources = sorted(durations)
    src_dir = root / "sources"  # hard links need one filesystem: the sources are copied beside the clips
    src_dir.mkdir()
    for name in sources:
        shutil.copy(DEMO / "clips" / name, src_dir / name)
    rng = random.Random(0)
    words = sorted({w for s in synth.demo_sentences(400, random.Random(1)) for w in s.split()})
    voices = [hashlib_hex(i) for i in range(max(10, n // 20))]  # ~20 clips per speaker, as in a release
    rows, clip_rows = {"train": [], "dev": [], "test": []}, []
    counts = {"train": n, "dev": EVAL_CLIPS, "test": EVAL_CLIPS}
    index = 0
    for split, count in counts.items():
        for _ in range(count):
            source = sources[index % len(sources)]
            name = f"common_voice_pt_{50_000_000 + index}.mp3"
            os.link(src_dir / source, root / "clips" / name)
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 8))).capitalize() + "."
            speaker = voices[rng.randrange(len(voices))] if split == "train" else hashlib_hex(-1 - index % 50)
            rows[split].append([speaker, name, hashlib_hex(index)[:64], sentence, "", "2", "0", "", "", "", "",
                                "pt", ""])
            clip_rows.append([name, durations[source]])
            index += 1
    for split, split_rows in rows.items():
        synth.write_tsv(root / f"{split}.tsv", synth.CV_COLUMNS, split_rows)
    synth.write_tsv(root / "clip_durations.tsv", ["clip", "duration[ms]"], clip_rows)
    (root / "done").touch()
    return root


def hashlib_hex(i: int) -> str:
    return hashlib.sha512(str(i).encode()).hexdigest()


def run_train(root: Path, cache: Path) -> dict:
    """`python train.py lang=pt model=tiny data.root=<root> ++trainer.max_steps=1`, timed."""
    run_dir = tempfile.mkdtemp(prefix="scale-run-")
    command = [sys.executable, "train.py", "lang=pt", "model=tiny", f"data.root={root}", "++trainer.max_steps=1",
               f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "ASR_CACHE_DIR": str(cache)}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    report_at, tail = None, []
    for line in process.stdout:
        if report_at is None and "data report" in line:
            report_at = time.perf_counter() - started
        tail = (tail + [line])[-20:]
    _, status, usage = os.wait4(process.pid, 0)
    total = time.perf_counter() - started
    shutil.rmtree(run_dir, ignore_errors=True)
    if status != 0:
        sys.exit("train.py failed:\n" + "".join(tail))
    return {"report": report_at, "total": total, "rss_gb": usage.ru_maxrss / 2**20}


def private_mb(pid: int) -> float:
    """Unique set size: memory only this process holds (copy-on-write pages it has written)."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return sum(int(m) for m in re.findall(r"Private_(?:Clean|Dirty):\s+(\d+) kB", text)) / 1024


def _collect(_worker_id: int) -> None:
    gc.collect()


def in_process(root: Path, cache: Path) -> dict:
    """Load (warm), plan, len() and the loader workers' memory, in this process."""
    os.environ["ASR_CACHE_DIR"] = str(cache)

    from asr.core.config import compose

    cfg = compose("train", ["lang=pt", "model=tiny", f"data.root={root}", f"run_dir={tempfile.mkdtemp()}",
                            "data.num_workers=4"])
    data = SpeechDataModule.from_config(cfg.data, WAV2VEC2)
    started = time.perf_counter()
    data.setup("fit")
    load = time.perf_counter() - started
    loader = data.train_dataloader()
    sampler = loader.batch_sampler
    started = time.perf_counter()
    batches = len(sampler.batches(1))  # every batch of epoch 1, as index lists
    plan = time.perf_counter() - started
    started = time.perf_counter()
    len(sampler)
    reps = 1000 if time.perf_counter() - started < 1e-3 else 3  # a len() that plans the epoch is slow
    started = time.perf_counter()
    for _ in range(reps):
        len(sampler)
    length = (time.perf_counter() - started) / reps
    loader.worker_init_fn = _collect  # after the workers' own set-up; see the module docstring
    iterator = iter(loader)
    for _ in range(30):
        next(iterator)
    workers = [private_mb(w.pid) for w in iterator._workers]
    main_mb = private_mb(os.getpid())
    del iterator
    return {"load": load, "plan": plan, "batches": batches, "len_us": length * 1e6, "workers_mb": workers,
            "main_mb": main_mb}


def report_in_process(root: str, cache: str) -> None:
    r = in_process(Path(root), Path(cache))
    print(f"  in-process: load (warm) {r['load']:.2f} s, plan an epoch {r['plan']:.2f} s "
          f"({r['batches']:,} batches), len() {r['len_us']:.1f} us, main process private "
          f"{r['main_mb']:.0f} MB, 4 workers private " + ", ".join(f"{m:.0f}" for m in r["workers_mb"])
          + " MB", flush=True)


def main(argv: list[str]) -> None:
    args, _ = cli.parse("bench/scale", argv)
    layouts = Path(args.dir).expanduser()
    for n in cli.values(args, "clips"):
        started = time.perf_counter()
        root = build(layouts / f"cv-{n}", n)
        print(f"N={n:,}: layout {root} ready ({time.perf_counter() - started:.0f} s)", flush=True)
        cache = Path(tempfile.mkdtemp(prefix="scale-cache-", dir=layouts))
        stated = root / "clip_durations.tsv"
        if args.headers:
            stated.rename(stated.with_suffix(".off"))
        try:
            measure(root, cache, n, args)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
            if args.headers:
                stated.with_suffix(".off").rename(stated)


def measure(root: Path, cache: Path, n: int, args) -> None:
    if not args.no_train:
        for name in ("cold", "warm"):
            r = run_train(root, cache)
            print(f"  {name}: data report {r['report']:.1f} s, first update done {r['total']:.1f} s, "
                  f"peak RSS {r['rss_gb']:.2f} GB, {n / r['total']:,.0f} clips/s", flush=True)
    if not args.no_process:
        if args.no_train:
            run_train(root, cache)  # fills the caches
        # a process of its own, so that one N's memory does not count in the next (not multiprocessing's spawn:
        # its child would spawn the loader workers too, which then hold their own imports)
        code = (f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import scale; "
                f"scale.report_in_process({str(root)!r}, {str(cache)!r})")
        subprocess.run([sys.executable, "-c", code], check=True)

if __name__ == "__main__":
    main(sys.argv[1:])
