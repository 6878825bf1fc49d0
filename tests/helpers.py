"""Small builders shared by the tests: tiny configs, models and JPEG folders."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from lcr_fast.config import load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**sections):
    """A ResNet-18, 32 px BYOL config with small heads: fast enough for CPU tests."""
    base = {
        "model": {"name": "byol", "backbone": "resnet18", "maxpool": False, "pretrained": "none",
                  "proj_hidden_dim": 64, "proj_dim": 32, "rationale_channels": 8},
        "dataset": {"image_size": 32, "num_workers": 0},
        "train": {"batch_size": 4, "num_epochs": 3, "stop_at_epoch": 2, "warmup_epochs": 1, "base_lr": 0.5, "knn_k": 5},
        "data": {"backend": "torchvision"},
        "engine": {"channels_last": False, "log_interval": 1, "deterministic": True},
        "seed": 0,
    }
    for name, values in sections.items():
        base.setdefault(name, {})
        if isinstance(values, dict):
            base[name].update(values)
        else:
            base[name] = values
    return load_config(None, base)


def write_folder(root: str | os.PathLike, classes: int = 3, per_class: int = 4, size: int = 40, splits=("train", "test"),
                 seed: int = 0) -> Path:
    """``root/<split>/class_<i>/<n>.jpg`` with random-texture images whose mean colour depends on the class."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                base = np.array([(60 * c) % 255, 120, (255 - 50 * c) % 255], dtype=np.float64)
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{n}.jpg", quality=90)
    return root
