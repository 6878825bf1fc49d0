"""Backbones: torchvision's ResNet family by name, the stem max-pool switch, and initialisation from a local file."""
import pytest
import torch
from torchvision import models as tvm

from lcr_fast.config import ConfigError, load_config
from lcr_fast.models import build_model
from lcr_fast.models.backbone import (
    BACKBONE_NAMES, PretrainedWeightsError, UnknownBackboneError, build_backbone, infer_arch, resolve_arch)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reference_names_are_resnet50_without_maxpool():
    assert resolve_arch("resnet50_cub200", None) == ("resnet50", False)
    assert resolve_arch("resnet50_aircrafts", None) == ("resnet50", False)
    assert resolve_arch("resnet50", None) == ("resnet50", True)
    assert resolve_arch("resnet18", False) == ("resnet18", False)
    with pytest.raises(ValueError, match="unknown backbone 'resnet51'"):
        resolve_arch("resnet51", None)


def test_maxpool_halves_layer4():
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert build_backbone("resnet18", maxpool=True).eval()(x).shape == (1, 512, 2, 2)
        assert build_backbone("resnet18", maxpool=False).eval()(x).shape == (1, 512, 4, 4)


def test_local_torchvision_file_initialises_every_weight(tmp_path):
    torch.manual_seed(3)
    source = tvm.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    trunk = build_backbone("resnet18", maxpool=True, pretrained=str(tmp_path / "resnet18.pth"))
    for name, value in trunk.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name


def test_bad_pretrained_files_are_named(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_backbone("resnet18", pretrained=str(tmp_path / "missing.pth"))
    torch.save(tvm.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(PretrainedWeightsError, match="do not fit resnet50"):
        build_backbone("resnet50", pretrained=str(tmp_path / "r18.pth"))


# torchvision's ResNet family: name -> layer4 channels
FAMILY = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
          "wide_resnet50_2": 2048, "resnext50_32x4d": 2048}


@pytest.mark.parametrize("name", FAMILY)
def test_each_name_builds_with_its_width_and_stride(name):
    # On the meta device: the real constructors and forward, shapes without arithmetic (ResNet-152 costs seconds).
    with torch.device("meta"):
        x = torch.empty(1, 3, 64, 64)
        with_pool, without = build_backbone(name), build_backbone(name, maxpool=False)
        assert with_pool.output_dim == FAMILY[name] and with_pool(x).shape == (1, FAMILY[name], 2, 2)  # /32
        assert without(x).shape == (1, FAMILY[name], 4, 4)  # /16
        net = getattr(tvm, name)()
    assert set(with_pool.state_dict()) == set(net.state_dict()) - {"fc.weight", "fc.bias"}
    assert infer_arch(with_pool.state_dict()) == name


def test_the_maxpool_switch_in_the_config_and_the_reference_names():
    def pooled(model: dict) -> bool:
        cfg = load_config(None, {"model": {"pretrained": "none", "proj_hidden_dim": 32, "proj_dim": 16, **model}})
        with torch.device("meta"):
            return not isinstance(build_model(cfg).backbone.maxpool, torch.nn.Identity)

    assert pooled({"backbone": "resnet34"}) and not pooled({"backbone": "resnet34", "maxpool": False})
    assert not pooled({"backbone": "resnet50_cub200"}) and pooled({"backbone": "resnet50_cub200", "maxpool": True})
    assert [resolve_arch(n, None) for n in ("resnet50_stanfordcars", "wide_resnet50_2", "resnext50_32x4d")] == [
        ("resnet50", False), ("wide_resnet50_2", True), ("resnext50_32x4d", True)]


def test_weights_files_of_training_scripts_round_trip(tmp_path):
    torch.manual_seed(4)
    source = tvm.resnet34(weights=None)
    # torchvision's and timm's training scripts wrap the state dict, DistributedDataParallel prefixes "module."
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}, "epoch": 9}, tmp_path / "r34.pth")
    trunk = build_backbone("resnet34", maxpool=False, pretrained=str(tmp_path / "r34.pth"))
    for name, value in trunk.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name
    torch.save({"state_dict": trunk.state_dict()}, tmp_path / "again.pth")
    again = build_backbone("resnet34", pretrained=str(tmp_path / "again.pth"))
    for (k1, v1), (k2, v2) in zip(trunk.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_a_file_of_another_arch_names_what_it_holds(tmp_path):
    torch.save(tvm.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(PretrainedWeightsError, match=r"do not fit resnet34 \(the file holds a resnet18\)"):
        build_backbone("resnet34", pretrained=str(tmp_path / "r18.pth"))
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(PretrainedWeightsError, match="is not a torch weights file"):
        build_backbone("resnet18", pretrained=str(tmp_path / "notes.pth"))


def test_unknown_name_lists_the_names():
    with pytest.raises(UnknownBackboneError) as failure:
        resolve_arch("resnet200", None)
    for name in BACKBONE_NAMES:
        assert name in str(failure.value)
    with pytest.raises(ConfigError, match="model.backbone: unknown backbone 'wide_resnet101'.*wide_resnet50_2"):
        load_config(None, {"model": {"backbone": "wide_resnet101"}})


@pytest.mark.parametrize("arch", ["resnet34", "resnext50_32x4d"])
def test_reference_files_of_other_resnets_get_their_arch(arch):
    from lcr_fast import methods

    with torch.device("meta"):
        trunk = getattr(tvm, arch)().state_dict()
    width = trunk["fc.weight"].shape[1]
    heads = {"conv16.weight": torch.empty(8, width, 1, 1), "queue": torch.empty(16, 64),
             "projector.layer1.0.weight": torch.empty(64, width), "projector.layer2.weight": torch.empty(16, 64),
             "encoder_q.fc.0.weight": torch.empty(width, width), "encoder_q.fc.2.weight": torch.empty(16, width)}
    for method, prefix in (("moco", "encoder_q."), ("byol", "backbone.")):
        state = {**{prefix + k: v for k, v in trunk.items() if not k.startswith("fc.")}, **heads}
        config = methods.get(method).reference.config_for(state, lambda key: state[key].shape)
        assert config["model"]["backbone"] == arch, method
