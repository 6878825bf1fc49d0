"""Train BYOL or MoCo v2 with the LCR rationale branch; evaluate by kNN and retrieval.

One GPU, several, or the CPU (gloo), always through DeepSpeed:

    deepspeed lcr_fast/train.py -c configs/byol_cub200.yaml --data_dir /data/CUB_200_2011 \
        --log_dir runs/cub --ckpt_dir runs/cub/ckpt
    deepspeed --num_gpus 8 lcr_fast/train.py -c configs/byol_cub200.yaml --data_dir ... train.batch_size=256
    python lcr_fast/train.py -c configs/demo.yaml --data_dir data/synthetic --log_dir runs/demo --ckpt_dir runs/demo/ckpt
    python lcr_fast/train.py ... --resume                        # continue from <ckpt_dir>/last.pt
    python lcr_fast/train.py ... --eval_from runs/cub/ckpt/last.pt   # evaluate only (ours or a reference .pth)

Trailing ``section.key=value`` arguments override the config (``train.stop_at_epoch=2``).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a script, Python put lcr_fast/ itself first on sys.path, where our module names (config,
    # data, models, ...) would shadow others'; the repository root goes there instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import contextlib
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from lcr_fast import engine as eng
from lcr_fast.checkpoint import (CheckpointLockError, CheckpointWriteError, UnsafeCheckpointError, check_writable,
                                 load_training_checkpoint, run_lock, save_training_checkpoint, set_rng_state)
from lcr_fast.compat import CheckpointMismatchError, export_reference_checkpoint, load_state_strict
from lcr_fast.config import Config, ConfigError, load_config, recipe_for, save_config
from lcr_fast.data import DatasetError, build_eval_loader, build_train_loader, check_same_classes, scan_split
from lcr_fast.eval.features import evaluate
from lcr_fast.loading import load_model
from lcr_fast.models import build_model, compile_backbones
from lcr_fast.models.moco import check_queue_size
from lcr_fast.optim import build_optimizer, build_schedule
from lcr_fast.report import plot_curves, write_report
from lcr_fast.run_log import RunLog
from lcr_fast.visualize import pick_images, rationale_maps, write_heatmaps


LOSS_TERMS = ("loss", "ssl_loss", "rationale_loss")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stops before writing another checkpoint."""


class NonFiniteWatch:
    """Remembers, on the device and without a host sync, the first step whose loss terms are not all
    finite; ``check()`` (at log intervals and before every checkpoint) raises naming that step."""

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.terms = torch.zeros(len(LOSS_TERMS), device=device)

    def update(self, step: int, out: dict) -> None:
        terms = torch.stack([out[k].detach().float() for k in LOSS_TERMS])
        new = (~torch.isfinite(terms).all()) & (self.first_step < 0)
        self.first_step = torch.where(new, torch.full_like(self.first_step, step), self.first_step)
        self.terms = torch.where(new, terms, self.terms)

    def check(self) -> None:
        step = int(self.first_step)
        if step >= 0:
            values = ", ".join(f"{k} {v:.4g}" for k, v in zip(LOSS_TERMS, self.terms.tolist()))
            raise NonFiniteLossError(f"non-finite loss at optimizer step {step} ({values}); training stopped and the "
                                     "last checkpoint was left as it was")


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (a host sync; only engine.on_nonfinite=skip pays it)."""
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class StopRequest:
    """SIGTERM or SIGINT (preemption, Ctrl-C) asks the run to stop at a step boundary with a checkpoint
    it can resume from exactly: the next step in one process; with several ranks the next log-interval
    step, whose host sync the agreement rides on."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train BYOL / MoCo v2 with LCR.", epilog="Trailing section.key=value arguments override the config.")
    p.add_argument("-c", "--config-file", required=True, help="YAML config (the reference's files work unchanged)")
    p.add_argument("--data_dir", default=os.getenv("DATA"), help="ImageFolder root with train/ and test/ (env DATA)")
    p.add_argument("--log_dir", default=os.getenv("LOG"), help="where logs and results go (env LOG)")
    p.add_argument("--ckpt_dir", default=os.getenv("CHECKPOINT"), help="where checkpoints go (env CHECKPOINT)")
    p.add_argument("--hide_progress", action="store_true", help="no progress bars")
    p.add_argument("--eval_from", default=None, help="evaluate this checkpoint (ours or the reference's) instead of training")
    p.add_argument("--debug", action="store_true", help="tiny run: batch 2, one epoch, 8 images")
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="continue from a checkpoint (default <ckpt_dir>/last.pt)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume train.stop_at_epoch=200`: argparse hands the override to the optional PATH.
        args.overrides.insert(0, args.resume)
        args.resume = "auto"
    missing = [name for name in ("data_dir", "log_dir", "ckpt_dir") if getattr(args, name) is None]
    if missing:
        p.error(f"missing {', '.join('--' + m for m in missing)} (or the DATA / LOG / CHECKPOINT environment variables)")
    return args


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.debug:
        # As the reference's --debug: a couple of tiny steps to check that everything runs.
        overrides += ["train.batch_size=2", "train.num_epochs=1", "train.stop_at_epoch=1", "train.warmup_epochs=0",
                      "dataset.num_workers=0", "eval.batch_size=2"]
    cfg = load_config(args.config_file, overrides)
    if cfg.seed is None:
        cfg["seed"] = random.SystemRandom().randrange(2**31)  # recorded, so every run can be repeated
    return cfg


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


