"""The reference's augmentation recipes as torchvision/PIL transforms.

These are the baseline the DALI pipelines are checked against, and the fallback data path where
DALI is missing. The parameters are those of GANPerf/LCR (``augmentations/byol_aug.py``) and of
MoCo v2's "aug-plus" recipe (``main_moco.py``).
"""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RECIPES = ("byol", "mocov2")


def blur_kernel_size(image_size: int) -> int:
    """The reference's blur window: odd, about a tenth of the image (23 at 224 px)."""
    return image_size // 20 * 2 + 1


def eval_resize(image_size: int) -> int:
    """Resize-before-center-crop size (256 at 224 px)."""
    return int(image_size * (8 / 7))


class Solarize:
    """Invert pixels at or above 128, as PIL's ImageOps.solarize."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, 128)


class PILGaussianBlur:
    """MoCo v2's blur: PIL's Gaussian filter with a radius drawn uniformly from ``sigma``."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        radius = float(torch.empty(1).uniform_(*self.sigma))
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def _normalize() -> list:
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def byol_view_transforms(image_size: int) -> tuple[Callable, Callable]:
    """BYOL's asymmetric pair: view 1 always blurred; view 2 blurred with p=0.1 and solarized with p=0.2."""
    kernel = blur_kernel_size(image_size)

    def common() -> list:
        return [
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]

    view1 = T.Compose(common() + [T.GaussianBlur(kernel_size=kernel, sigma=(0.1, 2.0))] + _normalize())
    view2 = T.Compose(
        common()
        + [T.RandomApply([T.GaussianBlur(kernel_size=kernel, sigma=(0.1, 2.0))], p=0.1),
           T.RandomApply([Solarize()], p=0.2)]
        + _normalize()
    )
    return view1, view2


def mocov2_view_transform(image_size: int) -> Callable:
    """MoCo v2 "aug-plus": both views drawn from the same distribution."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
        ]
        + _normalize()
    )


def two_view_transforms(recipe: str, image_size: int) -> tuple[Callable, Callable]:
    if recipe == "byol":
        return byol_view_transforms(image_size)
    if recipe == "mocov2":
        view = mocov2_view_transform(image_size)
        return view, view
    raise ValueError(f"unknown augmentation recipe {recipe!r}; expected one of {RECIPES}")


def linear_train_transform(image_size: int) -> Callable:
    """The training images of BYOL's linear evaluation (the reference's ``Transform_single`` with
    ``train_classifier=True``): RandomResizedCrop (bicubic) + flip, no colour augmentation."""
    return T.Compose(
        [T.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                             interpolation=T.InterpolationMode.BICUBIC),
         T.RandomHorizontalFlip()]
        + _normalize()
    )


def eval_transform(image_size: int) -> Callable:
    """Resize(8/7 of the crop, bicubic) + CenterCrop, as the reference's evaluation loaders."""
    return T.Compose(
        [T.Resize(eval_resize(image_size), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
        + _normalize()
    )

