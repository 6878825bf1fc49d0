"""DALI input pipelines: the reference's two-view recipes and its evaluation transform.

One graph serves every recipe and both devices: ``mixed`` (nvJPEG) decoding and GPU operators when
the loader's device is CUDA, DALI's CPU backend otherwise or when asked for (``decoder="cpu"``, the
fallback of a GPU whose ``mixed`` pipeline cannot run: its batches are then copied to the GPU). All
randomness is drawn in Python (numpy, seeded per epoch and block of permutation slots, so not by
rank) and fed to the graph next to the encoded files through one ``external_source``, each draw
under its own name (``ViewDraws``: the graph reads ``views.0.colour.M``, never "the seventh input"),
so the graph and the drawing code cannot disagree on which array is which. That keeps the graph a
pure function of its inputs, which buys:

- exact torchvision sampling where it matters (RandomResizedCrop's ten attempts and fallback,
  ColorJitter's random order of its four operations, per-sample probabilities);
- determinism independent of DALI's RNG, thread count and prefetching: epoch e of a fresh loader
  equals epoch e of a long run, and a pipeline rebuilt after a decode failure resumes mid-epoch
  with the very same batches;
- epochs that DALI cannot skip or merge: Python feeds exactly the batches of ``epoch_indices`` and
  the external source ends the epoch when they are used up.

How the recipes map to DALI operators (torchvision order: crop, flip, jitter, grayscale, blur,
solarize; flipping commutes with every later step, so it is fused into the crop's resize):

- RandomResizedCrop: box drawn as torchvision does, then ``fn.resize`` of that ROI to S x S with
  antialiasing (cubic for BYOL and evaluation, linear for MoCo v2 as torchvision's default).
- ColorJitter (p .8) and RandomGrayscale (p .2): brightness, contrast, saturation and hue are all
  affine in RGB, so the jitter followed by grayscale collapses into one ``out = M x + K m`` per
  sample, where m is the crop's mean colour (contrast blends with the mean grey of the image at
  that point, which is linear in m). The four operations compose in a random order drawn per
  sample, as torchvision's ColorJitter does. Evaluated by ``recolour.recolour`` (DALI's mean
  reduction and ``coord_transform`` on the GPU, a Numba kernel inside the graph on the CPU), and
  skipped for samples that draw neither operator. Deviations:
  intermediate values are neither rounded nor clipped to [0, 255] between the operations (only the
  result is), and hue is a rotation of RGB about the grey axis by
  360 * h degrees (h in [-.1, .1] -> +-36 degrees) instead of a shift in HSV; of the linear hue
  approximations this is the closest to torchvision's (mean abs. difference about 17/255 at h = .1,
  DALI's own YIQ rotation about 22/255).
- GaussianBlur: torchvision's kernel (window ``blur_kernel_size(S)``, sigma U(0.1, 2)) computed in
  Python and applied as two 1-D passes of ``fn.filter`` with reflect-101 borders (as torch's
  ``reflect`` padding), only on the samples that draw it (DALI conditionals). On the CPU this is
  several times faster than ``fn.gaussian_blur``; the pass in between is rounded to uint8, so
  pixels may differ from torchvision by one grey level. MoCo v2's PIL blur takes a radius equal to
  sigma, so the same operator serves it.
- Solarize (threshold 128): a 256-entry lookup table on the drawn samples only.
- Flip: a crop box whose x end lies before its start; ``fn.resize`` mirrors it at no cost.
- ToTensor + Normalize: ``fn.crop_mirror_normalize`` to float32 NCHW.
- Evaluation: Resize(int(S * 8/7), bicubic) + CenterCrop(S) is the single ROI resize of the box that
  the crop cuts out of the resized image.

Decoding ignores EXIF orientation, as PIL's loader in torchvision's ImageFolder does. DALI's decoder,
like PIL, reads a file by its content, whatever its name; a format it does not read (GIF, say: see
``formats.DALI_FORMATS``), or a file it refuses that PIL reads, reaches it as a PNG of PIL's RGB pixels,
so both backends train on the same images. A file that passed the FolderIndex checks but that neither
reads is skipped with a warning (and added to ``index.skipped``); the next usable sample takes its
place, so step counts stay equal across ranks.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray
from PIL import Image

from .folder import DatasetError, FolderIndex
from .formats import DALI_FORMATS, png_bytes, sniff_format
from .recolour import recolour
from .sharding import ShardedEpochs
from .transforms import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size, eval_resize

GREY = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL's convert("L")
_CROP_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10
_PREFETCH = 2
DECODERS = ("mixed", "cpu")  # nvJPEG decoding with GPU operators, or DALI's CPU backend throughout
_SNIFF_BYTES = 64  # enough for every signature formats.sniff_format knows
_SOLARIZED = [v if v < 128 else 255 - v for v in range(256)]  # one table lookup instead of four arithmetic passes


@dataclass(frozen=True)
class ViewSpec:
    """One view's augmentation. ``crop_scale`` None means the evaluation resize + centre crop."""

    crop_scale: tuple[float, float] | None
    cubic: bool
    flip: bool = False
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.0
    grey_p: float = 0.0
    blur_p: float = 0.0
    solarize_p: float = 0.0

    @property
    def colour(self) -> bool:
        return self.jitter_p > 0 or self.grey_p > 0


