"""The planner: python -m asr.tools.memory [cards=true] [train overrides] (settings: conf/memory.yaml).
Random weights of the config's architecture; a batch of the worst shape the config allows: clips of
data.max_seconds, as many as data.max_batch_seconds (and data.max_batch_size) hold; labels of LABELS_PER_SECOND
characters per second; forward and backward in training mode with the config's precision, with AdamW's
moments allocated. On CUDA, the allocator's peak; the budget that fits is the largest whose peak stays
under (1 - margin) of the device's memory. On a CPU (the tiny model, or a look at the arithmetic), the
growth of the process's peak resident memory, measured on budgets in increasing order only.
"""


import logging
import os
import sys
from contextlib import nullcontext

import torch

import asr
from asr.core import audio, text
from asr.core.config import compose
from asr.model import finetune as tuning
from asr.model.encoder import SyncFreeWav2Vec2ForCTC
from asr.model.module import CTCModel
from asr.model.speed import PRECISION_DTYPE
from asr.run.warmup import LABELS_PER_SECOND, adam_room
from asr.tools import cli

log = logging.getLogger(__name__)



def _autocast(precision: str, device: torch.device):
    """The autocast of a mixed precision (`bf16-mixed`, `16-mixed`); nothing for the others."""
    mixed = str(precision).endswith("-mixed")
    return torch.autocast(device.type, dtype=PRECISION_DTYPE[str(precision)]) if mixed else nullcontext()


def synthetic_batch(clips: int, seconds: float, vocab_size: int, device: torch.device) -> dict:
    """`clips` clips of `seconds` of noise with labels of `LABELS_PER_SECOND` characters per second, as
    `asr.data.loading.collate` lays a batch out."""
    samples = int(seconds * audio.SAMPLE_RATE)
    label_length = max(1, int(LABELS_PER_SECOND * seconds))
    generator = torch.Generator().manual_seed(0)
    return {"ids": [str(i) for i in range(clips)], "audio": torch.randn(clips, samples, generator=generator).to(device),
            "lengths": [samples] * clips, "label_lengths": [label_length] * clips,
            "labels": torch.randint(0, vocab_size - 1, (clips, label_length), generator=generator).to(device)}


