"""Helper of test_batching: one epoch of real DDP on 2 CPU processes (gloo); each rank writes the clip
ids of its training batches. Lightning's DDP launcher runs this script again for rank 1.

    python tests/ddp_batches.py <common voice root> <out dir>
"""

import json
import sys
from pathlib import Path

import lightning as L
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asr.model import CTCModel  # noqa: E402
from tests.conftest import compose_config  # noqa: E402


class WriteRankBatches(L.Callback):
    def __init__(self, out_dir: Path):
        self.out_dir, self.ids = out_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.append(batch["ids"])

    def on_train_end(self, trainer, pl_module):
        (self.out_dir / f"ids-rank{trainer.global_rank}.json").write_text(json.dumps(self.ids))


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
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[WriteRankBatches(out)])
    trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    main(*sys.argv[1:3])
