"""BYOL + LCR computes what the reference computes: formulas, one training step, and its checkpoints."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lcr_fast import engine as eng
from lcr_fast.compat import load_reference_checkpoint, reference_state_dict
from lcr_fast.kernels.batch_norm_act import fused_applies
from lcr_fast.loop import StepParts, train_step
from lcr_fast.models import build_model
from lcr_fast.lcr import per_image_unit
from lcr_fast.optim import WarmupCosineSchedule, build_optimizer
from lcr_fast.reference import ReferenceBYOL, ReferenceLARS, ReferenceResNet, ReferenceSchedule, reference_train_step
from lcr_fast.train import build_engine

from helpers import assert_outputs_close, engine_order_step, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _views(batch=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


def test_each_loss_term_matches_an_independent_computation():
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    twin = copy.deepcopy(model)
    v1, v2 = _views()
    out = model(v1, v2)

    # Independent plain-torch evaluation of the paper's formulas on an identical copy.
    f1, f2 = twin.backbone(v1), twin.backbone(v2)
    p1 = twin.predictor(twin.projector(f1.mean((2, 3))))
    p2 = twin.predictor(twin.projector(f2.mean((2, 3))))
    with torch.no_grad():
        z1 = twin.target_projector(twin.target_backbone(v1).mean((2, 3)))
        z2 = twin.target_projector(twin.target_backbone(v2).mean((2, 3)))

    def neg_cos(p, z):
        return -(p / p.norm(dim=1, keepdim=True) * (z / z.norm(dim=1, keepdim=True))).sum(1).mean()

    ssl = neg_cos(p1, z2) / 2 + neg_cos(p2, z1) / 2
    grad = torch.autograd.grad(ssl, f1, retain_graph=True)[0]
    cam = torch.clamp((f1 * grad).sum(1), min=0)
    y = twin.rationale.bn(twin.rationale.conv(f1))
    a = torch.clamp(y, min=0).max(dim=1).values
    a = a - a.min()
    att = a / (1e-7 + a.max())
    p = torch.softmax(cam.flatten(1) / 0.4, dim=1)
    q = torch.softmax(att.flatten(1) / 0.4, dim=1)
    kl = (p * (p.log() - q.log())).sum()

    torch.testing.assert_close(out["ssl_loss"], ssl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["gradcam"], cam, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["attention"], att, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["rationale_loss"], kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], ssl + 0.01 * kl, rtol=1e-5, atol=1e-6)
    assert out["gradcam"].shape == (4, 2, 2) and out["attention"].shape == (4, 2, 2)
    att = out["attention"].detach()
    assert float(att.max()) == pytest.approx(1.0, abs=1e-6) and float(att.min()) == 0.0


def test_forward_changes_no_parameter():
    model = build_model(tiny_config()).train()
    before = {k: v.clone() for k, v in model.named_parameters()}
    model(*_views())
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())


def _reference_pair(tmp_path, fixes=None):
    torch.manual_seed(1)
    ref = ReferenceBYOL(ReferenceResNet("resnet18", maxpool=False), hidden=64, proj=32, channels=8)
    path = tmp_path / "ref.pth"
    torch.save({"epoch": 3, "state_dict": ref.state_dict()}, path)
    cfg = tiny_config(fixes=fixes or {})
    ours = load_reference_checkpoint(path, "byol", config=cfg)
    return ref, ours, cfg


def test_training_steps_equal_the_reference(tmp_path):
    """Two LARS steps from the same reference checkpoint: losses, maps and every tensor after each step."""
    ref, ours, cfg = _reference_pair(tmp_path)
    steps_per_epoch = 5
    ref_opt = ReferenceLARS(ref, lr=cfg.train.base_lr * cfg.train.batch_size / 256)
    ref_sched = ReferenceSchedule(ref_opt, cfg.train.warmup_epochs, 0.0, cfg.train.num_epochs,
                                  cfg.train.base_lr * cfg.train.batch_size / 256, 0.0, steps_per_epoch)
    opt = build_optimizer(cfg, ours)
    sched = WarmupCosineSchedule(cfg, steps_per_epoch)
    for step in range(2):
        x1, x2 = _views(seed=10 + step)
        expected = reference_train_step(ref, ref_opt, ref_sched, x1, x2)
        out = engine_order_step(ours, opt, sched, step, x1, x2)
        assert_outputs_close(out, expected, step)
        ours_state = reference_state_dict(ours)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(ours_state[key], value, rtol=1e-5, atol=1e-6, msg=f"step {step}: {key}")
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_sched.lr_schedule[0])


def test_the_trainers_steps_equal_the_reference(tmp_path):
    """Two steps of what ``deepspeed lcr_fast/train.py`` runs (``build_engine``: DeepSpeed and the default
    channels_last, so the fused CPU BatchNorm; ``train_step``) against the reference's, same tolerances. fp32
    pinned: the comparison is with the reference's fp32 arithmetic, whatever ``auto`` picks on this CPU."""
    ref, ours, cfg = _reference_pair(tmp_path)
    model, engine, optimizer, _ = build_engine(cfg, eng.init_distributed(60), "fp32")
    model.load_state_dict(ours.state_dict())
    steps_per_epoch = 5
    ref_opt = ReferenceLARS(ref, lr=cfg.train.base_lr * cfg.train.batch_size / 256)
    ref_sched = ReferenceSchedule(ref_opt, cfg.train.warmup_epochs, 0.0, cfg.train.num_epochs,
                                  cfg.train.base_lr * cfg.train.batch_size / 256, 0.0, steps_per_epoch)
    parts = StepParts(engine=engine, model=model, optimizer=optimizer,
                      schedule=WarmupCosineSchedule(cfg, steps_per_epoch), pieces=1,
                      channels_last=cfg.engine.channels_last)
    assert cfg.engine.channels_last and fused_applies(
        torch.zeros(2, 8, 2, 2).contiguous(memory_format=torch.channels_last), model.backbone.bn1, None)
    for step in range(2):
        x1, x2 = _views(seed=10 + step)
        expected = reference_train_step(ref, ref_opt, ref_sched, x1, x2)
        terms = train_step(parts, [(x1, x2)], step).terms
        torch.testing.assert_close(terms, torch.stack([expected["ssl_loss"], expected["rationale_loss"]]),
                                   rtol=1e-5, atol=1e-6, msg=f"step {step}: loss terms")
        ours_state = reference_state_dict(model)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(ours_state[key], value, rtol=1e-5, atol=1e-6, msg=f"step {step}: {key}")