def index_splits(data_dir: str, debug: bool):
    """Index and check both splits; runs before any process group or model exists, so bad data fails in seconds."""
    train_index = scan_split(data_dir, "train")
    test_index = scan_split(data_dir, "test")
    check_same_classes(train_index, test_index)
    if debug:
        train_index.samples, test_index.samples = train_index.samples[:8], test_index.samples[:8]
    return train_index, test_index


def build_data(cfg: Config, data_dir: str, train_index, test_index, info: eng.DistInfo):
    micro = eng.micro_batch_size(cfg, info.world_size)
    eval_batch = cfg.data.eval_batch_size or cfg.train.batch_size // info.world_size
    threads, size, backend = cfg.dataset.num_workers, cfg.dataset.image_size, cfg.data.backend
    train = build_train_loader(data_dir, recipe_for(cfg), micro, size, backend, info.device, threads, cfg.seed,
                               info.rank, info.world_size, index=train_index, micro_batches=cfg.engine.grad_accum_steps)
    memory = build_eval_loader(data_dir, "train", eval_batch, size, backend, info.device, threads, index=train_index)
    test = build_eval_loader(data_dir, "test", eval_batch, size, backend, info.device, threads, index=test_index)
    return train, memory, test


def best_over_epochs(history: list[dict]) -> dict:
    """The best value of each retrieval metric over the evaluated epochs, with its epoch, as the
    reference's MoCo reports them (each metric's maximum on its own; selected on the test split)."""
    best = {}
    for metric in ("rank1", "rank5", "mAP"):
        scored = [h for h in history if metric in h]
        if scored:
            top = max(scored, key=lambda h: h[metric])
            best[metric] = {"value": top[metric], "epoch": top["epoch"]}
    return best


def format_results(results: dict) -> str:
    lines = [f"skipped {results['skipped_steps']} step(s) with a non-finite loss"] if results.get("skipped_steps") else []
    for key, label in (("retrieval", "rationale features"), ("retrieval_gap", "GAP features")):
        if key in results:
            r = results[key]
            lines.append(f"retrieval ({label}): rank-1 {100 * r['rank1']:.2f}  rank-5 {100 * r['rank5']:.2f}  mAP {100 * r['mAP']:.2f}")
    if results.get("retrieval_best"):
        best = results["retrieval_best"]
        lines.append("best over epochs (selected on the test split): " + "  ".join(
            f"{k} {100 * v['value']:.2f} (epoch {v['epoch']})" for k, v in best.items()))
    if "knn_top1" in results:
        lines.append(f"kNN top-1 (k={results.get('knn_k')}, GAP features): {results['knn_top1']:.2f}")
    return "\n".join(lines)


def write_checkpoint(path: str, engine, model, optimizer, epoch: int, step: int, cfg: Config, extra: dict,
                     info: eng.DistInfo) -> None:
    """Rank 0 writes ``path``; under ZeRO every rank first writes its optimizer partition through the
    engine, and last.pt names it."""
    zero = cfg.engine.zero_stage > 0
    if zero:
        extra = {**extra, "zero_tag": eng.save_zero_state(engine, os.path.dirname(path), step)}
    if info.is_main:
        save_training_checkpoint(path, model, None if zero else optimizer, epoch, step, cfg.to_dict(), extra)
        if zero:
            eng.remove_stale_zero_states(os.path.dirname(path), extra["zero_tag"])
    eng.barrier()


