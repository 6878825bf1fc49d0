"""What only a real GPU can show (skipped elsewhere; the gpu_paths stage of benchmarks/gpu_check.sh runs it):
no synchronising CUDA call in the training step (torch's sync debug mode raises on each: a blocking copy,
a read of a device value, a device or stream synchronisation), DeepSpeed binding the GPU of a task whose
launcher's local rank is beyond the visible GPUs, CUDA RNG states of more GPUs than there are, and the
device asked for by ``--device`` made current. tests/test_gpu_paths.py reaches the same branches on a CPU."""
import os

import pytest
import torch

from lcr_fast.errors import UserError
from lcr_fast.launch import Launch
from lcr_fast.loading import resolve_device

from helpers import free_port, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

BOUND = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
STEPS = 4
METHODS = {
    "byol": {},
    "moco": {"name": "moco", "maxpool": True, "moco_dim": 16, "moco_k": 16},  # its key shuffle copies a permutation
}


@pytest.fixture(scope="module")
def info():
    """A group of one whose launcher says local rank 3 x the visible GPUs: as under srun --gpus-per-task,
    device 0 of those this process sees (DeepSpeed sets cuda:LOCAL_RANK as it initialises)."""
    pytest.importorskip("deepspeed")
    from lcr_fast import engine as eng

    saved = {name: os.environ.get(name) for name in BOUND}
    local_rank = 3 * torch.cuda.device_count()
    yield eng.init_distributed(60, launch=Launch("slurm", 0, 1, local_rank, 0, 1, "127.0.0.1", free_port()))
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_steps_make_no_synchronising_cuda_call(info, method):
    from lcr_fast import engine as eng
    from lcr_fast.loop import StepParts, train_step
    from lcr_fast.optim import build_schedule
    from lcr_fast.train import build_engine

    assert info.device == torch.device("cuda", 0)
    cfg = tiny_config(model=METHODS[method], engine={"channels_last": True})
    precision = eng.resolve_precision("auto", info.device)
    model, engine, optimizer, _ = build_engine(cfg, info, precision)
    assert torch.cuda.current_device() == 0 and next(model.parameters()).device == info.device
    parts = StepParts(engine=engine, model=model, optimizer=optimizer, schedule=build_schedule(cfg, STEPS), pieces=1,
                      channels_last=True)
    g = torch.Generator(device=info.device).manual_seed(0)
    batches = [[(torch.randn(4, 3, 32, 32, device=info.device, generator=g),
                 torch.randn(4, 3, 32, 32, device=info.device, generator=g))] for _ in range(STEPS)]
    train_step(parts, batches[0], 0)  # the first step initialises libraries (cuBLAS, cuDNN, Triton's cache)
    torch.cuda.synchronize()
    for step in range(1, STEPS):
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = train_step(parts, batches[step], step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(result.terms).all()


def test_rng_states_of_more_gpus_than_visible_restore_those_there_are():
    from lcr_fast.checkpoint import rng_state, set_rng_state

    state = rng_state()
    saved = torch.cuda.get_rng_state_all()
    state["cuda"] = saved + [saved[0]] * 8  # as written by a rank that saw eight more GPUs
    torch.cuda.manual_seed_all(12345)
    set_rng_state(state)
    assert all(torch.equal(torch.cuda.get_rng_state(i), s) for i, s in enumerate(saved))


def test_the_device_asked_for_becomes_current_and_one_beyond_the_visible_is_refused():
    current, last = torch.cuda.current_device(), torch.cuda.device_count() - 1
    try:
        assert resolve_device(f"cuda:{last}") == torch.device("cuda", last)
        assert torch.cuda.current_device() == last
    finally:
        torch.cuda.set_device(current)
    with pytest.raises(UserError, match="GPU\\(s\\) are visible"):
        resolve_device(f"cuda:{last + 1}")


def test_heatmaps_on_the_gpu_leave_the_model_and_the_cuda_rng_untouched():
    from lcr_fast import visualize
    from lcr_fast.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config(dataset={"image_size": 48})).cuda().train()
    before = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.cuda.get_rng_state()
    cam, attention = visualize.rationale_maps(model, torch.randn(3, 3, 48, 48))
    assert cam.shape == attention.shape == (3, 3, 3) and cam.is_cuda
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers())
