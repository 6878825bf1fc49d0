"""lcr-export: the backbone for torchvision (ours and the reference's checkpoints), features of a folder to a file."""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torchvision import models as tvm

from lcr_fast import export
from lcr_fast.checkpoint import save_training_checkpoint
from lcr_fast.compat import export_reference_checkpoint
from lcr_fast.data.transforms import eval_transform
from lcr_fast.feature_export import read_features
from lcr_fast.loading import load_model
from lcr_fast.models import build_model
from lcr_fast.models.backbone import build_backbone
from PIL import Image

from helpers import tiny_config, write_folder
from moco_reference import RefMoCo, reference_file

pytestmark = pytest.mark.usefixtures("one_thread")

SIMSIAM = {"name": "simsiam", "simsiam_dim": 32, "simsiam_pred_dim": 16}


def _our_checkpoint(path, **model):
    """A trained-looking tiny checkpoint: random weights, BN statistics moved by one train-mode forward."""
    torch.manual_seed(0)
    cfg = tiny_config(model=model)
    net = build_model(cfg).train()
    with torch.no_grad():
        net.backbone(torch.randn(4, 3, 32, 32))
    save_training_checkpoint(path, net, None, 2, 5, cfg.to_dict())
    return path


def _run(capsys, *argv):
    rc = export.cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _torchvision_layer4(net: tvm.ResNet, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _load_torchvision(weights, card: dict) -> tvm.ResNet:
    net = getattr(tvm, card["arch"])()
    missing, unexpected = net.load_state_dict(torch.load(weights, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    if not card["stem_maxpool"]:
        net.maxpool = nn.Identity()
    return net.eval()


@pytest.mark.parametrize("method", [{}, SIMSIAM], ids=["byol", "simsiam"])
def test_our_backbone_without_maxpool_loads_into_torchvision(tmp_path, capsys, method):
    ckpt = _our_checkpoint(tmp_path / "last.pt", **method)
    rc, out, _ = _run(capsys, "backbone", "--ckpt", ckpt, "--out", tmp_path / "out" / "r18.pth")
    assert rc == 0 and "r18.json" in out
    card = json.loads((tmp_path / "out" / "r18.json").read_text())
    assert (card["arch"], card["stem_maxpool"], card["output_dim"], card["layer4_stride"]) == \
        ("resnet18", False, 512, 16)
    assert card["source"]["layout"] == "lcr-fast" and card["source"]["epoch"] == 2
    assert card["source"]["method"] == (method.get("name") or "byol")
    ours, _ = load_model(ckpt)
    net = _load_torchvision(tmp_path / "out" / "r18.pth", card)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        expected = ours.eval().backbone(x)
        got = _torchvision_layer4(net, x)
    assert got.shape == (3, 512, 3, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_cards_usage_lines_run_as_printed(tmp_path, capsys, monkeypatch):
    ckpt = _our_checkpoint(tmp_path / "last.pt")
    _run(capsys, "backbone", "--ckpt", ckpt, "--out", tmp_path / "byol.pth")
    card = json.loads((tmp_path / "byol.json").read_text())
    assert any("model.maxpool = torch.nn.Identity()" in line for line in card["usage"])
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec("\n".join(card["usage"]), scope)
    ours, _ = load_model(ckpt)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        pooled = ours.eval().backbone(x).mean(dim=(2, 3))
        torch.testing.assert_close(scope["model"].eval()(x), pooled, rtol=1e-5, atol=1e-6)


def test_a_reference_byol_file_exports_the_backbone_ours_does(tmp_path, capsys):
    ckpt = _our_checkpoint(tmp_path / "last.pt")
    model, cfg = load_model(ckpt)
    export_reference_checkpoint(model, tmp_path / "byol_ref.pth", epoch=4)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg.to_dict()))  # what the file cannot tell: no max-pool
    assert _run(capsys, "backbone", "--ckpt", ckpt, "--out", tmp_path / "ours.pth")[0] == 0
    rc, _, err = _run(capsys, "backbone", "--ckpt", tmp_path / "byol_ref.pth", "--method", "byol", "--config",
                      tmp_path / "tiny.yaml", "--out", tmp_path / "ref.pth")
    assert rc == 0, err
    ours, ref = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("ours", "ref"))
    assert ref["source"]["layout"] == "reference" and ref["source"]["epoch"] == 4
    assert {k: ref[k] for k in ("arch", "stem_maxpool", "layer4_stride")} == \
        {k: ours[k] for k in ("arch", "stem_maxpool", "layer4_stride")} == \
        {"arch": "resnet18", "stem_maxpool": False, "layer4_stride": 16}
    a, b = (torch.load(tmp_path / f"{name}.pth", weights_only=True) for name in ("ours", "ref"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reference_moco_backbone_with_maxpool_loads_into_torchvision(tmp_path, capsys):
    torch.manual_seed(1)
    ref = RefMoCo("resnet18")
    ref.encoder_q.train()(torch.randn(4, 3, 32, 32))  # BN statistics other than the initial ones
    reference_file(tmp_path / "checkpoint_0003.pth.tar", ref, epoch=3)
    rc, _, _ = _run(capsys, "backbone", "--ckpt", tmp_path / "checkpoint_0003.pth.tar", "--method", "moco",
                    "--out", tmp_path / "moco.pt")
    assert rc == 0
    card = json.loads((tmp_path / "moco.json").read_text())
    assert (card["arch"], card["stem_maxpool"], card["layer4_stride"]) == ("resnet18", True, 32)
    assert card["source"]["layout"] == "reference" and card["source"]["epoch"] == 3
    assert not any("Identity()  # trained without" in line for line in card["usage"])
    net = _load_torchvision(tmp_path / "moco.pt", card)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = _torchvision_layer4(ref.encoder_q.eval(), x)
        torch.testing.assert_close(_torchvision_layer4(net, x), expected, rtol=0, atol=0)
    # The exported file is also a model.pretrained file for the next run.
    trunk = build_backbone("resnet18", maxpool=True, pretrained=str(tmp_path / "moco.pt"))
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, ref.encoder_q.state_dict()[key]), key


def _expected_features(model, paths, batch_size: int) -> dict:
    transform = eval_transform(32)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    out = {"gap": [], "rationale": []}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            feats = model.eval().extract(images[start:start + batch_size])
            for key in out:
                out[key].append(feats[key])
    return {key: torch.cat(value) for key, value in out.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    write_folder(root / "data", classes=3, per_class=3, size=40, splits=("test",))
    flat = root / "flat"
    flat.mkdir()
    for image in sorted((root / "data" / "test").rglob("*.jpg")):
        shutil.copy(image, flat / f"{image.parent.name}_{image.name}")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_features_of_an_image_folder(tmp_path, capsys, data):
    ckpt = _our_checkpoint(tmp_path / "last.pt")
    rc, out, _ = _run(capsys, "features", "--ckpt", ckpt, "--images", data / "data" / "test", "--out",
                      tmp_path / "f.npz", "--batch_size", 4, "--num_workers", 0, "--device", "cpu", "--hide_progress")
    assert rc == 0 and "9 images, 3 classes" in out
    record = read_features(tmp_path / "f.npz")
    assert list(record["classes"]) == ["class_0", "class_1", "class_2"]
    assert list(record["paths"]) == [f"class_{c}/{n}.jpg" for c in range(3) for n in range(3)]
    assert record["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and record["labels"].dtype == np.int64
    assert record["gap"].shape == record["rationale"].shape == (9, 512) and record["gap"].dtype == np.float32
    assert record["meta"]["batch_size"] == 4 and record["meta"]["image_size"] == 32 and record["meta"]["labelled"]
    model, _ = load_model(ckpt)
    expected = _expected_features(model, [data / "data" / "test" / p for p in record["paths"]], batch_size=4)
    for key in ("gap", "rationale"):
        torch.testing.assert_close(torch.from_numpy(record[key]), expected[key], rtol=1e-5, atol=1e-6)


def test_features_of_a_plain_folder_to_pt(tmp_path, capsys, data):
    ckpt = _our_checkpoint(tmp_path / "last.pt")
    rc, out, _ = _run(capsys, "features", "--ckpt", ckpt, "--images", data / "flat", "--out", tmp_path / "f.pt",
                      "--batch_size", 5, "--num_workers", 0, "--device", "cpu", "--hide_progress")
    assert rc == 0 and "9 images, no labels" in out
    record = read_features(tmp_path / "f.pt")
    assert "labels" not in record and "classes" not in record and not record["meta"]["labelled"]
    assert record["paths"] == sorted(p.name for p in (data / "flat").iterdir())
    model, _ = load_model(ckpt)
    expected = _expected_features(model, [data / "flat" / p for p in record["paths"]], batch_size=5)
    for key in ("gap", "rationale"):
        assert record[key].shape == (9, 512)
        torch.testing.assert_close(record[key], expected[key], rtol=1e-5, atol=1e-6)


def test_input_errors_are_one_line(tmp_path, capsys, data):
    ckpt = _our_checkpoint(tmp_path / "last.pt")
    (tmp_path / "empty").mkdir()
    cases = [
        (("backbone", "--ckpt", tmp_path / "missing.pt", "--out", tmp_path / "b.pth"), "does not exist"),
        (("backbone", "--ckpt", ckpt, "--method", "moco", "--out", tmp_path / "b.pth"),
         "is a byol checkpoint, not moco"),
        (("features", "--ckpt", ckpt, "--images", tmp_path / "empty", "--out", tmp_path / "f.npz"), "holds no image"),
        (("features", "--ckpt", ckpt, "--images", tmp_path / "nowhere", "--out", tmp_path / "f.npz"), "does not exist"),
        (("features", "--ckpt", ckpt, "--images", data / "data", "--out", tmp_path / "f.npz"), "not classes"),
    ]
    for argv, message in cases:
        rc, _, err = _run(capsys, *argv)
        assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    reference = tmp_path / "ref.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, reference)
    rc, _, err = _run(capsys, "backbone", "--ckpt", reference, "--out", tmp_path / "b.pth")
    assert rc == 2 and "say which method it holds" in err
    with pytest.raises(SystemExit) as usage:
        export.cli(["features", "--ckpt", str(ckpt), "--images", str(data / "flat"), "--out", str(tmp_path / "f.csv")])
    assert usage.value.code == 2 and "must end with .npz or .pt" in capsys.readouterr().err
    assert not list(tmp_path.glob("b.*")) and not list(tmp_path.glob("f.*"))
