"""Image bytes to model input: limits, safe decode, upright RGB, resize, crop, normalise."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage

# Pillow's own decompression-bomb guard is switched off for the whole process; `decode` replaces
# it with the configured pixel limit, checked at the same moment (header read, nothing decoded).
# Why not keep Pillow's: between 1x and 2x Image.MAX_IMAGE_PIXELS it only *warns* and then decodes
# anyway. Turning that warning into an error needs the warnings filter list, which is process-wide
# state; `warnings.catch_warnings()` swaps it without a lock (not thread-safe before Python 3.14),
# and decoding runs on a thread pool. With the guard off no warning is ever emitted, and our limit
# is the only one, so operators tune one number (MNV3_MAX_IMAGE_PIXELS).
Image.MAX_IMAGE_PIXELS = None

#: The only formats `decode` will parse: what cameras, browsers and phones send. Everything else
#: (ICO, PDF, EPS, PSD, TGA, ...) is rejected before a plugin sees more than the magic bytes.
FORMATS: Final = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

INTERPOLATIONS: Final = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}

WHITE: Final = (255, 255, 255)

#: Key in Image.info under which `decode` leaves the geometry of a reduced-scale JPEG decode.
DRAFT_INFO_KEY: Final = "mnv3_draft_geometry"

# EXIF orientation -> the transpose that undoes it (the table of PIL.ImageOps.exif_transpose).
_ORIENTATION_FIX: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Integer modes whose samples span 16 bits (Pillow opens 16-bit grey PNG/TIFF as I;16*; "I" is
# its 32-bit container for integer TIFFs, which in practice also carry 16-bit data).
_WIDE_INT_MODES: Final = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})

# Resizing the whole image then cropping (torchvision's order) costs pixels in proportion to the
# aspect ratio: a 100000x1 image would resize to 25600000x256. Past this many pixels of resized
# image (aspect ratio 16:1 at any resize_shorter) only the crop window is resampled instead.
_EXACT_RESIZE_MAX_ASPECT: Final = 16


@dataclass(frozen=True)
class PreprocessSpec:
    """How the model wants its input, as stored in the model file's metadata_props."""

    resize_shorter: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        for name in ("resize_shorter", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.crop > self.resize_shorter:
            # torchvision would zero-pad the crop; no model we serve is trained that way.
            raise ValueError(
                f"crop ({self.crop}) must not exceed resize_shorter ({self.resize_shorter})"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        _check_triple("mean", self.mean, positive=False)
        _check_triple("std", self.std, positive=True)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> PreprocessSpec:
        """Read resize_shorter, crop, interpolation, mean and std (JSON lists) from metadata_props.

        Every key is required: a model file without them was not made by our exporter, and
        guessing ImageNet defaults would silently cost accuracy (the TF-slim weights, for one,
        need different mean/std). Any missing or bad value raises ValueError naming the key.
        """

        def text(key: str) -> str:
            if key not in meta:
                raise ValueError(f"model metadata has no {key!r} (needed for preprocessing)")
            return meta[key]

        def integer(key: str) -> int:
            raw = text(key)
            try:
                return int(raw.strip())
            except ValueError:
                raise ValueError(
                    f"model metadata {key!r} must be an integer, got {raw!r}"
                ) from None

        def triple(key: str) -> tuple[float, float, float]:
            raw = text(key)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = None
            if (
                not isinstance(value, list)
                or len(value) != 3
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            ):
                raise ValueError(
                    f"model metadata {key!r} must be a JSON list of 3 numbers, got {raw!r}"
                )
            return (float(value[0]), float(value[1]), float(value[2]))

        try:
            return cls(
                resize_shorter=integer("resize_shorter"),
                crop=integer("crop"),
                interpolation=text("interpolation").strip().lower(),
                mean=triple("mean"),
                std=triple("std"),
            )
        except ValueError as exc:
            raise ValueError(f"bad preprocessing metadata in the model file: {exc}") from None


def _check_triple(name: str, value: tuple[float, float, float], *, positive: bool) -> None:
    if (
        len(value) != 3
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in value)
        or (positive and not all(v > 0 for v in value))
    ):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise ValueError(f"{name} must be 3 {kind}, got {value!r}")


@dataclass(frozen=True)
class Limits:
    """What one request may cost: bytes on the wire, pixels declared in the image header."""

    max_image_bytes: int
    max_image_pixels: int

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def decode(data: bytes, limits: Limits, *, draft_to: int | None) -> Image.Image:
    """Decode image bytes into an RGB image, upright per its EXIF orientation.

    Accepts JPEG, PNG, WebP, BMP, GIF and TIFF; of an animation, only the first frame.
    Transparency (an alpha channel, a transparent palette entry or a tRNS colour key) is
    composited onto a WHITE background. 16-bit and 32-bit integer greys are scaled from the
    16-bit range to 8 bits; float greys ("F") are clipped to 0..255 as Pillow does.

    Limits are enforced before any pixel is decoded: the byte length before Pillow sees the
    data, then width x height as declared by the header. `draft_to` (a shorter-side length, or
    None) lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale in the DCT domain: the smallest
    scale whose shorter side is still >= draft_to. Other formats ignore it. A drafted image
    carries info[DRAFT_INFO_KEY], the full-size geometry that resize_crop honours.

    Raises ImageTooLarge or InvalidImage; nothing else escapes for any input bytes, except
    MemoryError, which is the host's condition rather than the request's.
    """
    size = len(data)
    if size > limits.max_image_bytes:
        raise ImageTooLarge(f"image is {size} bytes; the limit is {limits.max_image_bytes} bytes")
    if size == 0:
        raise InvalidImage("empty image: the body has zero bytes")

    # Pillow raises many types for hostile bytes (SyntaxError, OSError, ValueError, struct.error,
    # EOFError, IndexError, ...). Each stage below maps all of them to InvalidImage with a
    # message naming the stage; only our own errors and MemoryError pass through.
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage(
            "unsupported or unrecognised image format (accepted: JPEG, PNG, WebP, BMP, GIF, TIFF)"
        ) from None
    except MemoryError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Only reachable if other code re-enabled Pillow's guard (see MAX_IMAGE_PIXELS above).
        raise ImageTooLarge(str(exc)) from exc
    except Exception as exc:
        raise InvalidImage(f"corrupt image header: {exc}") from exc

    width, height = img.size
    pixels = width * height
    if pixels > limits.max_image_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {pixels} pixels; "
            f"the limit is {limits.max_image_pixels} pixels"
        )
    if pixels == 0:
        raise InvalidImage(f"image has no pixels ({width}x{height})")

    fmt = img.format or "image"
    try:
        # Image.draft is a no-op (None) for every format but JPEG.
        drafted = img.draft(None, (draft_to, draft_to)) if draft_to is not None else None
        img.load()
        fix = _orientation_fix(img)
    except MemoryError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(str(exc)) from exc
    except Exception as exc:
        raise InvalidImage(f"corrupt or truncated {fmt} data: {exc}") from exc

    mode = img.mode
    try:
        rgb = _to_rgb(img)
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidImage(f"cannot convert {fmt} pixel mode {mode} to RGB: {exc}") from exc

    # A JPEG decoded at 1/s scale is ceil(W/s) x ceil(H/s): its last column and row stand for
    # fewer than s source pixels. Record where the full-size picture lies in the small one, so
    # that resize_crop can keep torchvision's geometry (size, scale and crop of the original).
    # Without this, 1306x1531 drafted to 327x383 resizes to 256x299 instead of 256x300 and the
    # crop slides by up to half a pixel (measured: mean error 4.9 grey levels instead of 0.83).
    geometry = None
    if drafted is not None and img.size != (width, height):
        geometry = _DraftGeometry((width, height), drafted[1])
    if fix is not None:
        if geometry is not None:
            geometry = geometry.transposed(rgb.size, fix)
        rgb = rgb.transpose(fix)
    if geometry is not None:
        rgb.info[DRAFT_INFO_KEY] = geometry
    return rgb


