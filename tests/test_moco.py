"""MoCo v2 + LCR computes what the reference computes: loss terms, GradCAM, queue, EMA, checkpoints, a step."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lcr_fast import methods
from lcr_fast.compat import export_reference_checkpoint, load_reference_checkpoint, reference_state_dict
from lcr_fast.config import ConfigError, load_config
from lcr_fast.kernels import BACKEND
from lcr_fast.methods.moco import queue_size_error
from lcr_fast.models import build_model
from lcr_fast.models.moco import MoCo
from lcr_fast.optim import CosineEpochSchedule, WarmupCosineSchedule, build_optimizer, build_schedule

from helpers import REPO, assert_outputs_close, engine_order_step, tiny_config
from moco_reference import RefMoCo, reference_file, reference_step

pytestmark = pytest.mark.usefixtures("one_thread")
# The reference's max-branch tensors, which no loss reads (its declared checkpoint layout).
MOCO_UNUSED = methods.get("moco").reference.unused

B, DIM, K, H, W = 4, 16, 24, 48, 80  # ResNet-18 with max-pool: layer4 is 2 x 3, so rows and columns differ


def moco_config(**sections):
    model = {"name": "moco", "backbone": "resnet18", "maxpool": True, "pretrained": "none", "moco_dim": DIM,
             "moco_k": K, "rationale_channels": 8, **sections.pop("model", {})}
    train = {"batch_size": B, "optimizer": {"name": "sgd", "weight_decay": 1e-4, "momentum": 0.9}, "base_lr": 0.03,
             "warmup_epochs": 0, "schedule": "cosine_epoch", "scale_lr": False, **sections.pop("train", {})}
    return tiny_config(model=model, train=train, **sections)


def _views(seed=0, batch=B, size=(H, W)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g), torch.randn(batch, 3, *size, generator=g)


def test_loss_terms_and_gradcam_match_an_independent_computation():
    torch.manual_seed(0)
    model = build_model(moco_config()).train()
    twin = copy.deepcopy(model)
    v1, v2 = _views()
    out = model(v1, v2)

    # forward changes no parameter; its state changes are BN statistics and the enqueue
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert not torch.equal(model.queue, twin.queue) and int(model.queue_ptr) == B
    # The reference runs the rationale detector's BN three times per step (query, key, query).
    assert int(model.rationale.bn.num_batches_tracked) == 3

    # Plain torch on an identical copy: no shuffle (BatchNorm statistics do not depend on the order).
    f = twin.backbone(v1)
    q = F.normalize(twin.projector(f.mean((2, 3))), dim=1)
    with torch.no_grad():
        k = F.normalize(twin.key_projector(twin.key_backbone(v2).mean((2, 3))), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ twin.queue], dim=1) / 0.2
    ce = -torch.log_softmax(logits, dim=1)[:, 0].mean()
    grad = torch.autograd.grad(ce, f, retain_graph=True)[0]
    cam = torch.clamp((f * grad).sum(1), min=0)
    a = torch.clamp(twin.rationale.bn(twin.rationale.conv(f)), min=0).amax(dim=1)
    a = a - a.min()
    att = a / (1e-7 + a.max())
    p, lq = torch.softmax(cam, dim=-1), torch.log_softmax(att, dim=-1)  # rows of w, no temperature
    kl = (torch.where(p > 0, p * (p.log() - lq), torch.zeros_like(p))).sum()

    assert out["gradcam"].shape == (B, 2, 3) and out["attention"].shape == (B, 2, 3)
    torch.testing.assert_close(out["ssl_loss"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["gradcam"], cam, rtol=1e-4, atol=1e-7)
    assert out["gradcam"].abs().sum() > 0
    torch.testing.assert_close(out["attention"], att, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["rationale_loss"], kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"], ce + 0.01 * kl, rtol=1e-5, atol=1e-6)


def _switched(fix: str) -> tuple[MoCo, MoCo]:
    """(the reference-mode model, a copy with ``fixes.<fix>`` on), after checking the config switch sets it."""
    assert getattr(build_model(moco_config(fixes={fix: True}, model={"moco_k": 4})).rationale, fix)
    torch.manual_seed(0)
    faithful = build_model(moco_config()).train()
    fixed = copy.deepcopy(faithful)
    setattr(fixed.rationale, fix, True)
    return faithful, fixed


def test_rationale_loss_reaches_the_backbone_through_cam_unless_detached():
    faithful, fixed = _switched("detach_cam")
    grads = []
    for model in (faithful, fixed):
        torch.manual_seed(0)
        out = model(*_views())
        grads.append(torch.autograd.grad(out["rationale_loss"], model.backbone.layer4[1].conv2.weight)[0])
    assert grads[1].abs().sum() > 0, "attention still reaches the backbone"
    assert not torch.allclose(grads[0], grads[1])


def test_scale_cam_switch_scales_each_cam_before_the_row_wise_kl():
    raw, scaled = _switched("scale_cam")
    torch.manual_seed(0)
    cam = raw(*_views())["gradcam"].detach()
    torch.manual_seed(0)
    out = scaled(*_views())
    low = cam.flatten(1).amin(1)[:, None, None]
    unit = (cam - low) / (cam.flatten(1).amax(1)[:, None, None] - low)
    torch.testing.assert_close(out["gradcam"].detach(), unit, rtol=1e-5, atol=1e-6)
    p, lq = unit.softmax(-1), out["attention"].detach().log_softmax(-1)  # rows of w, no temperature
    torch.testing.assert_close(out["rationale_loss"].detach(), (p * (p.log() - lq)).sum(), rtol=1e-4, atol=1e-6)


def test_queue_holds_the_last_keys_in_order_with_wrap_around():
    torch.manual_seed(0)
    model = build_model(moco_config()).train()
    seen = []
    enqueue = model._enqueue
    model._enqueue = lambda keys: (seen.append(keys.clone()), enqueue(keys))
    steps = 7  # 6 batches fill K = 24, the 7th wraps around
    direct = None
    for step in range(steps):
        v1, v2 = _views(seed=step, size=(32, 32))
        if step == 0:
            with torch.no_grad():
                twin = copy.deepcopy(model)
                direct = F.normalize(twin.key_projector(twin.key_backbone(v2).mean((2, 3))), dim=1)
        model.momentum_update()
        model(v1, v2)
    # the keys are the key encoder's (BN over 4 one-pixel maps amplifies the shuffle's rounding)
    torch.testing.assert_close(seen[0], direct, rtol=1e-3, atol=1e-4)
    ptr = int(model.queue_ptr)
    assert ptr == steps * B % K
    newest_last = torch.roll(model.queue, -ptr, dims=1)
    assert torch.equal(newest_last, torch.cat(seen[-K // B:]).T)
    assert torch.equal(model.queue[:, :B], seen[6].T) and torch.equal(model.queue[:, B:2 * B], seen[1].T)


def test_momentum_update_is_bit_exact():
    torch.manual_seed(0)
    model = build_model(moco_config())
    with torch.no_grad():
        for p in model.query_parameters():
            p.add_(torch.randn_like(p))
    keys = [p.clone() for p in model.key_parameters()]
    buffers = {k: v.clone() for k, v in model.key_backbone.named_buffers()}
    model.momentum_update()
    for key, query, new in zip(keys, model.query_parameters(), model.key_parameters()):
        assert torch.equal(new, key * 0.999 + query * (1.0 - 0.999))  # the reference's expression
    assert all(torch.equal(buffers[k], v) for k, v in model.key_backbone.named_buffers())
    assert all(not p.requires_grad for p in model.key_parameters())


def test_the_queue_takes_whole_global_batches():
    assert queue_size_error(65536, 128) is None and queue_size_error(24, 4) is None
    with pytest.raises(ValueError, match=r"moco_k=65500 .* global batch train.batch_size=128.*65408, 65536"):
        moco_config(model={"moco_k": 65500}, train={"batch_size": 128})
    with pytest.raises(ConfigError, match="Nearby valid sizes: 128, 256"):
        moco_config(model={"moco_k": 100}, train={"batch_size": 128})
    model = build_model(moco_config())
    with pytest.raises(ValueError, match="not a multiple"):
        model._enqueue(torch.zeros(5, DIM))


def test_reference_checkpoint_round_trip_is_bit_exact(tmp_path, capsys):
    torch.manual_seed(3)
    ref = RefMoCo()
    opt = torch.optim.SGD(ref.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(4)
    reference_step(ref, opt, *_views(seed=1))  # queue, pointers, momentum buffers: not the initial ones
    reference_file(tmp_path / "checkpoint_0003.pth.tar", ref, opt)

    model = load_reference_checkpoint(tmp_path / "checkpoint_0003.pth.tar", "moco")  # shapes from the file
    assert "optimizer state" in capsys.readouterr().out
    assert isinstance(model, MoCo) and model.K == K and model.projector[2].out_features == DIM
    export_reference_checkpoint(model, tmp_path / "out.pth.tar", epoch=3)
    again = load_reference_checkpoint(tmp_path / "out.pth.tar", "moco")

    exported = torch.load(tmp_path / "out.pth.tar", weights_only=True)
    assert set(exported) == {"epoch", "arch", "state_dict", "optimizer"}
    assert exported["epoch"] == 3 and exported["arch"] == "resnet18"
    sd = exported["state_dict"]
    assert set(sd) == {"module." + k for k in ref.state_dict()}
    for key, value in ref.state_dict().items():
        assert torch.equal(sd["module." + key], value), key
    fc = sd["module.fc.weight"].data_ptr()
    assert fc == sd["module.qmax.2.weight"].data_ptr() == sd["module.kmax.2.weight"].data_ptr()
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_fresh_model_exports_a_file_the_reference_loads(tmp_path):
    model = build_model(moco_config())
    with torch.no_grad():
        model.queue_ptr.fill_(8)
    export_reference_checkpoint(model, tmp_path / "a.pth.tar")
    export_reference_checkpoint(model, tmp_path / "b.pth.tar")
    a, b = (torch.load(tmp_path / f"{n}.pth.tar", weights_only=True) for n in "ab")
    ref = RefMoCo()
    ref.load_state_dict({k[len("module."):]: v for k, v in a["state_dict"].items()}, strict=True)
    torch.optim.SGD(ref.parameters(), 0.03, momentum=0.9, weight_decay=1e-4).load_state_dict(a["optimizer"])
    assert int(a["state_dict"]["module.queue_ptr_max"]) == 8
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), f"{key} is not deterministic"
    unused = [k for k in a["state_dict"] if any(k[len("module."):].startswith(u) for u in MOCO_UNUSED)]
    assert len(unused) == 18  # queue_max, queue_ptr_max, conv16_2, bn16_2 (5), fc (2), qmax (4), kmax (4)


def test_training_steps_equal_the_reference(tmp_path):
    """Two SGD steps from the same reference checkpoint: losses, maps, queue and every used tensor after each."""
    # Seed 7 failed on the Zen 2 development machine of 2026-12-03 (seeds 1, 2, 3 pass): at step 1 the losses,
    # GradCAM and rationale map agreed, but the gradients did not (parameters apart by 1e-4). Forward outputs equal
    # and gradients not is what a near-tie does in the map's channel max or its min-max, whose backward sends the
    # whole gradient to one element: few-ulp differences between the two implementations then pick another one.
    torch.manual_seed(1)
    ref = RefMoCo()
    reference_file(tmp_path / "ref.pth.tar", ref)
    cfg = moco_config()
    ours = load_reference_checkpoint(tmp_path / "ref.pth.tar", "moco", config=cfg)
    ref_opt = torch.optim.SGD(ref.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    opt = build_optimizer(cfg, ours)
    sched = build_schedule(cfg, steps_per_epoch=5)
    for step in range(2):
        x1, x2 = _views(seed=10 + step)
        torch.manual_seed(100 + step)  # the shuffle's permutation: both draw it from the CPU generator
        expected = reference_step(ref, ref_opt, x1, x2)
        torch.manual_seed(100 + step)
        out = engine_order_step(ours, opt, sched, step, x1, x2)
        assert_outputs_close(out, expected, step, keys=("loss", "ssl_loss", "rationale_loss", "gradcam"))
        # min-max normalisation magnifies the few-ulp differences SGD leaves in conv16/bn16
        torch.testing.assert_close(out["attention"].detach(), expected["attention"], rtol=1e-4, atol=2e-5)
        ours_state = reference_state_dict(ours)
        for key, value in ref.state_dict().items():
            if any(key == u or key.startswith(u) for u in MOCO_UNUSED):
                continue  # the max branch: no loss reads it
            torch.testing.assert_close(ours_state[key], value, rtol=1e-5, atol=1e-6, msg=f"step {step}: {key}")
    assert opt.param_groups[0]["lr"] == 0.03


def test_extract_returns_normalised_gap_and_rationale_features():
    model = build_model(moco_config()).eval()
    x = _views()[0]
    out = model.extract(x)
    for key in ("gap", "rationale"):
        assert out[key].shape == (B, 512)
        torch.testing.assert_close(out[key].norm(dim=1), torch.ones(B))
    feat = model.backbone(x)
    torch.testing.assert_close(out["rationale"], F.normalize((feat * out["attention"][:, None]).mean((2, 3)), dim=1))


def test_cosine_epoch_schedule_and_unscaled_lr():
    cfg = moco_config(model={"moco_k": 256}, train={"num_epochs": 100, "stop_at_epoch": 100, "batch_size": 128})
    sched = build_schedule(cfg, steps_per_epoch=10)
    assert isinstance(sched, CosineEpochSchedule)
    opt = build_optimizer(cfg, torch.nn.Linear(3, 2))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 0.03, "no batch/256 scaling"
    for step, epoch in ((0, 0), (9, 0), (10, 1), (555, 55), (999, 99)):
        lr = 0.03
        lr *= 0.5 * (1.0 + math.cos(math.pi * epoch / 100))  # main_moco.py's adjust_learning_rate
        assert sched.apply(opt, step) == lr and opt.param_groups[0]["lr"] == lr
    assert isinstance(build_schedule(tiny_config(), 10), WarmupCosineSchedule)  # BYOL's default
    with pytest.raises(ConfigError, match="no warmup"):
        moco_config(train={"warmup_epochs": 1})


@pytest.mark.parametrize("name", ["moco_cub200", "moco_stanfordcars", "moco_aircrafts", "moco_demo"])
def test_moco_configs_load_and_have_valid_queues(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.model.name == "moco" and cfg.train.schedule == "cosine_epoch" and cfg.train.scale_lr is False
    assert queue_size_error(cfg.model.moco_k, cfg.train.batch_size) is None
    if name != "moco_demo":
        assert (cfg.model.backbone, cfg.model.maxpool, cfg.model.pretrained) == ("resnet50", True, "imagenet")
        recipe = (cfg.train.base_lr, cfg.train.batch_size, cfg.model.moco_t, cfg.model.moco_dim, cfg.model.moco_k)
        assert recipe == (0.03, 128, 0.2, 256, 65536)
        assert cfg.train.num_epochs == cfg.train.stop_at_epoch == 100 and cfg.data.recipe == "mocov2"


def test_triton_step_equals_torch_step():
    torch.manual_seed(0)
    model = build_model(moco_config()).train()
    twin = copy.deepcopy(model)
    x1, x2 = _views(seed=2, batch=3)
    results = []
    for mode, m in (("torch", model), ("triton", twin)):
        with BACKEND.using(mode):
            torch.manual_seed(1)
            out = m(x1, x2)
            params = [p for p in m.parameters() if p.requires_grad]
            results.append((out, torch.autograd.grad(out["loss"], params)))
    (expected, expected_grads), (got, got_grads) = results
    for key in ("loss", "ssl_loss", "rationale_loss", "gradcam", "attention"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.queue, twin.queue)
