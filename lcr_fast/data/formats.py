"""Image files recognised by their content, as PIL (the reference's loader) reads them, and the true
reason a file cannot be used.

A file's extension only selects it as a candidate (torchvision's ImageFolder list); what it holds
decides how it is checked and decoded: a PNG saved as ``.jpg`` is a PNG, an HTML error page saved as
``.jpg`` is "not an image (HTML)".
"""
from __future__ import annotations

import io
import os

from PIL import Image

# torchvision's ImageFolder extensions (IMG_EXTENSIONS): the files the reference's loader picks up.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What DALI's decoders read (checked with DALI 2.4.0 on the CPU). Other formats PIL reads (GIF, ...)
# reach DALI re-encoded as PNG, losslessly, by ``png_bytes``.
DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "PNM", "WebP"})
# A JPEG ends with the EOI marker; writers may pad a few bytes after it, so look at the tail.
_JPEG_TAIL_BYTES = 1024
_HEAD_BYTES = 64
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"BM", "BMP"),
)
# ISO base media brands (bytes 8-12 after "ftyp") of still-image formats.
_FTYP_IMAGES = {b"heic": "HEIF", b"heix": "HEIF", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF",
                b"avis": "AVIF"}
_DOCUMENTS = ((b"<!doctype html", "HTML"), (b"<html", "HTML"), (b"<head", "HTML"), (b"<body", "HTML"),
              (b"<svg", "SVG"), (b"<?xml", "XML"), (b"%pdf", "PDF"), (b"{", "JSON"), (b"[", "JSON"))
# Formats whose header check (PIL's verify) proves the pixel data whole: PNG checks every chunk's CRC up to
# IEND; JPEG has its end-of-image marker. Every other format is decoded in full: they are rare in photo
# datasets, and mostly uncompressed or cheap to decode.
_HEADER_CHECKED = ("JPEG", "PNG")
# Formats every PIL build reads; the others (WebP, JPEG 2000, HEIF, AVIF) need a library PIL may lack.
_PIL_BUILT_IN = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "PNM")


def sniff_format(head: bytes) -> str | None:
    """The image format that ``head`` (a file's first bytes) starts, or None for none we know."""
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if len(head) > 2 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "PNM"
    if head[4:8] == b"ftyp" and head[8:12] in _FTYP_IMAGES:
        return _FTYP_IMAGES[head[8:12]]
    return None


def _not_an_image(head: bytes) -> str | None:
    """"not an image (HTML)" and the like for documents and text, else None."""
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for prefix, name in _DOCUMENTS:
        if start.startswith(prefix):
            return f"{name}, not a raster image" if name == "SVG" else f"not an image ({name})"
    if head[4:8] == b"ftyp":
        return f"not an image (ISO media {head[8:12].decode('ascii', 'replace').strip()!r}, e.g. a video)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # The cut may split a character: only the last three bytes may fail.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return None
    if all(c.isprintable() or c.isspace() for c in text):
        return "not an image (text)"
    return None


def _decode_failure(kind: str, exc: Exception) -> str:
    message = str(exc)
    if "truncated" in message.lower():
        return f"truncated {kind} ({message})"
    return f"cannot decode {kind}: {type(exc).__name__}: {message}"


def check_image(path: str) -> str | None:
    """Why ``path`` cannot be read as an image, or None when it looks whole.

    The format comes from the file's first bytes, never from its name. A JPEG is checked by PIL's
    verify and its end-of-image marker (truncated JPEGs pass verify; the marker costs one small read
    instead of a full decode), a PNG by PIL's verify (every chunk's CRC), anything else by a full
    decode. A file PIL can read in a format we do not name is accepted, as PIL would read it.
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
            kind = sniff_format(head)
            if kind == "JPEG":
                f.seek(max(0, size - _JPEG_TAIL_BYTES))
                if b"\xff\xd9" not in f.read():
                    return "truncated JPEG (no end-of-image marker)"
    except OSError as exc:
        return f"cannot read it: {exc}"
    try:
        with Image.open(path) as img:
            if kind in _HEADER_CHECKED:
                img.verify()
            else:
                img.load()
    except Exception as exc:  # PIL raises many types for broken or unknown files
        if kind is not None:
            if isinstance(exc, Image.UnidentifiedImageError) and kind not in _PIL_BUILT_IN:
                return f"unsupported format {kind} (PIL cannot read it here; convert it to JPEG or PNG)"
            return _decode_failure(kind, exc)
        return _not_an_image(head) or f"unknown format (starts with {head[:8].hex(' ')})"
    return None


def png_bytes(data: bytes) -> bytes:
    """``data`` (any format PIL reads) as a PNG of its RGB pixels: PIL's ``convert("RGB")``, as the
    torchvision loader decodes it, kept lossless for a decoder that does not read the original."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=1)
    return out.getvalue()