@dataclass(frozen=True)
class _DraftGeometry:
    """A reduced-scale decode: the full-resolution size, and the box it covers in our pixels."""

    source_size: tuple[int, int]
    box: tuple[float, float, float, float]

    def transposed(self, size: tuple[int, int], method: Image.Transpose) -> _DraftGeometry:
        """The same geometry after `method` is applied to an image of `size`."""
        w, h = size
        x0, y0, x1, y1 = self.box
        (ax, ay), (bx, by) = _move(method, w, h, x0, y0), _move(method, w, h, x1, y1)
        swaps = method in _AXIS_SWAPS
        source = (self.source_size[1], self.source_size[0]) if swaps else self.source_size
        return _DraftGeometry(source, (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)))


def _move(method: Image.Transpose, w: float, h: float, x: float, y: float) -> tuple[float, float]:
    """Where `method` sends the point (x, y) of a w x h image (continuous coordinates)."""
    T = Image.Transpose
    match method:
        case T.FLIP_LEFT_RIGHT:
            return w - x, y
        case T.FLIP_TOP_BOTTOM:
            return x, h - y
        case T.ROTATE_180:
            return w - x, h - y
        case T.ROTATE_90:  # counter-clockwise
            return y, w - x
        case T.ROTATE_270:
            return h - y, x
        case T.TRANSPOSE:
            return y, x
        case T.TRANSVERSE:
            return h - y, w - x
    raise ValueError(f"not a transpose: {method!r}")


_AXIS_SWAPS: Final = frozenset(
    {
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSPOSE,
        Image.Transpose.TRANSVERSE,
    }
)