def stop_with_checkpoint(path: str, engine, model, optimizer, epoch: int, step: int, cfg: Config, history: list, epoch_step: int,
                         info: eng.DistInfo, written: bool = False) -> dict:
    """Write (unless the epoch's own checkpoint just was) a checkpoint ``epoch_step`` steps into ``epoch`` and stop."""
    if not written:
        write_checkpoint(path, engine, model, optimizer, epoch, step, cfg, {"history": history, "epoch_step": epoch_step}, info)
    if info.is_main:
        print(f"stopped on a signal after optimizer step {step}; checkpoint {path} written. Continue with --resume.")
    return {"stopped_at_step": step, "checkpoint": path}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = resolve_config(args)
    if cfg.model.name == "moco":
        check_queue_size(cfg.model.moco_k, cfg.train.batch_size)
    train_index, test_index = index_splits(args.data_dir, args.debug)
    if not args.eval_from:
        check_writable(args.ckpt_dir)
    os.environ.setdefault("LCR_KERNELS", cfg.kernels.backend)
    info = eng.init_distributed(cfg.engine.dist_timeout_s, args.local_rank)
    eng.check_engine_options(cfg, info.device)
    precision = eng.resolve_precision(cfg.engine.precision, info.device)
    seed_everything(cfg.seed + info.rank, cfg.engine.deterministic)
    show = info.is_main and not args.hide_progress
    train_loader, memory_loader, test_loader = build_data(cfg, args.data_dir, train_index, test_index, info)
    knn_k = min(cfg.train.knn_k, len(memory_loader.index))

    if args.eval_from:
        model, _ = load_model(args.eval_from, cfg.model.name, cfg.to_dict())
        model = model.to(info.device)
        results = {"checkpoint": args.eval_from, "knn_k": knn_k}
        results.update(evaluate(model, memory_loader, test_loader, knn_k, cfg.train.knn_t, progress=show,
                                autocast=eng.autocast(precision, info.device)))
        if info.is_main:
            write_report(results, args.log_dir)
            print(format_results(results))
        return results

    # Rank 0 holds the checkpoint folder's lock for the run; a second run on the same folder stops here.
    with run_lock(args.ckpt_dir) if info.is_main else contextlib.nullcontext():
        return train(args, cfg, info, train_loader, memory_loader, test_loader, test_index, knn_k, precision, show)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """A collective: every rank calls it at the same steps."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)  # gloo has no AVG
        values /= dist.get_world_size()
    return values


def step_losses(mean_terms: torch.Tensor, rationale_weight: float, pieces: int) -> dict:
    """The losses of the global batch, as the reference's single process reports them, from the
    per-piece means of (ssl_loss, rationale_loss) over ``pieces`` = ranks x micro-batches: the SSL
    loss is a mean over samples, the KL a sum over them."""
    ssl, kl = mean_terms.tolist()
    kl *= pieces
    return {"loss": ssl + rationale_weight * kl, "ssl_loss": ssl, "rationale_loss": kl}


def train(args: argparse.Namespace, cfg: Config, info: eng.DistInfo, train_loader, memory_loader, test_loader, test_index,
          knn_k: int, precision: str, show: bool) -> dict:
    """The training run proper: model, engine, the step loop, checkpoints, the final evaluation and report."""
    amp = eng.autocast(precision, info.device)
    model = build_model(cfg)
    if cfg.engine.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(info.device)
    optimizer = build_optimizer(cfg, model)
    start_epoch, step, epoch_step, history = 0, 0, 0, []
    ckpt_path = os.path.join(args.ckpt_dir, "last.pt")
    if args.resume:
        resume_path = ckpt_path if args.resume == "auto" else args.resume
        ckpt = load_training_checkpoint(resume_path)
        load_state_strict(model, ckpt["model"], resume_path)
        if ckpt["optimizer"] is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        elif cfg.engine.zero_stage == 0:
            raise ConfigError(f"{resume_path} was written under ZeRO (its optimizer state is partitioned by rank): resume it "
                              "with the engine.zero_stage it was trained with")
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["extra"].get("history", [])
        epoch_step = ckpt["extra"].get("epoch_step", 0)
        set_rng_state(ckpt["rng"])
        if info.is_main:
            print(f"resumed from {resume_path}: epoch {start_epoch}, step {step}" + (f" ({epoch_step} into the epoch)" if epoch_step else ""))
    if cfg.model.name == "moco":
        model.broadcast_queue()
    engine, optimizer = eng.initialize(model, optimizer, cfg, info.world_size, precision)
    if args.resume and ckpt["optimizer"] is None:
        eng.load_zero_state(engine, os.path.dirname(resume_path), ckpt["extra"]["zero_tag"])
    if cfg.engine.channels_last and cfg.engine.zero_stage == 0:
        # After initialize: DeepSpeed broadcasts parameters as contiguous bytes, which channels_last
        # weights are not. Module.to keeps the Parameter objects, so the optimizer still holds them.
        # ZeRO 1/2 keep every weight a view of their flat buffer and reduce gradients with view(-1), so
        # there the weights stay contiguous and only the activations are channels_last: convolutions
        # still run channels_last (the input decides), and autograd hands each weight a gradient
        # strided like the weight itself.
        model.to(memory_format=torch.channels_last)
    compile_backbones(model, cfg.engine.compile)
    accum = cfg.engine.grad_accum_steps
    steps_per_epoch = len(train_loader) // accum
    schedule = build_schedule(cfg, steps_per_epoch)
    log = RunLog(args.log_dir, cfg.logger.tensorboard, enabled=info.is_main)
    if info.is_main:
        save_config(cfg, os.path.join(args.log_dir, "config.yaml"))
    # The reference's KL is a sum over the whole batch; DeepSpeed divides each micro-batch's objective by
    # the accumulation steps and averages gradients over ranks, so the KL counts world_size * accum times.
    kl_weight = model.rationale_weight * info.world_size * accum

    rates, last_losses = [], {}
    watch, stop, stopped, skipped = NonFiniteWatch(info.device), StopRequest(), None, 0
    step_terms = torch.zeros(2, device=info.device)  # ssl_loss, rationale_loss summed over this step's micro-batches
    for epoch in range(start_epoch, cfg.train.stop_at_epoch):
        model.train()
        done_in_epoch = epoch_step if epoch == start_epoch else 0  # optimizer steps
        train_loader.set_epoch(epoch, done_in_epoch * accum)
        bar = tqdm(desc=f"epoch {epoch}/{cfg.train.num_epochs}", total=steps_per_epoch, initial=done_in_epoch, disable=not show)
        tic, pairs, micro = time.perf_counter(), 0, 0
        for view1, view2, _ in train_loader:
            if micro == 0:  # once per optimizer step, as the reference: EMA first, then this step's forward
                lr = schedule.apply(optimizer, step)
                model.momentum_update()
            if cfg.engine.channels_last:
                view1, view2 = view1.contiguous(memory_format=torch.channels_last), view2.contiguous(memory_format=torch.channels_last)
            out = engine(view1, view2)  # autocast, when on, comes from the engine's torch_autocast
            objective = out["ssl_loss"] + kl_weight * out["rationale_loss"]
            if cfg.engine.on_nonfinite == "skip" and not all_finite(objective):
                # (accum is 1 here.) The batch is consumed but no optimizer step is taken (the EMA step above stays).
                skipped += 1
                done_in_epoch += 1
                bar.update(1)
                continue
            engine.backward(objective)
            engine.step()  # steps the optimizer only after the last micro-batch
            if cfg.engine.on_nonfinite == "stop":
                watch.update(step + 1, out)
            step_terms += torch.stack([out["ssl_loss"].detach().float(), out["rationale_loss"].detach().float()])
            micro += 1
            if micro < accum:
                continue
            micro = 0
            step += 1
            done_in_epoch += 1
            pairs += cfg.train.batch_size
            bar.update(1)
            log_step = step % cfg.engine.log_interval == 0 or step == 1
            if log_step:
                watch.check()
                last_losses = step_losses(mean_over_ranks(step_terms) / accum, model.rationale_weight, info.world_size * accum)
                rate = pairs / (time.perf_counter() - tic)
                if step > 1:  # the first interval holds start-up costs
                    rates.append(rate)
                log.log(step, epoch=epoch, lr=lr, pairs_per_s=rate, skipped_steps=skipped, **last_losses)
                bar.set_postfix(loss=f"{last_losses['loss']:.4f}", lr=f"{lr:.3g}", pairs_s=f"{rate:.1f}")
                tic, pairs = time.perf_counter(), 0
            step_terms.zero_()
            if (log_step or info.world_size == 1) and done_in_epoch < steps_per_epoch and stop.agreed(info.device):
                watch.check()
                stopped = stop_with_checkpoint(ckpt_path, engine, model, optimizer, epoch, step, cfg, history, done_in_epoch, info)
                break
        bar.close()
        if stopped:
            break

        knn_due = cfg.train.knn_monitor and epoch % cfg.train.knn_interval == 0
        retrieval_due = bool(cfg.train.retrieval_interval) and epoch % cfg.train.retrieval_interval == 0
        if (knn_due or retrieval_due) and info.is_main:
            scores = evaluate(model, memory_loader, test_loader, knn_k, cfg.train.knn_t, retrieval=retrieval_due, progress=show, autocast=amp)
            entry = {"epoch": epoch, **({"knn_top1": scores["knn_top1"]} if knn_due else {}), **scores.get("retrieval", {})}
            history.append(entry)
            log.log(step, **entry)
            if show:
                shown = [f"kNN top-1 {entry['knn_top1']:.2f}%"] if "knn_top1" in entry else []
                shown += [f"{k} {100 * entry[k]:.2f}" for k in ("rank1", "rank5", "mAP") if k in entry]
                print(f"epoch {epoch}: " + ", ".join(shown))
        watch.check()
        write_checkpoint(ckpt_path, engine, model, optimizer, epoch + 1, step, cfg, {"history": history}, info)
        if epoch + 1 < cfg.train.stop_at_epoch and stop.agreed(info.device):
            stopped = stop_with_checkpoint(ckpt_path, engine, model, optimizer, epoch + 1, step, cfg, history, 0, info, written=True)
            break
    if stopped:
        log.close()
        return stopped

    results: dict = {"name": cfg.name, "epochs": cfg.train.stop_at_epoch, "steps": step, "knn_k": knn_k, "history": history,
                     "throughput_pairs_per_s": sum(rates) / len(rates) if rates else None, "final_losses": last_losses,
                     "skipped_steps": skipped,
                     "config": cfg.to_dict()}
    if cfg.logger.matplotlib:
        # On every rank: MoCo's forward gathers keys across ranks, so all of them must run it.
        count = 8
        if cfg.model.name == "moco":  # the keys of every rank's images must fill the queue in whole batches
            count = max(n for n in range(1, count + 1) if cfg.model.moco_k % (n * info.world_size) == 0)
        images, titles = pick_images(test_index, count, cfg.dataset.image_size)
        maps = rationale_maps(model, images)
    if info.is_main:
        reference_path = os.path.join(args.ckpt_dir, f"{cfg.name}_reference.pth")
        export_reference_checkpoint(model, reference_path, epoch=cfg.train.stop_at_epoch)
        results["checkpoint"], results["reference_checkpoint"] = ckpt_path, reference_path
        results.update(evaluate(model, memory_loader, test_loader, knn_k, cfg.train.knn_t, retrieval=cfg.eval is not False and cfg.eval.retrieval,
                                progress=show, autocast=amp))
        # Best over the epochs that ran retrieval, the last one included (it may fall between intervals).
        scored = [h for h in history if "mAP" in h]
        last = {"epoch": cfg.train.stop_at_epoch - 1, **results.get("retrieval", {})}
        if scored and scored[-1]["epoch"] != last["epoch"]:
            scored.append(last)
        results["retrieval_best"] = best_over_epochs(scored)
        if cfg.logger.matplotlib:
            results["curves"] = plot_curves(log.path, os.path.join(args.log_dir, "curves.png"))
            results["heatmaps"] = write_heatmaps(model, images, os.path.join(args.log_dir, "heatmaps.png"), titles=titles, maps=maps)
        _, report = write_report(results, args.log_dir)
        print(format_results(results))
        print(f"report written to {report}")
    log.close()
    eng.barrier()
    return results


# Errors that mean "your input is wrong": a one-line message instead of a traceback.
USER_ERRORS = (ConfigError, DatasetError, CheckpointMismatchError, UnsafeCheckpointError, FileNotFoundError,
               CheckpointWriteError, CheckpointLockError, NonFiniteLossError, eng.ProcessGroupError)


def cli() -> None:
    try:
        main()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
