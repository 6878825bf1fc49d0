"""Evaluation computes in the run's precision and layout, whatever layout the evaluated model's weights have."""
import copy

import pytest
import torch

from lcr_fast.eval.numerics import EvalNumerics
from lcr_fast.models import build_model

from helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    """(a loaded checkpoint's model: contiguous weights, the trainer's: the same weights channels_last), eval mode."""
    torch.manual_seed(0)
    loaded = build_model(tiny_config()).eval()
    return loaded, copy.deepcopy(loaded).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_loaded_checkpoint_extracts_the_trainers_features_bit_for_bit(models, precision):
    loaded, trainers = models
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    numerics = EvalNumerics(precision, channels_last=True)
    with torch.no_grad():
        ours, theirs = numerics.extract(loaded, images), numerics.extract(trainers, images)
    for key in ("gap", "rationale"):
        assert torch.equal(ours[key], theirs[key]), key


def test_the_layout_changes_bf16_features_so_it_is_part_of_the_numerics(models):
    loaded, _ = models
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        contiguous = EvalNumerics("bf16", channels_last=False).extract(loaded, images)["gap"].float()
        channels_last = EvalNumerics("bf16", channels_last=True).extract(loaded, images)["gap"].float()
    assert not torch.equal(contiguous, channels_last)
    assert torch.allclose(contiguous, channels_last, rtol=0.05, atol=0.05 * channels_last.abs().max().item())


def test_of_run_takes_the_runs_precision_and_layout():
    cfg = tiny_config(engine={"precision": "fp32", "channels_last": False})
    assert EvalNumerics.of_run(cfg, "cpu") == EvalNumerics("fp32", channels_last=False)
    assert EvalNumerics.of_run(tiny_config(), "cpu", precision="bf16") == EvalNumerics("bf16", channels_last=True)
