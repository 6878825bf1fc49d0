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


def _mocov2_loader(index, seed: int) -> DaliTrainLoader:
    return DaliTrainLoader(index, recipe="mocov2", batch_size=4, image_size=S, device="cpu", num_threads=2, seed=seed)


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
    loader = DaliEvalLoader(index, batch_size=3, image_size=S, device="cpu", num_threads=2)
    labels = torch.cat([labels for _, labels in loader]).tolist()
    assert labels == reference.targets == [0, 0, 1, 1, 1, 2, 2]


def test_eval_matches_torchvision_and_keeps_the_last_batch(folder):
    index = scan_split(folder, "test")
    dali = build_eval_loader(folder, "test", 3, S, "dali", "cpu", num_threads=2, index=index)
    torch_loader = TorchEvalLoader(index, batch_size=3, image_size=S, device="cpu", num_workers=0)
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
    loaders = [DaliEvalLoader(index, batch_size=2, image_size=S, device="cpu", num_threads=1, shard_id=shard,
                              num_shards=2) for shard in (0, 1)]
    shards = [torch.cat([labels for _, labels in loader]) for loader in loaders]
    assert shards[0].tolist() == [index.samples[i][1] for i in range(0, 7, 2)]
    assert shards[1].tolist() == [index.samples[i][1] for i in range(1, 7, 2)]