class Probe:
    """A model of the config's architecture on `device`, with AdamW's moments, that measures the peak
    memory of one training step on a batch."""

    def __init__(self, cfg, device: torch.device):
        from omegaconf import OmegaConf

        cfg = OmegaConf.merge(cfg, {"model": {"pretrained": None, "compile": False}})
        tokens = [*"abcdefghijklmnopqrstuvwxyz'", text.WORD_DELIMITER, text.UNK, text.PAD]
        self.device, self.precision = device, cfg.trainer.precision
        self.model = CTCModel.from_config(cfg, tokens).to(device).train()
        self.vocab_size = len(tokens)
        self._moments = adam_room([], self.model)

    def peak_gb(self, clips: int, seconds: float) -> float | None:
        """Peak memory (GB) of forward and backward on `clips` clips of `seconds`; None: out of memory."""
        import resource

        batch = synthetic_batch(clips, seconds, self.vocab_size, self.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with _autocast(self.precision, self.device):
                loss = self.model(batch).loss
            loss.backward()
        except torch.OutOfMemoryError:
            return None
        finally:
            self.model.zero_grad(set_to_none=True)
            batch = loss = None
        if cuda:
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB: the process's peak


def model_states(cfg) -> dict:
    """The arithmetic of the config's model states, without running it: parameters (total, trainable under
    `model.finetune` and `model.freeze_feature_encoder`) and the bytes of float32 weights, of gradients of the
    trainable ones, and of AdamW's two float32 moments per trainable parameter. Activations are not in it:
    they depend on the batch and the device (the planner's batches measure them). The network is built on
    the meta device: seconds, no memory, for any size."""
    from omegaconf import OmegaConf
    from transformers import Wav2Vec2Config

    finetune = tuning.check(OmegaConf.to_container(cfg.model.finetune))
    fields = {**OmegaConf.to_container(cfg.model.arch), **OmegaConf.to_container(cfg.model.config),
              **tuning.config_overrides(finetune), "vocab_size": 40}
    with torch.device("meta"):
        network = SyncFreeWav2Vec2ForCTC(Wav2Vec2Config(**fields))
        if cfg.model.freeze_feature_encoder:
            network.freeze_feature_encoder()
        tuning.prepare(network, finetune, "the planner's model")
    total = sum(p.numel() for p in network.parameters())
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    return {"finetune": finetune["method"], "total_parameters": total, "trainable_parameters": trainable,
            "weights_gb": 4 * total / 1e9, "gradients_gb": 4 * trainable / 1e9, "adamw_gb": 8 * trainable / 1e9}


def capacity_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def clips_within(budget: float, max_seconds: float, max_batch_size: int | None) -> int:
    """Clips of the longest allowed duration a budget of padded seconds holds."""
    clips = max(1, int(budget // max_seconds))
    return min(clips, max_batch_size) if max_batch_size else clips


def plan(cfg, device: torch.device, margin: float, limit: float) -> dict:
    """Budgets of padded audio (doubling from one longest clip), each's peak, and the largest that fits."""
    probe = Probe(cfg, device)
    longest, size = cfg.data.max_seconds, cfg.data.max_batch_size
    allowed = (1 - margin) * capacity_gb(device)
    rows, budget, fit, failed = [], longest, None, None
    while budget <= limit:
        clips = clips_within(budget, longest, size)
        if rows and rows[-1]["peak_gb"] * clips / rows[-1]["clips"] > 1.5 * allowed:
            failed = budget  # far past the limit by the last rung's rate: not run (a CPU would swap or be killed)
            break
        peak = probe.peak_gb(clips, longest)
        rows.append({"max_batch_seconds": budget, "clips": clips, "peak_gb": peak})
        if peak is None or peak > allowed:
            failed = budget
            break
        fit = budget
        if size and clips >= size:
            break  # data.max_batch_size binds: a larger budget gives the same batch
        budget *= 2
    if device.type == "cuda" and fit is not None and failed is not None:  # bisect to one clip
        low, high = fit, failed
        while high - low > longest:
            middle = (low + high) // longest // 2 * longest
            if middle <= low:
                break
            peak = probe.peak_gb(clips_within(middle, longest, size), longest)
            rows.append({"max_batch_seconds": middle, "clips": clips_within(middle, longest, size), "peak_gb": peak})
            low, high = (middle, high) if peak is not None and peak <= allowed else (low, middle)
        fit = low
    return {"rows": sorted(rows, key=lambda r: r["max_batch_seconds"]), "fits": fit, "allowed_gb": allowed,
            "capacity_gb": capacity_gb(device)}


def cards(device: torch.device, margin: float, overrides: list[str]) -> list[dict]:
    """Each experiment's card batch (data.max_batch_size clips of data.max_seconds, its precision): its
    peak, whether it fits, and where not the first of these that does with the same audio per update:
    gradient checkpointing, then half the clips per batch (update_clips keeps the update)."""
    rows = []
    for path in sorted((asr.REPO_DIR / "conf" / "experiment").glob("*.yaml")):
        tried = [[], ["model.gradient_checkpointing=true"]]
        cfg = compose("train", [f"experiment={path.stem}", *overrides])
        size = cfg.data.max_batch_size
        while size and size > 1:
            size //= 2
            tried.append(["model.gradient_checkpointing=true", f"data.max_batch_size={size}",
                          f"data.max_batch_seconds={size * cfg.data.max_seconds:g}"])
        row = {"experiment": path.stem, "model": cfg.model.arch.hidden_size, "precision": cfg.trainer.precision,
               "clips": cfg.data.max_batch_size, "seconds": cfg.data.max_seconds}
        for extra in tried:
            run = compose("train", [f"experiment={path.stem}", *overrides, *extra])
            probe = Probe(run, device)
            peak = probe.peak_gb(run.data.max_batch_size or 1, run.data.max_seconds)
            del probe
            fits = peak is not None and peak <= (1 - margin) * capacity_gb(device)
            row.setdefault("peak_gb", peak)
            row.setdefault("fits", fits)
            if fits:
                row["override"] = " ".join(extra) or "-"
                row["override_peak_gb"] = peak
                break
        rows.append(row)
    return rows


def main(argv: list[str]):
    args, overrides = cli.parse("memory", argv, passthrough=True)  # the others: the train config's
    if args.states:
        states = model_states(compose("train", [*overrides, "run_dir=/tmp/asr-memory"]))
        print(f"{' '.join(overrides) or 'defaults'}: finetune={states['finetune']}, {states['trainable_parameters']:,} "
              f"of {states['total_parameters']:,} parameters train; float32 weights {states['weights_gb']:.2f} GB, "
              f"gradients {states['gradients_gb']:.2f} GB, AdamW moments {states['adamw_gb']:.2f} GB: "
              f"{states['weights_gb'] + states['gradients_gb'] + states['adamw_gb']:.2f} GB before activations")
        return states
    device = asr.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (peak resident memory)"
    if args.cards:
        rows = cards(device, args.margin, [*overrides, "run_dir=/tmp/asr-memory"])
        print(f"\nthe cards' batches on {where}, {capacity_gb(device):.0f} GB, {args.margin:.0%} kept free")
        print(f"{'experiment':<16} {'precision':<10} {'batch':>12} {'peak GB':>8} {'fits':>5}  "
              f"override that fits (same audio per update)")
        for r in rows:
            peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "OOM"
            print(f"{r['experiment']:<16} {r['precision']:<10} {r['clips']:>4} x {r['seconds']:>4.0f} s {peak:>8} "
                  f"{'yes' if r['fits'] else 'no':>5}  {r.get('override', 'none found') if not r['fits'] else '-'}")
        return rows
    cfg = compose("train", [*overrides, "run_dir=/tmp/asr-memory"])
    result = plan(cfg, device, args.margin, args.limit_seconds)
    print(f"\n{' '.join(overrides) or 'defaults'} on {where}: {result['capacity_gb']:.1f} GB, "
          f"{result['allowed_gb']:.1f} GB usable ({args.margin:.0%} kept free); clips of {cfg.data.max_seconds:g} s")
    print(f"{'max_batch_seconds':>17} {'clips':>5} {'peak GB':>8}")
    for r in result["rows"]:
        print(f"{r['max_batch_seconds']:>17g} {r['clips']:>5} "
              f"{r['peak_gb'] if r['peak_gb'] is None else round(r['peak_gb'], 2)!s:>8}")
    print(f"largest that fits: data.max_batch_seconds={result['fits']:g}" if result["fits"] else
          "not even one clip of data.max_seconds fits: model.gradient_checkpointing=true, precision=bf16, or a "
          "lower data.max_seconds")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
