"""SimSiam + LCR computes what its formulas say: the architecture, several training steps against a plain
re-implementation (tests/simsiam_reference.py), its configs and what the method declares."""
import pytest
import torch
from torch import nn

from lcr_fast import methods
from lcr_fast.compat import export_reference_checkpoint, has_reference_layout
from lcr_fast.config import ConfigError, load_config, recipe_for
from lcr_fast.models import build_model
from lcr_fast.models.simsiam import SimSiam
from lcr_fast.optim import CosineEpochSchedule, build_optimizer, build_schedule

from helpers import REPO, assert_outputs_close, engine_order_step, tiny_config
from simsiam_reference import RefSimSiam, adjust_learning_rate, reference_name, sgd, train_step

pytestmark = pytest.mark.usefixtures("one_thread")

B, DIM, PRED, H, W = 4, 32, 8, 64, 96  # ResNet-18 with the stem max-pool: layer4 is 2 x 3
STEPS_PER_EPOCH, EPOCHS = 2, 4


def simsiam_config(**sections):
    model = {"name": "simsiam", "backbone": "resnet18", "maxpool": True, "pretrained": "none", "simsiam_dim": DIM,
             "simsiam_pred_dim": PRED, "rationale_channels": 8, **sections.pop("model", {})}
    train = {"batch_size": B, "optimizer": {"name": "sgd", "weight_decay": 1e-4, "momentum": 0.9}, "base_lr": 4.0,
             "warmup_epochs": 0, "schedule": "cosine_epoch", "scale_lr": True, "num_epochs": EPOCHS,
             "stop_at_epoch": EPOCHS, **sections.pop("train", {})}
    return tiny_config(model=model, train=train, **sections)


def _views(seed, batch=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, H, W, generator=g), torch.randn(batch, 3, H, W, generator=g)