def _orientation_fix(img: Image.Image) -> Image.Transpose | None:
    """The transpose that makes `img` upright, from EXIF (or XMP) orientation; None if upright."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation)
        return _ORIENTATION_FIX.get(orientation) if isinstance(orientation, int) else None
    except Exception:
        # Metadata is optional: a damaged EXIF block must not reject pixels that decoded fine.
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _WIDE_INT_MODES:
        img = _wide_int_to_8bit(img)
    if img.has_transparency_data:  # also an RGB or L image with a tRNS colour key
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, WHITE)
        background.paste(rgba, mask=rgba)  # the mask is rgba's alpha band
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def _wide_int_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit range -> 8 bits by round(v / 257) (Pillow's own conversion clips at 255 instead,
    turning most 16-bit photos white). A tRNS colour key becomes an alpha band."""
    samples = np.asarray(img)
    wide = np.clip(samples, 0, 65535).astype(np.uint32)
    grey = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    key = img.info.get("transparency")
    if not isinstance(key, int):
        return grey
    alpha = Image.fromarray(np.where(samples == key, 0, 255).astype(np.uint8))
    return Image.merge("LA", (grey, alpha))


def _resized_size(width: int, height: int, resize_shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int): shorter side -> resize_shorter, longer side truncated."""
    if width <= height:
        return resize_shorter, int(resize_shorter * height / width)
    return int(resize_shorter * width / height), resize_shorter


def resize_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize (shorter side -> spec.resize_shorter) then center-crop spec.crop x spec.crop.

    Bit-identical to torchvision's Resize + CenterCrop on PIL images: the whole image is
    resized, then cropped. We measured Pillow's `resize(box=crop window)` shortcut: it samples
    the same positions, but Pillow hands the box to C as 32-bit floats, so some values (0.02%
    on the sample photos, up to 2% at other sizes) differ by 1/255, up to 3/255 with bicubic.
    Parity wins for ordinary images (the full resize costs ~0.4 ms more after a draft); the
    shortcut serves aspect ratios above 16:1, where the full resize grows with the aspect ratio
    (a 100000x1 image would become 25600000x256), and JPEGs that `decode` drafted, which are
    approximate anyway: their sizes and offsets are those of the full-resolution image.
    """
    geometry = img.info.get(DRAFT_INFO_KEY)
    if isinstance(geometry, _DraftGeometry):
        source_size, box = geometry.source_size, geometry.box
    else:
        source_size, box = img.size, (0.0, 0.0, float(img.width), float(img.height))
    new_w, new_h = _resized_size(*source_size, spec.resize_shorter)
    # torchvision's offsets: round() of a float, i.e. half to even (58.5 -> 58).
    left = round((new_w - spec.crop) / 2.0)
    top = round((new_h - spec.crop) / 2.0)
    resample = INTERPOLATIONS[spec.interpolation]
    if geometry is None and new_w * new_h <= _EXACT_RESIZE_MAX_ASPECT * spec.resize_shorter**2:
        resized = img.resize((new_w, new_h), resample)
        return resized.crop((left, top, left + spec.crop, top + spec.crop))

    # Resample only the crop window: crop x crop pixels whatever the size or aspect ratio.
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / new_w, (y1 - y0) / new_h  # our pixels per resized pixel
    window = (
        max(0.0, x0 + left * sx),
        max(0.0, y0 + top * sy),
        min(float(img.width), x0 + (left + spec.crop) * sx),
        min(float(img.height), y0 + (top + spec.crop) * sy),
    )
    return img.resize((spec.crop, spec.crop), resample, box=window)


@lru_cache(maxsize=8)
def _affine(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(x / 255 - mean) / std folded into x * scale + bias, per channel, shaped [3, 1, 1]."""
    m = np.asarray(mean, dtype=np.float64).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float64).reshape(3, 1, 1)
    scale = (1.0 / (255.0 * s)).astype(np.float32)
    bias = (-m / s).astype(np.float32)
    scale.setflags(write=False)
    bias.setflags(write=False)
    return scale, bias


def to_array(img: Image.Image, spec: PreprocessSpec) -> npt.NDArray[np.float32]:
    """An RGB crop x crop image -> float32 [3, crop, crop], C-contiguous, (x/255 - mean) / std.

    One multiply and one add over uint8 input, into one preallocated array (~0.1 ms at 224):
    within 5e-7 of the three-step float32 arithmetic, far below one input level (1/255 / std).
    """
    if img.mode != "RGB" or img.size != (spec.crop, spec.crop):
        raise ValueError(
            f"to_array needs an RGB {spec.crop}x{spec.crop} image, "
            f"got {img.mode} {img.size[0]}x{img.size[1]}"
        )
    scale, bias = _affine(spec.mean, spec.std)
    out = np.empty((3, spec.crop, spec.crop), dtype=np.float32)
    np.multiply(np.asarray(img).transpose(2, 0, 1), scale, out=out)
    out += bias
    return out


def preprocess(
    data: bytes, spec: PreprocessSpec, limits: Limits, *, draft: bool = True
) -> npt.NDArray[np.float32]:
    """Image bytes -> the model's float32 [3, crop, crop] input.

    draft=True lets libjpeg decode large JPEGs at reduced scale (several times faster on
    camera-size photos, see DESIGN.md); draft=False is bit-for-bit torchvision preprocessing
    (up to float32 rounding in the normalisation). Non-JPEG inputs give identical results.
    """
    img = decode(data, limits, draft_to=spec.resize_shorter if draft else None)
    return to_array(resize_crop(img, spec), spec)
