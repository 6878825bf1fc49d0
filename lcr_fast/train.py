"""Train a self-supervised method of lcr_fast.methods (BYOL, MoCo v2, ...) with the LCR rationale branch;
evaluate by kNN and retrieval and, for BYOL, by the linear evaluation the reference's main.py runs after training.

One GPU, several, or the CPU (gloo), always through DeepSpeed:

    deepspeed lcr_fast/train.py -c configs/byol_cub200.yaml --data_dir /data/CUB_200_2011 \
        --log_dir runs/cub --ckpt_dir runs/cub/ckpt
    deepspeed --num_gpus 8 lcr_fast/train.py -c configs/byol_cub200.yaml --data_dir ... train.batch_size=256
    python lcr_fast/train.py -c configs/demo.yaml --data_dir data/synthetic --log_dir runs/demo \
        --ckpt_dir runs/demo/ckpt
    python lcr_fast/train.py ... --resume              # continue from <ckpt_dir>/last.pt; starts fresh if there is none
    python lcr_fast/train.py ... --eval_from runs/cub/ckpt/last.pt   # evaluate only (ours or a reference .pth)
    python lcr_fast/train.py -c configs/demo.yaml --data_dir ~/photos --eval_data_dir data/synthetic ...
                                                       # pretrain on unlabeled images, evaluate on an ImageFolder

Trailing ``section.key=value`` arguments override the config (``train.stop_at_epoch=2``). The step
itself (EMA, forward, objective, backward) and the epoch around it are in ``lcr_fast/loop.py``.
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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from lcr_fast import engine as eng
from lcr_fast import kernels, methods, run_info, selfcheck
from lcr_fast.checkpoint import (check_checkpoint_file, check_writable, load_training_checkpoint, run_lock,
                                 save_training_checkpoint, set_rng_state)
from lcr_fast.compat import export_reference_checkpoint, has_reference_layout, load_state_strict
from lcr_fast.config import Config, ConfigError, load_config, packaged_configs, recipe_for, save_config
from lcr_fast.data import (DatasetError, Evaluation, FolderIndex, build_eval_loader, build_train_loader,
                           check_hold_out, checked_loader, evaluation_data, hold_out, scan_training_images)
from lcr_fast.errors import run_cli
from lcr_fast.eval.features import evaluate
from lcr_fast.eval.linear import linear_eval_lcr
from lcr_fast.eval.numerics import EvalNumerics
from lcr_fast.host_memory import keep_freed_memory
from lcr_fast.loading import load_model
from lcr_fast.loop import EpochContext, NonFiniteWatch, RunState, StepParts, StopRequest, run_epoch
from lcr_fast.models import build_model, compile_backbones
from lcr_fast.optim import build_optimizer, build_schedule
from lcr_fast.results import plot_curves, training_summary, write_training_report
from lcr_fast.run_log import RunLog
from lcr_fast.visualize import pick_images, rationale_maps, write_heatmaps


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    p = argparse.ArgumentParser(description=f"Train {' / '.join(methods.names())} with LCR.",
                                epilog="Trailing section.key=value arguments override the config.")
    p.add_argument("-c", "--config-file", help="YAML config (the reference's files work unchanged), or the name of "
                                              "a packaged one (byol_cub200, ...)")
    p.add_argument("--list-configs", action="store_true", help="list the packaged configs and exit")
    p.add_argument("--data_dir", default=os.getenv("DATA"),
                   help="ImageFolder root with train/ and test/, or a folder of unlabeled images (env DATA)")
    p.add_argument("--eval_data_dir", default=None,
                   help="ImageFolder root with train/ and test/ to evaluate on instead of --data_dir; without it a run "
                        "on unlabeled images is not evaluated")
    p.add_argument("--log_dir", default=os.getenv("LOG"), help="where logs and results go (env LOG)")
    p.add_argument("--ckpt_dir", default=os.getenv("CHECKPOINT"), help="where checkpoints go (env CHECKPOINT)")
    p.add_argument("--hide_progress", action="store_true", help="no progress bars")
    p.add_argument("--eval_from", default=None,
                   help="evaluate this checkpoint (ours or the reference's) instead of training")
    p.add_argument("--debug", action="store_true", help="tiny run: batch 2, one epoch, 8 images")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default <ckpt_dir>/last.pt, or a fresh start when there is none)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p


def take_override_from_resume(args: argparse.Namespace) -> None:
    """``--resume train.stop_at_epoch=200``: argparse hands the override to the optional PATH; give it back."""
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.insert(0, args.resume)
        args.resume = "auto"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.list_configs:
        for name, path in packaged_configs().items():
            print(f"{name:20s} {path}")
        p.exit()
    if args.config_file is None:
        p.error("the following arguments are required: -c/--config-file")
    take_override_from_resume(args)
    missing = [name for name in ("data_dir", "log_dir", "ckpt_dir") if getattr(args, name) is None]
    if missing:
        p.error(f"missing {', '.join('--' + m for m in missing)} "
                "(or the DATA / LOG / CHECKPOINT environment variables)")
    return args


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.debug:
        # As the reference's --debug: a couple of tiny steps to check that everything runs.
        overrides += ["train.batch_size=2", "train.num_epochs=1", "train.stop_at_epoch=1", "train.warmup_epochs=0",
                      "dataset.num_workers=0"]
    return load_config(args.config_file, overrides)


@dataclass
class Inputs:
    """The run's inputs, checked before any process group or model exists."""

    train_index: FolderIndex  # what the run trains on: train/ without the validation images, or unlabeled images
    evaluation: Evaluation  # the labeled images it is evaluated on (its bank is train_index in the reference layout)
    resume: dict | None  # the training checkpoint to continue from
    resume_path: str | None
    val_index: FolderIndex | None = None  # data.val_per_class images per class held out of train/


