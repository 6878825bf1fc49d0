"""Image files are recognised by content, as PIL reads them, on every backend; what is skipped names its true reason."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lcr_fast.data import build_eval_loader, build_train_loader, scan_split
from lcr_fast.data.formats import check_image, png_bytes, sniff_format
from lcr_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.usefixtures("one_thread")

S = 32
# One flat colour per class: every crop, resize and blur of a flat image keeps it, so pixels can be checked exactly.
COLOURS = {"amber": (230, 160, 20), "blue": (20, 60, 200), "green": (30, 190, 70)}
FORMAT_OF = {"amber": "PNG", "blue": "GIF", "green": "JPEG"}  # what each class's files hold, all named .jpg


def _encoded(colour, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(out, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.fixture
def disguised(tmp_path):
    """train/ and test/ whose every file is named .jpg, each class's of another format (FORMAT_OF)."""
    for split in ("train", "test"):
        for name, colour in COLOURS.items():
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for n in range(2):
                (folder / f"{n}.jpg").write_bytes(_encoded(colour, FORMAT_OF[name]))
    return tmp_path


def _normalised(colour) -> torch.Tensor:
    return (torch.tensor(colour) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def test_formats_are_sniffed_from_content():
    rgb = Image.new("RGB", (8, 8), (1, 2, 3))
    for fmt, name in (("PNG", "PNG"), ("JPEG", "JPEG"), ("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF"),
                      ("WEBP", "WebP"), ("PPM", "PNM")):
        out = io.BytesIO()
        rgb.save(out, format=fmt)
        assert sniff_format(out.getvalue()[:64]) == name
    assert sniff_format(b"<!DOCTYPE html><html>") is None
    assert sniff_format(b"\x00\x00\x00\x18ftypheic\x00\x00") == "HEIF"


def test_a_png_or_gif_named_jpg_is_kept_and_damaged_files_name_their_true_reason(disguised):
    folder = disguised / "train" / "amber"
    jpeg = _encoded((10, 20, 30), "JPEG")
    png = (folder / "0.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "cut_png.jpg").write_bytes(png[: len(png) - 20])
    (folder / "notes.jpg").write_text("a caption someone saved with an image's name\n")
    (folder / "page.jpg").write_text("<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>\n")
    (folder / "blob.png").write_bytes(bytes(range(200, 256)) * 4)
    with pytest.warns(UserWarning, match=r"skipped 5 unreadable image file\(s\) of 11"):
        index = scan_split(disguised, "train")
    assert len(index) == 6
    reasons = {path.rsplit("/", 1)[1]: reason for path, reason in index.skipped}
    assert reasons["cut.jpg"] == "truncated JPEG (no end-of-image marker)"
    assert reasons["cut_png.jpg"].startswith("truncated PNG")
    assert reasons["notes.jpg"] == "not an image (text)"
    assert reasons["page.jpg"] == "not an image (HTML)"
    assert reasons["blob.png"] == "unknown format (starts with c8 c9 ca cb cc cd ce cf)"
    assert check_image(str(folder / "0.jpg")) is None


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_every_backend_reads_png_and_gif_named_jpg_with_their_pixels_and_labels(disguised, backend):
    index = scan_split(disguised, "test")
    assert not index.skipped
    images, labels = zip(*build_eval_loader(disguised, "test", 6, S, backend, "cpu", num_threads=1, index=index))
    images, labels = torch.cat(images), torch.cat(labels)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    for image, label in zip(images, labels):
        expected = _normalised(COLOURS[index.classes[label]]).view(3, 1, 1).expand_as(image)
        # JPEG's chroma subsampling moves a flat colour by a grey level or two; PNG and GIF keep it exactly.
        tolerance = 3 / 255 / min(IMAGENET_STD) if index.classes[label] == "green" else 1e-4
        torch.testing.assert_close(image, expected, atol=tolerance, rtol=0)

    train = build_train_loader(disguised, "byol", 6, S, backend, "cpu", num_threads=1, seed=0)
    view1, view2, train_labels = next(iter(train))
    assert sorted(train_labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert view1.shape == view2.shape == (6, 3, S, S)


def test_png_bytes_keep_pil_rgb_pixels():
    rng = np.random.default_rng(0)
    palette = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).convert("P")
    out = io.BytesIO()
    palette.save(out, format="GIF")
    with Image.open(io.BytesIO(png_bytes(out.getvalue()))) as again, Image.open(out) as original:
        assert again.format == "PNG"
        assert np.array_equal(np.asarray(again), np.asarray(original.convert("RGB")))
