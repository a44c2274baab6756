"""Training speed and memory on the GPU at hand, over a matrix of settings, ours against the HF Trainer.

    python benchmarks/gpu.py 'models=[xlsr_300m,xlsr_1b]' hf=true profile=true   # the one command (~4 min, H200)
    python benchmarks/gpu.py models=xlsr_300m precisions=[bf16,16] batch_seconds=[100,200]
    python benchmarks/gpu.py models=xlsr_1b checkpointing=[false,true] attention=[sdpa,eager] compile=[false,encoder]
    python benchmarks/gpu.py models=tiny steps=4 warmup=2 hf=true profile=true    # on a CPU (what the tests run)

Settings and their defaults: conf/bench/gpu.yaml (`--help`); each matrix setting (models, precisions,
batch_seconds, checkpointing, attention, compile) takes one value or a list. Any other key=value overrides
the train config of every setting.

Random weights shaped as the model group says (`model.pretrained=null`: no download), the conv feature
encoder frozen as in fine-tuning (not for tiny, which trains from scratch). Clips: synthetic tones of
distinct random lengths in [min_seconds, max_seconds] in the Common Voice layout (48 kHz MP3, decoded
by the loader workers as in a real run; numpy and soundfile make them, no espeak-ng), as many as the
run's updates need so that no epoch ends inside the measured updates; or a corpus (root=, a Common Voice
locale directory). Our run is train.py's (`asr.run.training.assemble`), its warm-up of every batch shape included.

Per setting, over `steps` updates after `warmup` (the timed span starts and ends with a device
synchronisation, the only ones the benchmark adds): audio-seconds per second (real audio), MFU
(`asr.model.speed`: model FLOPs of the real audio / the device's dense peak from Lightning's table or
peak_tflops), peak GPU memory (the allocator's, read at the span's end), loader wait (share of the span
the training loop waited for a batch, `asr.model.speed.SpeedMonitor`), host ms per update (batch end to batch
end). With profile=true, then `profile_steps` updates under torch.profiler (GPU-busy share: the union of
the device's kernels and copies over the wall time; the top kernels) and `sync_steps` updates under
torch's sync debug mode (`asr.model.speed.SyncSites`: the calls that made the host wait, by project frame). With
hf=true, the HF Trainer on the same job right after: same architecture and initial weights, same clips
decoded beforehand (as run_speech_recognition_ctc.py does), the same clips per update on average
(group_by_length), the same precision, checkpointing and attention.
"""

import gc
import itertools
import math
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from asr.model import speed  # noqa: E402
from asr.tools import cli, synth  # noqa: E402

PRECISION = {"bf16": "bf16", "16": "16", "32": "32"}
COMPILE = {"off": "false", "on": "layers", "false": "false", "layers": "layers", "encoder": "encoder", "all": "all"}
CHECKPOINTING = {"off": "off", "on": "on", "false": "off", "true": "on"}
SENTENCES = ["a b c", "d e f", "g h i", "j k l", "m n o", "p q r", "s t u", "v w x"]
DEV_CLIPS = 8
MARGIN = 1.3  # clips beyond what the updates need on average: a uniform draw of lengths packs unevenly


def corpus_clips(updates: int, batch_seconds: float, low: float, high: float) -> int:
    """Train clips of uniform random length in [low, high] s that give at least `updates` batches of
    `batch_seconds` padded audio (one batch per update), with a margin."""
    return math.ceil(MARGIN * updates * batch_seconds / ((low + high) / 2)) + 1


def _tone(length: float, i: int) -> np.ndarray:
    t = np.arange(int(length * 48_000)) / 48_000
    return (0.3 * np.sin(2 * np.pi * (200 + 20 * (i % 20)) * t)).astype(np.float32)


def _write_clip(job: tuple[Path, float, int]) -> None:
    path, length, i = job
    synth.write_mp3(path, _tone(length, i))


