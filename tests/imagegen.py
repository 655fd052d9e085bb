"""Test images built in memory: valid ones in every mode and format, and crafted hostile bytes."""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]

RED: RGB = (255, 0, 0)
GREEN: RGB = (0, 255, 0)
BLUE: RGB = (0, 0, 255)
WHITE: RGB = (255, 255, 255)


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    """`img` saved in `fmt` (a Pillow format name), as bytes."""
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def gradient(width: int = 60, height: int = 40) -> Image.Image:
    """An RGB image with no symmetry: red grows left to right, green top to bottom, blue is 90.

    Any flip or rotation of it is a different image, which is what orientation tests need.
    """
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, axis=0)
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None].repeat(width, axis=1)
    blue = np.full((height, width), 90.0)
    return Image.fromarray(np.stack([x, y, blue], axis=2).round().astype(np.uint8))


def upscaled_jpeg(photo: Path, megapixels: float = 2.0, quality: int = 90) -> bytes:
    """A real photo upscaled (bicubic) to about `megapixels` and saved as a JPEG.

    Stands in for a camera photo: large enough that JPEG draft decoding matters.
    """
    img = Image.open(photo).convert("RGB")
    factor = math.sqrt(megapixels * 1e6 / (img.width * img.height))
    size = (round(img.width * factor), round(img.height * factor))
    return encode(img.resize(size, Image.Resampling.BICUBIC), "JPEG", quality=quality)


def jpeg_with_orientation(img: Image.Image, orientation: int) -> bytes:
    """`img` as a JPEG whose EXIF says it must be shown with `orientation` (1..8) applied."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def animation(fmt: str, colours: list[RGB], size: tuple[int, int] = (32, 24)) -> bytes:
    """A multi-frame GIF or WebP, one solid colour per frame."""
    frames = [Image.new("RGB", size, colour) for colour in colours]
    extra: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **extra)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming width x height RGB pixels, then 8 bytes of image data.

    Decoding it would need width * height * 4 bytes of memory (10 GB for 50000x50000); only
    a check of the header's numbers before decoding keeps that from happening.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 8))
        + _png_chunk(b"IEND", b"")
    )


def _gif(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    # Logical screen with a 2-colour global palette, then one image of `frame` size whose
    # LZW data encodes a single pixel (clear code, index 0, end code).
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", *screen, 0x80, 0, 0)
        + b"\x00\x00\x00\xff\xff\xff"
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, *frame, 0)
        + b"\x02\x02\x44\x01\x00"
        + b"\x3b"
    )


def gif_declaring_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width x height, holding one 1x1 frame."""
    return _gif((width, height), (1, 1))


def gif_declaring_frame(width: int, height: int) -> bytes:
    """A GIF with a 1x1 screen whose first frame claims width x height (Pillow grows the image)."""
    return _gif((1, 1), (width, height))


def truncated(data: bytes, keep: float) -> bytes:
    """The first `keep` fraction (0..1) of `data`."""
    return data[: int(len(data) * keep)]


def unsupported_formats() -> dict[str, bytes]:
    """Real files in formats Pillow knows but the service must refuse (attack surface, rarity)."""
    small = gradient(16, 16)
    return {
        "ico": encode(small, "ICO"),
        "ppm": encode(small, "PPM"),
        "pdf": encode(small, "PDF"),
        "tga": encode(small, "TGA"),
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n",
        "psd": b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 16, 16, 8, 3),
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"/>',
    }


def not_images() -> dict[str, bytes]:
    """Bodies a confused or hostile client may send instead of an image."""
    return {
        "zero bytes": b"",
        "text": b"hello, this is not an image\n",
        "html": b"<!DOCTYPE html><html><body><img src='cat.jpg'></body></html>",
        "json": b'{"image": "aGVsbG8="}',
        "random bytes": np.random.default_rng(1234).integers(0, 256, 4096, np.uint8).tobytes(),
        "png signature only": b"\x89PNG\r\n\x1a\n",
        "jpeg markers only": b"\xff\xd8\xff\xd9",
    }
