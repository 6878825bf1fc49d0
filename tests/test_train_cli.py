"""The training entry point end to end on tiny data: results, checkpoints, resume after kill -9, bad input."""
import json
import signal

import pytest
import torch

from lcr_fast import train
from lcr_fast.checkpoint import load_training_checkpoint, save_training_checkpoint
from lcr_fast.compat import load_reference_checkpoint
from lcr_fast.config import ConfigError
from lcr_fast.data import DatasetError, build_train_loader, torch_loader

from helpers import config_file, metrics, run_command, run_train, tiny_config, wait_for_logged, write_folder


@pytest.mark.slow
def test_train_writes_results_and_checkpoints_that_reload(tmp_path):
    write_folder(tmp_path / "data", classes=3, per_class=4, size=40)
    cfg_path = config_file(tmp_path, train={"stop_at_epoch": 2, "knn_interval": 1}, seed=None)
    proc = run_train(tmp_path, "run", cfg_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank-1" in proc.stdout and "mAP" in proc.stdout and "kNN top-1" in proc.stdout

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("rank1", "rank5", "mAP"):
        assert 0.0 <= results["retrieval"][key] <= 1.0
    assert [h["epoch"] for h in results["history"]] == [0, 1] and results["steps"] == 6

    ckpt = load_training_checkpoint(tmp_path / "run" / "ckpt" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6
    assert isinstance(ckpt["config"]["seed"], int), "the seed that was drawn is recorded"
    assert ckpt["config"]["model"]["backbone"] == "resnet18"
    lines = [m for m in metrics(tmp_path / "run") if not m.get("untrained")]  # the first line: the initial weights
    assert {"loss", "ssl_loss", "rationale_loss", "lr", "pairs_per_s"} <= set(lines[0])
    assert (tmp_path / "run" / "tensorboard").is_dir()

    exported = load_reference_checkpoint(tmp_path / "run" / "ckpt" / f"{ckpt['config']['name']}_reference.pth",
                                         "byol", config=tiny_config(model={"pretrained": "none"}))
    assert torch.equal(exported.backbone.conv1.weight, ckpt["model"]["backbone.conv1.weight"])

    # --eval_from on our checkpoint and on the reference export give the same figures as the run.
    for source in ("last.pt", f"{ckpt['config']['name']}_reference.pth"):
        again = run_train(tmp_path, "eval_" + source.split(".")[0], cfg_path, "--eval_from",
                          tmp_path / "run" / "ckpt" / source)
        assert again.returncode == 0, again.stdout + again.stderr
        evaluated = json.loads((tmp_path / ("eval_" + source.split(".")[0]) / "results.json").read_text())
        assert evaluated["retrieval"] == pytest.approx(results["retrieval"])
        assert evaluated["knn_top1"] == pytest.approx(results["knn_top1"])


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path, uninterrupted):
    data, cfg_path, expected = uninterrupted

    proc = run_train(tmp_path, "killed", cfg_path, data=data, wait=False)
    wait_for_logged(proc, tmp_path / "killed", lambda m: m.get("epoch") == 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = max(m["step"] for m in metrics(tmp_path / "killed"))
    assert 12 < done < 24, "killed in the middle of the second epoch"

    resumed = run_train(tmp_path, "killed", cfg_path, "--resume", data=data)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "epoch 1, step 12" in resumed.stdout
    after = [m for m in metrics(tmp_path / "killed") if "loss" in m][-12:]
    assert after[0]["step"] == 13
    for m in after:
        assert m["loss"] == pytest.approx(expected[m["step"]], rel=1e-6, abs=1e-7), m["step"]


def _forbid_model(monkeypatch):
    def fail(*_):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(train, "build_model", fail)


def test_missing_data_dir_fails_before_any_model(tmp_path, monkeypatch):
    _forbid_model(monkeypatch)
    cfg_path = config_file(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        train.main(["-c", str(cfg_path), "--data_dir", str(tmp_path / "missing"), "--log_dir", str(tmp_path / "l"),
                    "--ckpt_dir", str(tmp_path / "c")])


def test_empty_class_folder_fails_before_any_model(tmp_path, monkeypatch):
    _forbid_model(monkeypatch)
    write_folder(tmp_path / "data", classes=2, per_class=2)
    (tmp_path / "data" / "train" / "class_empty").mkdir()
    with pytest.raises(DatasetError, match="class_empty"):
        train.main(["-c", str(config_file(tmp_path)), "--data_dir", str(tmp_path / "data"),
                    "--log_dir", str(tmp_path / "l"), "--ckpt_dir", str(tmp_path / "c")])


@pytest.mark.slow
def test_misspelt_key_is_a_one_line_error_from_the_cli(tmp_path):
    write_folder(tmp_path / "data", classes=2, per_class=2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbon: resnet18\n")
    proc = run_train(tmp_path, "bad", bad)
    assert proc.returncode == 2
    assert "error: unknown config key 'model.backbon'" in proc.stderr
    assert "did you mean 'model.backbone'" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(ConfigError):
        train.main(["-c", str(bad), "--data_dir", str(tmp_path / "data"), "--log_dir", "l", "--ckpt_dir", "c"])


@pytest.mark.slow
def test_debug_run_on_the_default_dali_backend(tmp_path):
    """--debug (batch 2, one epoch, 8 images, no worker processes) through DALI, the default backend."""
    write_folder(tmp_path / "data", classes=2, per_class=5, size=40)
    cfg_path = config_file(tmp_path, data={"backend": "dali"})
    proc = run_train(tmp_path, "debug", cfg_path, "--debug")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "debug" / "results.json").read_text())
    assert results["steps"] == 4 and results["config"]["data"]["backend"] == "dali"
    assert results["config"]["train"]["batch_size"] == 2


@pytest.mark.slow
def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    """One job script serves the first launch and every requeue: --resume with nothing to resume trains."""
    write_folder(tmp_path / "data", classes=3, per_class=4, size=40)
    proc = run_train(tmp_path, "run", config_file(tmp_path, train={"stop_at_epoch": 1}), "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"no checkpoint at {tmp_path / 'run' / 'ckpt' / 'last.pt'} yet; starting a fresh run" in proc.stdout
    ckpt = load_training_checkpoint(tmp_path / "run" / "ckpt" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 3


def _held_out(tmp_path, *overrides):
    """train.py's inputs for 3 classes of 6 training images with data.val_per_class=2, split as main() splits them."""
    argv = ["-c", str(config_file(tmp_path, data={"val_per_class": 2})), "--data_dir", str(tmp_path / "data"),
            "--log_dir", str(tmp_path / "l"), "--ckpt_dir", str(tmp_path / "c"), *overrides]
    args = train.parse_args(argv)
    cfg = train.resolve_config(args)
    inputs = train.check_inputs(args, cfg)
    train.split_validation(args, cfg, inputs)
    return cfg, inputs


def test_validation_images_never_enter_a_training_batch(tmp_path, monkeypatch):
    write_folder(tmp_path / "data", classes=3, per_class=6, size=40)
    cfg, inputs = _held_out(tmp_path)
    val = {path for path, _ in inputs.val_index.samples}
    trained = {path for path, _ in inputs.train_index.samples}
    assert len(val) == 6 and len(trained) == 12 and not val & trained
    assert inputs.evaluation.bank is inputs.train_index, "the kNN bank holds no validation image either"
    assert sorted(label for _, label in inputs.val_index.samples) == [0, 0, 1, 1, 2, 2]
    assert {path for path, _ in _held_out(tmp_path)[1].val_index.samples} == val, "the seed fixes the split"
    assert {path for path, _ in _held_out(tmp_path, "seed=1")[1].val_index.samples} != val

    read = []
    load = torch_loader._load_rgb
    monkeypatch.setattr(torch_loader, "_load_rgb", lambda path: read.append(path) or load(path))
    # The training loader as set_up builds it, over three epochs (three permutations).
    loader = build_train_loader(tmp_path / "data", "byol", cfg.train.batch_size, cfg.dataset.image_size, "torchvision",
                                "cpu", 0, cfg.seed, index=inputs.train_index)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    assert len(read) == 3 * 12 and set(read) <= trained

    with pytest.raises(DatasetError, match=r"3 class\(es\) .* have 6 or fewer: class_0 \(6\)"):
        _held_out(tmp_path, "data.val_per_class=6")

    # A resumed run holds out what it held out before: seed: null takes the checkpoint's seed, and another
    # count or seed is refused.
    save_training_checkpoint(tmp_path / "c" / "last.pt", torch.nn.Linear(1, 1), None, 1, 3,
                             tiny_config(data={"val_per_class": 2}, seed=5).to_dict())
    resumed = _held_out(tmp_path, "--resume", "seed=null")[1]
    assert resumed.resume["step"] == 3
    assert resumed.val_index.samples == _held_out(tmp_path, "seed=5")[1].val_index.samples
    for override in ("seed=6", "data.val_per_class=3"):
        with pytest.raises(ConfigError, match="differs from the resumed run's 2 with seed 5"):
            _held_out(tmp_path, "--resume", override)


@pytest.mark.slow
def test_end_of_run_linear_evaluation_and_selection_on_validation(tmp_path):
    """BYOL's linear evaluation after training takes the YAML's eval section and, by default, classifies a fresh
    model averaged per batch, as the reference; data.val_per_class selects an epoch without the test split."""
    write_folder(tmp_path / "data", classes=3, per_class=6, size=40)
    cfg_path = config_file(tmp_path, data={"val_per_class": 2}, eval={"num_epochs": 2, "batch_size": 5})
    proc = run_train(tmp_path, "run", cfg_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    report = (tmp_path / "run" / "report.md").read_text()

    linear = results["linear_eval"]
    # 12 training images (6 held out) in batches of 5, 5, 2, for the YAML's 2 epochs.
    assert (linear["epochs"], linear["steps_per_epoch"], linear["steps"], linear["num_train"]) == (2, 3, 6, 12)
    assert linear["protocol"] == "lcr" and linear["lr"] == pytest.approx(30 * 5 / 256) and linear["num_test"] == 18
    assert linear["top1"] == linear["top1_batch_mean"] and "per-batch" in linear["accuracy"]
    assert linear["weights"].startswith("not the trained weights: a fresh model")
    assert "weights evaluated: not the trained weights: a fresh model" in report and "**top-1 " in report
    assert "linear evaluation as the reference's BYOL main.py runs it after training (2 epochs, 6 steps" in proc.stdout

    assert results["validation_split"] == {"per_class": 2, "images": 6, "train_images": 12}
    assert [h["epoch"] for h in results["history"]] == [0, 1] and all("validation" in h for h in results["history"])
    chosen = results["selected_on_validation"]
    best = max(results["history"], key=lambda h: h["validation"]["mAP"])
    assert chosen["epoch"] == best["epoch"] and chosen["test"]["mAP"] == best["mAP"]
    assert chosen["validation"] == best["validation"]
    for label in ("| last epoch | 1 |", f"| best validation mAP ({100 * best['validation']['mAP']:.2f}; selected on 6",
                  "| best of each metric (selected on the test split, as the reference's authors report) |"):
        assert label in report

    # The switches: the run's own weights, accuracy over all test images. lcr-eval's default linear protocol for
    # BYOL runs the same function with the checkpoint's keys (the same held-out images, the same seed).
    fixed = run_train(tmp_path, "fixed", cfg_path, "train.stop_at_epoch=1", "fixes.linear_eval_trained_weights=true",
                      "fixes.linear_eval_weighted_accuracy=true")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    trained = json.loads((tmp_path / "fixed" / "results.json").read_text())["linear_eval"]
    assert trained["weights"].startswith("the trained weights") and trained["top1"] == trained["top1_sample_weighted"]
    assert "weights evaluated: the trained weights" in (tmp_path / "fixed" / "report.md").read_text()
    evaluated = run_command("-m", "lcr_fast.eval", "--ckpt", tmp_path / "fixed" / "ckpt" / "last.pt", "--data_dir",
                            tmp_path / "data", "--protocol", "linear", "--out", tmp_path / "eval", "--hide_progress")
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    again = json.loads((tmp_path / "eval" / "last_eval.json").read_text())["linear"]
    assert again["test_batches"] == trained["test_batches"] and again["top1"] == trained["top1"]
    assert again["last_epoch_loss"] == pytest.approx(trained["last_epoch_loss"], rel=1e-6)


@pytest.mark.slow
def test_a_bf16_run_and_lcr_eval_on_its_checkpoint_give_the_same_figures(tmp_path):
    """engine.precision=bf16 forced: the path that precision auto takes on a CPU with native bf16, which the
    other CLI tests never see on a CPU without it (emulated there, so tiny data and one epoch). A user who
    re-evaluates the checkpoint gets the run's own retrieval figures and linear evaluation, exactly."""
    write_folder(tmp_path / "data", classes=3, per_class=4, size=40)
    cfg_path = config_file(tmp_path, train={"stop_at_epoch": 1}, engine={"precision": "bf16"},
                           eval={"num_epochs": 1, "batch_size": 6}, fixes={"linear_eval_trained_weights": True},
                           logger={"tensorboard": False, "matplotlib": False})
    proc = run_train(tmp_path, "run", cfg_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["components"]["precision"].startswith("bf16")

    ckpt = tmp_path / "run" / "ckpt" / "last.pt"
    for protocol in ("retrieval", "linear"):
        evaluated = run_command("-m", "lcr_fast.eval", "--ckpt", ckpt, "--data_dir", tmp_path / "data",
                                "--protocol", protocol, "--out", tmp_path / protocol, "--hide_progress")
        assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    retrieval = json.loads((tmp_path / "retrieval" / "last_eval.json").read_text())
    assert retrieval["precision"] == "bf16" and retrieval["channels_last"] is True
    assert {k: retrieval["retrieval"][k] for k in ("rank1", "rank5", "mAP")} == results["retrieval"]
    linear = json.loads((tmp_path / "linear" / "last_eval.json").read_text())["linear"]
    trained = results["linear_eval"]
    assert (linear["last_epoch_loss"], linear["test_batches"]) == (trained["last_epoch_loss"],
                                                                  trained["test_batches"])
