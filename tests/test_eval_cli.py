"""lcr-eval end to end on a tiny checkpoint: results files, both linear protocols, reference files, bad input."""
import json
import shutil

import pytest
import torch
import yaml

from lcr_fast.checkpoint import save_training_checkpoint
from lcr_fast.compat import export_reference_checkpoint
from lcr_fast.data import build_eval_loader
from lcr_fast.eval import cli, retrieval_metrics
from lcr_fast.eval.features import extract_features
from lcr_fast.eval.numerics import EvalNumerics
from lcr_fast.models import build_model

from helpers import run_command, tiny_config, write_folder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Our checkpoint (last.pt), its reference-format export, a YAML for the latter, and JPEG folders."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg)
    # One step of training-mode forwards so that the BN statistics are not the initial ones.
    model.train()
    with torch.no_grad():
        model.backbone(torch.randn(4, 3, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    save_training_checkpoint(root / "ckpt" / "last.pt", model, optimizer, 1, 3, cfg.to_dict())
    export_reference_checkpoint(model, root / "ckpt" / "byol_reference.pth")
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    write_folder(root / "data", classes=3, per_class=4, size=40)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _run(capsys, *argv):
    rc = cli.main([*map(str, argv), "--hide_progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_all_protocols_write_json_and_markdown(setup, capsys, tmp_path):
    rc, out, err = _run(capsys, "--ckpt", setup / "ckpt" / "last.pt", "--data_dir", setup / "data", "--epochs", 3,
                        "--linear_protocol", "cached", "--out", tmp_path)
    assert rc == 0, err
    results = json.loads((tmp_path / "last_eval.json").read_text())
    markdown = (tmp_path / "last_eval.md").read_text()
    for key in ("rank1", "rank5", "mAP"):
        assert 0.0 <= results["retrieval"][key] <= 1.0
    assert 0.0 <= results["knn"]["top1"] <= 100.0 and results["knn"]["k"] == 12  # capped at the bank size
    assert results["linear"]["protocol"] == "cached" and results["linear"]["epochs"] == 3
    assert 0.0 <= results["linear"]["top1"] <= results["linear"]["top5"] <= 100.0
    assert results["features"] == "rationale" and results["num_classes"] == 3 and results["num_test"] == 12
    assert "| retrieval (leave-one-out, test split) | rationale | mAP |" in markdown
    assert "linear probe, cached features (no augmentation; not main_lincls)" in markdown
    assert markdown.strip() in out  # the table is printed

    # The figures are those of the rationale features the model extracts as train.py's evaluation does: in the
    # precision and layout of the run (engine.precision auto: bf16 on a CPU that computes it natively, where an
    # fp32 extraction would differ in the third digit), which lcr-eval records.
    model, cfg = cli.load_for_eval(str(setup / "ckpt" / "last.pt"))
    numerics = EvalNumerics.of_run(cfg, "cpu")
    assert (results["precision"], results["channels_last"]) == (numerics.precision, numerics.channels_last)
    loader = build_eval_loader(setup / "data", "test", cfg.train.batch_size, 32, "torchvision", "cpu", 0)
    feats, labels = extract_features(model, loader, numerics=numerics)
    assert results["retrieval"]["mAP"] == pytest.approx(retrieval_metrics(feats["rationale"], labels)["mAP"], abs=1e-9)


def test_reference_checkpoint_with_config_gives_the_same_figures(setup, capsys, tmp_path):
    args = ("--data_dir", setup / "data", "--protocol", "retrieval", "--features", "gap")
    rc, _, err = _run(capsys, "--ckpt", setup / "ckpt" / "last.pt", *args, "--out", tmp_path / "ours")
    assert rc == 0, err
    # --method comes from the YAML's model.name; --image_size is the YAML's.
    rc, _, err = _run(capsys, "--ckpt", setup / "ckpt" / "byol_reference.pth", "--config", setup / "tiny.yaml", *args,
                      "--out", tmp_path / "ref")
    assert rc == 0, err
    ours = json.loads((tmp_path / "ours" / "last_eval.json").read_text())
    ref = json.loads((tmp_path / "ref" / "byol_reference_eval.json").read_text())
    assert ref["retrieval"] == ours["retrieval"] and ref["features"] == "gap"
    assert "knn" not in ref and "linear" not in ref and ref["backbone"] == "resnet18"


def test_linear_reference_protocol_runs(setup, capsys, tmp_path):
    rc, out, err = _run(capsys, "--ckpt", setup / "ckpt" / "last.pt", "--data_dir", setup / "data",
                        "--protocol", "linear", "--linear_protocol", "reference", "--epochs", 2,
                        "--linear_batch_size", 256, "--out", tmp_path)
    assert rc == 0, err
    linear = json.loads((tmp_path / "last_eval.json").read_text())["linear"]
    assert linear["protocol"] == "reference" and linear["epochs"] == 2 and linear["lr"] == 30.0
    assert linear["milestones"] == [60, 80] and linear["batch_size"] == 256
    assert 0.0 <= linear["top1"] <= linear["top5"] <= 100.0
    assert "linear probe, reference protocol (main_lincls), 2 epochs" in out


def test_linear_defaults_to_byol_main_protocol_with_the_config_eval_section(setup, capsys, tmp_path):
    """BYOL's default linear protocol is the reference main.py's, its settings the checkpoint's eval section
    (tiny_config: one epoch, batch 128, base_lr 30); --epochs overrides the epochs only."""
    rc, out, err = _run(capsys, "--ckpt", setup / "ckpt" / "last.pt", "--data_dir", setup / "data",
                        "--protocol", "linear", "--out", tmp_path / "default")
    assert rc == 0, err
    linear = json.loads((tmp_path / "default" / "last_eval.json").read_text())["linear"]
    assert linear["protocol"] == "lcr" and linear["weights"] == "the checkpoint's"
    assert (linear["epochs"], linear["steps"], linear["batch_size"]) == (1, 1, 128)
    assert linear["lr"] == 15.0 and linear["seed"] == 0 and "per-batch" in linear["accuracy"]
    assert "linear evaluation as the reference's BYOL main.py runs it after training" in out
    rc, _, err = _run(capsys, "--ckpt", setup / "ckpt" / "last.pt", "--data_dir", setup / "data",
                      "--protocol", "linear", "--epochs", 2, "--out", tmp_path / "two")
    assert rc == 0, err
    two = json.loads((tmp_path / "two" / "last_eval.json").read_text())["linear"]
    assert (two["epochs"], two["steps"], two["lr"]) == (2, 2, 15.0)


def test_bad_inputs_are_one_line_errors(setup, capsys, tmp_path):
    ours, ref = setup / "ckpt" / "last.pt", setup / "ckpt" / "byol_reference.pth"
    data = setup / "data"
    write_folder(tmp_path / "no_test", classes=2, per_class=1, splits=("train",))
    write_folder(tmp_path / "uneven", classes=3, per_class=1, splits=("train",))
    write_folder(tmp_path / "uneven", classes=2, per_class=2, splits=("test",))
    cases = [
        (("--ckpt", ours, "--method", "moco", "--data_dir", data), "is a byol checkpoint, not moco"),
        (("--ckpt", ref, "--method", "moco", "--data_dir", data), "is a byol checkpoint, not moco"),
        (("--ckpt", ref, "--data_dir", data), "say which method it holds"),
        (("--ckpt", ours, "--data_dir", tmp_path / "no_test"), "has no 'test' folder"),
        (("--ckpt", ours, "--data_dir", tmp_path / "uneven"), "train and test class folders differ (3 vs 2 classes)"),
        (("--ckpt", tmp_path / "missing.pt", "--data_dir", data), "does not exist"),
        (("--ckpt", ours, "--data_dir", data, "--device", "bogus"), "unknown --device 'bogus'"),
    ]
    for argv, message in cases:
        rc, out, err = _run(capsys, *argv, "--out", tmp_path / "out")
        assert rc == 2, (argv, err)
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists(), "nothing is written for bad input"


@pytest.mark.slow
def test_module_entry_point_exit_status_and_no_traceback(setup, tmp_path):
    write_folder(tmp_path / "uneven", classes=3, per_class=1, splits=("train",))
    write_folder(tmp_path / "uneven", classes=2, per_class=1, splits=("test",))
    proc = run_command("-m", "lcr_fast.eval", "--ckpt", setup / "ckpt" / "last.pt", "--data_dir", tmp_path / "uneven",
                       env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: train and test class folders differ") and "Traceback" not in proc.stderr
