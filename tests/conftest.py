"""Test-wide settings shared by every test module."""
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be chosen
# before triton is first imported, because @triton.jit reads it when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and does not wait on a second core that others keep busy.
    Modules of such tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_kernels(monkeypatch):
    """Dispatch every kernel call to Triton (on CPU tensors: its interpreter) rather than to torch."""
    monkeypatch.setenv("LCR_KERNELS", "triton")
