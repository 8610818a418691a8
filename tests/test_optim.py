"""Warmup + cosine schedule keeps per-group lr ratios and hits its endpoints."""

import math

import torch

from visiontune.runtime import warmup_cosine


def test_warmup_then_cosine_per_group():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1], "lr": 1e-3}, {"params": [p2], "lr": 1e-2}])
    sched = warmup_cosine(opt, total_steps=100, warmup_steps=10, min_ratio=0.01)
    lrs = []
    for _ in range(100):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    first = [a for a, _ in lrs]
    assert first[0] < first[5] < first[9] <= 1e-3 + 1e-12  # rising during warmup
    assert math.isclose(max(first), 1e-3, rel_tol=1e-6)
    assert all(b / a == 10.0 or math.isclose(b / a, 10.0) for a, b in lrs)  # ratio preserved
    assert first[-1] < 0.02e-3 + 1e-12 and first[-1] >= 0.01e-3 - 1e-12  # decays to min_ratio
    assert all(x >= y - 1e-15 for x, y in zip(first[10:], first[11:]))  # monotone decay after warmup