def synthetic_corpus(root: Path, clips: int, low: float, high: float, seed: int = 0) -> Path:
    """`clips` train clips (and 8 dev) of tones of distinct random lengths in [low, high] seconds, in the
    Common Voice layout (the rows as `asr.tools.synth.write_common_voice` writes them), MP3s encoded by all cores."""
    rng = random.Random(seed)
    lengths = [rng.uniform(low, high) for _ in range(clips + DEV_CLIPS)]
    voice = synth.TRAIN_VOICES[0]
    (root / "clips").mkdir(parents=True, exist_ok=True)
    names = [f"common_voice_pt_{40_000_000 + i}.mp3" for i in range(len(lengths))]
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(_write_clip, [(root / "clips" / n, s, i) for i, (n, s) in enumerate(zip(names, lengths))],
                 chunksize=8)
    rows = [[voice.client_id, name, f"s{i % len(SENTENCES)}", SENTENCES[i % len(SENTENCES)], "", "2", "0", "",
             voice.gender, "", "", "pt", ""] for i, name in enumerate(names)]
    synth.write_tsv(root / "train.tsv", synth.CV_COLUMNS, rows[:clips])
    synth.write_tsv(root / "dev.tsv", synth.CV_COLUMNS, rows[clips:])
    synth.write_tsv(root / "validated.tsv", synth.CV_COLUMNS, rows)
    for name in ("test.tsv", "other.tsv", "invalidated.tsv"):
        synth.write_tsv(root / name, synth.CV_COLUMNS, [])
    synth.write_tsv(root / "clip_durations.tsv", ["clip", "duration[ms]"],
                    [(n, round(1000 * int(s * 48_000) / 48_000)) for n, s in zip(names, lengths)])
    return root


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time the device had any kernel or copy running."""
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def kernel_figures(profiler, updates: int, cuda: bool, top: int = 12) -> dict:
    """From a finished torch.profiler: device-busy seconds (None on a CPU) and the top kernels by device time
    (on a CPU, the top operators by own CPU time), each as (name, ms per update, calls per update)."""
    if not cuda:
        rows = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        return {"busy_s": None,
                "top": [(e.key, e.self_cpu_time_total / 1e3 / updates, e.count / updates) for e in rows]}
    from torch.autograd import DeviceType

    kernels = [e for e in profiler.events() if e.device_type == DeviceType.CUDA]
    totals, calls = {}, {}
    for e in kernels:
        totals[e.name] = totals.get(e.name, 0.0) + e.time_range.elapsed_us()
        calls[e.name] = calls.get(e.name, 0) + 1
    rows = sorted(totals, key=totals.get, reverse=True)[:top]
    return {"busy_s": busy_seconds([(e.time_range.start / 1e6, e.time_range.end / 1e6) for e in kernels]),
            "top": [(name, totals[name] / 1e3 / updates, calls[name] / updates) for name in rows]}


class Measure(speed.SpeedMonitor):
    """SpeedMonitor's windows (one per update here), kept over the timed span; then the profiled updates and
    the sync-debug updates (`phases`). Everything is read inside the fit, on the device it ran on."""

    def __init__(self, warmup: int, steps: int, profile_steps: int, sync_steps: int, peak_tflops: float | None):
        super().__init__(peak_tflops)
        self.phases = {"timed": (warmup, warmup + steps), "profile": (warmup + steps, warmup + steps + profile_steps),
                       "syncs": (warmup + steps + profile_steps, warmup + steps + profile_steps + sync_steps)}
        self.windows, self.stamps, self.shapes, self.timed_shapes = [], [], set(), set()
        self.figures, self.epochs, self.profiler, self.sync_sites, self.syncs_per_update = {}, [], None, None, []
        self._started = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step, cuda = trainer.global_step, pl_module.device.type == "cuda"
        self.shapes.add(tuple(batch.get("shape", ())))
        first, last = self.phases["timed"]
        if first < step <= last:
            self.stamps.append(time.perf_counter())
            self.timed_shapes.add(tuple(batch.get("shape", ())))
        if step == first:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self._started, self.windows = time.perf_counter(), []
            self.stamps, self.epochs = [self._started], [trainer.current_epoch]
            self._reset(self._started)
        if step == last:
            self._timed(trainer, pl_module)
        self._profile(step, cuda)
        self._syncs(step)

    def _timed(self, trainer, pl_module) -> None:
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self._started
        self.epochs.append(trainer.current_epoch)
        total = {k: sum(w[k] for w in self.windows) for k in ("audio", "flops", "wait")}
        host = [1000 * (b - a) for a, b in zip(self.stamps, self.stamps[1:])]
        self.figures = {
            "audio_s_per_s": total["audio"] / seconds,
            "mfu": total["flops"] / seconds / self.peak if self.peak else None,
            "wait": total["wait"] / seconds, "memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "gflop_per_audio_s": total["flops"] / total["audio"] / 1e9,
            "host_ms_median": statistics.median(host), "host_ms_max": max(host),
            "epoch_boundary": self.epochs[0] != self.epochs[1]}

    def _profile(self, step: int, cuda: bool) -> None:
        first, last = self.phases["profile"]
        if first == last:
            return
        if step == first:
            activities = [torch.profiler.ProfilerActivity.CPU,
                          *([torch.profiler.ProfilerActivity.CUDA] if cuda else [])]
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self._profile_started = time.perf_counter()
        elif step == last and self.profiler is not None:
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - self._profile_started
            self.profiler.__exit__(None, None, None)
            kernels = kernel_figures(self.profiler, last - first, cuda)
            self.figures.update(profiled_updates=last - first, profiled_ms_per_update=1000 * wall / (last - first),
                                gpu_busy=kernels["busy_s"] / wall if kernels["busy_s"] is not None else None,
                                top=kernels["top"])
            self.profiler = None

    def _syncs(self, step: int) -> None:
        first, last = self.phases["syncs"]
        if first == last:
            return
        if step == first:
            self.sync_sites = speed.SyncSites().__enter__()
            self._counted = 0
        elif first < step <= last and self.sync_sites is not None:
            self.syncs_per_update.append(self.sync_sites.count - self._counted)
            self._counted = self.sync_sites.count
            if step == last:
                self.sync_sites.__exit__(None, None, None)
                self.figures.update(syncs_per_update=list(self.syncs_per_update),
                                    sync_sites=self.sync_sites.sites.most_common())

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.sync_sites is not None and "sync_sites" not in self.figures:  # the fit ended early
            self.sync_sites.__exit__(None, None, None)

    def _log(self, trainer, pl_module):
        self.windows.append(dict(self._window))
        self._reset(time.perf_counter())


def ours(cfg, args) -> tuple[dict, object, object]:
    """Our run (train.py's assembly) measured; its data and a model with its initial weights (for the HF side)."""
    from omegaconf import OmegaConf

    from asr.model.module import CTCModel
    from asr.run.training import assemble
    from asr.run.warmup import WorstBatchFirst

    profile, syncs = (args.profile_steps, args.sync_steps) if args.profile else (0, 0)
    measure = Measure(args.warmup, args.steps, profile, syncs, args.peak_tflops)
    run = assemble(cfg, callbacks=[measure], max_steps=args.warmup + args.steps + profile + syncs, max_time=None,
                   limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    initial = {k: v.clone() for k, v in run.model.model.state_dict().items()}
    started = time.perf_counter()
    run.fit()
    figures = {**measure.figures, "fit_s": time.perf_counter() - started, "shapes": len(measure.shapes),
               "timed_shapes": len(measure.timed_shapes), "plan_shapes": len(run.data.sampler("train").shapes)}
    warm = next((c for c in run.callbacks if isinstance(c, WorstBatchFirst)), None)
    figures["warmup"] = dict(warm.warmup) if warm is not None and warm.warmup else None
    data = run.data
    del run
    fresh = CTCModel.from_config(OmegaConf.merge(cfg, {"model": {"compile": False}}), data.vocab.tokens)
    fresh.model.load_state_dict(initial)  # our initial weights, for the HF Trainer (never compiled)
    return figures, data, fresh


def hf(cfg, steps: int, warmup: int, data, model, peak) -> dict:
    """The HF Trainer on the same job (benchmarks/throughput.py's, on this device and precision)."""
    import throughput
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.started = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.started, seen["audio"], seen["flops"] = time.perf_counter(), 0.0, 0.0

    seen = {}
    timer = Timer()
    result = throughput.hf_trainer(cfg, warmup + steps, throughput.clips_per_batch(data), data, model.model,
                                   callbacks=[timer], seen=seen,
                                   flops=lambda lengths: speed.training_flops(
                                       model.model.config, lengths, cfg.model.freeze_feature_encoder is False))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - timer.started
    return {"audio_s_per_s": seen["audio"] / seconds, "mfu": seen["flops"] / seconds / peak if peak else None,
            "wait": None, "memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
            "padding": result["padding"]}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def details(r: dict) -> list[str]:
    """The profile=true lines of one of our rows."""
    fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    lines = [f"-- {r['model']} {r['precision']} {r['batch_s']:.0f} s, compile {r['compile']}, ckpt {r['ckpt']}, "
             f"{r['attention']}: fit {r['fit_s']:.0f} s"]
    warm = r.get("warmup")
    if warm:
        attention = warm.get("attention")
        ms = ", ".join(f"{k} {fmt(v, '.2f')}" for k, v in attention["ms"].items()) if attention else ""
        chosen = f"; attention {attention['chosen']} (ms: {ms})" if attention else ""
        lines.append(f"   warm-up before the first update: {warm['seconds']:.1f} s, {warm['train_shapes']} train + "
                     f"{warm['dev_shapes']} dev shapes{chosen}")
    lines.append(f"   host ms per update (timed): median {r['host_ms_median']:.0f}, max {r['host_ms_max']:.0f}; "
                 f"batch shapes: {r['shapes']} in the run, {r['timed_shapes']} in the timed updates, "
                 f"{r['plan_shapes']} in the plan; epoch boundary in the timed updates: "
                 f"{'YES (a bigger corpus: clips=)' if r['epoch_boundary'] else 'no'}")
    if "profiled_updates" in r:
        lines.append(f"   profiled {r['profiled_updates']} updates: {r['profiled_ms_per_update']:.0f} ms per update, "
                     f"GPU busy {fmt(r['gpu_busy'], '.0%')} (union of kernels and copies / wall)")
        kind = "kernels" if r["gpu_busy"] is not None else "CPU operators (own time)"
        lines.append(f"   top {kind}, ms and calls per update:")
        lines += [f"   {ms:9.2f} {calls:7.1f}  {name[:110]}" for name, ms, calls in r["top"]]
    if "syncs_per_update" in r:
        measured = torch.cuda.is_available()
        lines.append(f"   host syncs per update (sync debug mode): "
                     f"{r['syncs_per_update'] if measured else 'not measured on a CPU'}")
        lines += [f"   {n:5d}  {ours}   <- {library}" for (ours, library), n in r["sync_sites"]]
    return lines


def matrix(args, train_overrides: list[str]) -> list[tuple[dict, list[str]]]:
    """Each setting of the matrix (one per combination of the matrix settings' values) with the train config
    overrides of its run; one line and exit for a value a matrix setting does not take."""
    configs = []
    for model, precision, seconds, ckpt, attention, compiled in itertools.product(
            cli.values(args, "models"), cli.values(args, "precisions", PRECISION), cli.values(args, "batch_seconds"),
            cli.values(args, "checkpointing", CHECKPOINTING), cli.values(args, "attention", ("sdpa", "eager")),
            cli.values(args, "compile", COMPILE)):
        ckpt = CHECKPOINTING[ckpt]
        overrides = [f"model={model}", "model.pretrained=null", f"precision='{PRECISION[precision]}'", "lang=pt",
                     "logger=none", "~callbacks.checkpoint", "~callbacks.last", "~callbacks.speed",
                     f"model.gradient_checkpointing={ckpt == 'on'}", f"model.attn_implementation={attention}",
                     f"model.compile={COMPILE[compiled]}", *([f"data.max_batch_seconds={seconds}"] if seconds else []),
                     *train_overrides]
        setting = {"model": model, "precision": precision, "ckpt": ckpt, "attention": attention,
                   "compile": COMPILE[compiled]}
        configs.append((setting, overrides))
    return configs


def main(argv: list[str]) -> list[dict]:
    args, train_overrides = cli.parse("bench/gpu", argv, passthrough=True)  # the others: the train config's
    if args.quick:
        args.steps, args.warmup, args.profile_steps, args.sync_steps = 5, 2, 2, 1
    from asr.core.config import compose

    configs = matrix(args, train_overrides)
    root = args.root
    if root is None:  # one corpus for every setting, sized for the largest batch
        budget = max(compose("train", [*o, "data.root=/tmp", "run_dir=/tmp"]).data.max_batch_seconds
                     for _, o in configs)
        updates = args.warmup + args.steps + (args.profile_steps + args.sync_steps if args.profile else 0)
        clips = args.clips or corpus_clips(updates, budget, args.min_seconds, args.max_seconds)
        started = time.perf_counter()
        root = synthetic_corpus(Path(tempfile.mkdtemp()) / "pt", clips, args.min_seconds, args.max_seconds)
        print(f"corpus: {clips} synthetic clips of {args.min_seconds:g}-{args.max_seconds:g} s in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    rows = []
    for setting, overrides in configs:
        cfg = compose("train", [*overrides, f"data.root={root}", f"run_dir={tempfile.mkdtemp()}"])
        setting["batch_s"] = cfg.data.max_batch_seconds
        try:
            mine, data, model = ours(cfg, args)
        except torch.OutOfMemoryError:
            rows.append({**setting, "who": "ours", "oom": True})
            _free()
            print_rows(rows[-1:], args)
            continue
        rows.append({**setting, "who": "ours", **mine})
        _free()
        if args.hf:
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
            peak = speed.peak_flops(device, cfg.trainer.precision, args.peak_tflops)
            try:
                rows.append({**setting, "who": "HF Trainer", **hf(cfg, args.steps, args.warmup, data, model, peak)})
            except torch.OutOfMemoryError:
                rows.append({**setting, "who": "HF Trainer", "oom": True})
            del model, data
            _free()
        print_rows([r for r in rows if all(r[k] == v for k, v in setting.items())], args)  # a timeout keeps these
    if len(configs) > 1:
        print("\nall settings:")
        print_rows(rows, args, details_too=False)
    return rows


def print_rows(rows: list[dict], args, details_too: bool = True) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nrandom weights, {device}, {args.steps} timed updates after {args.warmup}")
    print(f"{'model':>9} {'precision':>9} {'batch s':>7} {'ckpt':>4} {'attn':>5} {'compile':>7} {'who':>10} "
          f"{'audio-s/s':>9} {'MFU':>6} {'peak GB':>7} {'wait':>6} {'host ms':>7} {'vs HF':>6}")
    fmt = lambda v, f: format(v, f) if v is not None else format("-", f[:2].replace("%", ""))  # noqa: E731
    for i, r in enumerate(rows):
        head = (f"{r['model']:>9} {r['precision']:>9} {r['batch_s']:>7.0f} {r['ckpt']:>4} {r['attention']:>5} "
                f"{r['compile']:>7} {r['who']:>10}")
        if r.get("oom"):
            print(f"{head} {'out of memory':>9}")
            continue
        ratio = ""
        theirs = rows[i + 1] if i + 1 < len(rows) else {}
        if r["who"] == "ours" and theirs.get("who") == "HF Trainer" and not theirs.get("oom"):
            ratio = f"{r['audio_s_per_s'] / theirs['audio_s_per_s']:.2f}x"
        print(f"{head} {r['audio_s_per_s']:>9.1f} {fmt(r['mfu'], '>6.1%')} {fmt(r['memory_gb'], '>7.1f')} "
              f"{fmt(r['wait'], '>6.1%')} {fmt(r.get('host_ms_median'), '>7.0f')} {ratio:>6}")
    if args.profile and details_too:
        for r in rows:
            if r["who"] == "ours" and not r.get("oom"):
                print("\n".join(details(r)))
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
