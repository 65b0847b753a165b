"""Each schedule against its formula, driven through torch's LambdaLR and an optimiser as training does."""

import json
import math

import pytest
import torch

from archlab.errors import ConfigError
from archlab.train.schedules import NoamSchedule, WarmupConstant, WarmupCosine, build_schedule, build_scheduler


def lrs_seen_by_steps(schedule, lr: float, n: int) -> list[float]:
    """The learning rate optimiser step 1, 2, ..., n uses (read before each step, as the loop does)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, schedule)
    seen = []
    for _ in range(n):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_noam_is_the_papers_formula_with_steps_counted_from_one():
    d, warmup = 512, 4000
    seen = lrs_seen_by_steps(NoamSchedule(d, warmup), 1.0, 6)
    for step, lr in enumerate(seen, start=1):
        assert lr == pytest.approx(d**-0.5 * min(step**-0.5, step * warmup**-1.5), rel=1e-15)
    s = NoamSchedule(d, warmup)
    for step in (1, 10, 3999, 4000, 4001, 10_000, 100_000):
        assert s.factor(step) == pytest.approx(d**-0.5 * min(step**-0.5, step * warmup**-1.5), rel=1e-15)
    # linear up to the peak (d * warmup)^-0.5 at step = warmup, then 1/sqrt(step)
    assert s.factor(2000) == pytest.approx(s.factor(1000) * 2, rel=1e-12)
    assert s.factor(warmup) == pytest.approx((d * warmup) ** -0.5, rel=1e-12)
    assert s.factor(16_000) == pytest.approx(s.factor(4000) / 2, rel=1e-12)
    assert max(s.factor(k) for k in range(1, 20_000)) == s.factor(warmup)
    assert NoamSchedule(d).warmup == 4000


def test_warmup_cosine_against_its_formula():
    warmup, total, lr, min_lr = 10, 50, 2e-3, 2e-4
    seen = lrs_seen_by_steps(WarmupCosine(warmup, total, min_lr / lr), lr, total)
    for step, got in enumerate(seen, start=1):
        if step <= warmup:
            want = lr * step / warmup
        else:
            p = (step - warmup) / (total - warmup)
            want = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))
        assert got == pytest.approx(want, rel=1e-12, abs=1e-18), step
    assert seen[warmup - 1] == pytest.approx(lr)  # the peak, at the end of warmup
    assert seen[-1] == pytest.approx(min_lr)  # the floor, at the last step
    assert all(a >= b for a, b in zip(seen[warmup:], seen[warmup + 1 :]))  # decreasing after warmup
    assert WarmupCosine(0, 10).factor(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))


def test_warmup_constant():
    seen = lrs_seen_by_steps(WarmupConstant(4), 0.1, 8)
    assert seen == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1], rel=1e-15)
    assert lrs_seen_by_steps(WarmupConstant(0), 0.1, 3) == [0.1, 0.1, 0.1]


def test_scheduler_state_is_json_and_resumes_the_same_rates():
    def fresh():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, build_scheduler(opt, build_schedule("cosine", warmup=3, total=20, lr=1.0, min_lr=0.1))

    opt, sched = fresh()
    for _ in range(7):
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    opt2, sched2 = fresh()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    for _ in range(5):
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()


def test_bad_schedule_settings_raise_config_errors():
    with pytest.raises(ConfigError, match=r"steps=10 must be > warmup=10"):
        WarmupCosine(10, 10)
    with pytest.raises(ConfigError, match="d_model"):
        build_schedule("noam", warmup=10, total=100, lr=1.0)
    with pytest.raises(ConfigError, match="warmup=0 must be > 0"):
        NoamSchedule(512, 0)
    with pytest.raises(ConfigError, match="unknown schedule 'cosin'.*did you mean 'cosine'"):
        build_schedule("cosin", warmup=1, total=10, lr=1.0)
