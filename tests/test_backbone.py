"""Backbones: the stem max-pool switch, ResNet widths, and initialisation from a local torchvision file."""
import pytest
import torch
from torchvision import models as tvm

from lcr_fast.models.backbone import PretrainedWeightsError, build_backbone, resolve_arch

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
