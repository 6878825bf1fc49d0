"""Reference-format checkpoints: exact round trips, clear errors, no code execution."""
import os

import pytest
import torch

from lcr_fast.checkpoint import UnsafeCheckpointError, safe_load
from lcr_fast.compat import CheckpointMismatchError, export_reference_checkpoint, load_reference_checkpoint
from lcr_fast.models import build_model
from lcr_fast.reference import ReferenceBYOL, ReferenceResNet

from helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_file(path, arch="resnet18", hidden=64, proj=32):
    torch.manual_seed(0)
    ref = ReferenceBYOL(ReferenceResNet(arch, maxpool=False), hidden=hidden, proj=proj, channels=8)
    torch.save({"epoch": 7, "state_dict": ref.state_dict()}, path)
    return ref


def test_round_trip_is_bit_exact(tmp_path):
    ref = _reference_file(tmp_path / "ref.pth")
    model = load_reference_checkpoint(tmp_path / "ref.pth", "byol", config=tiny_config())
    export_reference_checkpoint(model, tmp_path / "out.pth", epoch=7)
    again = load_reference_checkpoint(tmp_path / "out.pth", "byol", config=tiny_config())

    exported = torch.load(tmp_path / "out.pth", weights_only=True)
    assert exported["epoch"] == 7
    assert set(exported["state_dict"]) == set(ref.state_dict()), "same key names as the reference"
    for key, value in ref.state_dict().items():
        assert torch.equal(exported["state_dict"][key], value), key
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    # Aliased names share one tensor, as in the reference's own files.
    sd = exported["state_dict"]
    assert sd["backbone.conv1.weight"].data_ptr() == sd["online_encoder.0.conv1.weight"].data_ptr()


def test_shapes_are_inferred_without_a_config(tmp_path):
    _reference_file(tmp_path / "ref.pth", hidden=48, proj=24)
    model = load_reference_checkpoint(tmp_path / "ref.pth", "byol")
    assert model.projector.layer2.out_features == 24 and model.projector.layer1[0].out_features == 48
    assert model.rationale.conv.out_channels == 8


def test_dataparallel_prefix_is_accepted(tmp_path):
    ref = _reference_file(tmp_path / "ref.pth")
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "dp.pth")
    model = load_reference_checkpoint(tmp_path / "dp.pth", "byol", config=tiny_config())
    assert torch.equal(model.backbone.conv1.weight, ref.backbone.conv1.weight)


def test_shape_mismatch_names_the_keys(tmp_path):
    _reference_file(tmp_path / "ref.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_reference_checkpoint(tmp_path / "ref.pth", "byol", config=tiny_config(model={"proj_dim": 16}))
    assert "projector.layer2.weight" in str(err.value) and "(32, 64)" in str(err.value)


def test_other_method_is_named(tmp_path):
    torch.save({"epoch": 0, "state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}}, tmp_path / "moco.pth.tar")
    with pytest.raises(CheckpointMismatchError, match="is a moco checkpoint, not byol"):
        load_reference_checkpoint(tmp_path / "moco.pth.tar", "byol")


def test_missing_keys_are_listed(tmp_path):
    ref = _reference_file(tmp_path / "ref.pth")
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("bn16.")}
    torch.save({"epoch": 0, "state_dict": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(5\): rationale\.bn\.bias"):
        load_reference_checkpoint(tmp_path / "partial.pth", "byol", config=tiny_config())


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"epoch": 0, "state_dict": {}, "payload": _Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_reference_checkpoint(tmp_path / "evil.pth", "byol")
    with pytest.raises(UnsafeCheckpointError):
        safe_load(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_our_model_exports_every_reference_key(tmp_path):
    model = build_model(tiny_config())
    export_reference_checkpoint(model, tmp_path / "x.pth")
    keys = set(torch.load(tmp_path / "x.pth", weights_only=True)["state_dict"])
    assert {"conv16.weight", "bn16.running_mean", "online_predictor.layer2.bias", "target_encoder.0.conv1.weight",
            "target_encoder.1.layer1.1.running_var", "online_encoder.1.layer2.weight"} <= keys
