"""Exact torchvision-style preprocessing, written plainly, as the yardstick for the fast path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def torchvision_input(
    path: Path,
    mean: Sequence[float],
    std: Sequence[float],
    resize_shorter: int = 256,
    crop: int = 224,
) -> np.ndarray:
    """[1,3,crop,crop] float32 as EXPECTED.json describes: PIL RGB, bilinear resize, centre crop."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if w <= h:
        size = (resize_shorter, int(resize_shorter * h / w))
    else:
        size = (int(resize_shorter * w / h), resize_shorter)
    img = img.resize(size, Image.Resampling.BILINEAR)
    left = round((size[0] - crop) / 2)
    top = round((size[1] - crop) / 2)
    img = img.crop((left, top, left + crop, top + crop))
    pixels = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)
