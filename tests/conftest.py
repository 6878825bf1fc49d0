"""Test-wide settings shared by every test module."""
import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be chosen
# before triton is first imported, because @triton.jit reads it when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
