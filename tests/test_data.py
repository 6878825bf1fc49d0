"""ImageFolder indexing, damaged files, sharding, the torchvision loaders and the synthetic dataset."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lcr_fast.data import DatasetError, build_eval_loader, build_train_loader, check_same_classes, scan_split
from lcr_fast.data.sharding import epoch_indices
from lcr_fast.data import synthetic
from lcr_fast.data.synthetic import DEMO, MARK_COLOURS, Scene, class_names, render, write_dataset
from lcr_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

from helpers import write_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_labels_follow_sorted_class_folders(tmp_path):
    write_folder(tmp_path, classes=3, per_class=2)
    (tmp_path / "train" / "a_first").mkdir()
    write_folder(tmp_path / "extra", classes=1, per_class=1)
    (tmp_path / "extra" / "train" / "class_0" / "0.jpg").rename(tmp_path / "train" / "a_first" / "x.jpg")
    index = scan_split(tmp_path, "train")
    assert index.classes == ["a_first", "class_0", "class_1", "class_2"]
    assert [label for _, label in index.samples] == [0, 1, 1, 2, 2, 3, 3]


def test_damaged_files_are_skipped_and_counted_and_non_images_ignored(tmp_path):
    write_folder(tmp_path, classes=2, per_class=3)
    folder = tmp_path / "train" / "class_0"
    good = (folder / "0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "garbage.png").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable image file\(s\) of 9"):
        index = scan_split(tmp_path, "train")
    assert len(index) == 6 and len(index.skipped) == 3
    assert {p.rsplit("/", 1)[1] for p, _ in index.skipped} == {"truncated.jpg", "empty.jpg", "garbage.png"}


def test_missing_split_empty_class_and_class_mismatch_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_split(tmp_path / "nope", "train")
    write_folder(tmp_path, classes=2, per_class=2, splits=("train",))
    with pytest.raises(DatasetError, match="has no 'test' folder"):
        scan_split(tmp_path, "test")
    (tmp_path / "train" / "class_9").mkdir()
    with pytest.raises(DatasetError, match="no usable image.*class_9"):
        scan_split(tmp_path, "train")
    (tmp_path / "train" / "class_9").rmdir()
    write_folder(tmp_path, classes=3, per_class=1, splits=("test",))
    with pytest.raises(DatasetError, match=r"only in test: \['class_2'\]"):
        check_same_classes(scan_split(tmp_path, "train"), scan_split(tmp_path, "test"))


def test_shards_cover_each_sample_once_and_match_one_big_batch():
    one = epoch_indices(23, batch_size=4, seed=3, epoch=1)
    shards = [epoch_indices(23, batch_size=2, seed=3, epoch=1, shard_id=r, num_shards=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 10
    assert sorted(shards[0] + shards[1]) == sorted(one[:20])
    # Global step s of the 2-rank run holds exactly the samples of step s of the 1-rank run.
    for s in range(5):
        assert sorted(shards[0][2 * s:2 * s + 2] + shards[1][2 * s:2 * s + 2]) == sorted(one[4 * s:4 * s + 4])
    assert epoch_indices(23, 4, 3, 2) != one, "reshuffled each epoch"
    assert epoch_indices(23, 4, 3, 1) == one, "deterministic for a seed"


def test_torchvision_train_loader_batches(tmp_path):
    write_folder(tmp_path, classes=3, per_class=4, size=48)
    loader = build_train_loader(tmp_path, "byol", batch_size=4, image_size=32, backend="torchvision", device="cpu",
                                num_threads=0, seed=0)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    v1, v2, labels = batches[0]
    assert v1.shape == v2.shape == (4, 3, 32, 32) and v1.dtype == torch.float32 and labels.dtype == torch.int64
    lo = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
    hi = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    assert lo - 1e-4 <= float(v1.min()) and float(v1.max()) <= hi + 1e-4
    assert not torch.equal(v1, v2), "two different views"
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again)), "same epoch, same batches"
    loader.set_epoch(1)
    assert not torch.equal(list(loader)[0][0], batches[0][0])


def test_eval_loader_keeps_file_order_and_last_partial_batch(tmp_path):
    write_folder(tmp_path, classes=2, per_class=3, size=40)
    loader = build_eval_loader(tmp_path, "test", batch_size=4, image_size=32, backend="torchvision", device="cpu",
                               num_threads=0)
    labels = torch.cat([lab for _, lab in loader])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    images = torch.cat([img for img, _ in loader])
    assert images.shape == (6, 3, 32, 32)
    torch.testing.assert_close(images, torch.cat([img for img, _ in loader]))


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_mid_epoch_gives_the_rest_of_the_same_epoch(tmp_path, backend, workers):
    write_folder(tmp_path, classes=2, per_class=6, size=40)
    loader = build_train_loader(tmp_path, "byol", batch_size=3, image_size=32, backend=backend, device="cpu",
                                num_threads=workers, seed=5)
    loader.set_epoch(2)
    whole = list(loader)
    loader.set_epoch(2, start_step=2)
    rest = list(loader)
    assert len(whole) == 4 and len(rest) == 2
    for a, b in zip(whole[2:], rest):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="outside the epoch"):
        loader.set_epoch(2, start_step=5)


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_two_ranks_read_what_one_rank_accumulating_two_micro_batches_reads(tmp_path, backend):
    """Same global batch and micro-batch size: the same images with the same augmentations, so a run
    can move between numbers of ranks (and gradient accumulation) without changing its data."""
    write_folder(tmp_path, classes=3, per_class=6, size=40)
    common = dict(recipe="byol", batch_size=3, image_size=32, backend=backend, device="cpu", num_threads=0, seed=5)
    ranks = [build_train_loader(tmp_path, shard_id=r, num_shards=2, **common) for r in range(2)]
    single = build_train_loader(tmp_path, micro_batches=2, **common)
    assert len(single) == 2 * len(ranks[0]) == 6
    for epoch in (0, 1):
        for loader in ranks + [single]:
            loader.set_epoch(epoch)
        rank_batches = [list(loader) for loader in ranks]
        single_batches = list(single)
        for step in range(len(ranks[0])):
            for r in range(2):
                for a, b in zip(rank_batches[r][step], single_batches[2 * step + r]):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_synthetic_dataset_layout_determinism_and_grain(tmp_path):
    flat = write_dataset(tmp_path / "flat", num_classes=3, train_per_class=2, test_per_class=1, image_size=(120, 90))
    again = write_dataset(tmp_path / "again", num_classes=3, train_per_class=2, test_per_class=1, image_size=(120, 90))
    grainy = write_dataset(tmp_path / "grainy", num_classes=3, train_per_class=2, test_per_class=1,
                           image_size=(120, 90), grain=12)
    index = scan_split(flat, "train")
    assert index.classes == class_names(3) and len(index) == 6 and len(scan_split(flat, "test")) == 3
    files = sorted(p.relative_to(flat) for p in flat.rglob("*.jpg"))
    assert files == sorted(p.relative_to(grainy) for p in grainy.rglob("*.jpg"))
    assert all((flat / f).read_bytes() == (again / f).read_bytes() for f in files)
    # Grain makes photo-like files: more than twice the bytes of flat colours (headers included), same pixels.
    assert sum((grainy / f).stat().st_size for f in files) > 2 * sum((flat / f).stat().st_size for f in files)
    with Image.open(grainy / files[0]) as img:
        assert img.size == (120, 90)


def test_synthetic_scene_draws_the_class_colour_on_the_demo_scene():
    scene = DEMO["scene"]
    palette = {name: np.array(MARK_COLOURS[name], dtype=float) for name in scene.colours}
    for label in range(DEMO["num_classes"]):
        pixels = np.asarray(render(label, (96, 96), random.Random(label), scene=scene)).reshape(-1, 3).astype(float)
        assert (pixels == 128).all(axis=1).mean() > 0.1, "a plain grey background"
        near = {name: int((np.abs(pixels - rgb).max(axis=1) <= 12).sum()) for name, rgb in palette.items()}
        own = scene.mark(label)[1]
        assert near[own] >= 10 and all(near[own] > 5 * n for name, n in near.items() if name != own), near


def test_synthetic_class_names_follow_shapes_then_colours_and_the_cli_writes_the_demo(tmp_path, capsys):
    assert class_names(3) == ["000.red_disc", "001.red_square", "002.red_triangle"]
    assert class_names(3, Scene(shapes=1)) == ["000.red_disc", "001.green_disc", "002.blue_disc"]
    with pytest.raises(ValueError, match=r"\[2, 8\] with 1 mark shapes, got 10"):
        write_dataset(tmp_path / "x", num_classes=10, scene=Scene(shapes=1))
    synthetic.main(["--out", str(tmp_path / "demo"), "--demo", "--train-per-class", "1", "--test-per-class", "2"])
    assert scan_split(tmp_path / "demo", "train").classes == class_names(8, DEMO["scene"])
    assert len(scan_split(tmp_path / "demo", "test")) == 16
    assert "wrote 24 images of 8 classes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(tmp_path / "bad"), "--demo", "--classes", "12"])
    assert exit_info.value.code == 2 and "got 12" in capsys.readouterr().err
