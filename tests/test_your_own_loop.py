"""docs/your-own-loop.md: its example runs as printed, and its steps are lcr-fast's BYOL + LCR steps."""
import copy
import re

import pytest
import torch
from torch import nn

from lcr_fast.lcr import RationaleBranch
from lcr_fast.models import build_model

from helpers import REPO, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

PAGE = REPO / "docs" / "your-own-loop.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def example():
    """The namespace of the page's complete example after it has run as a script (its training loop too)."""
    (code,) = [block for block in _python_blocks() if "def train_step" in block]
    torch.manual_seed(0)
    namespace = {"__name__": "__main__"}
    exec(compile(code, str(PAGE), "exec"), namespace)
    return namespace


def _copy_by_order(source: nn.Module, target: nn.Module) -> None:
    """``target`` takes ``source``'s parameters and buffers entry by entry (their names differ, their order
    and shapes do not: a torchvision ResNet's children vs our trunk, Sequential MLP vs our named one)."""
    src, dst = source.state_dict(), target.state_dict()
    assert len(src) == len(dst)
    for (src_key, value), dst_key in zip(src.items(), dst):
        assert value.shape == dst[dst_key].shape, (src_key, dst_key)
    target.load_state_dict(dict(zip(dst, src.values())))


def _ours_like(ns: dict):
    """Our BYOL + LCR model with the example's sizes, weights, buffers and optimizer state."""
    projector = ns["projector"]
    model = build_model(tiny_config(model={"maxpool": True, "proj_hidden_dim": projector[0].out_features,
                                           "proj_dim": projector[3].out_features,
                                           "rationale_channels": ns["lcr"].conv.out_channels})).train()
    for theirs, ours in ((ns["trunk"], model.backbone), (ns["projector"], model.projector),
                         (ns["predictor"], model.predictor), (ns["target_trunk"], model.target_backbone),
                         (ns["target_projector"], model.target_projector), (ns["lcr"], model.rationale)):
        _copy_by_order(theirs, ours)
    assert model.tau == ns["tau"]
    # The example's optimizer holds its parameters in this order: its state (momentum) maps index for index.
    # A copy: load_state_dict keeps the very tensors, and the example's steps update them in place.
    optimizer = torch.optim.SGD([*model.backbone.parameters(), *model.projector.parameters(),
                                 *model.predictor.parameters(), *model.rationale.parameters()], lr=1.0)
    optimizer.load_state_dict(copy.deepcopy(ns["optimizer"].state_dict()))
    return model, optimizer


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Equal up to fp32 rounding on the tensor's own scale: the two sides sum in different orders (our
    pooling and loss kernels, the example's mean and cosine_similarity), and through a ResNet's backward
    that leaves differences of ~1e-6 of the largest entry on entries far smaller than it."""
    scale = float(theirs.abs().max()) if theirs.is_floating_point() else 0.0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale + 1e-7, msg=lambda m: f"{what}: {m}")


def _our_step(model, optimizer, view1, view2) -> dict:
    model.momentum_update()  # the engine's order: the EMA right before the step's forward
    out = model(view1, view2)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    return out


def test_the_example_ran_as_printed_and_trained(example):
    out = example["out"]
    assert set(out) == {"loss", "ssl_loss", "rationale_loss", "gradcam", "attention"}
    assert torch.isfinite(out["loss"]) and float(out["rationale_loss"].detach()) > 0
    assert example["lcr"].bn.num_batches_tracked.item() == example["steps"]
    torch.testing.assert_close(out["loss"], out["ssl_loss"] + 0.01 * out["rationale_loss"])


def test_the_example_step_equals_our_byol_lcr_step(example):
    """One step from the state the example's loop left (its EMA and SGD momentum both matter then): the
    losses, maps, gradients, and every parameter and buffer after it. One step, because a second one
    compares rounding more than code: the stem's max-pool picks among the ReLU's tied zeros, and a
    1e-7 difference after the first step routes conv1's gradient through other pixels."""
    ns = example
    model, optimizer = _ours_like(ns)
    assert optimizer.state_dict()["state"], "the example's loop left SGD momentum to carry over"
    assert not torch.equal(ns["target_trunk"][0].weight, ns["trunk"][0].weight), "an EMA target behind the online"
    size = ns["image_size"]
    view1, view2 = torch.randn(2, 4, 3, size, size, generator=torch.Generator().manual_seed(1))
    theirs = ns["train_step"](view1, view2)
    ours = _our_step(model, optimizer, view1, view2)
    for key in ("loss", "ssl_loss", "rationale_loss", "gradcam", "attention"):
        _assert_close(ours[key].detach(), theirs[key].detach(), key)
    pairs = {"backbone": (ns["trunk"], model.backbone), "projector": (ns["projector"], model.projector),
             "predictor": (ns["predictor"], model.predictor), "rationale": (ns["lcr"], model.rationale)}
    for name, (theirs_module, ours_module) in pairs.items():
        for a, b in zip(theirs_module.parameters(), ours_module.parameters()):
            _assert_close(b.grad, a.grad, f"{name} gradient")
    pairs |= {"target_backbone": (ns["target_trunk"], model.target_backbone),
              "target_projector": (ns["target_projector"], model.target_projector)}
    for name, (theirs_module, ours_module) in pairs.items():
        for a, b in zip(theirs_module.state_dict().values(), ours_module.state_dict().values()):
            _assert_close(b, a, f"{name} parameters and buffers")


def test_the_branch_defaults_are_the_reference_byol_ones():
    branch = RationaleBranch(16)
    assert (branch.temperature, branch.weight, branch.conv.out_channels) == (0.4, 0.01, 32)
    assert branch.flatten_kl and not (branch.per_sample_minmax or branch.detach_cam or branch.scale_cam)
    assert sorted(branch.state_dict()) == ["bn.bias", "bn.num_batches_tracked", "bn.running_mean",
                                           "bn.running_var", "bn.weight", "conv.weight"]
