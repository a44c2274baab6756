"""Learning-rate schedules, stepped once per optimizer update (not per micro-batch).

`linear` is the HF Trainer's (transformers' own function); `tristage` is fairseq's `tri_stage`
(REFERENCE.md gives the formula).
"""

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_linear_schedule_with_warmup


def tristage_factor(step: int, total_steps: int, ratios=(0.1, 0.4, 0.5), init_lr_scale: float = 0.01,
                    final_lr_scale: float = 0.01) -> float:
    """lr / peak lr at optimizer update `step`: linear warm-up from init, hold, exponential decay to final."""
    warmup, hold, decay = (int(total_steps * r) for r in ratios)
    if step < warmup:
        return init_lr_scale + (1 - init_lr_scale) * step / warmup
    step -= warmup
    if step < hold:
        return 1.0
    step -= hold
    if 0 < decay and step <= decay:
        return math.exp(math.log(final_lr_scale) * step / decay)
    return final_lr_scale


def build(optimizer: Optimizer, total_steps: int, name: str, **options) -> LambdaLR:
    """The schedule `name` over `total_steps` optimizer updates; options come from conf/sched/<name>.yaml."""
    if name == "linear":  # warmup_steps, when set, wins over warmup_ratio (as in HF TrainingArguments)
        warmup = options.get("warmup_steps")
        warmup = int(options.get("warmup_ratio", 0.0) * total_steps) if warmup is None else warmup
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if name == "tristage":
        return LambdaLR(optimizer, partial(tristage_factor, total_steps=total_steps, **options))
    raise ValueError(f"sched={name} is unknown; expected linear or tristage")
