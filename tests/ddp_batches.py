"""Helper of test_batching: one epoch of real DDP on 2 CPU processes (gloo); each rank writes the clip
ids of its training batches (tests.callbacks.RecordUpdates: rank<r>.json). Lightning's DDP launcher runs
this script again for rank 1.

    python tests/ddp_batches.py <common voice root> <out dir> [override ...]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.callbacks import RecordUpdates  # noqa: E402
from tests.conftest import SHRUNK, assembled  # noqa: E402


def main(root: str, out_dir: str, *overrides: str) -> None:
    out = Path(out_dir)
    run = assembled(f"data.root={root}", "data.max_batch_seconds=7", "data.num_workers=0", f"run_dir={out}", *SHRUNK,
                    "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_epochs=1",
                    *overrides, callbacks=[RecordUpdates(out_dir)], limit_val_batches=0)
    (out / "durations.json").write_text(json.dumps({u.id: u.duration for u in run.data.load("train")}))
    run.fit()


if __name__ == "__main__":
    main(*sys.argv[1:])
