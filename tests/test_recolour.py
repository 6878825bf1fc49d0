"""The DALI recipes' colour step: the CPU's Numba kernel against plain numpy and against the DALI
operators the GPU graph uses, on images of irregular sizes and with real jitter matrices."""
import sys
import warnings

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def

from lcr_fast.data import resolve_backend
from lcr_fast.data.dali import RECIPE_VIEWS, colour_transforms
from lcr_fast.data.recolour import recolour, recolour_ops, recolour_pixels

SHAPES = [(7, 13), (40, 33), (1, 1), (64, 96)]


def _inputs(seed: int, n: int, spec=RECIPE_VIEWS["byol"][0], size: tuple[int, int] | None = None):
    """Images with flat patches and noise, and the (M, K) of jitter + greyscale as ``spec`` draws them."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h, w = size or SHAPES[i % len(SHAPES)]
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[: h // 2, : w // 2] = rng.integers(200, 256, 3)  # a bright patch that jitter drives past 255
        images.append(image)
    changed, M, K = colour_transforms(n, spec, rng)
    # Samples drawn as unchanged carry the identity; give every sample a real transform.
    assert changed.sum() >= n // 2
    return images, M[changed], K[changed]


def _numpy_reference(image: np.ndarray, M: np.ndarray, K: np.ndarray) -> np.ndarray:
    x = image.reshape(-1, 3).astype(np.float64)
    value = x @ M.T.astype(np.float64) + K.astype(np.float64) @ x.mean(axis=0)
    return np.clip(np.floor(value + 0.5), 0, 255).astype(np.uint8).reshape(image.shape)


def test_kernel_matches_numpy():
    images, M, K = _inputs(0, 24)
    clipped = 0
    for image, m, k in zip(images, M, K):
        out = np.empty_like(image)
        recolour_pixels(out, image, m, k)
        expected = _numpy_reference(image, m, k)
        diff = np.abs(out.astype(int) - expected)
        # float32 against float64 arithmetic: at most one grey level, where a value lies on a .5 boundary.
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
        clipped += int((expected == 255).sum() + (expected == 0).sum())
    assert clipped > 0  # the clip was exercised


@pytest.mark.parametrize("seed,recipe,size", [(1, "byol", None), (2, "mocov2", None), (3, "byol", (224, 224)),
                                               (4, "mocov2", (224, 224))])
def test_gpu_formulation_equals_the_cpu_kernel(seed, recipe, size):
    """The GPU graph's operators (``recolour_ops``), run here on CPU data nodes, against the Numba kernel
    the CPU graph uses: both devices compute the same augmentation, equal to the byte except, rarely, one
    grey level where float32 rounding decides (23 values of 40 million in 20 batches of 224 px images)."""
    images, M, K = _inputs(seed, 16, RECIPE_VIEWS[recipe][0], size)
    n = len(M)

    @pipeline_def(batch_size=n, num_threads=2, device_id=None)
    def both():
        x, m, k = fn.external_source(source=lambda: (images[:n], M, K), num_outputs=3, batch=True,
                                     layout=["HWC", "", ""])
        return recolour(x, m, k, "cpu"), recolour_ops(x, m, k)

    pipe = both()
    pipe.build()
    ours, dalis = pipe.run()
    differing = total = 0
    for i in range(n):
        a, b = np.asarray(ours[i]).astype(int), np.asarray(dalis[i]).astype(int)
        assert a.shape == images[i].shape
        total += a.size
        for y, x, c in np.argwhere(a != b):
            # Both sum in float32, in different orders (and DALI's mean accumulates in float32): they may
            # round apart only where the exact value lies within float32 noise of a rounding boundary.
            mean = images[i].reshape(-1, 3).mean(0)
            exact = M[i, c].astype(np.float64) @ images[i][y, x] + K[i, c].astype(np.float64) @ mean
            assert abs(a[y, x, c] - b[y, x, c]) == 1 and abs(exact + 0.5 - round(exact + 0.5)) < 1e-4
            differing += 1
    assert differing <= total * 1e-5
    assert ours.layout() == dalis.layout() == "HWC"


def test_missing_numba_falls_back_to_torchvision(monkeypatch):
    # Re-import the pipelines with Numba absent (None in sys.modules makes its import fail).
    for name in ("lcr_fast.data.dali", "lcr_fast.data.recolour"):
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "numba", None)
    unavailable = r"DALI is unavailable \(ModuleNotFoundError: .*numba.*\); using the torchvision loader"
    with pytest.warns(UserWarning, match=unavailable):
        assert resolve_backend("dali") == "torchvision"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("torchvision") == "torchvision"
