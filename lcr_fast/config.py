"""Configuration: every default in one place, the reference's YAML files read unchanged.

A config is the reference's sections (``name``, ``dataset``, ``model``, ``train`` with ``optimizer``,
``eval``, ``logger``, ``seed``) plus ours (``data``, ``engine``, ``kernels``, ``fixes``). A key that is
not in DEFAULTS is an error naming the key, the file and the closest valid key, raised before
anything runs. ``fixes`` holds one switch per reference quirk: all off reproduces the reference.

DEFAULTS is the one table of keys. Its ``model`` section holds the keys every method reads, then each
method's own (``model.moco_k``, ...), which the method declares with its checks in its module of
``lcr_fast.methods`` and which are added here; the keys of all methods are valid whichever runs, so a
saved config lists them all, as it always has.
"""
from __future__ import annotations

import copy
import difflib
import importlib.resources
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from . import methods
from .errors import UserError

DEFAULTS: dict[str, Any] = {
    "name": "lcr-experiment",
    "dataset": {
        "name": "imagefolder",  # reference names: cub200, stanfordcars, aircrafts (all ImageFolder train/ test/)
        "image_size": 224,
        # loader threads (DALI) or worker processes (torchvision). On the 2-core CPU, 1, 2 and 8 DALI threads beside
        # torch's 2 measured within 6% of each other end to end (4.13-4.36 pairs/s, e2e_bench, 2026-12-03)
        "num_workers": 8,
    },
    "model": {
        "name": "byol",  # one of lcr_fast.methods.NAMES
        # reference names (resnet50_cub200, resnet50_stanfordcars, resnet50_aircrafts) are ResNet-50 without
        # the stem max-pool; torchvision's resnet18, resnet34, resnet50, resnet101, resnet152, wide_resnet50_2 and
        # resnext50_32x4d follow model.maxpool (lcr_fast.models.backbone.BACKBONE_NAMES).
        "backbone": "resnet50_cub200",
        "maxpool": None,  # None: off for the reference's BYOL backbones, on otherwise
        # imagenet (torchvision's V1 weights; torchvision fetches them into torch's hub cache when they are not
        # there) | none | a local weights file: a torchvision or timm state dict, one under state_dict or model
        # (module. prefixes removed), or lcr-export's backbone .pth
        "pretrained": "imagenet",
        "rationale_channels": 32,
        "rationale_weight": 0.01,
        "rationale_temperature": 0.4,  # the KL's t where it has one (BYOL's); the reference's MoCo KL has none
        # then each method's own keys, from its declaration (lcr_fast.methods.<name>.METHOD.keys)
    },
    "train": {
        # lars_simclr | sgd | adamw (ours; betas is read by adamw only, momentum and trust_coef not)
        "optimizer": {"name": "lars_simclr", "weight_decay": 1.5e-6, "momentum": 0.9, "trust_coef": 1e-3,
                      "betas": [0.9, 0.999]},
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
        # epochs between test-split retrieval runs during training (MoCo's reference: 1); 0: at the end only
        "retrieval_interval": 0,
        # warmup_cosine: BYOL's per-iteration warmup + cosine; cosine_epoch: MoCo's per-epoch cosine, no warmup
        "schedule": "warmup_cosine",
        "scale_lr": True,  # lr = base_lr * batch_size / 256 (BYOL's rule); MoCo's reference uses base_lr as it is
    },
    # BYOL's end-of-run linear evaluation (the reference's main.py -> linear_cub_eval.py) and lcr-eval's linear
    # protocols: SGD (the only optimizer the reference's configs name), LR = base_lr * batch_size / 256 with
    # per-iteration warmup and cosine; False skips the linear evaluation and the end-of-run retrieval
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
        # images per class held out of train/ (drawn with `seed`) as a validation split for model selection, never
        # trained on; 0: train on all of train/, as the reference; else at least 2 (retrieval needs a pair per class)
        "val_per_class": 0,
    },
    "engine": {
        # auto (bf16 where the device computes it natively: a GPU from compute capability 8.0, a CPU with AMX or
        # AVX512-BF16; else fp32) | fp32 | bf16 | fp16 (dynamic loss scaling); all autocast with fp32 master weights,
        # BN statistics, EMA target and MoCo queue, and the heads after layer4 in fp32
        "precision": "auto",
        "zero_stage": 0,  # 0 with lars_simclr; 1 or 2 partition optimizer state (and gradients) with sgd / adamw
        "grad_accum_steps": 1,  # micro-batches per optimizer step on each rank; train.batch_size stays the global batch
        "sync_bn": False,  # CUDA only: BatchNorm statistics over all ranks (the reference: per GPU)
        # torch.compile of the ResNet trunks: none | default | reduce-overhead (CUDA graphs) | aot_eager (no codegen).
        # none: compiled trunks measured no faster than eager on the CPU in fp32 (docs/benchmarks.md); GPU unmeasured
        "compile": "none",
        # the convolutions' layout, for the GPU's tensor cores; on the 2-core CPU in fp32 the step measured the same
        # either way (1.03-1.09x the reference channels_last, 1.04x contiguous, step_bench, 2026-12-03)
        "channels_last": True,
        "log_interval": 10,  # optimizer steps between host syncs for logging
        "deterministic": False,
        "dist_timeout_s": 600,
        # stop: a non-finite loss ends the run (the last checkpoint kept); skip: such a step is left out and
        # counted, at the price of one host sync per step
        "on_nonfinite": "stop",
        # false: a component that cannot take its fast path here (a Triton kernel that fails its start-up check,
        # DALI's GPU pipeline, bf16, engine.compile) falls back with one warning; true: that is an error instead
        # (for benchmarks and bug reports). kernels.backend=triton makes a kernel's fallback an error as well.
        "strict": False,
    },
    "kernels": {"backend": "auto"},  # auto | triton | torch; the LCR_KERNELS environment variable wins
    "fixes": {
        # Each switch turns one quirk of the reference into the corrected behaviour.
        "per_sample_minmax": False,  # rationale map normalised per image instead of over the whole batch
        "lars_momentum": False,  # lars_simclr keeps its momentum buffer (the reference never stores it)
        "detach_cam": False,  # the rationale loss does not back-propagate into the backbone through cam
        "warmup_first_step": False,  # the first iteration uses the warmup LR instead of the un-warmed base LR
        "flatten_kl": False,  # MoCo: KL over the flattened h*w map instead of row by row
        # GradCAM scaled to [0, 1] per image before the KL: the reference's raw CAM can lie so far below the KL's
        # temperature that its target is the uniform map (benchmarks/cam_scale.py measures it on a checkpoint)
        "scale_cam": False,
        # BYOL's end-of-run linear evaluation classifies the features of the trained model instead of a fresh one
        # (ImageNet or random backbone, untrained rationale detector: the reference never loads its checkpoint)
        "linear_eval_trained_weights": False,
        # ... and reports the accuracy over all test images instead of the mean of per-batch accuracies
        "linear_eval_weighted_accuracy": False,
    },
}


