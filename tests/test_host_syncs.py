"""No host synchronisation in the training step: several optimizer steps through the trainer's own
epoch function, ``train_step`` and the DeepSpeed engine read no device value outside the log steps.

On a GPU each such read (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``nonzero`` and other
ops whose output size depends on data) waits for the device and stalls the launch queue. On the CPU
they cost nothing, but they pass through the same dispatcher ops, which a TorchDispatchMode counts.
"""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lcr_fast
import lcr_fast.kernels
from lcr_fast import engine as eng
from lcr_fast import loop
from lcr_fast.config import load_config
from lcr_fast.loop import EpochContext, NonFiniteWatch, RunState, StepParts, StopRequest, run_epoch
from lcr_fast.optim import build_schedule
from lcr_fast.run_log import RunLog
from lcr_fast.train import build_engine

from helpers import REPO

SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
            torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default, torch.ops.aten.equal.default}
STEPS, LOG_INTERVAL = 6, 3


class SyncCounter(TorchDispatchMode):
    """Counts data-dependent reads inside ``train_step`` and, outside it, by the optimizer steps taken."""

    def __init__(self, state: RunState):
        super().__init__()
        self.state, self.in_step, self.inside, self.between = state, False, 0, {}
        self.backward_ops = 0  # proves that the mode sees the backward pass too

    def record(self) -> None:
        if self.in_step:
            self.inside += 1
        else:
            self.between[self.state.step] = self.between.get(self.state.step, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.record()
        self.backward_ops += self.in_step and "backward" in func.__name__
        return func(*args, **(kwargs or {}))


class Batches:
    """A training loader's interface over fixed random pairs."""

    def __init__(self, steps: int, batch: int, size: int):
        g = torch.Generator().manual_seed(0)
        self.pairs = [(torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g),
                       torch.zeros(batch, dtype=torch.long)) for _ in range(steps)]
        self.micro_batches, self.start_step = 1, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.start_step = start_step

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs[self.start_step:])


def _epoch(tmp_path, config: str):
    """The demo config as shipped (channels_last, LARS or SGD, on_nonfinite=stop); batch 4 at 32 px for a
    2-core CPU, MoCo's queue to fit it, and a log interval that leaves non-log steps between log steps."""
    overrides = {"train": {"batch_size": 4}, "dataset": {"image_size": 32}, "engine": {"log_interval": LOG_INTERVAL}}
    if config.startswith("moco"):
        overrides["model"] = {"moco_k": 16}
    cfg = load_config(REPO / "configs" / config, overrides)
    info = eng.init_distributed(60)
    model, engine, optimizer, _ = build_engine(cfg, info, "fp32")
    parts = StepParts(engine=engine, model=model, optimizer=optimizer, schedule=build_schedule(cfg, STEPS), pieces=1,
                      channels_last=True)
    state = RunState()
    log = RunLog(str(tmp_path), tensorboard=False)
    ctx = EpochContext(loader=Batches(STEPS, 4, 32), log=log, watch=NonFiniteWatch(info.device, 0.01),
                       stop=StopRequest(), device=info.device, world_size=1, global_batch=4, log_interval=LOG_INTERVAL,
                       num_epochs=1, stop_on_nonfinite=True, show_progress=False)
    return parts, state, ctx


@pytest.mark.parametrize("config", ["demo.yaml", "moco_demo.yaml"])
def test_no_host_sync_outside_log_steps(tmp_path, monkeypatch, config):
    parts, state, ctx = _epoch(tmp_path, config)
    counter = SyncCounter(state)
    step = loop.train_step

    def counted_step(*args):
        counter.in_step = True
        try:
            return step(*args)
        finally:
            counter.in_step = False

    monkeypatch.setattr(loop, "train_step", counted_step)
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: counter.record() or tolist(t))  # CPU tensors skip dispatch

    with counter:
        assert run_epoch(parts, state, ctx) is False
    ctx.log.close()

    assert state.step == STEPS
    assert counter.backward_ops > 0
    assert counter.inside == 0, "train_step (schedule, EMA, forward, backward, engine step) read a device value"
    log_steps = {1} | set(range(LOG_INTERVAL, STEPS + 1, LOG_INTERVAL))
    assert set(counter.between) == log_steps, counter.between  # the losses are read at log steps, and only there


OUR_CODE = (Path(lcr_fast.__file__).parent, Path(lcr_fast.kernels.__file__).parent)


def _host_copy_in_our_code(t: torch.Tensor, args, kwargs) -> bool:
    """``t.to(<a device>)`` from host memory, blocking, called by our code: DeepSpeed's own ``.to`` calls in the
    step move tensors that are already on the GPU there (``clip_grad_norm_``'s norm), where they cost nothing."""
    names_device = "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args)
    if t.device.type != "cpu" or not names_device or kwargs.get("non_blocking", False):
        return False
    caller = Path(sys._getframe(2).f_code.co_filename).resolve()
    return any(caller.is_relative_to(root) for root in OUR_CODE)


@pytest.mark.parametrize("config", ["demo.yaml", "moco_demo.yaml"])
def test_no_device_synchronize_or_blocking_copy_in_the_step(tmp_path, monkeypatch, config):
    """On the CPU both cost nothing, so they are counted where they are asked for: the accelerator's
    ``synchronize`` (DeepSpeed's throughput timer called it at every forward and step), and copies from host
    memory to a named device without ``non_blocking`` (on a GPU they wait for the stream to drain)."""
    from deepspeed.accelerator import get_accelerator

    parts, state, ctx = _epoch(tmp_path, config)
    accelerator = get_accelerator()
    synchronize, to = accelerator.synchronize, torch.Tensor.to
    calls = {"synchronize": 0, "steps": 0}
    blocking = []

    def counted_synchronize(*args, **kwargs):
        calls["synchronize"] += 1
        return synchronize(*args, **kwargs)

    def counted_to(t, *args, **kwargs):
        if _host_copy_in_our_code(t, args, kwargs):
            blocking.append((tuple(t.shape), args, kwargs))
        return to(t, *args, **kwargs)

    step = loop.train_step

    def counted_step(*args):
        calls["steps"] += 1
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "to", counted_to)
            return step(*args)

    monkeypatch.setattr(accelerator, "synchronize", counted_synchronize)
    monkeypatch.setattr(loop, "train_step", counted_step)
    assert run_epoch(parts, state, ctx) is False
    ctx.log.close()

    assert calls["steps"] == STEPS
    found = {"device synchronisations": calls["synchronize"], "blocking host-to-device copies": blocking}
    assert found == {"device synchronisations": 0, "blocking host-to-device copies": []}, f"in {STEPS} steps"