def test_two_shards_cover_each_sample_once_per_epoch(one_per_class):
    index = scan_split(one_per_class, "train")
    loaders = [DaliTrainLoader(index, recipe="byol", batch_size=2, image_size=S, device="cpu", num_threads=1, seed=3,
                               shard_id=r, num_shards=2) for r in (0, 1)]
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
    first, second = (_mocov2_loader(index, seed=7) for _ in range(2))
    epoch0, epoch1 = _epoch(first, 0), _epoch(first, 1)
    for a, b in zip(epoch0, _epoch(second, 0)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.cat([b[2] for b in epoch0]).tolist() != torch.cat([b[2] for b in epoch1]).tolist()

    # A fresh loader set to epoch 1 reproduces it, also next to an epoch abandoned half-way.
    fresh = _mocov2_loader(index, seed=7)
    abandoned = iter(fresh)
    next(abandoned)
    for a, b in zip(epoch1, _epoch(fresh, 1)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_seed = _epoch(_mocov2_loader(index, seed=8), 1)
    assert not torch.equal(other_seed[0][0], epoch1[0][0])


def test_damaged_files_are_skipped_and_counted(one_per_class):
    train = one_per_class / "train"
    (train / "c03" / "empty.jpg").write_bytes(b"")
    whole = (train / "c04" / "000.jpg").read_bytes()
    (train / "c04" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    # DALI has no GIF decoder: it gets PIL's pixels as PNG, so the GIF is read, under any name.
    gif = train / "c05" / "000.jpg"
    gif.unlink()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(train / "c05" / "000.png", format="GIF")

    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        index = scan_split(one_per_class, "train")
    assert len(index) == 12 and len(index.skipped) == 2
    (train / "c07" / "000.jpg").unlink()  # vanishes after indexing
    # Cut after indexing, its header whole: DALI refuses it and so does PIL's full decode.
    (train / "c06" / "000.jpg").write_bytes(whole[: len(whole) // 3])
    loader = DaliTrainLoader(index, recipe="byol", batch_size=4, image_size=S, device="cpu", num_threads=2, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = torch.cat([b[2] for epoch in (0, 1) for b in _epoch(loader, epoch)]).tolist()
    assert len(labels) == 2 * len(loader) * 4
    assert 6 not in labels and 7 not in labels and 5 in labels  # replaced by the next usable sample
    assert len(index.skipped) == 4
    assert {path.split("/")[-2] for path, _ in index.skipped[2:]} == {"c06", "c07"}
    messages = [str(w.message) for w in caught]
    assert sum("DALI cannot decode" in m for m in messages) == 1 and sum("cannot read it" in m for m in messages) == 1


def test_empty_or_missing_split_fails_clearly(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_train_loader(tmp_path / "nowhere", "byol", 4, S, "dali", "cpu", 2, 0)
    # Without train/ the folder itself may hold unlabeled images: an empty one holds none.
    with pytest.raises(DatasetError, match="holds no image files"):
        build_train_loader(tmp_path, "byol", 4, S, "dali", "cpu", 2, 0)
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no usable image"):
        build_train_loader(tmp_path, "byol", 4, S, "dali", "cpu", 2, 0)


def test_too_few_images_for_a_batch(folder):
    index = scan_split(folder, "train")
    with pytest.raises(ValueError, match=r"cannot fill one step of 1 batch\(es\) of 16 on each of 2 rank"):
        DaliTrainLoader(index, recipe="byol", batch_size=16, image_size=S, device="cpu", num_threads=2, seed=0,
                        num_shards=2)


def test_decode_window_holds_every_crop_and_flips_reverse_the_box():
    from lcr_fast.data.dali import RECIPE_VIEWS, batch_draws

    sizes = np.array([[375, 500], [96, 40], [33, 97]] * 40)
    draws = batch_draws(RECIPE_VIEWS["byol"], sizes, 224, np.random.default_rng(0))
    lo, shape = draws.window_start, draws.window_shape
    assert (lo >= 0).all() and (lo + shape <= sizes).all() and (shape > 0).all()
    assert len(draws.views) == len(RECIPE_VIEWS["byol"])
    flipped = []
    for view in draws.views:
        start, end = view.roi_start, view.roi_end
        # Relative to the window, every corner lies inside it.
        for corner in (start, end):
            assert (corner >= 0).all() and (corner <= shape).all()
        # y never reversed; x reversed for about half the samples (the flip, p = .5).
        assert (end[:, 0] > start[:, 0]).all()
        flipped.append(end[:, 1] < start[:, 1])
    for f in flipped:
        assert 40 <= f.sum() <= 80  # binomial(120, .5): 6 sigma either side


def test_flip_mirrors_the_crop(one_per_class):
    """The reversed box is an exact horizontal mirror of the unreversed one."""
    from lcr_fast.data.dali import EVAL_VIEW, _Runner, batch_draws

    index = scan_split(one_per_class, "train")

    def runner():
        return _Runner(index, views=(EVAL_VIEW,), batch_size=4, image_size=S, device="cpu", num_threads=1)

    def params(flip):
        def make(step, sizes):
            draws = batch_draws((EVAL_VIEW,), sizes, S, None)
            if not flip:
                return draws
            (view,) = draws.views
            start, end = view.roi_start.copy(), view.roi_end.copy()
            start[:, 1], end[:, 1] = view.roi_end[:, 1], view.roi_start[:, 1]
            return draws._replace(views=(view._replace(roi_start=start, roi_end=end),))
        return make

    plain = next(runner().run([[0, 1, 2, 3]], params(False)))[0]
    mirrored = next(runner().run([[0, 1, 2, 3]], params(True)))[0]
    torch.testing.assert_close(mirrored, plain.flip(-1), rtol=0, atol=1e-6)


def test_each_draw_feeds_the_graph_input_of_its_name():
    """M and K have the same shape, so only their names keep them apart: the feed places every leaf by
    the name the graph reads it under, never by position."""
    from lcr_fast.data.dali import RECIPE_VIEWS, batch_draws, draw_leaves, feed_order, graph_input_names

    view = ("roi_start", "roi_end", "colour.changed", "colour.M", "colour.K", "blur.applied", "blur.row",
            "blur.column")
    names = graph_input_names(RECIPE_VIEWS["byol"], S)
    assert names == ("encoded", "labels", "window_start", "window_shape", *(f"views.0.{n}" for n in view),
                     *(f"views.1.{n}" for n in view), "views.1.solarize")
    assert graph_input_names(RECIPE_VIEWS["mocov2"], S)[-1] == "views.1.blur.column"  # no solarize in MoCo v2

    draws = batch_draws(RECIPE_VIEWS["byol"], np.array([[40, 60]] * 8), S, np.random.default_rng(0))
    colour = draws.views[0].colour
    assert colour.M.shape == colour.K.shape == (8, 3, 3) and not np.array_equal(colour.M, colour.K)
    fed = feed_order(names, {"encoded": [], "labels": [], **draw_leaves(draws)})
    assert fed[names.index("views.0.colour.M")] is colour.M
    assert fed[names.index("views.0.colour.K")] is colour.K
    assert fed[names.index("views.1.solarize")] is draws.views[1].solarize


def test_draws_that_do_not_match_the_graph_fail_loudly(one_per_class):
    from lcr_fast.data.dali import RECIPE_VIEWS, _Runner, batch_draws, draw_leaves, feed_order, graph_input_names

    names = graph_input_names(RECIPE_VIEWS["byol"], S)
    moco = batch_draws(RECIPE_VIEWS["mocov2"], np.array([[40, 60]] * 2), S, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"missing \['views.1.solarize'\], unexpected \[\]"):
        feed_order(names, {"encoded": [], "labels": [], **draw_leaves(moco)})

    # A runner fed another recipe's draws stops at its first batch, naming what differs.
    index = scan_split(one_per_class, "train")
    runner = _Runner(index, views=RECIPE_VIEWS["byol"], batch_size=2, image_size=S, device="cpu", num_threads=1)
    wrong = lambda step, sizes: batch_draws(RECIPE_VIEWS["mocov2"], sizes, S, np.random.default_rng(step))  # noqa: E731
    with pytest.raises(Exception, match=r"do not match the DALI graph's: missing \['views.1.solarize'\]"):
        next(runner.run([[0, 1]], wrong))


def test_the_graph_applies_M_to_the_pixels_and_K_to_the_mean_colour(one_per_class):
    """out = M x + K m: with M = I and K = 0 a recoloured view equals the untouched one; with M = 0 and
    K = I every pixel of it is the crop's mean colour. Swapped, both would fail."""
    from dataclasses import replace

    from lcr_fast.data.dali import EVAL_VIEW, ColourDraws, _Runner, batch_draws

    index = scan_split(one_per_class, "train")
    views = (replace(EVAL_VIEW, grey_p=1.0),)

    def with_colour(changed: bool, M: np.ndarray, K: np.ndarray):
        def make(step, sizes):
            draws = batch_draws(views, sizes, S, np.random.default_rng(0))
            n = len(sizes)
            colour = ColourDraws(changed=np.full(n, changed), M=np.tile(M, (n, 1, 1)).astype(np.float32),
                                 K=np.tile(K, (n, 1, 1)).astype(np.float32))
            return draws._replace(views=(draws.views[0]._replace(colour=colour),))
        return make

    def images(draws):
        runner = _Runner(index, views=views, batch_size=4, image_size=S, device="cpu", num_threads=1)
        return next(runner.run([[0, 1, 2, 3]], draws))[0]

    untouched = images(with_colour(False, np.eye(3), np.zeros((3, 3))))
    assert untouched.flatten(1).std(dim=1).min() > 0.1  # textured images: far from flat
    torch.testing.assert_close(images(with_colour(True, np.eye(3), np.zeros((3, 3)))), untouched, rtol=0, atol=0)
    flat = images(with_colour(True, np.zeros((3, 3)), np.eye(3)))
    assert flat.flatten(2).std(dim=2).max() < 1e-5
