"""Branches that only CUDA takes, reached on a CPU by answering torch.cuda's queries: the device a task
binds under per-task GPU binding, CUDA RNG states restored with fewer visible GPUs, and ``--device cuda:N``
made the current device (Triton launches on the current device, not on its tensors')."""
import os
import types

import pytest
import torch

from lcr_fast import checkpoint
from lcr_fast import engine as eng
from lcr_fast.errors import UserError
from lcr_fast.launch import Launch
from lcr_fast.loading import resolve_device

BOUND = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_LOCAL_RANK")


def _visible_gpus(monkeypatch, count: int) -> list:
    """CUDA available with ``count`` visible devices; returns the list torch.cuda.set_device appends to."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device("cuda", device)
                                                                               if isinstance(device, int) else device))
    return current


@pytest.fixture
def joined(monkeypatch):
    """init_distributed with DeepSpeed's join replaced by a record of what it was handed."""
    import deepspeed

    for name in BOUND:
        monkeypatch.delenv(name, raising=False)  # restored after the test: init_distributed exports them
    handed = {}

    def fake_init(dist_backend, **_):
        handed.update(backend=dist_backend, LOCAL_RANK=os.environ["LOCAL_RANK"],
                      OMPI_COMM_WORLD_LOCAL_RANK=os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK"))

    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    monkeypatch.setattr(eng, "_wait_for_master", lambda launch, timeout_s: None)
    monkeypatch.setattr(eng, "dist", types.SimpleNamespace(is_initialized=lambda: False, get_rank=lambda: 3,
                                                           get_world_size=lambda: 4))
    return handed


@pytest.mark.parametrize("launcher", ["slurm", "openmpi"])
def test_a_task_that_sees_only_its_own_gpu_hands_deepspeed_device_0(monkeypatch, joined, launcher):
    # srun --gpus-per-task=1 (or a scheduler's CUDA_VISIBLE_DEVICES per task): local rank 3, one GPU visible.
    current = _visible_gpus(monkeypatch, 1)
    if launcher == "openmpi":
        monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    info = eng.init_distributed(60, launch=Launch(launcher, 3, 4, 3, 0, 1, "127.0.0.1", 29500))
    assert current == [torch.device("cuda", 0)]
    assert info.device == torch.device("cuda", 0) and info.local_rank == 3
    # DeepSpeed binds cuda:LOCAL_RANK (init_process_group's device_id, the engine's set_device), and its
    # engine asserts that OpenMPI's local rank equals LOCAL_RANK.
    assert joined == {"backend": "nccl", "LOCAL_RANK": "0",
                      "OMPI_COMM_WORLD_LOCAL_RANK": "0" if launcher == "openmpi" else None}


def test_a_task_that_sees_every_gpu_binds_its_local_rank(monkeypatch, joined):
    current = _visible_gpus(monkeypatch, 4)
    eng.init_distributed(60, launch=Launch("slurm", 3, 4, 3, 0, 1, "127.0.0.1", 29500))
    assert current == [torch.device("cuda", 3)] and joined["LOCAL_RANK"] == "3"


def test_a_cpu_run_exports_the_launchers_local_rank(monkeypatch, joined):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = eng.init_distributed(60, launch=Launch("slurm", 3, 4, 3, 0, 1, "127.0.0.1", 29500))
    assert info.device == torch.device("cpu") and joined["LOCAL_RANK"] == "3" and joined["backend"] == "gloo"


@pytest.mark.parametrize("saved, visible", [(8, 1), (8, 2), (2, 4)])
def test_cuda_rng_states_restore_on_as_many_gpus_as_both_runs_have(monkeypatch, saved, visible):
    _visible_gpus(monkeypatch, visible)
    restored = {}

    def set_rng_state(state, device="cuda"):
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= visible:  # what torch.cuda.default_generators[index] raises
            raise IndexError("tuple index out of range")
        restored[index] = state

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.full((16,), i, dtype=torch.uint8)
                                                                  for i in range(saved)])
    cpu_rng = torch.get_rng_state()
    state = checkpoint.rng_state()
    assert len(state["cuda"]) == saved
    checkpoint.set_rng_state(state)
    assert sorted(restored) == list(range(min(saved, visible)))
    assert all(torch.equal(s, torch.full((16,), i, dtype=torch.uint8)) for i, s in restored.items())
    assert torch.equal(torch.get_rng_state(), cpu_rng)


def test_the_device_asked_for_becomes_the_current_device(monkeypatch):
    current = _visible_gpus(monkeypatch, 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]
    assert resolve_device("cuda") == torch.device("cuda")  # the current device, whichever it is
    assert current == [torch.device("cuda", 1)]
    with pytest.raises(UserError, match=r"--device cuda:2 asked for, but 2 GPU\(s\) are visible"):
        resolve_device("cuda:2")

