import numpy as np
import pytest
import torch
from torch import nn

from lcr_fast.optim import LARS, WarmupCosineSchedule, build_optimizer, lars_param_groups
from lcr_fast.models import build_model

from helpers import tiny_config


def test_schedule_first_step_quirk_and_switch():
    cfg = tiny_config(train={"batch_size": 256, "base_lr": 0.3, "warmup_epochs": 2, "num_epochs": 4,
                             "stop_at_epoch": 4})
    sched = WarmupCosineSchedule(cfg, steps_per_epoch=10)
    assert sched.lr(0) == pytest.approx(0.3), "reference: the first step runs at the un-warmed base LR"
    assert sched.lr(1) == 0.0 and sched.lr(20) == pytest.approx(0.3)
    assert sched.lr(40) == pytest.approx(0.5 * 0.3 * (1 + np.cos(np.pi * 19 / 20)))
    fixed = WarmupCosineSchedule(tiny_config(train=dict(cfg.train), fixes={"warmup_first_step": True}),
                                 steps_per_epoch=10)
    assert fixed.lr(0) == 0.0 and fixed.lr(19) == pytest.approx(0.3)


def test_eval_section_schedule_always_scales_with_its_batch():
    cfg = tiny_config(train={"scale_lr": False}, eval={"base_lr": 30, "batch_size": 128, "num_epochs": 2,
                                                        "warmup_epochs": 1, "warmup_lr": 0, "final_lr": 0})
    sched = WarmupCosineSchedule(cfg, steps_per_epoch=10, section="eval")
    assert sched.lr(0) == 15.0, "reference: 30 x 128/256, the first step un-warmed"
    assert sched.lr(1) == 0.0 and sched.lr(10) == 15.0 and sched.lr(11) == 15.0
    assert sched.lr(19) == pytest.approx(0.5 * 15 * (1 + np.cos(np.pi * 8 / 10)))


def test_lr_scales_with_batch():
    cfg = tiny_config(train={"batch_size": 64, "base_lr": 0.4})
    opt = build_optimizer(cfg, build_model(cfg))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_lars_groups_exclude_batchnorm_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    base, exclude = lars_param_groups(model)
    assert {id(p) for p in base["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in exclude["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                  id(model[3].bias)}


def _two_steps(keep_momentum):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3))
    opt = LARS([{"name": "base", "params": [w]}], lr=1.0, momentum=0.9, weight_decay=0.0, trust_coef=1.0,
               keep_momentum=keep_momentum)
    updates = []
    for grad in (torch.ones(5, 3), torch.full((5, 3), 2.0)):
        before = w.detach().clone()
        w.grad = grad.clone()
        opt.step()
        updates.append(before - w.detach())
    return updates


def test_lars_momentum_is_absent_in_reference_mode_and_present_with_the_switch():
    plain = _two_steps(keep_momentum=False)
    heavy = _two_steps(keep_momentum=True)
    torch.testing.assert_close(plain[0], heavy[0])
    # Reference mode: the update is lr * trust * g with no memory of the previous step.
    assert not torch.allclose(plain[1], heavy[1])
    assert torch.all(heavy[1] > plain[1])


def test_lars_trust_ratio_per_layer():
    w = nn.Parameter(torch.full((4,), 2.0))
    opt = LARS([{"name": "base", "params": [w]}], lr=0.5, weight_decay=0.1, trust_coef=1e-3)
    w.grad = torch.full((4,), 1.0)
    opt.step()
    grad = 1.0 + 0.1 * 2.0  # weight decay is added to the gradient first
    trust = 1e-3 * 4.0 / (grad * 2.0)  # |w| = 4, |g| = 2 * grad
    torch.testing.assert_close(w.detach(), torch.full((4,), 2.0 - 0.5 * trust * grad))
