"""benchmarks/cam_scale.py: the KL target it reports is the model's own, and it leaves the model as it was."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import REPO, tiny_config, write_folder
from lcr_fast.checkpoint import save_training_checkpoint
from lcr_fast.config import load_config
from lcr_fast.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

_spec = importlib.util.spec_from_file_location("cam_scale", REPO / "benchmarks" / "cam_scale.py")
cam_scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cam_scale)


def _model(**sections):
    torch.manual_seed(0)
    return build_model(load_config(None, tiny_config(**sections)))


def test_byol_target_is_the_softmax_of_its_cam_over_the_flattened_map():
    model = _model()
    torch.manual_seed(1)
    view1, view2 = torch.randn(6, 3, 64, 64), torch.randn(6, 3, 64, 64)
    stats = cam_scale.kl_target_stats(model, view1, view2)

    out = model.train()(view1, view2)
    cam = out["gradcam"].detach()
    target = (cam.flatten(1) / 0.4).softmax(-1).amax(1)
    assert stats["uniform"] == pytest.approx(1 / 16)  # 64 px without the stem max-pool: a 4x4 layer4
    assert stats["target_max"] == pytest.approx(target.median().item(), rel=1e-5)
    assert stats["cam_peak"] == pytest.approx(cam.flatten(1).amax(1).median().item(), rel=1e-5, abs=1e-12)
    assert stats["cam_peak_largest"] == pytest.approx(cam.max().item(), rel=1e-5)
    spread = out["attention"].flatten(1).amax(1) - out["attention"].flatten(1).amin(1)
    assert stats["attention_spread"] == pytest.approx(spread.median().item(), rel=1e-5)
    assert stats["target_max"] >= stats["uniform"]


def test_probe_changes_no_parameter_or_statistic_and_restores_the_rng():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    cam_scale.kl_target_stats(model, torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    torch.manual_seed(3)
    assert torch.equal(torch.rand(1), expected)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_moco_target_is_row_by_row_without_temperature():
    model = _model(model={"name": "moco", "moco_k": 8, "moco_dim": 16})
    torch.manual_seed(2)
    view1, view2 = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    stats = cam_scale.kl_target_stats(model, view1, view2)
    assert stats["uniform"] == pytest.approx(1 / 4)  # a row of the 4x4 map


def test_cli_reads_a_checkpoint_and_a_folder(tmp_path, capsys):
    data = write_folder(tmp_path / "data", classes=2, per_class=4, size=40)
    config = load_config(None, tiny_config())
    ckpt = tmp_path / "last.pt"
    save_training_checkpoint(ckpt, _model(), None, 1, 2, config.to_dict())
    cam_scale.main(["--ckpt", str(ckpt), "--data_dir", str(data), "--n", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{ckpt}: 4 training images, medians per image"
    assert "(uniform: 0.2500000)" in lines[2]  # 32 px: a 2x2 map
    probability = float(lines[2].split()[4])
    assert 0.25 <= probability <= 1.0
