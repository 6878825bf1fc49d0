"""benchmarks/bn_baseline.py: it rebuilds the trainer's untrained network; its BatchNorm pass moves only statistics."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

from helpers import REPO, config_file, run_train, tiny_config, write_folder
from lcr_fast.config import load_config
from lcr_fast.data import build_eval_loader
from lcr_fast.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

_spec = importlib.util.spec_from_file_location("bn_baseline", REPO / "benchmarks" / "bn_baseline.py")
bn_baseline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bn_baseline)


def test_calibration_sets_the_data_statistics_and_changes_no_parameter(tmp_path):
    data = write_folder(tmp_path / "data", classes=2, per_class=5, size=40)
    torch.manual_seed(0)
    model = build_model(load_config(None, tiny_config()))
    parameters = {name: p.clone() for name, p in model.named_parameters()}
    loader = build_eval_loader(data, "train", 4, 32, "torchvision", "cpu", 0)  # 10 images: batches of 4, 4, 2

    bn_baseline.calibrate_batchnorm(model, loader)

    images = torch.cat([batch for batch, _ in loader])
    stem = model.backbone.conv1(images)  # what the first BatchNorm normalises
    batch_means = torch.stack([stem[i:i + 4].mean(dim=(0, 2, 3)) for i in (0, 4, 8)])
    # A cumulative average weighs each batch alike (the last one has two images, not four).
    assert torch.allclose(model.backbone.bn1.running_mean, batch_means.mean(0), atol=1e-5)
    assert not torch.allclose(model.backbone.bn1.running_var, torch.ones_like(model.backbone.bn1.running_var))
    for name, p in model.named_parameters():
        assert torch.equal(p, parameters[name]), name
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.momentum == 0.1 for m in norms) and not model.training


@pytest.mark.slow
def test_untrained_figure_is_the_one_the_trainer_prints(tmp_path):
    data = write_folder(tmp_path / "data", classes=3, per_class=6, size=40)
    cfg_path = config_file(tmp_path, train={"stop_at_epoch": 1, "num_epochs": 1, "warmup_epochs": 0}, seed=3)
    proc = run_train(tmp_path, "run", cfg_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trainer = json.loads((tmp_path / "run" / "results.json").read_text())["untrained"]["knn_top1"]

    row = bn_baseline.seed_row(str(cfg_path), str(data), 3)
    assert row["untrained"] == pytest.approx(trainer)
    assert 0.0 <= row["bn_calibrated"] <= 100.0
