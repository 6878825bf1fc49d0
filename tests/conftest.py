"""Test-wide settings: Triton runs interpreted on CPU tensors, and nothing may reach the network."""
import os

# Must be set before triton is first imported: @triton.jit reads it when a kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCH_HOME", os.path.join(os.path.dirname(__file__), ".torch_home_unused"))