def _add_method_keys(model: dict) -> None:
    """Every method's ``model.*`` keys with their defaults, after the shared ones: one namespace, so a
    key two methods declare is an error here rather than a silent overwrite."""
    for name in methods.names():
        for key, value in methods.get(name).keys.defaults.items():
            if key in model:
                raise ValueError(f"method {name!r} declares model.{key}, which is already a config key")
            model[key] = value


_add_method_keys(DEFAULTS["model"])

COMPILE_MODES = ("none", "default", "reduce-overhead", "aot_eager")  # engine.compile

# Sections the reference allows to be False instead of a mapping.
_MAY_BE_FALSE = {"eval"}


class ConfigError(UserError, ValueError):
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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python objects), reading ``1e-3`` and ``1e38`` as numbers, as YAML 1.2
    does: YAML 1.1 wants a dot and a signed exponent, so a learning rate written so became a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_override(text: str) -> dict:
    """``train.batch_size=64`` -> {"train": {"batch_size": 64}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.load(raw, Loader=_Loader) if raw != "" else None
    tree: dict = {}
    node = tree
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def packaged_configs() -> dict[str, str]:
    """The configs shipped with the package (``lcr_fast.configs``), name -> path: the reference's
    ``byol_cub200`` and the others, usable by name from an installed package."""
    folder = importlib.resources.files("lcr_fast.configs")
    return {Path(entry.name).stem: str(entry) for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".yaml")}


def resolve_config_path(path: str | os.PathLike) -> str:
    """``path`` itself when it is a file, else a packaged config's name (``byol_cub200`` or
    ``byol_cub200.yaml``)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    shipped = packaged_configs()
    name = Path(path).stem if Path(path).suffix == ".yaml" else Path(path).name
    if os.sep not in path and name in shipped:
        return shipped[name]
    raise ConfigError(f"config file {path!r} does not exist, nor is it a packaged config "
                      f"({', '.join(shipped)}; lcr-train --list-configs)")


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] | dict | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (a file or a packaged config's name; may be None), then
    ``overrides`` (``a.b=v`` strings or a dict)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = resolve_config_path(path)
        with open(path) as f:
            try:
                data = yaml.load(f, Loader=_Loader)
            except yaml.YAMLError as exc:  # includes tags that would construct Python objects
                raise ConfigError(f"config file {path!r} is not plain YAML: {str(exc).splitlines()[0]}") from exc
        if data is None:
            raise ConfigError(f"config file {path!r} is empty: name a config that sets at least the model and data")
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


def _integer(value: Any, key: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key} must be an integer of at least {minimum}, got {value!r}")


def _number(value: Any, key: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """A real number in [low, high] (or (low, high] with ``low_open``)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (low < value if low_open else low <= value) or value > high or math.isnan(value):
        above = f"{'above' if low_open else 'at least'} {low:g}"
        bound = above if high == math.inf else f"{above} and at most {high:g}"
        raise ConfigError(f"{key} must be a number {bound}, got {value!r}")


def _method_keys(kind: str) -> list[str]:
    """Every method's ``model.*`` keys of one kind of check (``integers``, ``flags``, ...; ConfigKeys)."""
    return [key for name in methods.names() for key in getattr(methods.get(name).keys, kind)]


def _validate_choices(cfg: dict) -> None:
    if not isinstance(cfg["name"], str) or not cfg["name"] or "/" in cfg["name"]:
        raise ConfigError(f"name must be a non-empty string without '/' (it names output files), got {cfg['name']!r}")
    _choice(cfg["model"]["name"], "model.name", methods.names())
    _choice(cfg["data"]["backend"], "data.backend", ("dali", "torchvision"))
    _choice(cfg["data"]["recipe"], "data.recipe", (None, "byol", "mocov2"))
    _choice(cfg["engine"]["precision"], "engine.precision", ("auto", "fp32", "bf16", "fp16"))
    _choice(cfg["engine"]["zero_stage"], "engine.zero_stage", (0, 1, 2, 3))
    _choice(cfg["engine"]["on_nonfinite"], "engine.on_nonfinite", ("stop", "skip"))
    _choice(cfg["kernels"]["backend"], "kernels.backend", ("auto", "triton", "torch"))
    _choice(cfg["train"]["optimizer"]["name"], "train.optimizer.name", ("lars_simclr", "sgd", "adamw"))
    _choice(cfg["train"]["schedule"], "train.schedule", ("warmup_cosine", "cosine_epoch"))
    for key in ("engine.sync_bn", "engine.channels_last", "engine.deterministic", "engine.strict", "train.scale_lr",
                "train.knn_monitor", "logger.tensorboard", "logger.matplotlib",
                *(f"model.{key}" for key in _method_keys("flags"))):
        section, name = key.split(".")
        _choice(cfg[section][name], key, (True, False))
    for name, value in cfg["fixes"].items():
        _choice(value, f"fixes.{name}", (True, False))
    _choice(cfg["engine"]["compile"], "engine.compile", COMPILE_MODES)
    _choice(cfg["model"]["maxpool"], "model.maxpool", (None, True, False))
    from lcr_fast.models.backbone import resolve_arch  # the models package reads this module: imported late

    try:
        resolve_arch(cfg["model"]["backbone"], cfg["model"]["maxpool"])
    except ValueError as exc:
        raise ConfigError(f"model.backbone: {exc}") from None
    if not isinstance(cfg["model"]["pretrained"], str):
        raise ConfigError(f"model.pretrained must be imagenet, none or a path, got {cfg['model']['pretrained']!r}")


def _validate_numbers(cfg: dict) -> None:
    model, train, optimizer = cfg["model"], cfg["train"], cfg["train"]["optimizer"]
    for key in ("rationale_channels", *_method_keys("integers")):
        _integer(model[key], f"model.{key}", 1)
    for key in ("batch_size", "stop_at_epoch", "num_epochs", "knn_interval", "knn_k"):
        _integer(train[key], f"train.{key}", 1)
    _integer(train["warmup_epochs"], "train.warmup_epochs", 0)
    _integer(train["retrieval_interval"], "train.retrieval_interval", 0)
    _integer(cfg["dataset"]["image_size"], "dataset.image_size", 32)
    _integer(cfg["dataset"]["num_workers"], "dataset.num_workers", 0)
    _integer(cfg["engine"]["grad_accum_steps"], "engine.grad_accum_steps", 1)
    _integer(cfg["engine"]["log_interval"], "engine.log_interval", 1)
    _integer(cfg["engine"]["dist_timeout_s"], "engine.dist_timeout_s", 1)
    _integer(cfg["data"]["val_per_class"], "data.val_per_class", 0)
    if cfg["data"]["val_per_class"] == 1:
        raise ConfigError("data.val_per_class must be 0 (off) or at least 2: retrieval among the validation images "
                          "finds no image of the query's class when each class holds out one")
    if cfg["data"]["eval_batch_size"] is not None:
        _integer(cfg["data"]["eval_batch_size"], "data.eval_batch_size", 1)
    if cfg["seed"] is not None:
        _integer(cfg["seed"], "seed", 0)
    _number(train["base_lr"], "train.base_lr", 0.0, low_open=True)
    for key in ("warmup_lr", "final_lr"):
        _number(train[key], f"train.{key}", 0.0)
    _number(train["knn_t"], "train.knn_t", 0.0, low_open=True)
    _number(optimizer["weight_decay"], "train.optimizer.weight_decay", 0.0)
    _number(optimizer["momentum"], "train.optimizer.momentum", 0.0, 1.0)
    _number(optimizer["trust_coef"], "train.optimizer.trust_coef", 0.0, low_open=True)
    for key in _method_keys("fractions"):
        _number(model[key], f"model.{key}", 0.0, 1.0)
    for key in ("rationale_temperature", *_method_keys("positives")):
        _number(model[key], f"model.{key}", 0.0, low_open=True)
    _number(model["rationale_weight"], "model.rationale_weight", 0.0)


def _validate_eval(section: dict | bool) -> None:
    if section is False:
        return
    name = section["optimizer"]["name"]
    if name != "sgd":
        raise ConfigError(f"eval.optimizer.name must be sgd, the linear evaluation's only optimizer (as in every "
                          f"reference config), got {name!r}")
    for key in ("batch_size", "num_epochs"):
        _integer(section[key], f"eval.{key}", 1)
    _integer(section["warmup_epochs"], "eval.warmup_epochs", 0)
    if section["warmup_epochs"] > section["num_epochs"]:
        raise ConfigError("eval.warmup_epochs must not exceed eval.num_epochs")
    _number(section["base_lr"], "eval.base_lr", 0.0, low_open=True)
    for key in ("warmup_lr", "final_lr"):
        _number(section[key], f"eval.{key}", 0.0)
    _number(section["optimizer"]["weight_decay"], "eval.optimizer.weight_decay", 0.0)
    _number(section["optimizer"]["momentum"], "eval.optimizer.momentum", 0.0, 1.0)
    _choice(section["retrieval"], "eval.retrieval", (True, False))


def _validate_combinations(cfg: dict) -> None:
    train, engine = cfg["train"], cfg["engine"]
    if train["stop_at_epoch"] > train["num_epochs"]:
        raise ConfigError(f"train.stop_at_epoch ({train['stop_at_epoch']}) must not exceed "
                          f"train.num_epochs ({train['num_epochs']})")
    if train["warmup_epochs"] > train["num_epochs"]:
        raise ConfigError("train.warmup_epochs must not exceed train.num_epochs")
    if train["schedule"] == "cosine_epoch" and train["warmup_epochs"]:
        raise ConfigError(f"train.schedule=cosine_epoch has no warmup (as the reference's MoCo): set "
                          f"train.warmup_epochs to 0, got {train['warmup_epochs']!r}")
    accum = engine["grad_accum_steps"]
    if train["batch_size"] % accum:
        raise ConfigError(f"train.batch_size {train['batch_size']} is not divisible by engine.grad_accum_steps {accum}")
    if accum > 1 and engine["on_nonfinite"] == "skip":
        raise ConfigError("engine.on_nonfinite=skip drops single batches, which would leave an accumulated step half "
                          "computed: use on_nonfinite=stop with engine.grad_accum_steps > 1")
    if engine["zero_stage"] == 3:
        raise ConfigError("engine.zero_stage=3 partitions parameters, which breaks GradCAM's autograd.grad on layer4: "
                          "use zero_stage 0, 1 or 2")
    if engine["zero_stage"] in (1, 2) and train["optimizer"]["name"] == "lars_simclr":
        raise ConfigError(
            f"engine.zero_stage={engine['zero_stage']} hands LARS one flattened partition, so its per-layer trust "
            "ratios would be computed over a whole shard of the model: use zero_stage 0 with lars_simclr, or "
            "train.optimizer.name sgd / adamw"
        )
    error = methods.get(cfg["model"]["name"]).batch_error(cfg["model"], train["batch_size"])
    if error:
        raise ConfigError(error)


def validate(cfg: dict) -> None:
    """Every check that needs the config alone: values that would fail later or silently compute
    something else. Checks that need the device or the number of ranks run where those are known."""
    _validate_choices(cfg)
    _validate_numbers(cfg)
    _validate_eval(cfg["eval"])
    _validate_combinations(cfg)


def recipe_for(cfg: Config) -> str:
    """The augmentation recipe: the configured one, else the method's own (its declaration's ``recipe``)."""
    return cfg.data.recipe or methods.get(cfg.model.name).recipe


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