def check_validation_split(cfg: Config, train_index: FolderIndex, evaluation: Evaluation, resume: dict | None) -> None:
    """``data.val_per_class`` can be held out of train/, and a resumed run holds out what it held out
    before: the same count and the same seed, or images it trained on would be validated on. The
    validation images are labeled ones the run would train on: the reference's layout, evaluated on itself."""
    if cfg.data.val_per_class and evaluation.bank is not train_index:
        raise ConfigError(f"data.val_per_class={cfg.data.val_per_class} holds labeled images out of the training "
                          "images, so it needs --data_dir in the reference's layout (train/ and test/ class folders) "
                          "and no --eval_data_dir; set data.val_per_class=0")
    if cfg.data.val_per_class:
        check_hold_out(train_index, cfg.data.val_per_class)
    if resume is None:
        return
    before = resume["config"]["data"].get("val_per_class", 0), resume["config"]["seed"]
    if (before[0] or cfg.data.val_per_class) and before != (cfg.data.val_per_class, cfg.seed):
        raise ConfigError(f"data.val_per_class={cfg.data.val_per_class} with seed {cfg.seed} differs from the resumed "
                          f"run's {before[0]} with seed {before[1]}: the validation split would mix with what it "
                          "trained on; resume with the same values")


def split_validation(args: argparse.Namespace, cfg: Config, inputs: Inputs) -> None:
    """Hold ``data.val_per_class`` images per class of train/ out of training, drawn with the run's
    seed (the same on every rank by then), into ``inputs.val_index``."""
    inputs.train_index, inputs.val_index = hold_out(inputs.train_index, cfg.data.val_per_class, cfg.seed)
    inputs.evaluation.bank = inputs.train_index
    if args.debug:
        for index in (inputs.train_index, inputs.val_index):
            index.samples = index.samples[:8]


