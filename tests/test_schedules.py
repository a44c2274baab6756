import math

import pytest
import torch

from asr.model import schedules


def lrs(name, total, **options):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = schedules.build(optimizer, total, name, **options)
    out = []
    for _ in range(total + 1):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_linear_is_the_hf_schedule():
    lr = lrs("linear", 100, warmup_steps=10, warmup_ratio=0.5)  # steps win over the ratio
    assert lr[0] == 0 and lr[5] == pytest.approx(0.5) and lr[10] == pytest.approx(1.0)
    assert lr[55] == pytest.approx(0.5) and lr[100] == 0


def test_tristage_follows_fairseq():
    total, init, final = 13000, 0.01, 0.05
    lr = lrs("tristage", total, ratios=[0.1, 0.4, 0.5], init_lr_scale=init, final_lr_scale=final)
    W, H, D = 1300, 5200, 6500  # int(13000 x ratio) per phase
    assert lr[0] == pytest.approx(init)
    assert lr[650] == pytest.approx(init + (1 - init) * 650 / W)
    assert lr[W] == lr[W + H - 1] == 1.0
    n = W + H + 1000
    assert lr[n] == pytest.approx(math.exp(-(-math.log(final) / D) * 1000))
    assert lr[W + H + D] == pytest.approx(final)
    assert schedules.tristage_factor(W + H + D + 50, total, [0.1, 0.4, 0.5], init, final) == final


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="sched=cosine"):
        lrs("cosine", 10)


def test_linear_warmup_ratio_when_no_warmup_steps():
    lr = lrs("linear", 200, warmup_steps=None, warmup_ratio=0.1)
    assert lr[10] == pytest.approx(0.5) and lr[20] == pytest.approx(1.0) and lr[200] == 0
