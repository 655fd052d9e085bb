"""Realistic benchmark inputs: ~2 MP JPEGs made by upscaling the real photos of ../shared."""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image

TARGET_PIXELS = 2_000_000


def two_megapixel_jpegs(images_dir: Path, quality: int = 90) -> list[bytes]:
    """Every photo of `images_dir`, scaled to ~2 MP (aspect kept) and encoded as a JPEG."""
    out = []
    for path in sorted(images_dir.glob("*.[jp][pn]g")):
        img = Image.open(path).convert("RGB")
        scale = math.sqrt(TARGET_PIXELS / (img.width * img.height))
        size = (round(img.width * scale), round(img.height * scale))
        buffer = io.BytesIO()
        img.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out
