"""The DALI loaders on DALI's CPU backend, on tiny ImageFolders written here."""
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from lcr_fast.data import DatasetError, build_eval_loader, build_train_loader, scan_split
from lcr_fast.data.dali import DaliEvalLoader, DaliTrainLoader
from lcr_fast.data.sharding import epoch_indices
from lcr_fast.data.torch_loader import TorchEvalLoader
from lcr_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

S = 32


def _textured(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth random image (JPEG-friendly) of (width, height) ``size``."""
    w, h = size
    coarse = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.BILINEAR)


def _write_split(root, split: str, classes: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for n in range(count):
            size = (int(rng.integers(40, 97)), int(rng.integers(32, 97)))
            _textured(rng, size).save(folder / f"{n:03d}.jpg", quality=92)


@pytest.fixture
def folder(tmp_path):
    # Created out of order: labels must still follow the sorted names.
    _write_split(tmp_path, "train", {"gull": 5, "albatross": 6, "tern": 5})
    _write_split(tmp_path, "test", {"gull": 3, "albatross": 2, "tern": 2}, seed=1)
    return tmp_path


@pytest.fixture
def one_per_class(tmp_path):
    """Twelve classes of one image each, so that a label names its sample."""
    _write_split(tmp_path, "train", {f"c{i:02d}": 1 for i in range(12)})
    return tmp_path


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("recipe", ["byol", "mocov2"])
def test_train_batches(folder, recipe):
    loader = build_train_loader(folder, recipe, 4, S, "dali", "cpu", num_threads=2, seed=0)
    assert isinstance(loader, DaliTrainLoader)
    assert len(loader) == 16 // 4
    assert loader.classes == ["albatross", "gull", "tern"]
    batches = list(loader)
    assert len(batches) == len(loader)
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for view1, view2, labels in batches:
        for view in (view1, view2):
            assert view.shape == (4, 3, S, S) and view.dtype == torch.float32 and view.device.type == "cpu"
            per_channel = view.transpose(0, 1).reshape(3, -1)
            assert (per_channel.min(1).values >= lo - 1e-5).all() and (per_channel.max(1).values <= hi + 1e-5).all()
            assert per_channel.std() > 0.05  # not constant
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        assert not torch.equal(view1, view2)
    # 16 of the 16 images, each once: the label counts are the class sizes.
    assert Counter(torch.cat([b[2] for b in batches]).tolist()) == {0: 6, 1: 5, 2: 5}


def test_labels_follow_sorted_class_folders(folder):
    index = scan_split(folder, "test")
    reference = ImageFolder(str(folder / "test"))
    assert index.classes == reference.classes
    loader = DaliEvalLoader(index, 3, S, "cpu", num_threads=2)
    labels = torch.cat([labels for _, labels in loader]).tolist()
    assert labels == reference.targets == [0, 0, 1, 1, 1, 2, 2]


def test_eval_matches_torchvision_and_keeps_the_last_batch(folder):
    index = scan_split(folder, "test")
    dali = build_eval_loader(folder, "test", 3, S, "dali", "cpu", num_threads=2, index=index)
    torch_loader = TorchEvalLoader(index, 3, S, "cpu", num_workers=0)
    assert len(dali) == len(torch_loader) == 3
    pairs = list(zip(dali, torch_loader))
    assert [images.shape[0] for (images, _), _ in pairs] == [3, 3, 1]
    for (images, labels), (ref_images, ref_labels) in pairs:
        assert torch.equal(labels, ref_labels)
        # Same resize, crop and normalisation: mean difference well under one grey level.
        diff = ((images - ref_images) * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255).abs()
        assert diff.mean() < 0.5 and diff.max() < 8


def test_eval_shards_split_the_files(folder):
    index = scan_split(folder, "test")
    shards = [torch.cat([labels for _, labels in DaliEvalLoader(index, 2, S, "cpu", 1, shard, 2)]) for shard in (0, 1)]
    assert shards[0].tolist() == [index.samples[i][1] for i in range(0, 7, 2)]
    assert shards[1].tolist() == [index.samples[i][1] for i in range(1, 7, 2)]


def test_two_shards_cover_each_sample_once_per_epoch(one_per_class):
    index = scan_split(one_per_class, "train")
    loaders = [DaliTrainLoader(index, "byol", 2, S, "cpu", 1, seed=3, shard_id=r, num_shards=2) for r in (0, 1)]
    assert [len(loader) for loader in loaders] == [3, 3]
    for epoch in (0, 1):
        seen = []
        for rank, loader in enumerate(loaders):
            labels = torch.cat([b[2] for b in _epoch(loader, epoch)]).tolist()
            assert labels == epoch_indices(12, 2, 3, epoch, rank, 2)  # one image per class: label == sample
            seen += labels
        assert sorted(seen) == list(range(12))


def test_same_seed_same_batches_and_epochs_reshuffle(one_per_class):
    index = scan_split(one_per_class, "train")
    first, second = (DaliTrainLoader(index, "mocov2", 4, S, "cpu", 2, seed=7) for _ in range(2))
    epoch0, epoch1 = _epoch(first, 0), _epoch(first, 1)
    for a, b in zip(epoch0, _epoch(second, 0)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.cat([b[2] for b in epoch0]).tolist() != torch.cat([b[2] for b in epoch1]).tolist()

    # A fresh loader set to epoch 1 reproduces it, also next to an epoch abandoned half-way.
    fresh = DaliTrainLoader(index, "mocov2", 4, S, "cpu", 2, seed=7)
    abandoned = iter(fresh)
    next(abandoned)
    for a, b in zip(epoch1, _epoch(fresh, 1)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_seed = _epoch(DaliTrainLoader(index, "mocov2", 4, S, "cpu", 2, seed=8), 1)
    assert not torch.equal(other_seed[0][0], epoch1[0][0])


def test_damaged_files_are_skipped_and_counted(one_per_class):
    train = one_per_class / "train"
    (train / "c03" / "empty.jpg").write_bytes(b"")
    whole = (train / "c04" / "000.jpg").read_bytes()
    (train / "c04" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    # Passes the index's checks (PIL reads it, not a JPEG) but DALI has no GIF decoder.
    gif = train / "c05" / "000.jpg"
    gif.unlink()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(train / "c05" / "000.png", format="GIF")

    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        index = scan_split(one_per_class, "train")
    assert len(index) == 12 and len(index.skipped) == 2
    (train / "c07" / "000.jpg").unlink()  # vanishes after indexing
    loader = DaliTrainLoader(index, "byol", 4, S, "cpu", 2, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = torch.cat([b[2] for epoch in (0, 1) for b in _epoch(loader, epoch)]).tolist()
    assert len(labels) == 2 * len(loader) * 4
    assert 5 not in labels and 7 not in labels  # replaced by the next usable sample
    assert len(index.skipped) == 4
    assert {path.split("/")[-2] for path, _ in index.skipped[2:]} == {"c05", "c07"}
    messages = [str(w.message) for w in caught]
    assert sum("DALI cannot decode" in m for m in messages) == 1 and sum("cannot read it" in m for m in messages) == 1


def test_empty_or_missing_split_fails_clearly(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_train_loader(tmp_path / "nowhere", "byol", 4, S, "dali", "cpu", 2, 0)
    with pytest.raises(DatasetError, match="no 'train' folder"):
        build_train_loader(tmp_path, "byol", 4, S, "dali", "cpu", 2, 0)
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no usable image"):
        build_train_loader(tmp_path, "byol", 4, S, "dali", "cpu", 2, 0)


def test_too_few_images_for_a_batch(folder):
    index = scan_split(folder, "train")
    with pytest.raises(ValueError, match=r"cannot fill one step of 1 batch\(es\) of 16 on each of 2 rank"):
        DaliTrainLoader(index, "byol", 16, S, "cpu", 2, seed=0, num_shards=2)


def test_decode_window_holds_every_crop_and_flips_reverse_the_box():
    from lcr_fast.data.dali import RECIPE_VIEWS, batch_params

    sizes = np.array([[375, 500], [96, 40], [33, 97]] * 40)
    params = batch_params(RECIPE_VIEWS["byol"], sizes, 224, np.random.default_rng(0))
    lo, shape = params[0], params[1]
    assert (lo >= 0).all() and (lo + shape <= sizes).all() and (shape > 0).all()
    views = RECIPE_VIEWS["byol"]
    first = 2
    flipped = []
    for spec in views:
        start, end = params[first], params[first + 1]
        # Relative to the window, every corner lies inside it.
        for corner in (start, end):
            assert (corner >= 0).all() and (corner <= shape).all()
        # y never reversed; x reversed for about half the samples (the flip, p = .5).
        assert (end[:, 0] > start[:, 0]).all()
        flipped.append(end[:, 1] < start[:, 1])
        first += 2 + 3 * spec.colour + 3 * bool(spec.blur_p) + bool(spec.solarize_p)
    assert first == len(params)
    for f in flipped:
        assert 40 <= f.sum() <= 80  # binomial(120, .5): 6 sigma either side


def test_flip_mirrors_the_crop(one_per_class):
    """The reversed box is an exact horizontal mirror of the unreversed one."""
    from lcr_fast.data.dali import EVAL_VIEW, _Runner, batch_params

    index = scan_split(one_per_class, "train")
    runner = _Runner(index, (EVAL_VIEW,), 4, S, "cpu", num_threads=1)

    def params(flip):
        def make(step, sizes):
            p = batch_params((EVAL_VIEW,), sizes, S, None)
            if flip:
                p[2][:, 1], p[3][:, 1] = p[3][:, 1], p[2][:, 1].copy()
            return p
        return make

    plain = next(runner.run([[0, 1, 2, 3]], params(False)))[0]
    mirrored = next(_Runner(index, (EVAL_VIEW,), 4, S, "cpu", num_threads=1).run([[0, 1, 2, 3]], params(True)))[0]
    torch.testing.assert_close(mirrored, plain.flip(-1), rtol=0, atol=1e-6)
