"""Configuration: every default in one place, the reference's YAML files read unchanged.

A config is the reference's sections (``name``, ``dataset``, ``model``, ``train`` with ``optimizer``,
``eval``, ``logger``, ``seed``) plus ours (``data``, ``engine``, ``kernels``, ``fixes``). A key that is
not in DEFAULTS is an error naming the key, the file and the closest valid key, raised before
anything runs. ``fixes`` holds one switch per reference quirk: all off reproduces the reference.
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Iterable

import yaml

DEFAULTS: dict[str, Any] = {
    "name": "lcr-experiment",
    "dataset": {
        "name": "imagefolder",  # reference names: cub200, stanfordcars, aircrafts (all ImageFolder train/ test/)
        "image_size": 224,
        "num_workers": 8,  # loader threads (DALI) or worker processes (torchvision)
    },
    "model": {
        "name": "byol",  # byol | moco
        # reference names (resnet50_cub200, resnet50_stanfordcars, resnet50_aircrafts) are ResNet-50 without
        # the stem max-pool; resnet50 / resnet18 follow model.maxpool.
        "backbone": "resnet50_cub200",
        "maxpool": None,  # None: off for the reference's BYOL backbones, on otherwise
        "pretrained": "imagenet",  # imagenet | none | path to a torchvision-format .pth
        "proj_hidden_dim": 4096,
        "proj_dim": 256,
        "ema_tau": 0.996,
        "rationale_channels": 32,
        "rationale_weight": 0.01,
        "rationale_temperature": 0.4,  # BYOL only: the reference's MoCo KL has no temperature
        # MoCo v2 (model.name=moco; the reference's main_moco.py --moco-dim/-k/-m/-t and --mlp).
        "moco_dim": 256,
        "moco_k": 65536,  # queue size: a multiple of train.batch_size (checked at start-up)
        "moco_m": 0.999,  # key encoder momentum
        "moco_t": 0.2,  # InfoNCE temperature
        "moco_mlp": True,  # head 2048 -> 2048 -> ReLU -> moco_dim instead of one Linear
    },
    "train": {
        # lars_simclr | sgd | adamw (ours; betas is read by adamw only, momentum and trust_coef not)
        "optimizer": {"name": "lars_simclr", "weight_decay": 1.5e-6, "momentum": 0.9, "trust_coef": 1e-3, "betas": [0.9, 0.999]},
        "warmup_epochs": 10,
        "warmup_lr": 0.0,
        "base_lr": 0.3,
        "final_lr": 0.0,
        "num_epochs": 800,
        "stop_at_epoch": 100,
        "batch_size": 128,  # per optimizer step, summed over ranks (the reference's DataParallel batch)
        "knn_monitor": True,
        "knn_interval": 1,
        "knn_k": 200,
        "knn_t": 0.1,
        "retrieval_interval": 0,  # epochs between test-split retrieval runs during training (MoCo's reference: 1); 0: at the end only
        # warmup_cosine: BYOL's per-iteration warmup + cosine; cosine_epoch: MoCo's per-epoch cosine, no warmup
        "schedule": "warmup_cosine",
        "scale_lr": True,  # lr = base_lr * batch_size / 256 (BYOL's rule); MoCo's reference uses base_lr as it is
    },
    "eval": {
        "optimizer": {"name": "sgd", "weight_decay": 0.0, "momentum": 0.9},
        "warmup_lr": 0.0,
        "warmup_epochs": 0,
        "base_lr": 30.0,
        "final_lr": 0.0,
        "batch_size": 128,
        "num_epochs": 100,
        "retrieval": True,  # leave-one-out retrieval on the test split after training
    },
    "logger": {"tensorboard": True, "matplotlib": True},
    "seed": None,
    "data": {
        "backend": "dali",  # dali | torchvision (dali falls back to torchvision when it cannot be imported)
        "recipe": None,  # byol | mocov2; None: the model's own recipe
        "eval_batch_size": None,  # None: train.batch_size per rank (the reference evaluates with its train batch)
    },
    "engine": {
        # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16 (dynamic loss scaling); all autocast
        # with fp32 master weights, BN statistics, EMA target and MoCo queue
        "precision": "auto",
        "zero_stage": 0,  # 0 with lars_simclr; 1 or 2 partition optimizer state (and gradients) with sgd / adamw
        "grad_accum_steps": 1,  # micro-batches per optimizer step on each rank; train.batch_size stays the global batch
        "sync_bn": False,  # CUDA only: BatchNorm statistics over all ranks (the reference: per GPU)
        # torch.compile of the ResNet trunks: none | default | reduce-overhead (CUDA graphs) | aot_eager (no codegen)
        "compile": "none",
        "channels_last": True,
        "log_interval": 10,  # optimizer steps between host syncs for logging
        "deterministic": False,
        "dist_timeout_s": 600,
        # stop: a non-finite loss ends the run (the last checkpoint kept); skip: such a step is left out and
        # counted, at the price of one host sync per step
        "on_nonfinite": "stop",
    },
    "kernels": {"backend": "auto"},  # auto | triton | torch; the LCR_KERNELS environment variable wins
    "fixes": {
        # Each switch turns one quirk of the reference into the corrected behaviour.
        "per_sample_minmax": False,  # rationale map normalised per image instead of over the whole batch
        "lars_momentum": False,  # lars_simclr keeps its momentum buffer (the reference never stores it)
        "detach_cam": False,  # the rationale loss does not back-propagate into the backbone through cam
        "warmup_first_step": False,  # the first iteration uses the warmup LR instead of the un-warmed base LR
        "flatten_kl": False,  # MoCo: KL over the flattened h*w map instead of row by row
    },
}

COMPILE_MODES = ("none", "default", "reduce-overhead", "aot_eager")  # engine.compile

# Sections the reference allows to be False instead of a mapping.
_MAY_BE_FALSE = {"eval"}


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


class Config(dict):
    """A nested dict with attribute access (``cfg.train.batch_size``); plain data, safe to pickle."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r}") from None

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return Config({k: _wrap(v) for k, v in value.items()})
    return value


