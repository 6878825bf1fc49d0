"""Pretraining on unlabeled images: the layouts, the loaders on both backends, evaluation on a separate ImageFolder or
none, and the errors for an empty folder or an evaluation folder without labels."""
import json

import numpy as np
import pytest
from PIL import Image

from lcr_fast import train
from lcr_fast.config import ConfigError
from lcr_fast.data import UNLABELED, DatasetError, build_train_loader, evaluation_data, scan_training_images

from helpers import config_file, run_train, write_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def write_unlabeled(folder, count: int, size: int = 40, seed: int = 0):
    """``count`` random-texture JPEGs straight in ``folder`` (no class folders)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        pixels = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(folder / f"img_{n:03d}.jpg", quality=90)
    return folder


def _main_args(tmp_path, data, *extra):
    return ["-c", str(config_file(tmp_path)), "--data_dir", str(data), "--log_dir", str(tmp_path / "l"),
            "--ckpt_dir", str(tmp_path / "c"), *map(str, extra)]


def _forbid_model(monkeypatch):
    def fail(*_):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(train, "build_model", fail)


def test_layouts_without_class_folders_are_unlabeled_and_the_reference_layout_is_labeled(tmp_path):
    loose = write_unlabeled(tmp_path / "photos", 3)
    write_unlabeled(loose / "2024" / "june", 2, seed=1)  # nested folders are not classes without train/
    index = scan_training_images(loose)
    assert not index.labeled and index.classes == [] and len(index) == 5
    assert {label for _, label in index.samples} == {UNLABELED}
    assert [p.rsplit("/", 1)[1] for p, _ in index.samples][:2] == ["img_000.jpg", "img_001.jpg"]

    in_train = write_unlabeled(tmp_path / "split" / "train", 4)
    index = scan_training_images(in_train.parent)
    assert not index.labeled and len(index) == 4 and index.root == in_train

    write_folder(tmp_path / "ref", classes=2, per_class=3)
    index = scan_training_images(tmp_path / "ref")
    assert index.labeled and index.classes == ["class_0", "class_1"]
    assert [label for _, label in index.samples] == [0, 0, 0, 1, 1, 1]


def test_empty_or_unreadable_folders_and_a_lone_test_split_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no image files"):
        scan_training_images(tmp_path / "empty")
    (tmp_path / "empty_train" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train' holds no image files"):
        scan_training_images(tmp_path / "empty_train")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_text("<html>not found</html>")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match=r"none of the 1 .*not an image \(HTML\)"):
        scan_training_images(tmp_path / "broken")
    write_folder(tmp_path / "no_train", classes=2, per_class=2, splits=("test",))
    with pytest.raises(DatasetError, match="'test' folder but no 'train' folder"):
        scan_training_images(tmp_path / "no_train")


def test_evaluation_data_comes_from_the_reference_layout_a_separate_folder_or_nowhere(tmp_path):
    photos = write_unlabeled(tmp_path / "photos", 4)
    unlabeled = scan_training_images(photos)
    skipped = evaluation_data(photos, unlabeled)
    assert skipped.bank is None and skipped.test is None
    assert skipped.to_dict() == {"data_dir": None,
                                 "skipped": f"{photos} holds unlabeled images and no --eval_data_dir was given"}

    labeled_dir = write_folder(tmp_path / "labeled", classes=2, per_class=3)
    separate = evaluation_data(photos, unlabeled, labeled_dir)
    assert separate.to_dict() == {"data_dir": str(labeled_dir), "train_images": 6, "test_images": 6, "num_classes": 2}

    labeled = scan_training_images(labeled_dir)
    own = evaluation_data(labeled_dir, labeled)
    assert own.bank is labeled and own.test.classes == labeled.classes

    with pytest.raises(DatasetError, match=r"--eval_data_dir needs labeled images .*has no class sub-folders \(it "
                                           r"holds images"):
        evaluation_data(photos, unlabeled, write_unlabeled(tmp_path / "flat" / "train", 2).parent)


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_loaders_yield_batches_of_an_unlabeled_folder(tmp_path, backend):
    photos = write_unlabeled(tmp_path / "photos", 9)
    loader = build_train_loader(photos, "byol", 4, 32, backend, "cpu", num_threads=1, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    for view1, view2, labels in batches:
        assert view1.shape == view2.shape == (4, 3, 32, 32)
        assert labels.tolist() == [UNLABELED] * 4
        assert not view1.isnan().any() and view1.std() > 0.1


def test_input_errors_of_unlabeled_runs_come_before_any_model(tmp_path, monkeypatch):
    _forbid_model(monkeypatch)
    photos = write_unlabeled(tmp_path / "photos", 6)
    with pytest.raises(DatasetError, match="--eval_from evaluates on labeled images, and there are none"):
        train.main(_main_args(tmp_path, photos, "--eval_from", tmp_path / "any.pt"))
    labeled = write_folder(tmp_path / "labeled", classes=2, per_class=3)
    with pytest.raises(ConfigError, match="data.val_per_class=2 holds labeled images out of the training images"):
        train.main(_main_args(tmp_path, photos, "--eval_data_dir", labeled, "data.val_per_class=2"))
    with pytest.raises(DatasetError, match="--eval_data_dir needs labeled images"):
        train.main(_main_args(tmp_path, labeled, "--eval_data_dir", photos))


@pytest.mark.slow
def test_cli_pretrains_on_unlabeled_images_with_and_without_an_evaluation_folder(tmp_path):
    photos = write_unlabeled(tmp_path / "photos", 8)
    labeled = write_folder(tmp_path / "labeled", classes=2, per_class=3)
    cfg_path = config_file(tmp_path, train={"stop_at_epoch": 1, "num_epochs": 1, "warmup_epochs": 0})

    alone = run_train(tmp_path, "alone", cfg_path, data=photos)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    reason = f"{photos} holds unlabeled images and no --eval_data_dir was given"
    assert [line for line in alone.stdout.splitlines() if "evaluation" in line.lower()] == \
        [f"evaluation skipped: {reason}"]
    results = json.loads((tmp_path / "alone" / "results.json").read_text())
    assert results["evaluation"] == {"data_dir": None, "skipped": reason}
    assert results["training_data"] == {"data_dir": str(photos), "images": 8, "labeled": False}
    assert results["steps"] == 2 and results["history"] == [] and results["untrained"] is None
    assert not {"knn_top1", "retrieval", "linear_eval", "heatmaps"} & set(results)
    report = (tmp_path / "alone" / "report.md").read_text()
    assert f"- evaluation skipped: {reason}" in report and "| evaluation |" not in report

    evaluated = run_train(tmp_path, "evaluated", cfg_path, "--eval_data_dir", labeled, data=photos)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert "evaluation skipped" not in evaluated.stdout and "kNN top-1" in evaluated.stdout
    results = json.loads((tmp_path / "evaluated" / "results.json").read_text())
    assert results["evaluation"] == {"data_dir": str(labeled), "train_images": 6, "test_images": 6, "num_classes": 2}
    assert results["num_classes"] == 2 and results["knn_k"] == 5
    assert 0 <= results["knn_top1"] <= 100 and 0 <= results["retrieval"]["mAP"] <= 1
    assert results["linear_eval"]["num_train"] == 6 and results["linear_eval"]["num_test"] == 6
    assert [h["epoch"] for h in results["history"]] == [0] and results["untrained"]["mAP"] > 0
    assert (tmp_path / "evaluated" / "heatmaps.png").is_file()
    report = (tmp_path / "evaluated" / "report.md").read_text()
    assert f"- evaluation data: {labeled} (train/: 6 images, the kNN bank; test/: 6 images; 2 classes)" in report
    assert f"- training data: {photos} (8 images, unlabeled)" in report
