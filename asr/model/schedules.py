"""Learning-rate schedules, stepped once per optimizer update (not per micro-batch).

`linear` is the HF Trainer's (transformers' own function); `tristage` is fairseq's `tri_stage`: with
phase ratios (r0, r1, r2) over max_steps, W = int(max_steps*r0), H = int(max_steps*r1), D = int(max_steps*r2);
the learning rate rises linearly from init_lr_scale x lr over W updates, holds lr for H, then decays
exponentially to final_lr_scale x lr over D, and stays there.
"""

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_linear_schedule_with_warmup


def tristage_factor(step: int, total_steps: int, ratios: list[float], init_lr_scale: float,
                    final_lr_scale: float) -> float:
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


def linear(optimizer: Optimizer, total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> LambdaLR:
    """HF `linear`: from 0 to lr over the warm-up, then to 0 at `total_steps`. `warmup_steps`, when set,
    wins over `warmup_ratio` (a fraction of `total_steps`), as in HF TrainingArguments."""
    warmup = int(warmup_ratio * total_steps) if warmup_steps is None else warmup_steps
    return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def tristage(optimizer: Optimizer, total_steps: int, ratios: list[float], init_lr_scale: float,
             final_lr_scale: float) -> LambdaLR:
    """fairseq `tri_stage` over `total_steps`: `ratios` (warm-up, hold, decay) are fractions of it."""
    return LambdaLR(optimizer, partial(tristage_factor, total_steps=total_steps, ratios=ratios,
                                       init_lr_scale=init_lr_scale, final_lr_scale=final_lr_scale))


SCHEDULES = {"linear": linear, "tristage": tristage}  # sched.name -> the function; conf/sched/<name>.yaml


def build(optimizer: Optimizer, total_steps: int, name: str, **options) -> LambdaLR:
    """The schedule `name` over `total_steps` optimizer updates; options come from conf/sched/<name>.yaml."""
    if name not in SCHEDULES:
        raise ValueError(f"sched={name} is unknown; expected {' or '.join(SCHEDULES)}")
    return SCHEDULES[name](optimizer, total_steps, **options)
