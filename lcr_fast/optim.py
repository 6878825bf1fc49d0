"""Optimisers and learning-rate schedules of the reference (``optimizers/`` in GANPerf/LCR)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from lcr_fast import methods

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def lars_param_groups(model: nn.Module) -> list[dict]:
    """The reference's split: BatchNorm parameters and every bias are excluded from weight decay and
    trust-ratio adaptation ("exclude"); other weights are adapted ("base"). Frozen parameters (the EMA
    target) are left out, as they never receive a gradient."""
    base, exclude = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, _BATCHNORMS) or name == "bias":
                exclude.append(param)
            elif name == "weight":
                base.append(param)
            else:
                raise ValueError(f"parameter {name!r} of {type(module).__name__} fits neither LARS group")
    return [{"name": "base", "params": base}, {"name": "exclude", "params": exclude}]


class LARS(Optimizer):
    """``lars_simclr``: layer-wise trust ratio ``trust_coef * |w| / |g|`` with weight decay added to the gradient.

    The reference reads a velocity it never stores, so its momentum has no effect: ``keep_momentum``
    False reproduces that, True keeps the buffer (heavy-ball momentum, as LARS intends).
    """

    def __init__(self, param_groups: list[dict], lr: float, momentum: float = 0.9, weight_decay: float = 1.5e-6,
                 trust_coef: float = 1e-3, keep_momentum: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef)
        super().__init__(param_groups, defaults)
        self.keep_momentum = keep_momentum

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            adapt = group["name"] != "exclude"
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                rate = group["lr"]
                if adapt:
                    grad.add_(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    # torch.where instead of the reference's Python `if` keeps the step free of host syncs.
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["trust_coef"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    rate = rate * trust
                if self.keep_momentum:
                    state = self.state[p]
                    update = rate * grad
                    if "velocity" in state:
                        update = state["velocity"].mul_(group["momentum"]).add_(update)
                    else:
                        state["velocity"] = update.clone()
                    p.sub_(update)
                else:
                    # One pass over p and its gradient, no update tensor written and read back: BYOL's 35 M
                    # parameters take 35 ms a step instead of 90 on a 2-core Zen 3 (docs/benchmarks.md).
                    if adapt:
                        p.addcmul_(grad, -rate)
                    else:
                        p.add_(grad, alpha=-rate)
        return loss


def build_optimizer(cfg, model: nn.Module) -> Optimizer:
    opt = cfg.train.optimizer
    lr = configured_lr(cfg, cfg.train.base_lr)
    if opt.name == "lars_simclr":
        return LARS(lars_param_groups(model), lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                    trust_coef=opt.trust_coef, keep_momentum=cfg.fixes.lars_momentum)
    # As the reference's SGD: the parameters the method names (its ``fixed_lr``: BYOL's predictor) in their
    # own group, which every schedule keeps at the base rate. Frozen parameters (a target, a bias a method
    # freezes) never receive a gradient: left out.
    fixed = methods.get(cfg.model.name).fixed_lr
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"name": "base", "params": [p for n, p in named if not (fixed and n.startswith(fixed))]},
              {"name": "predictor", "params": [p for n, p in named if fixed and n.startswith(fixed)]}]
    groups = [g for g in groups if g["params"]]  # MoCo has no predictor
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    if opt.name == "adamw":
        # Not in the reference: an element-wise optimizer that ZeRO-1/2 can partition (LARS cannot). Fused: one
        # kernel per step that keeps its step counts as tensors, where the default reads each one back to the host.
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay, fused=True)
    raise ValueError(f"unknown optimizer {opt.name!r}")


def scaled_lr(lr: float, batch_size: int) -> float:
    """The reference's linear scaling rule: lr * batch / 256."""
    return lr * batch_size / 256


