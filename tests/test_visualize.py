"""Heatmap grids: pixel size, non-constant maps, the caller's model left untouched, the command line."""
import numpy as np
import pytest
import torch
from PIL import Image

from lcr_fast import visualize
from lcr_fast.checkpoint import save_training_checkpoint
from lcr_fast.data import scan_split
from lcr_fast.data.torch_loader import TorchEvalLoader
from lcr_fast.models import build_model

from helpers import tiny_config, write_folder

SIZE = 48  # layer4 is 3x3 (no stem max-pool): enough for a map with structure


pytestmark = pytest.mark.usefixtures("one_thread")


def _model_and_images(tmp_path, n=3):
    torch.manual_seed(0)
    cfg = tiny_config(dataset={"image_size": SIZE})
    model = build_model(cfg)
    model.train()
    with torch.no_grad():  # BN statistics other than the initial ones
        model.backbone(torch.randn(4, 3, SIZE, SIZE))
    write_folder(tmp_path / "data", classes=3, per_class=2, size=56)
    index = scan_split(tmp_path / "data", "test")
    images, _ = next(iter(TorchEvalLoader(index, batch_size=n, image_size=SIZE, device="cpu", num_workers=0)))
    return cfg, model, images


def test_grid_size_panels_and_model_untouched(tmp_path):
    _, model, images = _model_and_images(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    path = visualize.write_heatmaps(model, images, str(tmp_path / "grid.png"), panel_px=64)
    assert path == str(tmp_path / "grid.png")
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape == (visualize.HEADER_PX + 3 * 64, 4 * 64, 3)  # 3 rows x 4 panels
    for row in range(3):
        top = visualize.HEADER_PX + row * 64
        rationale = picture[top + 4 : top + 60, 2 * 64 + 4 : 3 * 64 - 4].astype(float)
        assert rationale.std() > 1.0, f"row {row}: the rationale panel is constant"
    assert model.training, "the caller's mode is kept"
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_maps_are_the_eval_mode_gradcam_and_rationale(tmp_path):
    _, model, images = _model_and_images(tmp_path, n=4)
    cam, attention = visualize.rationale_maps(model, images)
    assert cam.shape == attention.shape == (4, SIZE // 16, SIZE // 16)
    assert (cam >= 0).all() and cam.sum() > 0
    # The rationale map is the one the evaluation features are pooled with.
    assert torch.allclose(attention, model.eval().extract(images)["attention"], atol=1e-6)
    panels = visualize.heatmap_panels(images, cam, attention)
    assert panels["gradcam"].shape == (4, SIZE, SIZE) and panels["overlay"].shape == (4, SIZE, SIZE, 3)
    assert panels["rationale"].min() == 0.0 and panels["rationale"].max() == 1.0


def test_command_line(tmp_path, capsys):
    cfg, model, _ = _model_and_images(tmp_path)
    ckpt = tmp_path / "last.pt"
    save_training_checkpoint(ckpt, model, torch.optim.SGD(model.parameters(), 0.1), 1, 1, cfg.to_dict())
    out = tmp_path / "figures" / "heatmaps.png"
    rc = visualize.main(["--ckpt", str(ckpt), "--data_dir", str(tmp_path / "data"), "--out", str(out), "--n", "5",
                         "--panel_px", "32"])
    assert rc == 0 and "heatmaps written to" in capsys.readouterr().out
    assert Image.open(out).size == (4 * 32, visualize.HEADER_PX + 5 * 32)
    rc = visualize.main(["--ckpt", str(ckpt), "--method", "moco", "--data_dir", str(tmp_path / "data"),
                         "--out", str(out)])
    assert rc == 2 and capsys.readouterr().err.startswith("error: ")