def check_inputs(args: argparse.Namespace, cfg: Config) -> Inputs:
    """Every check that needs only the config, the data folders or a file: bad input fails in seconds."""
    train_index = scan_training_images(args.data_dir)
    evaluation = evaluation_data(args.data_dir, train_index, args.eval_data_dir)
    pretrained = cfg.model.pretrained
    if pretrained not in ("imagenet", "none") and not args.eval_from and not os.path.isfile(pretrained):
        raise ConfigError(f"model.pretrained file {pretrained!r} does not exist (or use imagenet / none)")
    check_writable(args.log_dir, "logs and results")
    resume = path = None
    if args.eval_from:
        if evaluation.skipped:
            raise DatasetError(f"--eval_from evaluates on labeled images, and there are none: {evaluation.skipped}")
        check_checkpoint_file(args.eval_from)
    else:
        check_writable(args.ckpt_dir)
        path = args.resume
        if path == "auto":
            path = os.path.join(args.ckpt_dir, "last.pt")
            if not os.path.exists(path):
                print(f"--resume: no checkpoint at {path} yet; starting a fresh run")
                path = None
        resume = load_training_checkpoint(path) if path else None
    if cfg.seed is None:
        # seed: null draws one, recorded so that the run can be repeated; a resumed run keeps the one it drew.
        cfg["seed"] = resume["config"]["seed"] if resume is not None else random.SystemRandom().randrange(2**31)
    validating = cfg.data.val_per_class and not args.eval_from
    if not args.eval_from:
        check_validation_split(cfg, train_index, evaluation, resume)
    held = cfg.data.val_per_class * len(train_index.classes) if validating else 0
    if args.debug:
        cut = [evaluation.test, evaluation.bank] if evaluation.bank is not train_index else [evaluation.test]
        if not validating:  # else split_validation cuts both parts once the split is drawn
            cut.append(train_index)
        for index in cut:
            if index is not None:
                index.samples = index.samples[:8]
    if len(train_index) - held < cfg.train.batch_size and not args.eval_from:
        also = f" ({held} of them held out by data.val_per_class)" if held else ""
        raise DatasetError(f"{str(train_index.root)!r} has {len(train_index)} images{also}, fewer than one batch "
                           f"(train.batch_size={cfg.train.batch_size}): lower the batch size")
    return Inputs(train_index, evaluation, resume, path)


def seed_process(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators: what a rank does before it builds its model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_process(args: argparse.Namespace, cfg: Config) -> eng.DistInfo:
    """Join the process group, then what needs the device: its checks, the precision and the seeds."""
    # The config's choice; LCR_KERNELS, the user's override, still wins (a bad value of it fails the self-check).
    kernels.BACKEND.select(cfg.kernels.backend)
    launch = eng.resolve_launch(args.local_rank)
    # Every rank says what it was told before it joins: a group that never forms leaves that trace.
    print(launch.describe(), flush=True)
    info = eng.init_distributed(cfg.engine.dist_timeout_s, launch=launch)
    if info.device.type == "cpu":
        keep_freed_memory()  # each step's activations reuse the last step's memory (lcr_fast.host_memory)
    if info.world_size > 1:
        # With seed: null every process drew its own; rank 0's is the run's, so that all ranks read one
        # permutation of the data and hold out the same validation images.
        seed = torch.tensor([cfg.seed], dtype=torch.long, device=info.device)
        dist.broadcast(seed, src=0)
        cfg["seed"] = int(seed)
    eng.check_device_options(cfg, info.device)
    eng.micro_batch_size(cfg, info.world_size)
    seed_process(cfg.seed + info.rank)
    if cfg.engine.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not cfg.engine.deterministic
    return info


def eval_loaders(cfg: Config, args: argparse.Namespace, inputs: Inputs, info: eng.DistInfo, backend: str) -> tuple:
    """(labeled training images as the kNN bank, test split, validation images or None) in evaluation
    transforms, and their data path: the first from ``backend`` (a data.backend or a path) that runs here.
    Without labeled images to evaluate on (``inputs.evaluation.skipped``) all three are None."""
    batch = cfg.data.eval_batch_size or cfg.train.batch_size // info.world_size
    threads, size = cfg.dataset.num_workers, cfg.dataset.image_size
    loaders = []
    # The validation images are files of train/, held out of the training index.
    evaluation = inputs.evaluation
    for split, index in (("train", evaluation.bank), ("test", evaluation.test), ("train", inputs.val_index)):
        if index is None:
            loaders.append(None)
            continue
        loader, backend = checked_loader(lambda path: build_eval_loader(evaluation.data_dir, split, batch_size=batch,
                                                                        image_size=size, backend=path,
                                                                        device=info.device, num_threads=threads,
                                                                        index=index),
                                         backend, info.device, cfg.engine.strict)
        loaders.append(loader)
    return (*loaders, backend)


@dataclass
class Run:
    """Everything a training run holds after set-up."""

    args: argparse.Namespace
    cfg: Config
    info: eng.DistInfo
    inputs: Inputs
    parts: StepParts
    state: RunState
    ctx: EpochContext
    memory_loader: object
    test_loader: object
    precision: str
    components: selfcheck.Components
    val_loader: object = None  # the held-out validation images (data.val_per_class), else None
    record: dict | None = None  # rank 0: what this process ran on and how it was started (lcr_fast.run_info)
    earlier_runs: list[dict] = field(default_factory=list)  # the records of the runs it resumed, oldest first

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.args.ckpt_dir, "last.pt")

    @property
    def numerics(self) -> EvalNumerics:
        """What every evaluation of this run computes in, as ``lcr-eval`` does on its checkpoint."""
        return EvalNumerics.of_run(self.cfg, self.info.device, self.precision)

    @property
    def knn_k(self) -> int:
        bank = self.inputs.evaluation.bank
        return self.cfg.train.knn_k if bank is None else min(self.cfg.train.knn_k, len(bank))