def _byol_view(blur_p: float, solarize_p: float) -> ViewSpec:
    return ViewSpec((0.08, 1.0), cubic=True, flip=True, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grey_p=0.2,
                    blur_p=blur_p, solarize_p=solarize_p)


_MOCO_VIEW = ViewSpec((0.2, 1.0), cubic=False, flip=True, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grey_p=0.2,
                      blur_p=0.5)
RECIPE_VIEWS: dict[str, tuple[ViewSpec, ...]] = {
    "byol": (_byol_view(blur_p=1.0, solarize_p=0.0), _byol_view(blur_p=0.1, solarize_p=0.2)),
    "mocov2": (_MOCO_VIEW, _MOCO_VIEW),
}
EVAL_VIEW = ViewSpec(None, cubic=True)


# ---------------------------------------------------------------------------------------------
# What a batch draws, by name. The leaves are per-sample arrays (first axis the sample; one feed
# input each) or lists where samples differ in shape. The same structures carry DataNodes inside the
# graph (``_graph``), where each leaf is the external_source output of the same name.

class ColourDraws(NamedTuple):
    changed: Any  # [n] bool: jitter or greyscale drawn; the others keep the image as it is
    M: Any  # [n, 3, 3] applied to the pixels
    K: Any  # [n, 3, 3] applied to the crop's mean colour


class BlurDraws(NamedTuple):
    applied: Any  # [n] bool
    row: Any  # per sample a [1, taps] kernel
    column: Any  # per sample a [taps, 1] kernel


class ViewDraws(NamedTuple):
    """One view's draws; a step the view's ViewSpec lacks is None (and has no graph input)."""

    roi_start: Any  # [n, 2] (y, x) crop corner, relative to the decode window
    roi_end: Any  # [n, 2]; x before roi_start's for a flipped sample
    colour: ColourDraws | None = None
    blur: BlurDraws | None = None
    solarize: Any = None  # [n] bool


class BatchDraws(NamedTuple):
    window_start: Any  # [n, 2] int32: the decode window (``batch_draws``)
    window_shape: Any  # [n, 2] int32
    views: tuple[ViewDraws, ...]


FILE_INPUTS = ("encoded", "labels")  # the graph's inputs besides the draws, first


def draw_leaves(draws: NamedTuple, prefix: str = "") -> dict[str, Any]:
    """``name -> leaf`` of a draws structure, named by the fields' path (``views.1.colour.K``)."""
    leaves: dict[str, Any] = {}
    for name, value in zip(draws._fields, draws):
        key = prefix + name
        if value is None:
            continue
        if hasattr(value, "_fields"):
            leaves.update(draw_leaves(value, key + "."))
        elif name == "views":
            for i, view in enumerate(value):
                leaves.update(draw_leaves(view, f"{key}.{i}."))
        else:
            leaves[key] = value
    return leaves


