"""Training loss in fp32, bf16 and fp16 side by side: same model, data, seed and batches.

    python benchmarks/precision.py steps=300                      # tiny model on the demo (CPU or GPU)
    python benchmarks/precision.py steps=300 model=xlsr_300m data.max_batch_seconds=100   # on a GPU

Prints the mean training loss per window of updates for each precision, and per precision the skipped
updates, non-finite losses and (fp16) the final loss scale. On a CPU, fp16 runs with an explicit fp16
autocast and GradScaler (Lightning would turn `16-mixed` into bf16 there); on a GPU each precision is
what `precision=<p>` gives train.py. The settings and their defaults: conf/bench/precision.yaml (`--help`);
any other key=value (model=...) overrides the train config.
"""

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from asr.tools import cli  # noqa: E402

PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def run(cfg, steps: int, precision: str) -> dict:
    import lightning as L
    from lightning.pytorch.plugins import MixedPrecision

    from asr.run.training import assemble

    class Losses(L.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].detach().float())  # read at the end: no sync per step

    cuda = torch.cuda.is_available()
    plugins = {}
    if precision == "16" and not cuda:  # Lightning would run bf16 on a CPU
        plugins = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    losses = Losses()
    run = assemble(cfg, callbacks=[losses], max_steps=steps, max_time=None, limit_val_batches=0,
                   enable_progress_bar=False, enable_model_summary=False,
                   precision=None if plugins else PRECISIONS[precision], **plugins)
    run.fit()
    model, trainer = run.model, run.trainer
    values = torch.stack(losses.losses).cpu()
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return {"losses": values, "skipped": model.skipped_updates, "nonfinite": int((~torch.isfinite(values)).sum()),
            "scale": scaler.get_scale() if scaler is not None else None, "precision": trainer.precision}


def main(argv: list[str]) -> dict:
    args, overrides = cli.parse("bench/precision", argv, passthrough=True)  # the others: the train config's
    precisions = cli.values(args, "precisions", PRECISIONS)
    from asr.core.config import compose

    cfg = compose("train", ["logger=none", "~callbacks.checkpoint", "~callbacks.last",
                            "run_dir=/tmp/precision-benchmark", *overrides])
    results = {p: run(cfg, args.steps, p) for p in precisions}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{' '.join(overrides) or 'defaults'}, {args.steps} updates, seed {cfg.seed}, {device}: mean training "
          f"loss per {args.every} updates")
    print(f"{'updates':>9} " + " ".join(f"{results[p]['precision']:>10}" for p in precisions))
    for start in range(0, args.steps, args.every):
        cells = []
        for p in precisions:
            window = results[p]["losses"][start:start + args.every]
            finite = window[torch.isfinite(window)]
            cells.append(f"{finite.mean().item():>10.4f}" if len(finite) else f"{'-':>10}")
        print(f"{start + 1:>4}-{min(start + args.every, args.steps):<4} " + " ".join(cells))
    for p in precisions:
        r = results[p]
        print(f"{r['precision']:>10}: skipped updates {r['skipped']}, non-finite losses {r['nonfinite']}"
              + (f", final loss scale {r['scale']:g}" if r["scale"] is not None else ""))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
