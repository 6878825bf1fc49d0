"""A synthetic fine-grained ImageFolder: every class shows the same object on the same kind of clutter
and differs only in one small part (the colour and shape of a mark on the object's head).

This is what makes fine-grained recognition hard — the discriminative evidence is a few percent of
the pixels, at a random position and scale — so it exercises the rationale branch, and it lets tests,
the demo and the benchmarks run without downloading CUB, Cars or Aircraft.

    python -m lcr_fast.data.synthetic --out data/synthetic --classes 10 --train-per-class 24 --test-per-class 8
"""
from __future__ import annotations

import argparse
import dataclasses
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MARK_COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (40, 70, 220), "yellow": (240, 200, 20),
                "magenta": (200, 40, 200), "cyan": (20, 200, 210), "orange": (250, 130, 20),
                "white": (250, 250, 250)}
MARK_SHAPES = ["disc", "square", "triangle", "bar"]
PHOTO_GRAIN = 12.0  # see ``render``: photo-like JPEG sizes, what the benchmarks read


@dataclasses.dataclass(frozen=True)
class Scene:
    """How hard the scene makes the mark to find. The defaults are what tests and benchmarks draw."""

    background: tuple[int, int] = (90, 170)  # range of each channel of the plain background
    clutter: tuple[int, int] = (6, 14)  # range of the number of distractor shapes
    mark_scale: float = 0.45  # the mark's radius as a fraction of the head's
    object_scale: tuple[float, float] = (0.35, 0.6)  # range of the object's size, a fraction of the image side
    shapes: int = len(MARK_SHAPES)  # mark shapes in use: class c has shape c % shapes and colour c // shapes
    colours: tuple[str, ...] = tuple(MARK_COLOURS)  # names of the MARK_COLOURS in use, in class order

    @property
    def max_classes(self) -> int:
        return len(self.colours) * self.shapes

    def mark(self, label: int) -> tuple[str, str]:
        """The shape and colour name of class ``label``'s mark."""
        return MARK_SHAPES[label % self.shapes], self.colours[label // self.shapes]


# The demo's dataset (make demo, benchmarks/demo_seeds.py): eight classes told apart by the colour of a large mark on
# a plain scene, the object's size varying. On the default scene (distractors, a small mark in four shapes) a few
# minutes of CPU training from random weights learn nothing the untrained network does not already see.
DEMO = {"num_classes": 8, "train_per_class": 32, "test_per_class": 20,
        "scene": Scene(background=(128, 128), clutter=(0, 0), mark_scale=0.9, object_scale=(0.3, 0.9), shapes=1)}


def class_names(num_classes: int, scene: Scene = Scene()) -> list[str]:
    return [f"{i:03d}.{'_'.join(reversed(scene.mark(i)))}" for i in range(num_classes)]


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int, count: tuple[int, int]) -> None:
    for _ in range(rng.randint(*count)):
        colour = tuple(rng.randint(40, 200) for _ in range(3))
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.1, 0.5) * w, y0 + rng.uniform(0.1, 0.5) * h
        kind = rng.random()
        if kind < 0.4:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind < 0.8:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=max(1, int(0.02 * min(w, h))))


def _mark(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple) -> None:
    if shape == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        draw.rectangle((cx - 1.4 * r, cy - 0.45 * r, cx + 1.4 * r, cy + 0.45 * r), fill=colour)


