"""Every engine combination docs/distributed.md advertises takes an optimizer step with the shipped settings:
ZeRO 0/1/2 x channels_last on/off x fp32/bf16, BYOL and MoCo, through the trainer's own
``build_engine`` and ``train_step`` (the DeepSpeed engine included).

The configs are the shipped demo configs (BYOL's AdamW, MoCo's SGD: both optimizers ZeRO 1/2 accept).
Overridden, and why: batch 4 at 32 px (a 2-core CPU), the engine options under test, and MoCo's queue
to a multiple of that batch.
"""
import pytest
import torch

from lcr_fast import engine as eng
from lcr_fast.config import load_config
from lcr_fast.loop import StepParts, train_step
from lcr_fast.optim import build_schedule
from lcr_fast.train import build_engine

from helpers import REPO

CONFIGS = {"byol": REPO / "configs" / "demo.yaml", "moco": REPO / "configs" / "moco_demo.yaml"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def info():
    return eng.init_distributed(60)


def _config(method: str, zero: int, channels_last: bool, precision: str):
    overrides = {"train": {"batch_size": 4}, "dataset": {"image_size": 32},
                 "engine": {"zero_stage": zero, "channels_last": channels_last, "precision": precision}}
    if method == "moco":
        overrides["model"] = {"moco_k": 16}
    return load_config(CONFIGS[method], overrides)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("zero", [0, 1, 2])
@pytest.mark.parametrize("method", ["byol", "moco"])
def test_every_advertised_combination_takes_a_step(info, method, zero, channels_last, precision):
    cfg = _config(method, zero, channels_last, precision)
    torch.manual_seed(0)
    model, engine, optimizer, _ = build_engine(cfg, info, precision)
    parts = StepParts(engine=engine, model=model, optimizer=optimizer, schedule=build_schedule(cfg, 10), pieces=1,
                      channels_last=channels_last)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    g = torch.Generator().manual_seed(1)
    views = [(torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g))]

    result = train_step(parts, views, 0)

    assert result.taken and torch.isfinite(result.terms).all() and result.terms[0] != 0
    moved = sum(not torch.equal(b, p) for b, p in zip(before, model.backbone.parameters()))
    assert moved == len(before), f"{len(before) - moved} backbone tensors did not move"
    conv = model.backbone.conv1.weight
    # ZeRO 1/2 keep weights contiguous views of their flat buffer; stage 0 stores them channels_last.
    stored_channels_last = channels_last and zero == 0
    assert conv.is_contiguous(memory_format=torch.channels_last) == stored_channels_last
    assert conv.is_contiguous() == (not stored_channels_last)
    if channels_last:
        with torch.no_grad():
            feat = model.backbone(views[0][0].contiguous(memory_format=torch.channels_last))
        assert feat.is_contiguous(memory_format=torch.channels_last), "activations run channels_last"
