"""The DALI recipes against the reference's torchvision recipes, statistically, on controlled images.

Flat colours isolate the colour operators (cropping, flipping and blurring leave a flat image
unchanged), an impulse isolates the blur, and a position-encoding gradient reveals each crop's box
and flip. Rates are checked against their probabilities within 4 binomial standard deviations.
"""
import colorsys
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from lcr_fast.data import dali
from lcr_fast.data.folder import scan_split
from lcr_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size, two_view_transforms

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = 448  # 7 epochs of 2 batches of 32
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


def _folder(tmp_path, image: Image.Image, copies: int = 64):
    folder = tmp_path / "train" / "only"
    folder.mkdir(parents=True)
    for n in range(copies):
        image.save(folder / f"{n:03d}.png")  # lossless: pixel values are exact
    return scan_split(tmp_path, "train")


def _pixels(view: torch.Tensor) -> np.ndarray:
    return (view * _STD + _MEAN).numpy()


def _dali_views(index, recipe: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PAIRS pairs of views in 0..255, [N, 3, S, S] each."""
    loader = dali.DaliTrainLoader(index, recipe=recipe, batch_size=32, image_size=image_size, device="cpu",
                                  num_threads=2, seed=0)
    batches = []
    for epoch in range(PAIRS // (32 * len(loader))):
        loader.set_epoch(epoch)
        batches += list(loader)
    return tuple(_pixels(torch.cat([b[i] for b in batches])) for i in (0, 1))


def _torch_views(image: Image.Image, recipe: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    view1, view2 = two_view_transforms(recipe, image_size)
    pairs = [(view1(image), view2(image)) for _ in range(PAIRS)]
    return tuple(_pixels(torch.stack([p[i] for p in pairs])) for i in (0, 1))


def _check_rate(hits: np.ndarray, p: float) -> None:
    tolerance = 4 * math.sqrt(max(p * (1 - p), 1e-4) / len(hits))
    assert abs(hits.mean() - p) <= tolerance, f"rate {hits.mean():.3f}, expected {p} +- {tolerance:.3f}"


def _flat(colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def _colours(views: np.ndarray) -> np.ndarray:
    """The colour of each flat view, [N, 3]."""
    assert views.std(axis=(2, 3)).max() < 1.0  # still flat
    return views.mean(axis=(2, 3))


_TORCH_OPS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


@pytest.mark.parametrize("order, factors, grey, mean_tol, max_tol", [
    ((0,), (1.35, 1, 1, 0), False, 0.5, 1),
    ((1,), (1, 0.65, 1, 0), False, 0.5, 1),
    ((2,), (1, 1, 1.4, 0), False, 0.5, 1),
    ((2,), (1, 1, 0.6, 0), True, 1, 2),
    # PIL rounds after every operation, and later factors amplify those errors.
    ((2, 0, 1), (0.7, 1.3, 0.8, 0), False, 2, 6),  # contrast blends with the mean of the jittered image
    ((1, 2, 0), (1.2, 0.7, 1.3, 0), True, 2, 6),
    ((3,), (1, 1, 1, 0.02), False, 4, 15),  # hue: a linear stand-in for HSV's shift
])
def test_colour_transform_matches_torchvision_ops(order, factors, grey, mean_tol, max_tol):
    """M x + K m against torchvision's functional ops applied in the same order, on a textured image."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(30, 220, (16, 16, 3)).astype(np.uint8)
    reference = Image.fromarray(pixels)
    for op in order:
        reference = _TORCH_OPS[op](reference, factors[op])
    if grey:
        reference = F.rgb_to_grayscale(reference, num_output_channels=3)
    M, K = dali.colour_transform(order, factors, grey)
    x = pixels.reshape(-1, 3).astype(float)
    ours = np.clip(x @ M.T + K @ x.mean(axis=0), 0, 255)
    diff = np.abs(ours - np.asarray(reference).reshape(-1, 3))
    assert diff.mean() < mean_tol and diff.max() <= max_tol


@pytest.mark.parametrize("recipe", ["byol", "mocov2"])
def test_jitter_and_grey_rates(tmp_path, recipe):
    source = np.array([170, 140, 110])
    for spec, views in zip(dali.RECIPE_VIEWS[recipe], _dali_views(_folder(tmp_path, _flat(tuple(source))), recipe, 32)):
        colours = _colours(views)
        grey = np.ptp(colours, axis=1) < 2
        _check_rate(grey, spec.grey_p)
        # A flat image is invariant to contrast; brightness, saturation or hue move it.
        jittered = np.abs(colours[~grey] - source).max(axis=1) > 2
        _check_rate(jittered, spec.jitter_p)


@pytest.mark.parametrize("recipe", ["byol", "mocov2"])
def test_solarize_rate(tmp_path, recipe):
    # Bright enough that every jittered or grey version stays >= 128 until solarized.
    bright = _folder(tmp_path, _flat((250, 245, 240)))
    for spec, views in zip(dali.RECIPE_VIEWS[recipe], _dali_views(bright, recipe, 32)):
        colours = _colours(views)
        _check_rate(colours.mean(axis=1) < 128, spec.solarize_p)


def test_brightness_range_matches_torchvision(tmp_path):
    # On flat grey only brightness acts: level 128 * U(0.6, 1.4) with p 0.8, else unchanged.
    image = _flat((128, 128, 128))
    dali_levels = np.concatenate([_colours(v)[:, 0] for v in _dali_views(_folder(tmp_path, image), "byol", 32)])
    torch_levels = np.concatenate([_colours(v)[:, 0] for v in _torch_views(image, "byol", 32)])
    for levels in (dali_levels, torch_levels):
        assert 76 <= levels.min() <= 80 and 176 <= levels.max() <= 180
        _check_rate(np.abs(levels - 128) < 1, 0.2 + 0.8 * 2 / 102.4)
    moved = [np.sort(levels[np.abs(levels - 128) >= 1]) for levels in (dali_levels, torch_levels)]
    quantiles = [np.quantile(m, [0.1, 0.25, 0.5, 0.75, 0.9]) for m in moved]
    np.testing.assert_allclose(quantiles[0], quantiles[1], atol=6)


@pytest.mark.parametrize("recipe", ["byol", "mocov2"])
def test_colour_jitter_matches_torchvision(tmp_path, recipe):
    """HSV hue shift, saturation and value of jittered, non-grey first views: the same spread as
    torchvision's. Hue is tight; saturation and value get more room because DALI's hue (a rotation
    about the grey axis) also moves them a little, where torchvision's HSV shift keeps them."""
    image = _flat((150, 130, 110))
    source = np.array(colorsys.rgb_to_hsv(*(np.array(image.getpixel((0, 0))) / 255)))

    def hsv_changes(views: np.ndarray) -> tuple[np.ndarray, ...]:
        hsv = np.array([colorsys.rgb_to_hsv(*c) for c in _colours(views) / 255])
        keep = (hsv[:, 1] > 0.05) & (np.abs(hsv - source).max(axis=1) > 0.01)  # not grey, jittered
        hue = (hsv[keep, 0] - source[0] + 0.5) % 1 - 0.5
        return hue, hsv[keep, 1], hsv[keep, 2]

    ours = hsv_changes(_dali_views(_folder(tmp_path, image), recipe, 32)[0])
    theirs = hsv_changes(_torch_views(image, recipe, 32)[0])
    assert np.abs(ours[0]).max() <= 0.1 + 0.01 and np.abs(theirs[0]).max() <= 0.1 + 0.01
    q = [0.05, 0.25, 0.5, 0.75, 0.95]
    for mine, reference, tolerance in zip(ours, theirs, (0.015, 0.06, 0.06)):
        np.testing.assert_allclose(np.quantile(mine, q), np.quantile(reference, q), atol=tolerance)


@pytest.mark.parametrize("recipe", ["byol", "mocov2"])
def test_blur_rates(tmp_path, recipe, monkeypatch):
    """Only the blur acts (full-image crop of a square image, colour operators off); a blurred
    impulse's peak drops below 200 exactly when sigma exceeds a threshold computed from the kernel."""
    size = 64
    views = tuple(replace(spec, crop_scale=(1.0, 1.0), jitter_p=0.0, grey_p=0.0, solarize_p=0.0)
                  for spec in dali.RECIPE_VIEWS[recipe])
    monkeypatch.setitem(dali.RECIPE_VIEWS, recipe, views)
    impulse = np.zeros((size, size, 3), dtype=np.uint8)
    impulse[size // 2, size // 2] = 255
    sigmas = np.linspace(0.1, 2.0, 19001)
    centre = dali.gaussian_kernels(sigmas, blur_kernel_size(size))[:, blur_kernel_size(size) // 2]
    threshold = sigmas[np.argmax(255 * centre**2 < 200)]
    for spec, out in zip(views, _dali_views(_folder(tmp_path, Image.fromarray(impulse)), recipe, size)):
        peaks = out.max(axis=(1, 2, 3))
        _check_rate(peaks < 200, spec.blur_p * (2.0 - threshold) / 1.9)


def _boxes(views: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Width, height and flip of each view's source box, read off a view of the ramp R = 2x, G = 2y."""
    inner = np.arange(image_size // 4, 3 * image_size // 4)
    cols = views[:, 0][:, inner][:, :, inner].mean(axis=1)  # R along x
    rows = views[:, 1][:, inner][:, :, inner].mean(axis=2)  # G along y
    x_slope = np.polyfit(inner, cols.T, 1)[0]
    y_slope = np.polyfit(inner, rows.T, 1)[0]
    return np.abs(x_slope) * image_size / 2, y_slope * image_size / 2, x_slope < 0


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))

    def cdf(x: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.sort(x), grid, side="right") / len(x)

    return float(np.abs(cdf(a) - cdf(b)).max())


@pytest.mark.parametrize("recipe", ["byol", "mocov2"])
def test_crop_and_flip_distributions(tmp_path, recipe, monkeypatch):
    """Crop area and aspect ratio as torchvision's RandomResizedCrop samples them; flips at p 0.5."""
    width, height, size = 128, 96, 48
    views = tuple(replace(spec, jitter_p=0.0, grey_p=0.0, blur_p=0.0, solarize_p=0.0)
                  for spec in dali.RECIPE_VIEWS[recipe])
    monkeypatch.setitem(dali.RECIPE_VIEWS, recipe, views)
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    ramp = np.stack([2 * x, 2 * y, np.zeros_like(x)], axis=2).astype(np.uint8)
    out = np.concatenate(_dali_views(_folder(tmp_path, Image.fromarray(ramp)), recipe, size))
    w, h, flipped = _boxes(out, size)
    _check_rate(flipped, 0.5)

    torch.manual_seed(0)
    scale = views[0].crop_scale
    reference = np.array([T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), [3 / 4, 4 / 3])
                          for _ in range(4000)])
    ref_h, ref_w = reference[:, 2], reference[:, 3]
    critical = 2.3 * math.sqrt((len(w) + len(ref_w)) / (len(w) * len(ref_w)))  # two-sample KS, alpha ~ 5e-5
    assert _ks(w * h / (width * height), ref_w * ref_h / (width * height)) < critical
    assert _ks(np.log(w / h), np.log(ref_w / ref_h)) < critical
    assert w.max() <= width + 1 and h.max() <= height + 1
