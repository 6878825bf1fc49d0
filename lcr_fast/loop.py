"""The training loop: the run's state, one optimizer step, one epoch.

``train_step`` is the step ``deepspeed lcr_fast/train.py`` runs, and the one the benchmarks time:
schedule, EMA, then for each micro-batch the forward through the DeepSpeed engine, the objective
(``lcr_fast.objective``), backward and the engine's step. ``run_epoch`` feeds it the epoch's
micro-batches and owns what happens between steps: logging, the non-finite policy, stop signals.
Checkpoints, evaluation and reports belong to the trainer (``lcr_fast/train.py``).
"""
from __future__ import annotations

import itertools
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from lcr_fast.errors import NonFiniteLossError
from lcr_fast.objective import global_batch_losses, lcr_objective
from lcr_fast.run_log import RunLog

TERMS = ("ssl_loss", "rationale_loss")


@dataclass
class RunState:
    """Where a run is: what a checkpoint stores and a resumed run starts from."""

    epoch: int = 0  # the epoch running, or the next one to run
    step: int = 0  # optimizer steps taken
    epoch_step: int = 0  # steps of ``epoch`` already consumed (taken or skipped); 0 at an epoch boundary
    history: list[dict] = field(default_factory=list)  # per-epoch evaluations
    skipped: int = 0  # steps left out for a non-finite loss (engine.on_nonfinite=skip)
    untrained: dict | None = None  # kNN and retrieval of the initial weights, before the first step

    def extra(self) -> dict:
        """What the checkpoint's ``extra`` holds besides its ``epoch`` and ``step``."""
        return {"history": self.history, "epoch_step": self.epoch_step, "skipped": self.skipped,
                "untrained": self.untrained}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> RunState:
        extra = ckpt["extra"]
        return cls(epoch=ckpt["epoch"], step=ckpt["step"], epoch_step=extra.get("epoch_step", 0),
                   history=extra.get("history", []), skipped=extra.get("skipped", 0), untrained=extra.get("untrained"))


@dataclass(frozen=True, kw_only=True)
class StepParts:
    """What ``train_step`` works with; built once per run, by keyword (two counts and two flags sit among them)."""

    engine: Any  # the DeepSpeed engine around ``model``
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any  # lcr_fast.optim's WarmupCosineSchedule or CosineEpochSchedule
    pieces: int  # ranks x micro-batches whose gradients one optimizer step averages
    channels_last: bool
    skip_nonfinite: bool = False


@dataclass
class StepResult:
    terms: torch.Tensor  # [2] on the device: (ssl_loss, rationale_loss) averaged over the micro-batches
    lr: float
    taken: bool  # False: a non-finite loss, and no optimizer step (engine.on_nonfinite=skip)


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (a host sync; only engine.on_nonfinite=skip pays it)."""
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def train_step(parts: StepParts, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], step: int) -> StepResult:
    """One optimizer step (0-based ``step``) over this rank's ``micro_batches`` of (view1, view2).

    As the reference: the learning rate and the EMA of the target first, then the forward. Autocast,
    when on, comes from the engine's ``torch_autocast``; the engine steps the optimizer after the
    last micro-batch. No host sync unless ``skip_nonfinite``.
    """
    lr = parts.schedule.apply(parts.optimizer, step)
    parts.model.momentum_update()
    total, count, taken = None, 0, True
    for view1, view2 in micro_batches:
        if parts.channels_last:
            view1 = view1.contiguous(memory_format=torch.channels_last)
            view2 = view2.contiguous(memory_format=torch.channels_last)
        out = parts.engine(view1, view2)
        objective = lcr_objective(out["ssl_loss"], out["rationale_loss"], parts.model.rationale_weight, parts.pieces)
        terms = torch.stack([out[k].detach().float() for k in TERMS])
        total, count = terms if total is None else total + terms, count + 1
        if parts.skip_nonfinite and not all_finite(objective):
            taken = False  # config.validate allows skipping with one micro-batch only: nothing half-accumulated
            break
        parts.engine.backward(objective)
        parts.engine.step()
    return StepResult(total / count, lr, taken)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """A collective: every rank calls it at the same steps."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)  # gloo has no AVG
        values /= dist.get_world_size()
    return values


class NonFiniteWatch:
    """Remembers, on the device and without a host sync, the first step whose loss terms are not all
    finite; ``check()`` (at log intervals and before every checkpoint) raises naming that step."""

    def __init__(self, device: torch.device, rationale_weight: float):
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.terms = torch.zeros(len(TERMS), device=device)
        self.rationale_weight = rationale_weight

    def update(self, step: int, terms: torch.Tensor) -> None:
        new = (~torch.isfinite(terms).all()) & (self.first_step < 0)
        self.first_step = torch.where(new, torch.full_like(self.first_step, step), self.first_step)
        self.terms = torch.where(new, terms, self.terms)

    def check(self) -> None:
        step = int(self.first_step)
        if step >= 0:
            ssl, kl = self.terms.tolist()
            values = {"loss": lcr_objective(ssl, kl, self.rationale_weight), "ssl_loss": ssl, "rationale_loss": kl}
            shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            raise NonFiniteLossError(f"non-finite loss at optimizer step {step} ({shown}); training stopped and the "
                                     "last checkpoint was left as it was")


