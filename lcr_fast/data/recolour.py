"""The colour step of the DALI recipes: ``out = clip(M x + K m)`` per sample, m being the mean colour of
the image x (ColorJitter followed by RandomGrayscale, as ``dali.colour_transform`` composes them).

On the GPU this is DALI's own operators (``recolour_ops``): a mean reduction, ``coord_transform`` by K
of that mean and by M of the image, then arithmetic. DALI takes named argument inputs (``T=``) only from
the CPU, so the per-image offset K m, computed from GPU data, joins by broadcast addition instead. On the
CPU those operators cost about a third of the whole two-view recipe (``coord_transform`` is a scalar
loop), so there the same arithmetic runs as one compiled Numba kernel inside the DALI graph (DALI's
``NumbaFunction`` operator, executed by DALI's worker threads without the GIL), several times faster.
Both round the same way (+ 0.5, clip, truncate); tests run ``recolour_ops`` on CPU data nodes against
the kernel and find them equal to the byte.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode
from nvidia.dali.plugin.numba import NumbaFunction


@njit
def recolour_pixels(out: np.ndarray, image: np.ndarray, M: np.ndarray, K: np.ndarray) -> None:
    """``out = clip(round(M x + K m), 0, 255)`` for the uint8 HWC ``image`` with mean colour m."""
    pixels, result = image.reshape(-1, 3), out.reshape(-1, 3)
    n = pixels.shape[0]
    total = np.zeros(3)  # float64: exact for any image size that fits in memory
    for i in range(n):
        for c in range(3):
            total[c] += pixels[i, c]
    mean = total / n
    # + 0.5 then truncation: round half up, as DALI's conversion of the non-negative values that survive the clip.
    offset = np.empty(3, np.float32)
    for c in range(3):
        offset[c] = K[c, 0] * mean[0] + K[c, 1] * mean[1] + K[c, 2] * mean[2] + 0.5
    for i in range(n):
        r, g, b = np.float32(pixels[i, 0]), np.float32(pixels[i, 1]), np.float32(pixels[i, 2])
        for c in range(3):
            v = M[c, 0] * r + M[c, 1] * g + M[c, 2] * b + offset[c]
            result[i, c] = np.uint8(min(max(v, np.float32(0)), np.float32(255)))


def _run(out, image, M, K):
    recolour_pixels(out, image, M, K)


def _same_shape(out_shapes, in_shapes):
    for sample in range(len(out_shapes[0])):
        for axis in range(3):
            out_shapes[0][sample][axis] = in_shapes[0][sample][axis]


@functools.cache
def _cpu_operator() -> NumbaFunction:
    # Compiled once per process (seconds); the operator object can be called in any number of pipelines.
    return NumbaFunction(run_fn=_run, setup_fn=_same_shape, out_types=[types.UINT8],
                         in_types=[types.UINT8, types.FLOAT, types.FLOAT], outs_ndim=[3], ins_ndim=[3, 2, 2],
                         device="cpu")


def recolour_ops(images: DataNode, M: DataNode, K: DataNode) -> DataNode:
    """``recolour_pixels`` as DALI operators that exist on both devices. ``M`` and ``K`` are CPU nodes
    (named arguments); the offset derived from the images stays a regular input, as the GPU requires."""
    mean = fn.reshape(fn.reductions.mean(images, axis_names="HW"), shape=[1, 3])
    offset = fn.reshape(fn.coord_transform(mean, M=K), shape=[1, 1, 3])
    values = fn.coord_transform(images, M=M, dtype=types.FLOAT) + offset + 0.5
    # The values are exact integers after the floor, so the cast cannot round either way.
    return fn.cast(dmath.floor(dmath.clamp(values, 0.0, 255.0)), dtype=types.UINT8)


def recolour(images: DataNode, M: DataNode, K: DataNode, device: str) -> DataNode:
    """``clip(M x + K m)`` of each uint8 HWC image x in ``images``, rounded to uint8 (``device`` "cpu" or "gpu")."""
    if device == "cpu":
        return fn.reshape(_cpu_operator()(images, M, K), layout="HWC")
    return recolour_ops(images, M, K)