def render(label: int, size: tuple[int, int], rng: random.Random, grain: float = 0.0,
           scene: Scene = Scene()) -> Image.Image:
    """One image of class ``label``: clutter, a bird-like object, and the class's mark on its head.

    ``grain`` is the standard deviation (grey levels) of a luminance noise added before the final
    blur. Flat colours compress to about 10 KB at 500x375 and quality 90; a grain of 12 gives about
    70 KB (``PHOTO_GRAIN``), in the range of photos of that size, so that JPEG decoding costs in a
    benchmark about what it costs on a real dataset.
    """
    w, h = size
    img = Image.new("RGB", size, tuple(rng.randint(*scene.background) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, w, h, scene.clutter)

    scale = rng.uniform(*scene.object_scale) * min(w, h)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.35, 0.7) * h
    body = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in (120, 95, 70))
    draw.ellipse((cx - scale * 0.6, cy - scale * 0.35, cx + scale * 0.6, cy + scale * 0.35), fill=body)
    facing = rng.choice((-1, 1))
    hx, hy, hr = cx + facing * scale * 0.55, cy - scale * 0.35, scale * 0.22
    draw.ellipse((hx - hr, hy - hr, hx + hr, hy + hr), fill=body)
    draw.polygon([(hx + facing * hr * 0.9, hy - hr * 0.2), (hx + facing * hr * 1.6, hy),
                  (hx + facing * hr * 0.9, hy + hr * 0.2)], fill=(60, 50, 40))

    shape, colour = scene.mark(label)
    _mark(draw, shape, hx - facing * hr * 0.15, hy - hr * 0.1, hr * scene.mark_scale, MARK_COLOURS[colour])
    if grain:
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, grain, (h, w, 1))
        img = Image.fromarray((np.asarray(img) + noise).clip(0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.0, 0.6)))


COUNTS = {"num_classes": 10, "train_per_class": 24, "test_per_class": 8}  # write_dataset's, without --demo


def write_dataset(out_dir: str | Path, num_classes: int = COUNTS["num_classes"],
                  train_per_class: int = COUNTS["train_per_class"], test_per_class: int = COUNTS["test_per_class"],
                  image_size: tuple[int, int] = (96, 96), seed: int = 0, quality: int = 90, grain: float = 0.0,
                  scene: Scene = Scene()) -> Path:
    """Write ``out_dir/{train,test}/<class>/<n>.jpg`` and return ``out_dir`` (``grain``, ``scene`` as in ``render``)."""
    if not 2 <= num_classes <= scene.max_classes:
        raise ValueError(f"num_classes must be in [2, {scene.max_classes}] with {scene.shapes} mark shapes, "
                         f"got {num_classes}")
    out = Path(out_dir)
    names = class_names(num_classes, scene)
    for split, per_class, split_seed in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        for label, name in enumerate(names):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                rng = random.Random(hash((seed, split_seed, label, n)) & 0xFFFFFFFF)
                render(label, image_size, rng, grain, scene).save(folder / f"{n:04d}.jpg", quality=quality)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The options, unparsed: tests/test_docs.py checks the documentation's commands against them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (train/ and test/ are created in it)")
    parser.add_argument("--demo", action="store_true",
                        help="the demo's dataset (DEMO): its classes, counts and scene; the options below override it")
    parser.add_argument("--classes", type=int)
    parser.add_argument("--train-per-class", type=int)
    parser.add_argument("--test-per-class", type=int)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grain", type=float, default=0.0,
                        help="luminance noise, grey levels (photo-like file sizes: 12)")
    parser.add_argument("--background", type=int, nargs=2, metavar=("LOW", "HIGH"),
                        help="range of each background channel")
    parser.add_argument("--clutter", type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="range of the number of distractor shapes")
    parser.add_argument("--mark-scale", type=float, help="mark radius as a fraction of the head's")
    parser.add_argument("--object-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                        help="range of the object's size as a fraction of the image side")
    parser.add_argument("--shapes", type=int, choices=range(1, len(MARK_SHAPES) + 1),
                        help="mark shapes in use (classes cycle through shapes, then colours)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    base = DEMO if args.demo else {**COUNTS, "scene": Scene()}
    counts = {key: getattr(args, key) if getattr(args, key) is not None else base[key]
              for key in ("train_per_class", "test_per_class")}
    classes = args.classes if args.classes is not None else base["num_classes"]
    changes = {field: tuple(value) if isinstance(value, list) else value
               for field, value in (("background", args.background), ("clutter", args.clutter),
                                    ("mark_scale", args.mark_scale), ("object_scale", args.object_scale),
                                    ("shapes", args.shapes)) if value is not None}
    scene = dataclasses.replace(base["scene"], **changes)
    try:
        out = write_dataset(args.out, classes, counts["train_per_class"], counts["test_per_class"],
                            (args.width, args.height), args.seed, grain=args.grain, scene=scene)
    except ValueError as e:
        parser.error(str(e))
    total = classes * (counts["train_per_class"] + counts["test_per_class"])
    print(f"wrote {total} images of {classes} classes to {out}")


if __name__ == "__main__":
    main()
