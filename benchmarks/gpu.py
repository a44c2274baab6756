"""Training speed and memory on the GPU at hand, over a matrix of settings, ours against the HF Trainer.

    python benchmarks/gpu.py --model xlsr_300m --precision bf16 16 --batch-seconds 100 200
    python benchmarks/gpu.py --model xlsr_1b --checkpointing off on --attention sdpa eager --compile off on --hf
    python benchmarks/gpu.py --model tiny --steps 4 --warmup 2 --hf        # on a CPU (what the tests run)

Random weights shaped as the model group says (`model.pretrained=null`: no download), the conv feature
encoder frozen as in fine-tuning (not for tiny, which trains from scratch). Clips: synthetic tones of
uniform random length in [--min-seconds, --max-seconds] in the Common Voice layout (MP3, decoded by the
loader workers as in a real run), or a corpus (--root, a Common Voice locale directory).

Per setting, over the updates after --warmup (compile and allocator warm-up excluded; the timed span
starts and ends with a device synchronisation, the only ones the benchmark adds): audio-seconds per
second (real audio), MFU (`asr.speed`: model FLOPs of the real audio / the device's dense peak from
Lightning's table or --peak-tflops), peak GPU memory, loader wait (share of the span the training loop
waited for a batch). With --hf, the HF Trainer on the same job right after: same architecture and
initial weights, same clips decoded beforehand (as run_speech_recognition_ctc.py does), the same clips
per update on average (group_by_length), the same precision, checkpointing and attention.
"""

import argparse
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from asr import speed, synth  # noqa: E402

PRECISION = {"bf16": "bf16", "16": "16", "32": "32"}
SENTENCES = ["a b c", "d e f", "g h i", "j k l", "m n o", "p q r", "s t u", "v w x"]


def synthetic_corpus(root: Path, clips: int, low: float, high: float, seed: int = 0) -> Path:
    """`clips` train clips (and 8 dev) of tones of random length in [low, high] seconds, Common Voice layout."""
    rng = random.Random(seed)
    voice = synth.TRAIN_VOICES[0]
    lengths = [rng.uniform(low, high) for _ in range(clips + 8)]

    def tone(i, sentence, voice):
        t = np.arange(int(lengths[i] * 48_000)) / 48_000
        return (0.3 * np.sin(2 * np.pi * (200 + 20 * (i % 20)) * t)).astype(np.float32)

    text = [(SENTENCES[i % len(SENTENCES)], voice) for i in range(clips + 8)]
    synth.write_common_voice(root, {"train": text[:clips], "dev": text[clips:]}, "pt", tone)
    synth.write_tsv(root / "test.tsv", synth.CV_COLUMNS, [])
    return root


class Span(speed.SpeedMonitor):
    """SpeedMonitor's windows (one per update here), kept; the timed span synchronises the device at its ends."""

    def __init__(self, warmup: int, peak_tflops: float | None):
        super().__init__(peak_tflops)
        self.warmup, self.windows, self.started = warmup, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self.warmup and self.started is None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.started, self.windows = time.perf_counter(), []
            self._reset(self.started)

    def _log(self, trainer, pl_module):
        self.windows.append(dict(self._window))
        self._reset(time.perf_counter())

    def figures(self, device) -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.started
        total = {k: sum(w[k] for w in self.windows) for k in ("audio", "flops", "wait")}
        return {"audio_s_per_s": total["audio"] / seconds, "mfu": total["flops"] / seconds / self.peak if self.peak else None,
                "wait": total["wait"] / seconds, "memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
                "gflop_per_audio_s": total["flops"] / total["audio"] / 1e9}