def with_leaves(template: NamedTuple, leaves: dict[str, Any], prefix: str = "") -> NamedTuple:
    """``template`` with each leaf replaced by ``leaves[its name]``: a KeyError names a missing one."""
    changes = {}
    for name, value in zip(template._fields, template):
        key = prefix + name
        if value is None:
            continue
        if hasattr(value, "_fields"):
            changes[name] = with_leaves(value, leaves, key + ".")
        elif name == "views":
            changes[name] = tuple(with_leaves(view, leaves, f"{key}.{i}.") for i, view in enumerate(value))
        else:
            changes[name] = leaves[key]
    return template._replace(**changes)


def feed_order(names: Sequence[str], inputs: dict[str, Any]) -> tuple:
    """``inputs`` as the tuple of the graph's external_source outputs ``names``. Any name present on
    one side only raises: a drawing function and a graph that disagree fail at the first batch."""
    if set(inputs) != set(names):
        missing, extra = sorted(set(names) - set(inputs)), sorted(set(inputs) - set(names))
        raise ValueError(f"the batch's inputs do not match the DALI graph's: missing {missing}, unexpected {extra}")
    return tuple(inputs[name] for name in names)


# ---------------------------------------------------------------------------------------------
# Random parameters, drawn in Python. Each function returns per-sample arrays for ``n`` samples.