def configured_lr(cfg, lr: float) -> float:
    """``lr`` scaled by batch/256 when ``train.scale_lr`` (BYOL's reference), else as it is (MoCo's)."""
    return scaled_lr(lr, cfg.train.batch_size) if cfg.train.scale_lr else lr


class WarmupCosineSchedule:
    """Per-iteration linear warmup then cosine decay to ``final_lr``, over ``num_epochs`` epochs.

    ``lr(step)`` is the rate optimizer step ``step`` (0-based) runs at. The reference advances its
    scheduler after each step, so its first step runs at the optimizer's initial (un-warmed) rate
    and step i >= 1 at schedule[i-1]; ``warmup_first_step`` makes step i run at schedule[i].

    ``section`` names the config section read: ``train`` (pre-training, batch scaling per
    ``train.scale_lr``) or ``eval`` (the linear evaluation, whose rates the reference always scales
    by ``eval.batch_size / 256``).
    """

    def __init__(self, cfg, steps_per_epoch: int, section: str = "train"):
        t = cfg[section]
        scaled = section == "eval" or cfg.train.scale_lr

        def scale(lr: float) -> float:
            return scaled_lr(lr, t.batch_size) if scaled else lr

        warmup = steps_per_epoch * t.warmup_epochs
        decay = steps_per_epoch * (t.num_epochs - t.warmup_epochs)
        base, final = scale(t.base_lr), scale(t.final_lr)
        cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(decay) / decay))
        self.schedule = np.concatenate((np.linspace(scale(t.warmup_lr), base, warmup), cosine))
        self.base_lr = base
        self.shift = 0 if cfg.fixes.warmup_first_step else 1

    def lr(self, step: int) -> float:
        index = step - self.shift
        if index < 0:
            return self.base_lr
        return float(self.schedule[min(index, len(self.schedule) - 1)])

    def apply(self, optimizer: Optimizer, step: int) -> float:
        """Set every group's rate for ``step`` (a "predictor" group stays at the base rate) and return it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = self.base_lr if group.get("name") == "predictor" else lr
        return lr


def cosine_epoch_lr(base_lr: float, epoch: int, num_epochs: int) -> float:
    """MoCo's per-epoch cosine: base * (0.5 * (1 + cos(pi * epoch / epochs))), rounded as ``main_moco.py``'s
    ``lr *= 0.5 * (1. + math.cos(math.pi * epoch / args.epochs))``."""
    return base_lr * (0.5 * (1.0 + math.cos(math.pi * epoch / num_epochs)))


class CosineEpochSchedule:
    """The reference MoCo's ``adjust_learning_rate`` with ``--cos``: at the start of epoch e every group
    runs at base * 0.5 * (1 + cos(pi e / num_epochs)), constant through the epoch, no warmup; a
    "predictor" group (a method's ``fixed_lr``) stays at the base rate, as in WarmupCosineSchedule.

    Same interface as WarmupCosineSchedule; ``step`` (0-based optimizer steps) gives the epoch.
    """

    def __init__(self, cfg, steps_per_epoch: int):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.base_lr = configured_lr(cfg, cfg.train.base_lr)
        self.steps_per_epoch = steps_per_epoch
        self.num_epochs = cfg.train.num_epochs

    def lr(self, step: int) -> float:
        return cosine_epoch_lr(self.base_lr, step // self.steps_per_epoch, self.num_epochs)

    def apply(self, optimizer: Optimizer, step: int) -> float:
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = self.base_lr if group.get("name") == "predictor" else lr
        return lr


def build_schedule(cfg, steps_per_epoch: int):
    """The schedule ``train.schedule`` names: warmup_cosine (BYOL) or cosine_epoch (MoCo)."""
    if cfg.train.schedule == "warmup_cosine":
        return WarmupCosineSchedule(cfg, steps_per_epoch)
    if cfg.train.schedule == "cosine_epoch":
        return CosineEpochSchedule(cfg, steps_per_epoch)
    raise ValueError(f"unknown train.schedule {cfg.train.schedule!r}")