def test_architecture_is_builders():
    model = build_model(simsiam_config())
    assert isinstance(model, SimSiam)
    kinds = [type(m) for m in model.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert model.projector[0].bias is None and model.projector[3].bias is None
    assert model.projector[6].weight.shape == (DIM, 512) and not model.projector[6].bias.requires_grad
    assert not model.projector[7].affine and model.projector[7].weight is None
    assert [type(m) for m in model.predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert model.predictor[0].weight.shape == (PRED, DIM) and model.predictor[0].bias is None
    assert model.predictor[3].weight.shape == (DIM, PRED)
    # zero_init_residual: every block's last BatchNorm starts at 0; the stem's does not
    assert all(torch.all(block.bn2.weight == 0) for layer in (model.backbone.layer1, model.backbone.layer4)
               for block in layer)
    assert torch.all(model.backbone.bn1.weight == 1)
    assert model.rationale.temperature == 0.4 and model.rationale.flatten_kl and model.rationale_weight == 0.01
    before = [p.clone() for p in model.parameters()]
    model.momentum_update()  # no momentum encoder
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert isinstance(model.backbone.maxpool, nn.MaxPool2d)
    assert isinstance(build_model(simsiam_config(model={"maxpool": False})).backbone.maxpool, nn.Identity)


def test_training_steps_equal_a_plain_reimplementation():
    """Four SGD steps over two epochs from the same weights: losses, maps, every parameter and statistic, and
    the learning rates (the encoder's on the per-epoch cosine, the predictor's fixed at the initial rate)."""
    torch.manual_seed(0)
    cfg = simsiam_config()
    ours = build_model(cfg).train()
    ref = RefSimSiam("resnet18", DIM, PRED, channels=8).train()
    ref.load_state_dict({reference_name(k): v for k, v in ours.state_dict().items()}, strict=True)
    init_lr = cfg.train.base_lr * B / 256
    ref_opt = sgd(ref, init_lr)
    opt, sched = build_optimizer(cfg, ours), build_schedule(cfg, STEPS_PER_EPOCH)
    assert isinstance(sched, CosineEpochSchedule) and [g["name"] for g in opt.param_groups] == ["base", "predictor"]
    lrs = []
    for step in range(2 * STEPS_PER_EPOCH):
        x1, x2 = _views(seed=20 + step)
        adjust_learning_rate(ref_opt, init_lr, step // STEPS_PER_EPOCH, EPOCHS)
        expected = train_step(ref, ref_opt, x1, x2)
        out = engine_order_step(ours, opt, sched, step, x1, x2)
        lrs.append([g["lr"] for g in opt.param_groups])
        assert lrs[-1] == [g["lr"] for g in ref_opt.param_groups]
        assert_outputs_close(out, expected, step)
        theirs = ref.state_dict()
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, theirs[reference_name(key)], rtol=1e-5, atol=1e-6,
                                       msg=f"step {step}: {key}")
    assert lrs[0] == lrs[1] == [init_lr, init_lr]
    assert lrs[2][0] < init_lr and lrs[2][1] == init_lr  # epoch 1: the encoder decays, the predictor does not
    assert out["gradcam"].abs().sum() > 0 and out["rationale_loss"] > 0


def test_ssl_loss_stops_the_gradient_at_z():
    torch.manual_seed(0)
    model = build_model(simsiam_config()).train()
    x1, x2 = _views(seed=1)
    out = model(x1, x2)
    (g,) = torch.autograd.grad(out["ssl_loss"], model.projector[6].weight)
    feat1, feat2 = model.backbone(x1), model.backbone(x2)
    z1, z2 = (model.projector(f.mean((2, 3))) for f in (feat1, feat2))
    p1, p2 = model.predictor(z1), model.predictor(z2)
    cos = nn.functional.cosine_similarity
    loss = -(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) / 2
    torch.testing.assert_close(out["ssl_loss"], loss, rtol=1e-5, atol=1e-6)
    # through p only: the gradient z would add is absent
    (expected,) = torch.autograd.grad(loss, model.projector[6].weight, retain_graph=True)
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-7)
    with_z = -(cos(p1, z2).mean() + cos(p2, z1).mean()) / 2
    (other,) = torch.autograd.grad(with_z, model.projector[6].weight)
    assert not torch.allclose(g, other, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["simsiam_cub200", "simsiam_stanfordcars", "simsiam_aircrafts", "simsiam_demo"])
def test_simsiam_configs_load_with_simsiams_recipe(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.model.name == "simsiam" and recipe_for(cfg) == "mocov2" and cfg.train.schedule == "cosine_epoch"
    assert cfg.train.optimizer.name == "sgd" and cfg.train.scale_lr and cfg.train.warmup_epochs == 0
    assert (cfg.train.optimizer.momentum, cfg.train.optimizer.weight_decay) == (0.9, 1e-4)
    if name != "simsiam_demo":
        assert (cfg.model.backbone, cfg.model.maxpool, cfg.model.pretrained) == ("resnet50", True, "imagenet")
        assert (cfg.model.simsiam_dim, cfg.model.simsiam_pred_dim, cfg.train.base_lr) == (2048, 512, 0.05)
        assert (cfg.model.rationale_temperature, cfg.model.rationale_weight) == (0.4, 0.01)


def test_what_the_method_declares():
    method = methods.get("simsiam")
    cfg = simsiam_config()
    assert method.recipe == "mocov2" and recipe_for(cfg) == "mocov2"
    assert method.linear_protocol == "cached" and "no linear evaluation" in method.final_linear_eval
    assert "simsiam" not in methods.with_reference_layout()
    model = build_model(cfg)
    assert methods.of_model(model) is method and not has_reference_layout(model)
    with pytest.raises(ValueError, match="no reference checkpoints"):
        export_reference_checkpoint(model, "unused.pth")
    # the predictor alone in the fixed-rate group; the frozen projector bias in none
    opt = build_optimizer(cfg, model)
    grouped = {id(p): g["name"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = None if not p.requires_grad else "predictor" if name.startswith("predictor.") else "base"
        assert grouped.get(id(p)) == expected, name


def test_its_config_keys_are_checked():
    with pytest.raises(ConfigError, match="model.simsiam_dim must be an integer of at least 1"):
        load_config(None, {"model": {"name": "simsiam", "simsiam_dim": 0}})
    with pytest.raises(ConfigError, match="unknown config key 'model.simsiam_pred'.*'model.simsiam_pred_dim'"):
        load_config(None, {"model": {"simsiam_pred": 4}})
