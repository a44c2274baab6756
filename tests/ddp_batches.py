"""Helper of test_batching: one epoch of real DDP on 2 CPU processes (gloo); each rank writes the clip
ids of its training batches (tests.callbacks.RecordUpdates: rank<r>.json). Lightning's DDP launcher runs
this script again for rank 1.

    python tests/ddp_batches.py <common voice root> <out dir>
"""

import json
import sys
from pathlib import Path

import lightning as L
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asr.model import CTCModel  # noqa: E402
from tests.callbacks import RecordUpdates  # noqa: E402
from tests.conftest import compose_config  # noqa: E402


def main(root: str, out_dir: str) -> None:
    out = Path(out_dir)
    cfg = compose_config(overrides=[f"data.root={root}", "data.max_batch_seconds=7", "data.num_workers=0",
                                    f"run_dir={out}"])
    data = instantiate(cfg.data, _convert_="all")
    data.setup("fit")
    (out / "durations.json").write_text(json.dumps({u.id: u.duration for u in data.load("train")}))
    model = CTCModel.from_config(cfg, data.vocab.tokens)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[RecordUpdates(out_dir)])
    trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    main(*sys.argv[1:3])