def build_engine(cfg: Config, info: eng.DistInfo, precision: str, resume: dict | None = None,
                 resume_path: str | None = None):
    """Model, optimizer and DeepSpeed engine, restored from the training checkpoint ``resume`` (read
    from ``resume_path``) when given; returns (model, engine, optimizer, state). The benchmarks build
    theirs here too."""
    model = build_model(cfg)
    if cfg.engine.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(info.device)
    optimizer = build_optimizer(cfg, model)
    state, ckpt = RunState(), resume
    if ckpt is not None:
        load_state_strict(model, ckpt["model"], resume_path)
        if ckpt["optimizer"] is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        elif cfg.engine.zero_stage == 0:
            raise ConfigError(f"{resume_path} was written under ZeRO (its optimizer state is partitioned by rank): "
                              "resume it with the engine.zero_stage it was trained with")
        state = RunState.from_checkpoint(ckpt)
        set_rng_state(ckpt["rng"])
    model.broadcast_state()  # what DeepSpeed leaves per rank: it broadcasts parameters, not buffers (MoCo's queue)
    engine, optimizer = eng.initialize(model, optimizer, cfg, info.world_size, precision)
    if ckpt is not None and ckpt["optimizer"] is None:
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
    return model, engine, optimizer, state


def set_up(args: argparse.Namespace, cfg: Config, info: eng.DistInfo, inputs: Inputs,
           components: selfcheck.Components) -> Run:
    """Loaders (on the first data path that runs here), model and engine (its compiled trunks checked),
    the step's parts and the run's log; ``components`` gets the data path and the compile path."""
    precision, accum = components.precision, cfg.engine.grad_accum_steps
    micro = eng.micro_batch_size(cfg, info.world_size)
    train_loader, components.data = checked_loader(
        lambda path: build_train_loader(args.data_dir, recipe=recipe_for(cfg), batch_size=micro,
                                        image_size=cfg.dataset.image_size, backend=path, device=info.device,
                                        num_threads=cfg.dataset.num_workers, seed=cfg.seed, shard_id=info.rank,
                                        num_shards=info.world_size, index=inputs.train_index, micro_batches=accum),
        cfg.data.backend, info.device, cfg.engine.strict)
    memory_loader, test_loader, val_loader, _ = eval_loaders(cfg, args, inputs, info, components.data)
    model, engine, optimizer, state = build_engine(cfg, info, precision, inputs.resume, inputs.resume_path)
    components.compile = selfcheck.check_compile(model, cfg.engine.compile, micro, cfg.dataset.image_size,
                                                 cfg.engine.channels_last, precision, info.device, cfg.engine.strict)
    if inputs.resume is not None and info.is_main:
        print(f"resumed from {inputs.resume_path}: epoch {state.epoch}, step {state.step}"
              + (f" ({state.epoch_step} into the epoch)" if state.epoch_step else ""))
    schedule = build_schedule(cfg, len(train_loader) // accum)
    parts = StepParts(engine=engine, model=model, optimizer=optimizer, schedule=schedule,
                      pieces=info.world_size * accum, channels_last=cfg.engine.channels_last,
                      skip_nonfinite=cfg.engine.on_nonfinite == "skip")
    log = RunLog(args.log_dir, cfg.logger.tensorboard, enabled=info.is_main)
    record = run_record(info, state.step)
    if info.is_main:
        save_config(cfg, os.path.join(args.log_dir, "config.yaml"))
        components.write(args.log_dir)
    watch = NonFiniteWatch(info.device, model.rationale_weight)
    ctx = EpochContext(loader=train_loader, log=log, watch=watch, stop=StopRequest(), device=info.device,
                       world_size=info.world_size, global_batch=cfg.train.batch_size,
                       log_interval=cfg.engine.log_interval, num_epochs=cfg.train.num_epochs,
                       stop_on_nonfinite=cfg.engine.on_nonfinite == "stop",
                       show_progress=info.is_main and not args.hide_progress)
    earlier = inputs.resume.get("runs", []) if inputs.resume is not None else []
    return Run(args, cfg, info, inputs, parts, state, ctx, memory_loader, test_loader, precision, components,
               val_loader, record, earlier)


def run_record(info: eng.DistInfo, first_step: int = 0) -> dict | None:
    """Rank 0: the run's record (lcr_fast.run_info) with every rank's host and device; None elsewhere. A
    collective: every rank calls it."""
    ranks = run_info.gather_ranks(info.launch, info.device)
    return run_info.collect(info.launch, info.device, ranks, first_step) if info.is_main else None


def write_checkpoint(run: Run) -> None:
    """Rank 0 writes last.pt; under ZeRO every rank first writes its optimizer partition through the
    engine, and last.pt names it."""
    zero = run.cfg.engine.zero_stage > 0
    extra = run.state.extra()
    folder = os.path.dirname(run.ckpt_path)
    if zero:
        extra["zero_tag"] = eng.save_zero_state(run.parts.engine, folder, run.state.step)
    if run.info.is_main:
        save_training_checkpoint(run.ckpt_path, run.parts.model, None if zero else run.parts.optimizer,
                                 run.state.epoch, run.state.step, run.cfg.to_dict(), extra,
                                 runs=[*run.earlier_runs, run.record])
        if zero:
            eng.remove_stale_zero_states(folder, extra["zero_tag"])
    eng.barrier()


def evaluate_epoch(run: Run, epoch: int) -> None:
    """The kNN monitor and retrieval on the epochs their intervals select (rank 0), into the history.
    With a validation split both run on it and on the test split at every such epoch: the test
    figures of the epoch the validation selects are then known without a second pass."""
    train, validating = run.cfg.train, run.val_loader is not None
    knn_due = train.knn_monitor and epoch % train.knn_interval == 0
    retrieval_due = bool(train.retrieval_interval) and epoch % train.retrieval_interval == 0
    if not (knn_due or retrieval_due) or not run.info.is_main or run.test_loader is None:
        return
    scores = evaluate(run.parts.model, run.memory_loader, run.test_loader, run.knn_k, train.knn_t,
                      retrieval=retrieval_due or validating, progress=run.ctx.show_progress,
                      numerics=run.numerics, val_loader=run.val_loader)
    entry = {"epoch": epoch, **({"knn_top1": scores["knn_top1"]} if knn_due or validating else {}),
             **scores.get("retrieval", {})}
    if validating:
        entry["validation"] = scores["validation"]
    run.state.history.append(entry)
    run.ctx.log.log(run.state.step, **{k: v for k, v in entry.items() if k != "validation"},
                    **{f"val_{k}": v for k, v in entry.get("validation", {}).items()})
    if run.ctx.show_progress:
        shown = [f"kNN top-1 {entry['knn_top1']:.2f}%"] if "knn_top1" in entry else []
        shown += [f"{k} {100 * entry[k]:.2f}" for k in ("rank1", "rank5", "mAP") if k in entry]
        shown += [f"validation mAP {100 * entry['validation']['mAP']:.2f}"] if validating else []
        print(f"epoch {epoch}: " + ", ".join(shown))


def evaluate_untrained(run: Run) -> None:
    """kNN and retrieval of the initial weights (ImageNet or random) on rank 0, before the first step,
    so that every report shows what training added. Draws nothing from the run's random streams."""
    if not run.info.is_main or run.test_loader is None:
        return
    with torch.random.fork_rng(devices=[]):
        scores = evaluate(run.parts.model, run.memory_loader, run.test_loader, run.knn_k, run.cfg.train.knn_t,
                          progress=run.ctx.show_progress, numerics=run.numerics)
    run.state.untrained = {"knn_top1": scores["knn_top1"], **scores["retrieval"]}
    run.ctx.log.log(0, untrained=True, **run.state.untrained)
    if run.ctx.show_progress:
        print(f"untrained: kNN top-1 {scores['knn_top1']:.2f}%, mAP {100 * scores['retrieval']['mAP']:.2f}")


def train_epochs(run: Run) -> bool:
    """Epochs from the resumed state to ``train.stop_at_epoch``, a checkpoint after each; True when a
    stop signal ended the run early (with a checkpoint to resume from)."""
    if run.state.step == 0 and run.state.epoch_step == 0 and run.state.untrained is None:
        evaluate_untrained(run)
    for epoch in range(run.state.epoch, run.cfg.train.stop_at_epoch):
        run.state.epoch = epoch
        if run_epoch(run.parts, run.state, run.ctx):
            write_checkpoint(run)
            return True
        evaluate_epoch(run, epoch)
        run.ctx.watch.check()
        run.state.epoch, run.state.epoch_step = epoch + 1, 0
        write_checkpoint(run)
        if epoch + 1 < run.cfg.train.stop_at_epoch and run.ctx.stop.agreed(run.info.device):
            return True
    return False


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


def select_on_validation(history: list[dict], last: dict) -> dict:
    """The epoch of best validation mAP (the earliest of equals; ``last``, the final evaluation,
    counts as the last epoch) with its validation and test figures: model selection that never
    looks at the test split."""
    scored = [h for h in history if "validation" in h]
    if not scored or scored[-1]["epoch"] != last["epoch"]:
        scored.append(last)
    best = max(scored, key=lambda h: h["validation"]["mAP"])
    return {"epoch": best["epoch"], "validation": best["validation"],
            "test": {k: best[k] for k in ("knn_top1", "rank1", "rank5", "mAP") if k in best}}


PRETRAINED_WORDS = {"imagenet": "torchvision's ImageNet weights", "none": "random initialisation"}


def linear_eval_model(cfg: Config, trained: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The model BYOL's end-of-run linear evaluation classifies the features of, and which weights it
    holds, in words. The reference's ``linear_cub_eval.py`` builds a fresh model and never loads the
    checkpoint it was handed (its load line is commented out): the backbone of ``model.pretrained``
    and an untrained rationale detector, drawn here from ``seed``. ``fixes.linear_eval_trained_weights``
    takes the trained model instead."""
    if cfg.fixes.linear_eval_trained_weights:
        return trained, "the trained weights (the run's final model; fixes.linear_eval_trained_weights)"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        fresh = build_model(cfg)
    start = PRETRAINED_WORDS.get(cfg.model.pretrained, f"the weights of {cfg.model.pretrained}")
    return fresh.to(device), (f"not the trained weights: a fresh model (backbone from {start}, untrained rationale "
                              "detector), as the reference's linear evaluation, which never loads its checkpoint")


def end_of_run_linear_eval(run: Run) -> dict:
    """BYOL's linear evaluation after training, as the reference's ``main.py`` runs it when the config's
    ``eval`` is not False (rank 0; on the images the run trained on), for the methods that declare it
    (lcr_fast.methods); otherwise why it did not run."""
    cfg = run.cfg
    skipped = methods.get(cfg.model.name).final_linear_eval
    if skipped is not None:
        return {"skipped": skipped}
    if cfg.eval is False:
        return {"skipped": "the config's eval is false"}
    model, weights = linear_eval_model(cfg, run.parts.model, run.info.device)
    result = linear_eval_lcr(model, run.inputs.evaluation.bank, run.inputs.evaluation.test, cfg, run.info.device,
                             numerics=run.numerics, progress=run.ctx.show_progress)
    return {**result, "weights": weights}


def heatmap_inputs(run: Run) -> tuple | None:
    """(images, class names, maps) for the heatmap figure, computed on every rank: MoCo's forward
    gathers keys across ranks, so all of them run it while rank 0 draws."""
    if not run.cfg.logger.matplotlib or run.inputs.evaluation.test is None:
        return None
    # Up to 8 a rank, as many as the method's batch constraint allows (MoCo's queue takes whole global batches).
    method, world = methods.get(run.cfg.model.name), run.info.world_size
    count = max(n for n in range(1, 9) if method.batch_error(run.cfg.model, n * world) is None)
    images, titles = pick_images(run.inputs.evaluation.test, count, run.cfg.dataset.image_size)
    return images, titles, rationale_maps(run.parts.model, images)


def final_evaluation(run: Run) -> dict:
    """Rank 0, after the last epoch: kNN and retrieval of the final model, the best epochs, the
    validation's selection and the end-of-run linear evaluation."""
    cfg, state, model = run.cfg, run.state, run.parts.model
    validating = run.val_loader is not None
    retrieval = (cfg.eval is not False and cfg.eval.retrieval) or validating
    results = evaluate(model, run.memory_loader, run.test_loader, run.knn_k, cfg.train.knn_t, retrieval=retrieval,
                       progress=run.ctx.show_progress, numerics=run.numerics, val_loader=run.val_loader)
    # Best over the epochs that ran retrieval, the last one included (it may fall between intervals).
    scored = [h for h in state.history if "mAP" in h]
    last = {"epoch": cfg.train.stop_at_epoch - 1, "knn_top1": results["knn_top1"], **results.get("retrieval", {}),
            **({"validation": results["validation"]} if validating else {})}
    if scored and scored[-1]["epoch"] != last["epoch"]:
        scored.append(last)
    results["retrieval_best"] = best_over_epochs(scored)
    if validating:
        results["selected_on_validation"] = select_on_validation(state.history, last)
        results["validation_split"] = {"per_class": cfg.data.val_per_class, "images": len(run.inputs.val_index),
                                       "train_images": len(run.inputs.train_index)}
    results["linear_eval"] = end_of_run_linear_eval(run)
    return results


def training_data(data_dir: str, index: FolderIndex) -> dict:
    """What results.json records under "training_data": the folder, how many images, whether labeled."""
    return {"data_dir": os.path.abspath(data_dir), "images": len(index), "labeled": index.labeled,
            **({"num_classes": len(index.classes)} if index.labeled else {})}


def finish(run: Run) -> dict:
    """After the last epoch: the reference-format export, the final evaluation and the report (rank 0)."""
    cfg, state, model = run.cfg, run.state, run.parts.model
    rates = run.ctx.rates
    evaluation = run.inputs.evaluation
    results: dict = {"name": cfg.name, "epochs": cfg.train.stop_at_epoch, "steps": state.step,
                     "history": state.history, "final_losses": run.ctx.last_losses,
                     "throughput_pairs_per_s": sum(rates) / len(rates) if rates else None,
                     "skipped_steps": state.skipped, "untrained": state.untrained,
                     "training_data": training_data(run.args.data_dir, run.inputs.train_index),
                     "evaluation": evaluation.to_dict(), "components": run.components.to_dict(),
                     "run": run.record, **({"earlier_runs": run.earlier_runs} if run.earlier_runs else {}),
                     "config": cfg.to_dict()}
    if not evaluation.skipped:
        results.update(knn_k=run.knn_k, knn_t=cfg.train.knn_t, num_classes=len(evaluation.test.classes))
    pictures = heatmap_inputs(run)
    # The last collective. Rank 0 carries on alone, and the other ranks end here rather than wait for it
    # in a barrier that its linear evaluation could outlast (engine.dist_timeout_s).
    eng.barrier()
    if run.info.is_main:
        results["checkpoint"] = run.ckpt_path
        if has_reference_layout(model):
            reference_path = os.path.join(run.args.ckpt_dir, f"{cfg.name}_reference.pth")
            export_reference_checkpoint(model, reference_path, epoch=cfg.train.stop_at_epoch)
            results["reference_checkpoint"] = reference_path
        if not evaluation.skipped:
            results.update(final_evaluation(run))
        if cfg.logger.matplotlib:
            results["curves"] = plot_curves(run.ctx.log.path, os.path.join(run.args.log_dir, "curves.png"))
        if pictures is not None:
            images, titles, maps = pictures
            results["heatmaps"] = write_heatmaps(model, images, os.path.join(run.args.log_dir, "heatmaps.png"),
                                                 titles=titles, maps=maps)
        _, report = write_training_report(results, run.args.log_dir)
        summary = training_summary(results)
        if summary:  # nothing to sum up when nothing was evaluated
            print(summary)
        print(f"report written to {report}")
    return results


def evaluate_only(args: argparse.Namespace, cfg: Config, info: eng.DistInfo, inputs: Inputs,
                  components: selfcheck.Components) -> dict:
    """``--eval_from``: kNN and retrieval of a checkpoint (ours or the reference's), no training."""
    model, _ = load_model(args.eval_from, cfg.model.name, cfg.to_dict())
    model = model.to(info.device)
    memory_loader, test_loader, _, components.data = eval_loaders(cfg, args, inputs, info, cfg.data.backend)
    knn_k = min(cfg.train.knn_k, len(inputs.evaluation.bank))
    results = {"checkpoint": args.eval_from, "knn_k": knn_k, "knn_t": cfg.train.knn_t, "run": run_record(info)}
    results.update(evaluate(model, memory_loader, test_loader, knn_k, cfg.train.knn_t,
                            progress=info.is_main and not args.hide_progress,
                            numerics=EvalNumerics.of_run(cfg, info.device, components.precision)))
    results["components"] = components.to_dict()
    if info.is_main:
        write_training_report(results, args.log_dir)
        print(training_summary(results))
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = resolve_config(args)
    inputs = check_inputs(args, cfg)
    info = start_process(args, cfg)
    components = selfcheck.start_checks(cfg, info.device)
    if inputs.evaluation.skipped and info.is_main:
        print(f"evaluation skipped: {inputs.evaluation.skipped}")
    if args.eval_from:
        return evaluate_only(args, cfg, info, inputs, components)
    if cfg.data.val_per_class:
        split_validation(args, cfg, inputs)
    # Rank 0 holds the checkpoint folder's lock for the run; a second run on the same folder stops here.
    with run_lock(args.ckpt_dir) if info.is_main else contextlib.nullcontext():
        run = set_up(args, cfg, info, inputs, components)
        stopped = train_epochs(run)
        run.ctx.log.close()
        if stopped:
            if info.is_main:
                print(f"stopped on a signal after optimizer step {run.state.step}; checkpoint {run.ckpt_path} written. "
                      "Continue with --resume.")
            return {"stopped_at_step": run.state.step, "checkpoint": run.ckpt_path}
        return finish(run)


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
