"""The method registry: what each method declares, config keys assembled from the declarations, and
checkpoints written before the registry existed (their saved config lacks the later methods' keys)."""
import subprocess
import sys

import pytest
import torch

from lcr_fast import methods
from lcr_fast.checkpoint import load_training_checkpoint, save_training_checkpoint
from lcr_fast.config import DEFAULTS, ConfigError, load_config
from lcr_fast.data.transforms import RECIPES
from lcr_fast.eval.cli import LINEAR_PROTOCOLS
from lcr_fast.loading import load_model
from lcr_fast.models import build_model
from lcr_fast.models.lcr import LCRModel
from lcr_fast.optim import build_optimizer

from helpers import REPO, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", methods.names())
def test_each_method_declares_what_the_rest_asks(name):
    method = methods.get(name)
    assert method.name == name and issubclass(method.model_class(), LCRModel)
    assert method.recipe in RECIPES and method.linear_protocol in LINEAR_PROTOCOLS
    assert all(DEFAULTS["model"][key] == value for key, value in method.keys.defaults.items())
    model = build_model(tiny_config(model={"name": name}, train={"batch_size": 8}))
    assert methods.of_model(model) is method
    out = model.train()(*torch.randn(2, 4, 3, 32, 32))
    assert set(out) == {"loss", "ssl_loss", "rationale_loss", "gradcam", "attention"}
    features = model.eval().extract(torch.randn(4, 3, 32, 32))
    assert features["gap"].shape == features["rationale"].shape == (4, model.backbone.output_dim)


def test_unknown_method_and_method_keys_are_checked_by_the_config():
    with pytest.raises(ConfigError, match=r"model.name must be one of \(" + ", ".join(map(repr, methods.names()))):
        load_config(None, {"model": {"name": "simclr"}})
    with pytest.raises(ConfigError, match="model.moco_dim must be an integer of at least 1"):
        load_config(None, {"model": {"moco_dim": 0}})
    with pytest.raises(ConfigError, match="model.moco_mlp must be one of"):
        load_config(None, {"model": {"moco_mlp": "yes"}})
    with pytest.raises(ConfigError, match="unknown config key 'model.moco_km'.*'model.moco_m'"):
        load_config(None, {"model": {"moco_km": 4}})
    with pytest.raises(ConfigError, match="model.moco_k=10 is not a multiple"):
        load_config(None, {"model": {"name": "moco", "moco_k": 10}, "train": {"batch_size": 4}})
    assert load_config(None, {"model": {"name": "byol", "moco_k": 10}, "train": {"batch_size": 4}}).model.moco_k == 10


def test_the_registry_and_the_config_import_without_torch():
    code = "import sys, lcr_fast.config, lcr_fast.methods; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


# The model section of a checkpoint's config as the code before the registry wrote it: BYOL's and MoCo's keys
# only, none of a method added since.
BEFORE_THE_REGISTRY = {
    "name": "moco", "backbone": "resnet18", "maxpool": False, "pretrained": "none", "proj_hidden_dim": 64,
    "proj_dim": 32, "ema_tau": 0.996, "rationale_channels": 8, "rationale_weight": 0.01, "rationale_temperature": 0.4,
    "moco_dim": 16, "moco_k": 16, "moco_m": 0.999, "moco_t": 0.2, "moco_mlp": True,
}


def test_a_checkpoint_written_before_the_registry_loads_and_continues(tmp_path):
    cfg = tiny_config(model=BEFORE_THE_REGISTRY, train={"optimizer": {"name": "sgd"}})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    model(*torch.randn(2, 4, 3, 32, 32))["loss"].backward()
    optimizer.step()  # momentum buffers, which a resumed optimizer must give back to the same parameters
    saved = cfg.to_dict()
    saved["model"] = dict(BEFORE_THE_REGISTRY)
    save_training_checkpoint(tmp_path / "last.pt", model, optimizer, 1, 1, saved)

    loaded, loaded_cfg = load_model(tmp_path / "last.pt")
    lacking = set(DEFAULTS["model"]) - set(BEFORE_THE_REGISTRY)
    assert all(getattr(loaded_cfg.model, key) == DEFAULTS["model"][key] for key in lacking), "lacking keys: defaults"
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    resumed = build_optimizer(loaded_cfg, loaded)
    resumed.load_state_dict(load_training_checkpoint(tmp_path / "last.pt")["optimizer"])
    before = dict(zip((id(p) for p in model.parameters()), model.named_parameters()))
    names = {id(p): n for n, p in loaded.named_parameters()}
    for group, old_group in zip(resumed.param_groups, optimizer.param_groups):
        for p, old in zip(group["params"], old_group["params"]):
            assert names[id(p)] == before[id(old)][0]
            torch.testing.assert_close(resumed.state[p]["momentum_buffer"], optimizer.state[old]["momentum_buffer"])
