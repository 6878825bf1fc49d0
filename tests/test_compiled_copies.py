"""engine.compile and copies of the model: a deep copy of a compiled model runs its own trunks, so the
heatmap code's eval-mode probe copy leaves the trained model's BatchNorm statistics where they were.
``aot_eager`` traces as inductor does, without generating code: seconds on a CPU."""
import copy

import pytest
import torch

from lcr_fast import visualize
from lcr_fast.models import build_model, compile_backbones
from lcr_fast.models.backbone import ResNetTrunk

from helpers import tiny_config

SIZE = 48

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread", "fresh_dynamo")]  # compiling takes seconds


def _compiled_model():
    torch.manual_seed(0)
    model = build_model(tiny_config(dataset={"image_size": SIZE}))
    compile_backbones(model, "aot_eager")
    model.train()
    with torch.no_grad():  # BN statistics other than the initial ones, through the compiled trunk
        model.backbone(torch.randn(4, 3, SIZE, SIZE))
    return model


def test_end_of_run_pictures_leave_a_compiled_models_batchnorm_untouched(tmp_path):
    model = _compiled_model()
    before = {name: b.clone() for name, b in model.named_buffers()}
    images = torch.randn(3, 3, SIZE, SIZE)
    # As train.finish: the maps on every rank, then the picture on rank 0.
    cam, attention = visualize.rationale_maps(model, images)
    visualize.write_heatmaps(model, images, str(tmp_path / "heatmaps.png"), maps=(cam, attention), panel_px=32)
    moved = [name for name, b in model.named_buffers() if not torch.equal(b, before[name])]
    assert not moved, f"{len(moved)} of {len(before)} buffers moved, e.g. {moved[:3]}"
    # The maps are the eval-mode ones: the same as an eager eval-mode model's.
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if isinstance(module, ResNetTrunk):
            module.__dict__.pop("forward")
    eager_cam, eager_attention = visualize.rationale_maps(eager, images)
    torch.testing.assert_close(cam, eager_cam, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(attention, eager_attention, rtol=1e-4, atol=1e-6)


def test_a_deepcopy_of_a_compiled_model_runs_its_own_weights():
    model = _compiled_model().eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.backbone.parameters():
            p.mul_(0.5)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        mine, theirs = model.backbone(x), twin.backbone(x)
        eager = type(twin.backbone).forward(twin.backbone, x)
    torch.testing.assert_close(theirs, eager, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(mine, theirs), "the copy ran the original's weights"
    # Training the copy moves the copy's BatchNorm statistics, not the original's.
    before = {name: b.clone() for name, b in model.backbone.named_buffers()}
    twin.train()
    with torch.no_grad():
        twin.backbone(x)
    assert all(torch.equal(b, before[name]) for name, b in model.backbone.named_buffers())
    assert any(not torch.equal(b, before[name]) for name, b in twin.backbone.named_buffers())