def ours(cfg, steps: int, warmup: int, peak_tflops):
    from asr.model import CTCModel
    from asr.run import assemble

    span = Span(warmup, peak_tflops)
    run = assemble(cfg, callbacks=[span], max_steps=warmup + steps, max_time=None, limit_val_batches=0,
                   enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    initial = {k: v.clone() for k, v in run.model.model.state_dict().items()}
    run.fit()
    figures = span.figures(run.model.device)
    data = run.data
    del run
    from omegaconf import OmegaConf
    fresh = CTCModel.from_config(OmegaConf.merge(cfg, {"model": {"compile": False}}), data.vocab.tokens)
    fresh.model.load_state_dict(initial)  # our initial weights, for the HF Trainer (never compiled)
    return figures, data, fresh


def hf(cfg, steps: int, warmup: int, data, model, peak) -> dict:
    """The HF Trainer on the same job (benchmarks/throughput.py's, on this device and precision)."""
    from transformers import TrainerCallback

    import throughput

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
    result = throughput.hf_trainer(cfg, warmup + steps, throughput.clips_per_batch(data), data, model.model, callbacks=[timer], seen=seen,
                                   flops=lambda lengths: speed.training_flops(model.model.config, lengths, cfg.model.freeze_feature_encoder is False))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - timer.started
    return {"audio_s_per_s": seen["audio"] / seconds, "mfu": seen["flops"] / seconds / peak if peak else None,
            "wait": None, "memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
            "padding": result["padding"]}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="xlsr_300m", help="model group: tiny, xlsr_300m, xlsr_1b")
    parser.add_argument("--precision", nargs="+", default=["bf16"], choices=list(PRECISION))
    parser.add_argument("--batch-seconds", nargs="+", type=float, default=[None], help="data.max_batch_seconds")
    parser.add_argument("--checkpointing", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument("--attention", nargs="+", default=["sdpa"], choices=["sdpa", "eager"])
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument("--steps", type=int, default=30, help="timed updates, after --warmup")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--clips", type=int, default=400, help="synthetic train clips")
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=15.0)
    parser.add_argument("--root", help="a Common Voice locale directory instead of synthetic clips")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak (default: Lightning's table)")
    parser.add_argument("--hf", action="store_true", help="also the HF Trainer on each setting's job")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides of our run (key=value)")
    args = parser.parse_args(argv)
    from asr.config import compose

    root = args.root or synthetic_corpus(Path(tempfile.mkdtemp()) / "pt", args.clips, args.min_seconds,
                                         args.max_seconds)
    rows = []
    for precision, seconds, ckpt, attention, compiled in itertools.product(
            args.precision, args.batch_seconds, args.checkpointing, args.attention, args.compile):
        overrides = [f"model={args.model}", "model.pretrained=null", f"precision='{PRECISION[precision]}'",
                     "lang=pt", f"data.root={root}", "logger=none", "~callbacks.checkpoint", "~callbacks.last",
                     "~callbacks.speed", f"run_dir={tempfile.mkdtemp()}",
                     f"model.gradient_checkpointing={ckpt == 'on'}", f"model.attn_implementation={attention}",
                     f"model.compile={compiled == 'on'}", *([f"data.max_batch_seconds={seconds}"] if seconds else []),
                     *args.overrides]
        cfg = compose("train", overrides)
        setting = {"precision": precision, "batch_s": cfg.data.max_batch_seconds, "ckpt": ckpt,
                   "attention": attention, "compile": compiled}
        try:
            mine, data, model = ours(cfg, args.steps, args.warmup, args.peak_tflops)
        except torch.OutOfMemoryError:
            rows.append({**setting, "who": "ours", "oom": True})
            torch.cuda.empty_cache()
            continue
        rows.append({**setting, "who": "ours", **mine})
        if args.hf:
            peak = speed.peak_flops(model.device if torch.cuda.is_available() else torch.device("cpu"),
                                    cfg.trainer.precision, args.peak_tflops)
            try:
                rows.append({**setting, "who": "HF Trainer", **hf(cfg, args.steps, args.warmup, data, model, peak)})
            except torch.OutOfMemoryError:
                rows.append({**setting, "who": "HF Trainer", "oom": True})
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.model}, random weights, {device}, {args.steps} timed updates after {args.warmup}")
    print(f"{'precision':>9} {'batch s':>7} {'ckpt':>4} {'attn':>5} {'compile':>7} {'who':>10} "
          f"{'audio-s/s':>9} {'MFU':>6} {'peak GB':>7} {'wait':>6} {'vs HF':>6}")
    for i, r in enumerate(rows):
        if r.get("oom"):
            print(f"{r['precision']:>9} {r['batch_s']:>7.0f} {r['ckpt']:>4} {r['attention']:>5} {r['compile']:>7} "
                  f"{r['who']:>10} {'out of memory':>9}")
            continue
        ratio = ""
        if r["who"] == "ours" and i + 1 < len(rows) and rows[i + 1]["who"] == "HF Trainer" and not rows[i + 1].get("oom"):
            ratio = f"{r['audio_s_per_s'] / rows[i + 1]['audio_s_per_s']:.2f}x"
        fmt = lambda v, f: format(v, f) if v is not None else format("-", f[:2].replace("%", ""))  # noqa: E731
        print(f"{r['precision']:>9} {r['batch_s']:>7.0f} {r['ckpt']:>4} {r['attention']:>5} {r['compile']:>7} "
              f"{r['who']:>10} {r['audio_s_per_s']:>9.1f} {fmt(r['mfu'], '>6.1%')} {fmt(r['memory_gb'], '>7.1f')} "
              f"{fmt(r['wait'], '>6.1%')} {ratio:>6}")
    return rows


if __name__ == "__main__":
    main()
