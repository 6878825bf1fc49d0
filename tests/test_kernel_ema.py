"""ema_update is bit-identical to the reference's tau * t + (1 - tau) * s."""
import pytest
import torch

from lcr_fast.kernels import ema_update

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.996, 0.999])
def test_bit_identical_to_reference(dtype, tau):
    gen = torch.Generator().manual_seed(0)
    shapes = [(37,), (3, 5), (8, 3, 3, 3), ()]
    targets = [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes]
    sources = [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes]
    expected = [tau * t + (1 - tau) * s for t, s in zip(targets, sources)]
    before = [t.data_ptr() for t in targets]
    ema_update(targets, sources, tau)
    assert [t.data_ptr() for t in targets] == before  # in place
    for t, e in zip(targets, expected):
        assert torch.equal(t, e)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 targets but 1 sources"):
        ema_update([torch.ones(2), torch.ones(2)], [torch.ones(2)], 0.9)