def _all_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def _unknown_key_error(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(DEFAULTS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {source}{hint}")


def _merge(base: dict, update: dict, defaults: dict, source: str, prefix: str = "") -> None:
    for key, value in update.items():
        path = prefix + str(key)
        if key not in defaults:
            raise _unknown_key_error(path, source)
        if isinstance(defaults[key], dict):
            if value is False and key in _MAY_BE_FALSE:
                base[key] = False
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} in {source} must be a mapping, got {value!r}")
            if not isinstance(base.get(key), dict):
                base[key] = copy.deepcopy(defaults[key])
            _merge(base[key], value, defaults[key], source, path + ".")
        else:
            base[key] = value


def parse_override(text: str) -> dict:
    """``train.batch_size=64`` -> {"train": {"batch_size": 64}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    tree: dict = {}
    node = tree
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] | dict | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (may be None), then ``overrides`` (``a.b=v`` strings or a dict)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:  # includes tags that would construct Python objects
                raise ConfigError(f"config file {path!r} is not plain YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
        _merge(cfg, data, DEFAULTS, path)
    if isinstance(overrides, dict):
        _merge(cfg, overrides, DEFAULTS, "overrides")
    else:
        for item in overrides or ():
            _merge(cfg, parse_override(item), DEFAULTS, f"override {item!r}")
    validate(cfg)
    return _wrap(cfg)


def _choice(value: Any, key: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}")


def validate(cfg: dict) -> None:
    """Reject values that would fail later or silently compute something else."""
    _choice(cfg["model"]["name"], "model.name", ("byol", "moco"))
    _choice(cfg["data"]["backend"], "data.backend", ("dali", "torchvision"))
    _choice(cfg["data"]["recipe"], "data.recipe", (None, "byol", "mocov2"))
    _choice(cfg["engine"]["precision"], "engine.precision", ("auto", "fp32", "bf16", "fp16"))
    _choice(cfg["engine"]["zero_stage"], "engine.zero_stage", (0, 1, 2, 3))
    _choice(cfg["engine"]["on_nonfinite"], "engine.on_nonfinite", ("stop", "skip"))
    _choice(cfg["kernels"]["backend"], "kernels.backend", ("auto", "triton", "torch"))
    _choice(cfg["train"]["optimizer"]["name"], "train.optimizer.name", ("lars_simclr", "sgd", "adamw"))
    _choice(cfg["engine"]["sync_bn"], "engine.sync_bn", (True, False))
    _choice(cfg["engine"]["compile"], "engine.compile", COMPILE_MODES)
    accum = cfg["engine"]["grad_accum_steps"]
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
        raise ConfigError(f"engine.grad_accum_steps must be a positive integer, got {accum!r}")
    if accum > 1 and cfg["engine"]["on_nonfinite"] == "skip":
        raise ConfigError("engine.on_nonfinite=skip drops single batches, which would leave an accumulated step half "
                          "computed: use on_nonfinite=stop with engine.grad_accum_steps > 1")
    _choice(cfg["train"]["schedule"], "train.schedule", ("warmup_cosine", "cosine_epoch"))
    _choice(cfg["train"]["scale_lr"], "train.scale_lr", (True, False))
    if cfg["train"]["schedule"] == "cosine_epoch" and cfg["train"]["warmup_epochs"]:
        raise ConfigError(f"train.schedule=cosine_epoch has no warmup (as the reference's MoCo): set train.warmup_epochs "
                          f"to 0, got {cfg['train']['warmup_epochs']!r}")
    for key in ("moco_dim", "moco_k"):
        if not isinstance(cfg["model"][key], int) or isinstance(cfg["model"][key], bool) or cfg["model"][key] < 1:
            raise ConfigError(f"model.{key} must be a positive integer, got {cfg['model'][key]!r}")
    train = cfg["train"]
    if train["stop_at_epoch"] > train["num_epochs"]:
        raise ConfigError(f"train.stop_at_epoch ({train['stop_at_epoch']}) must not exceed train.num_epochs ({train['num_epochs']})")
    if train["warmup_epochs"] > train["num_epochs"]:
        raise ConfigError("train.warmup_epochs must not exceed train.num_epochs")
    if not isinstance(train["retrieval_interval"], int) or train["retrieval_interval"] < 0:
        raise ConfigError(f"train.retrieval_interval must be a non-negative integer, got {train['retrieval_interval']!r}")
    for key in ("batch_size", "stop_at_epoch", "num_epochs", "knn_interval"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {train[key]!r}")
    if not isinstance(cfg["dataset"]["image_size"], int) or cfg["dataset"]["image_size"] < 32:
        raise ConfigError(f"dataset.image_size must be an integer of at least 32, got {cfg['dataset']['image_size']!r}")


def recipe_for(cfg: Config) -> str:
    """The augmentation recipe: the configured one, else the model's own (BYOL's, or MoCo v2's aug-plus)."""
    return cfg.data.recipe or ("mocov2" if cfg.model.name == "moco" else "byol")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