# SIGTERM: preemption (SLURM sends it, then SIGKILL after KillWait); SIGINT: Ctrl-C; SIGUSR1: the early warning a
# SLURM job asks for with --signal=USR1@120 (or B:USR1@120, forwarded by its batch script).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """A stop signal (STOP_SIGNALS) asks the run to stop at a step boundary with a checkpoint it can
    resume from exactly: the next step in one process; with several ranks the next log-interval
    step, whose host sync the agreement rides on."""

    def __init__(self):
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum, _frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank received a signal. With several ranks it is a collective,
        called at the same steps on all of them; alone it costs nothing."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass(kw_only=True)
class EpochContext:
    """What ``run_epoch`` needs besides the step and the state; built once per run, by keyword."""

    loader: Any  # a training loader: iterable of (view1, view2, labels), with set_epoch and len()
    log: RunLog
    watch: NonFiniteWatch
    stop: StopRequest
    device: torch.device
    world_size: int
    global_batch: int
    log_interval: int
    num_epochs: int  # for the progress bar's label
    stop_on_nonfinite: bool
    show_progress: bool
    rates: list[float] = field(default_factory=list)  # pairs/s of each logged interval but the first
    last_losses: dict = field(default_factory=dict)

    @property
    def accum(self) -> int:
        return self.loader.micro_batches

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader) // self.accum


def _optimizer_steps(ctx: EpochContext) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """The epoch's micro-batches, ``accum`` at a time, each group lazily (one micro-batch in memory)."""
    pairs = ((view1, view2) for view1, view2, _ in ctx.loader)
    for _ in range((len(ctx.loader) - ctx.loader.start_step) // ctx.accum):
        yield itertools.islice(pairs, ctx.accum)
    # Let the loader see its epoch end: a DALI pipeline is then kept for the next epoch, not rebuilt.
    next(pairs, None)


def _log_step(ctx: EpochContext, state: RunState, result: StepResult, parts: StepParts, interval: dict) -> None:
    """Losses of the global batch, rate and learning rate at a log step (host syncs happen here only)."""
    ctx.watch.check()
    ctx.last_losses = global_batch_losses(mean_over_ranks(result.terms), parts.model.rationale_weight, parts.pieces)
    rate = interval["pairs"] / (time.perf_counter() - interval["since"])
    if state.step > 1:  # the first interval holds start-up costs
        ctx.rates.append(rate)
    ctx.log.log(state.step, epoch=state.epoch, lr=result.lr, pairs_per_s=rate, skipped_steps=state.skipped,
                **ctx.last_losses)
    interval["bar"].set_postfix(loss=f"{ctx.last_losses['loss']:.4f}", lr=f"{result.lr:.3g}", pairs_s=f"{rate:.1f}")
    interval.update(pairs=0, since=time.perf_counter())


def run_epoch(parts: StepParts, state: RunState, ctx: EpochContext) -> bool:
    """Run the rest of epoch ``state.epoch`` from ``state.epoch_step``; True when a stop signal ended it
    early (``state`` then says where, for a mid-epoch checkpoint). On a normal end ``state`` is left at
    the epoch's last step: the caller evaluates and moves it to the next epoch."""
    ctx.loader.set_epoch(state.epoch, state.epoch_step * ctx.accum)
    bar = tqdm(desc=f"epoch {state.epoch}/{ctx.num_epochs}", total=ctx.steps_per_epoch, initial=state.epoch_step,
               disable=not ctx.show_progress)
    interval = {"bar": bar, "pairs": 0, "since": time.perf_counter()}
    stopped = False
    for micro_batches in _optimizer_steps(ctx):
        result = train_step(parts, micro_batches, state.step)
        state.epoch_step += 1
        bar.update(1)
        if not result.taken:
            state.skipped += 1
            continue
        state.step += 1
        interval["pairs"] += ctx.global_batch
        if ctx.stop_on_nonfinite:
            ctx.watch.update(state.step, result.terms)
        log_step = state.step % ctx.log_interval == 0 or state.step == 1
        if log_step:
            _log_step(ctx, state, result, parts, interval)
        # Alone, a signal is seen after any step; several ranks agree at log steps, where they sync anyway.
        if (log_step or ctx.world_size == 1) and state.epoch_step < ctx.steps_per_epoch and ctx.stop.agreed(ctx.device):
            ctx.watch.check()
            stopped = True
            break
    bar.close()
    return stopped
