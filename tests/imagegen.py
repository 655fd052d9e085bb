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


# --- damaged files: one well-formed file, one precise defect ----------------------------------


def _segment(data: bytes, marker: bytes) -> int:
    """Offset of the first JPEG marker segment `marker` (e.g. b"\\xff\\xda"), which must exist."""
    at = data.find(marker)
    if at < 0:
        raise ValueError(f"no {marker!r} segment in this JPEG")
    return at


def jpeg_scan_overwritten(data: bytes, fill: int | None, length: int = 2000) -> bytes:
    """`data` with `length` bytes of its entropy-coded scan replaced, 200 bytes after the SOS.

    fill=None: seeded random bytes (libjpeg decodes them as noise, only warning); fill=0xFF: a
    run of marker prefixes, which libjpeg cannot decode.
    """
    start = _segment(data, b"\xff\xda") + 200
    if fill is None:
        junk = np.random.default_rng(1).integers(0, 256, length, np.uint8).tobytes()
    else:
        junk = bytes([fill]) * length
    return data[:start] + junk + data[start + length :]


def jpeg_declaring(data: bytes, width: int, height: int) -> bytes:
    """A baseline JPEG whose frame header (SOF0) is rewritten to width x height."""
    at = _segment(data, b"\xff\xc0") + 5  # marker, length (2), precision (1)
    return data[:at] + struct.pack(">HH", height, width) + data[at + 4 :]


def jpeg_with_broken_huffman_table(data: bytes) -> bytes:
    """A JPEG whose first Huffman table claims 255 codes of every length (no valid code tree)."""
    at = _segment(data, b"\xff\xc4") + 5  # marker, length (2), class/id (1)
    return data[:at] + b"\xff" * 16 + data[at + 16 :]


def jpeg_with_app1(data: bytes, payload: bytes) -> bytes:
    """`data` with an APP1 segment holding `payload` right after SOI (e.g. a damaged EXIF)."""
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


GARBAGE_EXIF: bytes = b"Exif\x00\x00II*\x00" + struct.pack("<I", 0x7FFF0000) + b"junk" * 10
"""An EXIF block whose first IFD offset points far beyond its end."""


def _png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, payload length) of every chunk of a PNG."""
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append((at, data[at + 4 : at + 8], length))
        at += 12 + length
    return chunks


def png_with_bad_crc(data: bytes, kind: bytes) -> bytes:
    """`data` with the CRC of its first `kind` chunk (b"IHDR", b"IDAT", ...) zeroed."""
    at, _, length = next(c for c in _png_chunks(data) if c[1] == kind)
    crc = at + 8 + length
    return data[:crc] + b"\x00\x00\x00\x00" + data[crc + 4 :]


def png_with_corrupt_deflate(data: bytes) -> bytes:
    """`data` with 190 bytes of its first IDAT's deflate stream overwritten (CRC kept valid)."""
    at, _, length = next(c for c in _png_chunks(data) if c[1] == b"IDAT")
    payload = bytearray(data[at + 8 : at + 8 + length])
    payload[10:200] = b"\x55" * 190
    return data[:at] + _png_chunk(b"IDAT", bytes(payload)) + data[at + 12 + length :]


def png_bomb(width: int, height: int) -> bytes:
    """A real, fully decodable all-black grey PNG: width x height pixels in a few dozen KB.

    8000x8000 is 64 MP (256 MB as RGBA) from ~62 KB. Built row block by row block so that
    making it costs no more memory than a few rows.
    """
    deflate = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter type 0, then `width` black samples
    blocks = [deflate.compress(row * 256) for _ in range(height // 256)]
    blocks.append(deflate.compress(row * (height % 256)))
    blocks.append(deflate.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(blocks))
        + _png_chunk(b"IEND", b"")
    )


def bmp_declaring(width: int, height: int) -> bytes:
    """A 4x4 BMP whose info header is rewritten to claim width x height pixels."""
    data = encode(Image.new("RGB", (4, 4)), "BMP")
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


def webp_with_corrupt_frame(data: bytes) -> bytes:
    """A lossy WebP whose VP8 data is replaced by seeded random bytes after its frame header."""
    at = data.index(b"VP8 ") + 20  # chunk header (8), frame tag (3), start code (3), size (4)
    junk = np.random.default_rng(3).integers(0, 256, len(data) - at, np.uint8).tobytes()
    return data[:at] + junk


def grey16(img: Image.Image) -> Image.Image:
    """`img` as a 16-bit greyscale image (mode I;16), each 8-bit level v stored as v * 257."""
    wide = np.asarray(img.convert("L")).astype(np.uint16) * 257
    return Image.fromarray(wide)


def multipart(boundary: str, *parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart/form-data body of (field name, filename or None, content) parts.

    A part with a filename is a file upload (Content-Type application/octet-stream); one
    without is a plain text field.
    """
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        headers = f"Content-Disposition: {disposition}\r\n"
        if filename is not None:
            headers = (
                f'Content-Disposition: {disposition}; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n"
            )
        out += f"--{boundary}\r\n{headers}\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()