def test_detach_cam_switch_stops_the_rationale_gradient_into_the_backbone(tmp_path):
    _, faithful, _ = _reference_pair(tmp_path)
    _, fixed, _ = _reference_pair(tmp_path, fixes={"detach_cam": True})
    x1, x2 = _views()
    grads = []
    for model in (faithful, fixed):
        out = model(x1, x2)
        (g,) = torch.autograd.grad(out["rationale_loss"], model.backbone.layer4[1].conv2.weight)
        grads.append(g)
    assert grads[1].abs().sum() > 0, "attention still reaches the backbone"
    assert not torch.allclose(grads[0], grads[1])


def test_scale_cam_switch_fits_the_rationale_map_to_each_cam_scaled_to_unit_range():
    torch.manual_seed(0)
    raw = build_model(tiny_config()).train()
    scaled = copy.deepcopy(raw)
    scaled.rationale.scale_cam = True  # what fixes.scale_cam sets
    assert build_model(tiny_config(fixes={"scale_cam": True})).rationale.scale_cam
    x1, x2 = _views(size=64)  # a 4x4 map: room for a shape
    out_raw, out = raw(x1, x2), scaled(x1, x2)

    cam = out_raw["gradcam"].detach()
    low = cam.flatten(1).amin(1)[:, None, None]
    unit = (cam - low) / (cam.flatten(1).amax(1)[:, None, None] - low)
    torch.testing.assert_close(out["gradcam"].detach(), unit, rtol=1e-5, atol=1e-6)
    att = out["attention"].detach()
    p, lq = (unit.flatten(1) / 0.4).softmax(-1), (att.flatten(1) / 0.4).log_softmax(-1)
    torch.testing.assert_close(out["rationale_loss"].detach(), (p * (p.log() - lq)).sum(), rtol=1e-4, atol=1e-6)
    # The raw CAM of a random network already lies far below t = 0.4: its target is almost the uniform map.
    assert out_raw["rationale_loss"] < 0.5 * out["rationale_loss"]
    (g,) = torch.autograd.grad(out["rationale_loss"], scaled.backbone.layer4[1].conv2.weight)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_per_image_unit_of_a_constant_map_is_zero_with_a_finite_gradient():
    cam = torch.zeros(2, 3, 3, requires_grad=True)
    scaled = per_image_unit(cam)
    assert torch.equal(scaled, torch.zeros(2, 3, 3))
    (g,) = torch.autograd.grad(scaled.sum(), cam)
    assert torch.isfinite(g).all()


def test_per_sample_minmax_switch_normalises_each_image():
    model = build_model(tiny_config(fixes={"per_sample_minmax": True})).train()
    att = model(*_views())["attention"]
    assert torch.allclose(att.flatten(1).amax(1), torch.ones(4), atol=1e-5)
    assert torch.all(att.flatten(1).amin(1) == 0)


def test_extract_returns_normalised_gap_and_rationale_features():
    model = build_model(tiny_config()).eval()
    out = model.extract(_views()[0])
    for key in ("gap", "rationale"):
        assert out[key].shape == (4, 512)
        torch.testing.assert_close(out[key].norm(dim=1), torch.ones(4))
    feat = model.backbone(_views()[0])
    pooled = F.normalize((feat * out["attention"][:, None]).mean((2, 3)), dim=1)
    torch.testing.assert_close(out["rationale"], pooled)


def test_resnet50_without_maxpool_gives_layer4_at_one_sixteenth():
    cfg = tiny_config(model={"backbone": "resnet50_cub200", "maxpool": None})
    model = build_model(cfg).eval()
    with torch.no_grad():
        feat = model.backbone(torch.randn(1, 3, 112, 112))
    assert feat.shape == (1, 2048, 7, 7)
    assert model.rationale.conv.in_channels == 2048
