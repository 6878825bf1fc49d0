"""Test-wide settings shared by every test module."""
import os
import shutil
import sys

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be chosen
# before triton is first imported, because @triton.jit reads it when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch builds DeepSpeed's CPU communication op (at every process group's start) with the first `ninja` on PATH.
# The venv has one (deepspeed requires it) and a machine may have another version, whose build logs differ: each
# then rebuilds, 30 s, what the other built. The tests' processes find the venv's first, as the deepspeed
# launcher's ranks and a user with the venv activated do.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

from helpers import uninterrupted_losses  # noqa: E402 (our package, imported once the choice above is made)


def pytest_report_header(config) -> str:
    """The CPU and whether it computes bf16 natively: engine.precision auto trains and evaluates in bf16 where it
    does, fp32 elsewhere, so a failure report must say which kind of machine it came from."""
    from lcr_fast.engine import cpu_bf16_instructions
    from lcr_fast.run_info import cpu_model

    found = cpu_bf16_instructions()
    native = f"yes ({found}): precision auto is bf16" if found else "no (emulated): precision auto is fp32"
    return f"CPU: {cpu_model()}; native bf16: {native}"


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and does not wait on a second core that others keep busy.
    Modules of such tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """A test that compiles starts and ends with dynamo's caches empty: every model a test compiles adds
    entries for ResNetTrunk.forward's code, and past dynamo's recompile limit it runs that code eagerly
    without asking the backend, so a later test's failing backend was never called (seen in the suite
    after test_compiled_copies and test_engine_scale had compiled their models in the same process)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def triton_kernels():
    """Dispatch every kernel call to Triton (on CPU tensors: its interpreter) rather than to torch."""
    from lcr_fast.kernels import BACKEND

    with BACKEND.using("triton"):
        yield


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``(data, cfg_path, losses)`` of :func:`helpers.uninterrupted_losses`, run once for all of a module's stop and
    resume tests: each stops and resumes its own run in its own folder, so they can share the reference."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cfg_path, losses = uninterrupted_losses(root)
    yield root / "data", cfg_path, losses
    shutil.rmtree(root, ignore_errors=True)  # two epochs of checkpoints