def random_crop_boxes(sizes: np.ndarray, scale: tuple[float, float],
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's RandomResizedCrop.get_params for images of ``sizes`` [n, 2] (H, W), vectorised.

    Returns the boxes' top-left and bottom-right corners, [n, 2] each in (y, x) order.
    """
    n = len(sizes)
    height, width = sizes[:, :1].astype(np.float64), sizes[:, 1:].astype(np.float64)
    area = height * width * rng.uniform(scale[0], scale[1], (n, _CROP_ATTEMPTS))
    ratio = np.exp(rng.uniform(math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]), (n, _CROP_ATTEMPTS)))
    w = np.round(np.sqrt(area * ratio))  # round half to even, as Python's round in torchvision
    h = np.round(np.sqrt(area / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = fits.any(axis=1)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    h, w = h[rows, first], w[rows, first]
    height, width = height[:, 0], width[:, 0]

    # No attempt fitted: the largest centred box whose aspect ratio is clamped into the range.
    in_ratio = width / height
    fb_w = np.where(in_ratio > _CROP_RATIO[1], np.round(height * _CROP_RATIO[1]), width)
    fb_h = np.where(in_ratio < _CROP_RATIO[0], np.round(width / _CROP_RATIO[0]), height)
    h, w = np.where(found, h, fb_h), np.where(found, w, fb_w)
    top = np.where(found, rng.integers(0, (height - h + 1).astype(np.int64)), (height - h) // 2)
    left = np.where(found, rng.integers(0, (width - w + 1).astype(np.int64)), (width - w) // 2)
    start = np.stack([top, left], axis=1)
    return start, start + np.stack([h, w], axis=1)


def centre_crop_boxes(sizes: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The box of the original image that Resize(int(S*8/7)) + CenterCrop(S) keeps, in (y, x) order."""
    resize = eval_resize(image_size)
    height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    short = np.minimum(height, width)
    # torchvision: the shorter side becomes `resize`, the longer one int(resize * long / short).
    new_h = np.where(height <= width, resize, np.floor(resize * height / short))
    new_w = np.where(height <= width, np.floor(resize * width / short), resize)
    top = np.round((new_h - image_size) / 2)
    left = np.round((new_w - image_size) / 2)
    sy, sx = height / new_h, width / new_w
    start = np.stack([top * sy, left * sx], axis=1)
    end = np.stack([(top + image_size) * sy, (left + image_size) * sx], axis=1)
    return start, end


def _hue_rotation(h: float) -> np.ndarray:
    """Rotation of RGB about the grey axis by 2*pi*h (Rodrigues); positive h turns red towards yellow."""
    k = np.ones(3) / math.sqrt(3)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    angle = 2 * math.pi * h
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def colour_transform(order: Sequence[int], factors: Sequence[float], grey: bool) -> tuple[np.ndarray, np.ndarray]:
    """(M, K), 3 x 3 each, such that ColorJitter's operations ``order`` (0 brightness, 1 contrast,
    2 saturation, 3 hue) with ``factors``, then greyscale if ``grey``, map an image x to M x + K m,
    m being x's mean colour.

    The image after each step is kept as A x + U m. Brightness, saturation, hue and greyscale are
    linear maps L (A, U -> L A, L U); contrast f blends with the current mean grey g.(A + U) m.
    """
    to_grey = np.outer(np.ones(3), GREY)
    A, U = np.eye(3), np.zeros((3, 3))
    for op in order:
        f = factors[op]
        if op == 0:
            A, U = f * A, f * U
        elif op == 1:
            A, U = f * A, f * U + (1 - f) * to_grey @ (A + U)
        else:
            L = f * np.eye(3) + (1 - f) * to_grey if op == 2 else _hue_rotation(f)
            A, U = L @ A, L @ U
    if grey:
        A, U = to_grey @ A, to_grey @ U
    return A, U


def colour_transforms(n: int, spec: ViewSpec, rng: np.random.Generator) -> ColourDraws:
    """Per-sample (changed [n], M [n, 3, 3], K [n, 3, 3]) of ``colour_transform`` drawn as
    RandomApply(ColorJitter) + RandomGrayscale draw them; ``changed`` is False where both were skipped."""
    b, c, s, h = spec.jitter
    jitter = rng.random(n) < spec.jitter_p
    factors = np.stack([rng.uniform(1 - b, 1 + b, n), rng.uniform(1 - c, 1 + c, n),
                        rng.uniform(1 - s, 1 + s, n), rng.uniform(-h, h, n)], axis=1)
    orders = rng.permuted(np.tile(np.arange(4), (n, 1)), axis=1)  # ColorJitter's random order
    grey = rng.random(n) < spec.grey_p
    M, K = np.tile(np.eye(3), (n, 1, 1)), np.zeros((n, 3, 3))
    changed = jitter | grey
    for i in np.flatnonzero(changed):
        M[i], K[i] = colour_transform(orders[i] if jitter[i] else (), factors[i], grey[i])
    return ColourDraws(changed=changed, M=M.astype(np.float32), K=K.astype(np.float32))


def gaussian_kernels(sigma: np.ndarray, size: int) -> np.ndarray:
    """torchvision's 1-D Gaussian kernels of ``size`` taps, one row per sigma."""
    x = np.arange(size) - (size - 1) / 2
    kernels = np.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    return (kernels / kernels.sum(axis=1, keepdims=True)).astype(np.float32)


def trim_kernel(kernel: np.ndarray, sigma: float) -> np.ndarray:
    """``kernel`` without its outer taps beyond 5 sigma (weights below 4e-6 of the centre's), unnormalised
    again: the blur equals torchvision's to far below a grey level and costs a small sigma fewer taps."""
    radius = min(len(kernel) // 2, math.ceil(5 * sigma))
    centre = len(kernel) // 2
    return kernel[centre - radius:centre + radius + 1]


def view_params(spec: ViewSpec, sizes: np.ndarray, image_size: int, rng: np.random.Generator | None) -> ViewDraws:
    """One view's draws for images of ``sizes``, its crop box in image coordinates."""
    n = len(sizes)
    if spec.crop_scale is None:
        start, end = centre_crop_boxes(sizes, image_size)
    else:
        start, end = random_crop_boxes(sizes, spec.crop_scale, rng)
    if spec.flip:
        # A box whose x end lies before its start makes fn.resize mirror the crop: the flip costs nothing.
        mirror = rng.random(n) < 0.5
        start[mirror, 1], end[mirror, 1] = end[mirror, 1], start[mirror, 1].copy()
    colour = colour_transforms(n, spec, rng) if spec.colour else None
    blur = None
    if spec.blur_p:
        sigma = rng.uniform(0.1, 2.0, n)
        taps = [trim_kernel(k, s) for k, s in zip(gaussian_kernels(sigma, blur_kernel_size(image_size)), sigma)]
        blur = BlurDraws(applied=rng.random(n) < spec.blur_p, row=[k[None, :] for k in taps],
                         column=[k[:, None] for k in taps])
    solarize = rng.random(n) < spec.solarize_p if spec.solarize_p else None
    return ViewDraws(roi_start=start.astype(np.float32), roi_end=end.astype(np.float32), colour=colour, blur=blur,
                     solarize=solarize)


def batch_draws(views: Sequence[ViewSpec], sizes: np.ndarray, image_size: int,
                rng: np.random.Generator | None) -> BatchDraws:
    """Everything ``_graph`` consumes besides the files and labels: the decode window (the smallest
    pixel-aligned box holding every view's crop, so the JPEG decoder skips what no view uses), then
    each view's ``view_params`` with its crop box relative to that window."""
    per_view = [view_params(spec, sizes, image_size, rng) for spec in views]
    corners = [corner for view in per_view for corner in (view.roi_start, view.roi_end)]
    lo = np.maximum(np.floor(np.min(corners, axis=0)), 0)
    hi = np.minimum(np.ceil(np.max(corners, axis=0)), sizes)
    offset = lo.astype(np.float32)
    relative = tuple(view._replace(roi_start=view.roi_start - offset, roi_end=view.roi_end - offset)
                     for view in per_view)
    return BatchDraws(window_start=lo.astype(np.int32), window_shape=(hi - lo).astype(np.int32), views=relative)


def draws_template(views: Sequence[ViewSpec], image_size: int) -> BatchDraws:
    """The draws of one dummy sample: which leaves a batch of ``views`` has, read off the drawing code
    itself, so that the graph's inputs are named after exactly what ``batch_draws`` returns."""
    return batch_draws(views, np.array([[image_size, image_size]]), image_size, np.random.default_rng(0))


def graph_input_names(views: Sequence[ViewSpec], image_size: int) -> tuple[str, ...]:
    """The names of the graph's external_source outputs, in their order."""
    return (*FILE_INPUTS, *draw_leaves(draws_template(views, image_size)))


# ---------------------------------------------------------------------------------------------
# The graph.

@pipeline_def(enable_conditionals=True)
def _graph(feed: Callable, views: tuple[ViewSpec, ...], image_size: int, decoder_device: str):
    names = graph_input_names(views, image_size)
    inputs = dict(zip(names, fn.external_source(source=feed, num_outputs=len(names), batch=True)))
    draws = with_leaves(draws_template(views, image_size), inputs)
    # Fancy (smooth) chroma upsampling as libjpeg-turbo and so PIL do it; nvJPEG's default differs.
    images = fn.decoders.image_slice(inputs["encoded"], start=draws.window_start, shape=draws.window_shape,
                                     axis_names="HW", device=decoder_device, output_type=types.RGB,
                                     adjust_orientation=False, jpeg_fancy_upsampling=True)
    outputs = []
    for spec, view in zip(views, draws.views):
        x = fn.resize(images, size=[image_size, image_size], roi_start=view.roi_start, roi_end=view.roi_end,
                      interp_type=types.INTERP_CUBIC if spec.cubic else types.INTERP_LINEAR, antialias=True)
        if view.colour is not None:
            if view.colour.changed:
                x = recolour(x, view.colour.M, view.colour.K, "cpu" if decoder_device == "cpu" else "gpu")
        if view.blur is not None:
            if view.blur.applied:
                x = fn.filter(fn.filter(x, view.blur.row, border="reflect_101"), view.blur.column,
                              border="reflect_101")
        if view.solarize is not None:
            if view.solarize:
                x = fn.lookup_table(x, keys=list(range(256)), values=_SOLARIZED, dtype=types.UINT8)
        outputs.append(fn.crop_mirror_normalize(
            x, dtype=types.FLOAT, output_layout="CHW",
            mean=[255 * v for v in IMAGENET_MEAN], std=[255 * v for v in IMAGENET_STD]))
    return (*outputs, inputs["labels"])


def _decode_error(data: np.ndarray) -> str | None:
    """Why DALI's CPU decoder rejects ``data``, or None. A fresh pipeline, as a failed one is spent."""

    @pipeline_def
    def probe():
        return fn.decoders.image(fn.external_source(source=lambda: [data], batch=True), device="cpu")

    pipe = probe(batch_size=1, num_threads=1, device_id=None)
    try:
        pipe.build()
        pipe.run()
    except Exception as exc:  # DALI reports decoder failures as RuntimeError, some setups as others
        # DALI's message repeats the pipeline context; the cause follows "encountered:".
        cause = str(exc).split("encountered:")[-1].strip().splitlines()
        return f"DALI cannot decode it: {cause[0] if cause else type(exc).__name__}"
    return None


def _pil_reads(path: str) -> bool:
    try:
        png_bytes(Path(path).read_bytes())
    except Exception:  # PIL raises many types for files it cannot read
        return False
    return True


class _Runner:
    """A DALI pipeline fed batch by batch from Python, yielding torch tensors on ``device``.

    A file that passed the FolderIndex checks but that DALI still cannot decode fails its whole
    batch; the runner then finds the file, replaces it (from then on) by the next usable sample as
    the torchvision loader does, rebuilds the pipeline and resumes at the failed step.
    """

    def __init__(self, index: FolderIndex, *, views: tuple[ViewSpec, ...], batch_size: int, image_size: int,
                 device: torch.device | str, num_threads: int, decoder: str | None = None):
        self.index = index
        self.views = views
        self.input_names = graph_input_names(views, image_size)
        self.batch_size, self.image_size, self.num_threads = batch_size, image_size, num_threads
        self.device = torch.device(device)
        self.decoder = decoder or ("mixed" if self.device.type == "cuda" else "cpu")
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown DALI decoder {self.decoder!r}; expected one of {DECODERS}")
        self.bad: set[int] = set()
        self.as_png: set[int] = set()  # samples DALI refused whose PIL decoding it gets as PNG bytes instead
        self._sizes: dict[int, tuple[int, int]] = {}
        self._pending: Iterator[tuple] = iter(())
        self._idle = None  # a pipeline between epochs

    def _feed(self) -> tuple:
        return next(self._pending)  # StopIteration ends DALI's epoch

    def define(self, device_id: int | None):
        """The pipeline, defined but not built: ``mixed`` decoding and GPU operators unless the decoder is "cpu".

        DALI checks operator devices and argument inputs here; only ``build()`` needs the GPU, so
        ``device_id=None`` defines the GPU graph on a machine without one (as the tests do)."""
        return _graph(self._feed, self.views, self.image_size, self.decoder,
                      batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
                      prefetch_queue_depth=_PREFETCH)

    def _build(self):
        pipe = self.define((self.device.index or 0) if self.decoder == "mixed" else None)
        pipe.build()
        return pipe

    def _skip(self, i: int, reason: str) -> None:
        path = self.index.samples[i][0]
        warnings.warn(f"skipping {path}: {reason}")
        self.index.skipped.append((path, reason))
        self.bad.add(i)

    def _read(self, i: int) -> tuple[int, np.ndarray]:
        """Sample i, or the next usable one after it, and its encoded bytes."""
        while True:
            if len(self.bad) == len(self.index):
                raise DatasetError(f"no image of {str(self.index.root)!r} can be read")
            while i in self.bad:
                i = (i + 1) % len(self.index)
            try:
                data = np.fromfile(self.index.samples[i][0], dtype=np.uint8)
                if i in self.as_png or sniff_format(data[:_SNIFF_BYTES].tobytes()) not in DALI_FORMATS:
                    data = np.frombuffer(png_bytes(data.tobytes()), dtype=np.uint8)
                if i not in self._sizes:
                    with Image.open(io.BytesIO(data)) as img:  # parses the header only
                        self._sizes[i] = (img.height, img.width)
                return i, data
            except (OSError, ValueError) as exc:  # the file changed since it was indexed
                self._skip(i, f"cannot read it: {type(exc).__name__}: {exc}")

    def _batch(self, step: int, indices: Sequence[int], draws: Callable[[int, np.ndarray], BatchDraws]) -> tuple:
        indices, encoded = zip(*(self._read(i) for i in indices))
        labels = np.array([self.index.samples[i][1] for i in indices], dtype=np.int64)
        sizes = np.array([self._sizes[i] for i in indices])
        inputs = {"encoded": list(encoded), "labels": labels, **draw_leaves(draws(step, sizes))}
        return feed_order(self.input_names, inputs)

    def _find_bad(self, batches: Sequence[Sequence[int]]) -> bool:
        """Probe the files of ``batches`` one by one with DALI's CPU decoder. A file it rejects is fed
        as PNG from then on when PIL reads it (a CMYK JPEG, say), else skipped. True when any was."""
        found = False
        for i in sorted({self._read(i)[0] for batch in batches for i in batch}):
            reason = _decode_error(self._read(i)[1])
            if reason is None:
                continue
            found = True
            if i not in self.as_png and _pil_reads(self.index.samples[i][0]):
                self.as_png.add(i)
            else:
                self._skip(i, reason)
        return found

    def _to_torch(self, outputs) -> list[torch.Tensor]:
        """Copies of the outputs (DALI reuses its buffers on the next run) as torch tensors on ``device``."""
        labels = torch.from_numpy(np.asarray(outputs[-1].as_tensor()).copy()).to(self.device, non_blocking=True)
        if self.decoder == "cpu":
            # A numpy view of DALI's buffer, then one memcpy: cheaper than np.array's element-wise
            # buffer-protocol copy or feed_ndarray into a fresh CPU tensor.
            views = [torch.from_numpy(np.asarray(out.as_tensor()).copy()) for out in outputs[:-1]]
            return [view.to(self.device, non_blocking=True) for view in views] + [labels]
        stream = torch.cuda.current_stream(self.device)
        views = []
        for out in outputs[:-1]:
            dali_tensor = out.as_tensor()
            view = torch.empty(dali_tensor.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(dali_tensor, view, cuda_stream=stream)
            views.append(view)
        return views + [labels]

    def run(self, batches: Sequence[Sequence[int]], draws: Callable[[int, np.ndarray], BatchDraws],
            start: int = 0) -> Iterator[list[torch.Tensor]]:
        """One epoch from batch ``start`` on: the outputs of ``batches`` (lists of sample indices) in order.

        The pipeline goes back to ``self._idle`` only after a complete epoch: one abandoned half-way
        may still hold queued batches, so it is dropped and the next epoch builds a fresh one.
        """
        pipe, self._idle = self._idle, None
        done = start
        while True:
            self._pending = (self._batch(s, batches[s], draws) for s in range(done, len(batches)))
            pipe = pipe or self._build()
            try:
                while True:
                    outputs = pipe.run()
                    done += 1
                    yield self._to_torch(outputs)
            except StopIteration:
                pipe.reset()
                self._idle = pipe
                return
            except RuntimeError:
                pipe = None
                # The failure may belong to any batch already queued behind the current one.
                if not self._find_bad(batches[done: done + _PREFETCH + 1]):
                    raise

    def check(self, batch: Sequence[int], draws: Callable[[int, np.ndarray], BatchDraws]) -> None:
        """Build the pipeline and run ``batch`` through it as a one-batch epoch, which leaves the pipeline
        idle for the first real epoch: a graph that cannot run here (no nvJPEG, a GPU or driver DALI does
        not support) fails now, before the model is built, and costs no second build when it works."""
        for _ in self.run([batch], draws):
            pass


class DaliTrainLoader(ShardedEpochs):
    """Two-view batches ``(view1, view2, labels)`` of one rank's shard, on ``device``.

    Reads exactly the batches of ``epoch_indices`` (as the torchvision loader), with augmentation
    parameters drawn from ``stream_seed(seed, epoch)`` and the batch's slots, so ``set_epoch(e)``
    on a fresh loader reproduces epoch e.
    """

    def __init__(self, index: FolderIndex, *, recipe: str, batch_size: int, image_size: int,
                 device: torch.device | str, num_threads: int, seed: int, shard_id: int = 0, num_shards: int = 1,
                 micro_batches: int = 1, decoder: str | None = None):
        if recipe not in RECIPE_VIEWS:
            raise ValueError(f"unknown augmentation recipe {recipe!r}; expected one of {tuple(RECIPE_VIEWS)}")
        super().__init__(index, batch_size=batch_size, seed=seed, shard_id=shard_id, num_shards=num_shards,
                         micro_batches=micro_batches)
        self.views = RECIPE_VIEWS[recipe]
        self.image_size = image_size
        self._runner = _Runner(index, views=self.views, batch_size=batch_size, image_size=image_size, device=device,
                               num_threads=num_threads, decoder=decoder)

    def define(self, device_id: int | None):
        """The pipeline, defined but not built (``_Runner.define``): with ``device_id=None`` the GPU graph's
        device checks run on a machine without a GPU."""
        return self._runner.define(device_id)

    def check(self) -> None:
        """One batch of the current epoch's first samples through the pipeline (``_Runner.check``)."""
        seed = self.epoch_seed()
        self._runner.check(self.epoch_indices()[:self.batch_size],
                           lambda step, sizes: batch_draws(self.views, sizes, self.image_size,
                                                           np.random.default_rng([seed, step])))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        indices, slots = self.epoch_indices(), self.epoch_slots()
        batches = [indices[i: i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        # DALI asks for batches ahead of time: the epoch's seed is fixed here, not read at feed time.
        seed = self.epoch_seed()

        def draws(step: int, sizes: np.ndarray) -> BatchDraws:
            # Drawn per block of batch_size slots: the same block gets the same draws on any number of ranks.
            rng = np.random.default_rng([seed, slots[step * self.batch_size] // self.batch_size])
            return batch_draws(self.views, sizes, self.image_size, rng)

        for view1, view2, labels in self._runner.run(batches, draws, self.start_step):
            yield view1, view2, labels


class DaliEvalLoader:
    """Evaluation batches ``(images, labels)`` of samples ``shard_id::num_shards`` in file order, the
    last batch possibly smaller: Resize(int(S*8/7), bicubic) + CenterCrop(S) + ImageNet normalisation."""

    def __init__(self, index: FolderIndex, *, batch_size: int, image_size: int, device: torch.device | str,
                 num_threads: int, shard_id: int = 0, num_shards: int = 1, decoder: str | None = None):
        self.index = index
        self.classes = index.classes
        self.image_size = image_size
        samples = list(range(shard_id, len(index), num_shards))
        if not samples:
            raise DatasetError(f"{str(index.root)!r} has no image for shard {shard_id} of {num_shards}")
        self._batches = [samples[i: i + batch_size] for i in range(0, len(samples), batch_size)]
        self._runner = _Runner(index, views=(EVAL_VIEW,), batch_size=batch_size, image_size=image_size,
                               device=device, num_threads=num_threads, decoder=decoder)

    def __len__(self) -> int:
        return len(self._batches)

    def check(self) -> None:
        """The first batch through the pipeline (``_Runner.check``)."""
        self._runner.check(self._batches[0], self._draws)

    def _draws(self, step: int, sizes: np.ndarray) -> BatchDraws:
        return batch_draws((EVAL_VIEW,), sizes, self.image_size, None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._runner.run(self._batches, self._draws):
            yield images, labels
