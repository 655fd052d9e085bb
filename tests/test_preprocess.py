"""service.preprocess: what reaches the model for every kind of image bytes, good and hostile."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from service.errors import ImageTooLarge, InvalidImage
from service.preprocess import Limits, PreprocessSpec, decode, preprocess, resize_crop, to_array
from tests import imagegen as gen
from tests.conftest import IMAGES
from tests.reference import torchvision_input

SPEC = PreprocessSpec()
# The TF-slim weights in shared/weights: same sizes, inputs scaled to [-1, 1].
TFSLIM_SPEC = PreprocessSpec(mean=(0.5019607843137255,) * 3, std=(0.4980392187243137,) * 3)
LIMITS = Limits(max_image_bytes=20 * 2**20, max_image_pixels=40_000_000)
PHOTOS = sorted(p for p in IMAGES.iterdir() if p.suffix in {".jpg", ".png"})
Float32Array = npt.NDArray[np.float32]


def pixels(x: Float32Array, spec: PreprocessSpec = SPEC) -> npt.NDArray[np.uint8]:
    """Undo the normalisation: the uint8 RGB image [crop, crop, 3] the model was shown."""
    mean = np.asarray(spec.mean).reshape(3, 1, 1)
    std = np.asarray(spec.std).reshape(3, 1, 1)
    levels: npt.NDArray[np.uint8] = np.rint((x * std + mean) * 255).astype(np.uint8)
    return levels.transpose(1, 2, 0)


def solid_input(colour: tuple[int, int, int], spec: PreprocessSpec = SPEC) -> Float32Array:
    """The model input for an image that is `colour` everywhere."""
    return to_array(Image.new("RGB", (spec.crop, spec.crop), colour), spec)


def assert_model_input(x: Float32Array, spec: PreprocessSpec = SPEC) -> None:
    assert x.shape == (3, spec.crop, spec.crop)
    assert x.dtype == np.float32
    assert x.flags.c_contiguous
    assert np.isfinite(x).all()


# --- PreprocessSpec from the model file's metadata_props ------------------------------------

EXPORTED_METADATA = {  # as models/export.py writes it for the TF-slim weights
    "resize_shorter": "256",
    "crop": "224",
    "interpolation": "bilinear",
    "mean": json.dumps([0.5019607843137255] * 3),
    "std": json.dumps([0.4980392187243137] * 3),
    "arch": "mobilenet_v3_small",  # other keys are ignored
}


def test_spec_reads_the_exporters_metadata() -> None:
    assert PreprocessSpec.from_metadata(EXPORTED_METADATA) == TFSLIM_SPEC


@pytest.mark.parametrize("key", ["resize_shorter", "crop", "interpolation", "mean", "std"])
def test_spec_refuses_metadata_without_a_key(key: str) -> None:
    meta = {k: v for k, v in EXPORTED_METADATA.items() if k != key}
    with pytest.raises(ValueError, match=f"model metadata has no '{key}'"):
        PreprocessSpec.from_metadata(meta)


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("resize_shorter", "256.0", "'resize_shorter' must be an integer"),
        ("crop", "-3", "crop must be a positive integer"),
        ("crop", "300", r"crop \(300\) must not exceed resize_shorter \(256\)"),
        ("interpolation", "lanczos", "interpolation must be one of bilinear, bicubic, nearest"),
        ("mean", "[0.5, 0.5]", "'mean' must be a JSON list of 3 numbers"),
        ("mean", "0.5", "'mean' must be a JSON list of 3 numbers"),
        ("mean", "[0.5, NaN, 0.5]", "mean must be 3 finite numbers"),
        ("std", "[0.2, 0.0, 0.2]", "std must be 3 positive finite numbers"),
        ("std", '["a", "b", "c"]', "'std' must be a JSON list of 3 numbers"),
    ],
)
def test_spec_refuses_bad_metadata_values(key: str, value: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        PreprocessSpec.from_metadata({**EXPORTED_METADATA, key: value})


# --- torchvision parity on the real photos ----------------------------------------------------


@pytest.mark.parametrize("spec", [SPEC, TFSLIM_SPEC], ids=["imagenet", "tfslim"])
@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_matches_torchvision_preprocessing_exactly(photo: Path, spec: PreprocessSpec) -> None:
    """draft=False: the same pixels as torchvision, normalised within float32 rounding."""
    ours = preprocess(photo.read_bytes(), spec, LIMITS, draft=False)
    reference = torchvision_input(photo, spec.mean, spec.std, spec.resize_shorter, spec.crop)[0]
    assert_model_input(ours, spec)
    assert np.array_equal(pixels(ours, spec), pixels(reference, spec))
    assert float(np.abs(ours - reference).max()) <= 1e-6


def test_crop_window_shortcut_is_one_grey_level_off() -> None:
    """Why resize_crop resizes the whole image although Pillow could resample just the crop.

    `img.resize((224, 224), box=crop window)` samples the same source positions as resizing
    the whole image and then cropping, but Pillow hands the box to C as 32-bit floats, so the
    filter weights shift slightly: on these photos some values move by one grey level (never
    more with bilinear at 256/224). Exact parity wins; the shortcut serves only extreme aspect
    ratios and drafted JPEGs. Should this ever measure 0, Pillow has changed and the shortcut
    could be used everywhere (it saves ~35% of the resize time).
    """
    worst = 0
    for photo in PHOTOS:
        img = Image.open(photo).convert("RGB")
        w, h = img.size
        new_w, new_h = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        left, top = round((new_w - 224) / 2), round((new_h - 224) / 2)
        box = (left * w / new_w, top * h / new_h, (left + 224) * w / new_w, (top + 224) * h / new_h)
        window = np.asarray(img.resize((224, 224), Image.Resampling.BILINEAR, box=box), np.int16)
        plain = np.asarray(resize_crop(img, SPEC), dtype=np.int16)
        worst = max(worst, int(np.abs(plain - window).max()))
    assert worst == 1


def test_to_array_normalises_white_and_black() -> None:
    mean, std = np.asarray(SPEC.mean), np.asarray(SPEC.std)
    white, black = solid_input((255, 255, 255)), solid_input((0, 0, 0))
    assert np.allclose(white[:, 0, 0], (1 - mean) / std, rtol=0, atol=1e-6)
    assert np.allclose(black[:, 0, 0], -mean / std, rtol=0, atol=1e-6)


def test_to_array_refuses_an_image_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="needs an RGB 224x224 image, got RGB 225x224"):
        to_array(Image.new("RGB", (225, 224)), SPEC)


# --- pixel modes -> RGB ---------------------------------------------------------------------


def _solid(mode: str, colour: float | tuple[float, ...], fmt: str = "PNG", **params: Any) -> bytes:
    return gen.encode(Image.new(mode, (40, 30), colour), fmt, **params)


def _modes() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """name -> (encoded image, the colour every pixel of the model's input must have)."""
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([200, 30, 60] + [0, 0, 0] * 255)
    wide = Image.fromarray(np.full((30, 40), 128 * 257, np.uint16))  # 16-bit grey 128 * 257
    assert wide.mode == "I;16"
    clear = (0, 0, 0, 0)
    return {
        "L": (_solid("L", 77), (77, 77, 77)),
        "LA opaque": (_solid("LA", (77, 255)), (77, 77, 77)),
        "LA transparent": (_solid("LA", (77, 0)), gen.WHITE),
        "P": (gen.encode(palette, "PNG"), (200, 30, 60)),
        "P transparent": (gen.encode(palette, "PNG", transparency=0), gen.WHITE),
        "P transparent GIF": (gen.encode(palette, "GIF", transparency=0), gen.WHITE),
        "RGBA opaque": (_solid("RGBA", (9, 99, 199, 255)), (9, 99, 199)),
        "RGBA transparent": (_solid("RGBA", clear), gen.WHITE),
        "RGBA WebP transparent": (_solid("RGBA", clear, "WEBP", lossless=True), gen.WHITE),
        "RGB colour key": (_solid("RGB", (1, 2, 3), transparency=(1, 2, 3)), gen.WHITE),
        "CMYK JPEG": (_solid("CMYK", (0, 255, 255, 0), "JPEG", quality=100), gen.RED),
        "I;16 PNG": (gen.encode(wide, "PNG"), (128, 128, 128)),
        "I;16 PNG colour key": (gen.encode(wide, "PNG", transparency=128 * 257), gen.WHITE),
        "I;16 TIFF": (gen.encode(wide, "TIFF"), (128, 128, 128)),
        "1 (bilevel)": (_solid("1", 1), gen.WHITE),
        "F TIFF": (_solid("F", 100.0, "TIFF"), (100, 100, 100)),
        "BMP": (_solid("RGB", (5, 6, 7), "BMP"), (5, 6, 7)),
    }


MODES = _modes()


@pytest.mark.parametrize("name", MODES)
def test_every_pixel_mode_becomes_rgb(name: str) -> None:
    """Each mode gives a [3,224,224] float32 input of the expected colour; alpha lands on white."""
    data, colour = MODES[name]
    x = preprocess(data, SPEC, LIMITS)
    assert_model_input(x)
    assert np.array_equal(pixels(x), np.broadcast_to(np.array(colour, np.uint8), (224, 224, 3)))


def test_transparency_is_composited_onto_white() -> None:
    """Fully transparent -> exactly the white input; half transparent red -> pink."""
    clear = gen.encode(Image.new("RGBA", (50, 50), (0, 0, 0, 0)), "PNG")
    assert np.array_equal(preprocess(clear, SPEC, LIMITS), solid_input(gen.WHITE))
    half_red = gen.encode(Image.new("RGBA", (50, 50), (255, 0, 0, 128)), "PNG")
    assert tuple(pixels(preprocess(half_red, SPEC, LIMITS))[100, 100]) == (255, 127, 127)


# --- EXIF orientation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "by_hand"),
    [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)],
    ids=["6 (rotate 90 cw)", "8 (rotate 90 ccw)"],
)
def test_exif_rotation_is_applied(orientation: int, by_hand: Image.Transpose) -> None:
    data = gen.jpeg_with_orientation(gen.gradient(300, 200), orientation)
    upright = Image.open(io.BytesIO(data)).convert("RGB").transpose(by_hand)
    assert upright.size == (200, 300)
    assert decode(data, LIMITS, draft_to=None).size == (200, 300)
    expected = to_array(resize_crop(upright, SPEC), SPEC)
    assert np.array_equal(preprocess(data, SPEC, LIMITS, draft=False), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_eight_orientations_agree_with_pillow(orientation: int) -> None:
    data = gen.jpeg_with_orientation(gen.gradient(30, 20), orientation)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    ours = decode(data, LIMITS, draft_to=None)
    assert ours.size == expected.size
    assert np.array_equal(np.asarray(ours), np.asarray(expected))


# --- size limits and decompression bombs ----------------------------------------------------


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize(
    ("data", "declared"),
    [
        (gen.png_declaring(50_000, 50_000), "50000x50000 = 2500000000 pixels"),
        (gen.gif_declaring_screen(65_535, 65_535), "65535x65535 = 4294836225 pixels"),
        (gen.gif_declaring_frame(60_000, 60_000), "60000x60000 = 3600000000 pixels"),
    ],
    ids=["PNG header", "GIF screen", "GIF first frame"],
)
def test_bomb_is_rejected_from_its_header(
    data: bytes, declared: str, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    """A tiny file declaring billions of pixels: refused before any pixel is decoded.

    Decoding would allocate 4 bytes per pixel (10-17 GB); `load` is booby-trapped to prove it
    never runs. Pillow's own bomb warning is not emitted either (the limit is ours alone).
    """
    assert len(data) < 100
    _forbid_decoding(monkeypatch)
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match=f"{declared}; the limit is 40000000 pixels"):
        decode(data, LIMITS, draft_to=None)
    assert time.perf_counter() - started < 0.1
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pixel_limit_is_inclusive() -> None:
    data = gen.encode(gen.gradient(60, 40), "PNG")
    assert decode(data, Limits(1000, 60 * 40), draft_to=None).size == (60, 40)
    with pytest.raises(ImageTooLarge, match="60x40 = 2400 pixels; the limit is 2399 pixels"):
        decode(data, Limits(1000, 60 * 40 - 1), draft_to=None)


def test_too_many_bytes_are_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    data = gen.encode(gen.gradient(60, 40), "PNG")

    def open_(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("the bytes were parsed")

    monkeypatch.setattr(Image, "open", open_)
    limits = Limits(max_image_bytes=len(data) - 1, max_image_pixels=10**6)
    message = f"image is {len(data)} bytes; the limit is {len(data) - 1} bytes"
    with pytest.raises(ImageTooLarge, match=message):
        preprocess(data, SPEC, limits)


def test_pillows_bomb_error_becomes_image_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should other code re-enable Pillow's guard, its error still maps to ImageTooLarge."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageTooLarge, match="could be decompression bomb"):
        decode(gen.encode(gen.gradient(60, 40), "PNG"), LIMITS, draft_to=None)


# --- not images, broken images --------------------------------------------------------------

UNSUPPORTED = {**gen.not_images(), **gen.unsupported_formats()}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_non_images_and_unsupported_formats_are_invalid(name: str) -> None:
    data = UNSUPPORTED[name]
    message = "zero bytes" if not data else "unsupported or unrecognised image format"
    with pytest.raises(InvalidImage, match=message):
        preprocess(data, SPEC, LIMITS)


def _photo_bytes(fmt: str) -> bytes:
    return gen.encode(Image.open(IMAGES / "chelsea.png").convert("RGB"), fmt)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_invalid(fmt: str, keep: float) -> None:
    with pytest.raises(InvalidImage, match=f"corrupt or truncated {fmt} data"):
        preprocess(gen.truncated(_photo_bytes(fmt), keep), SPEC, LIMITS)


def test_truncated_images_stay_errors() -> None:
    """Pillow's LOAD_TRUNCATED_IMAGES would silently pad with grey; it must stay off."""
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- extreme shapes, animations ---------------------------------------------------------------


@pytest.mark.parametrize("size", [(100_000, 1), (1, 100_000), (1, 1), (5000, 3)], ids=str)
def test_extreme_shapes_are_valid_images(size: tuple[int, int]) -> None:
    """A 100000x1 image would resize to 25600000x256 first; only the crop is computed."""
    data = gen.encode(Image.new("RGB", size, (10, 200, 30)), "PNG")
    started = time.perf_counter()
    x = preprocess(data, SPEC, LIMITS, draft=False)
    assert time.perf_counter() - started < 0.5
    assert_model_input(x)
    assert np.array_equal(x, solid_input((10, 200, 30)))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_its_first_frame(fmt: str) -> None:
    data = gen.animation(fmt, [gen.RED, gen.GREEN, gen.BLUE])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert np.array_equal(preprocess(data, SPEC, LIMITS), solid_input(gen.RED))


# --- JPEG draft (DCT-domain downscale) ------------------------------------------------------


@pytest.fixture(scope="module")
def two_megapixel_jpeg() -> bytes:
    return gen.upscaled_jpeg(IMAGES / "grace_hopper.jpg", megapixels=2.0)


def test_draft_decodes_a_large_jpeg_at_reduced_scale(two_megapixel_jpeg: bytes) -> None:
    """1306x1531: 1/4 scale is the smallest whose shorter side (327) is still >= 256."""
    assert Image.open(io.BytesIO(two_megapixel_jpeg)).size == (1306, 1531)
    assert decode(two_megapixel_jpeg, LIMITS, draft_to=None).size == (1306, 1531)
    assert decode(two_megapixel_jpeg, LIMITS, draft_to=256).size == (327, 383)


@pytest.mark.parametrize("orientation", [1, 2, 6, 7])
def test_draft_is_close_to_full_decode(two_megapixel_jpeg: bytes, orientation: int) -> None:
    """Measured: mean |difference| 0.83 grey levels (0.015 normalised), max 22 levels at edges.

    Also with EXIF orientations: the drafted image keeps the full-size geometry (256x300 then
    the centre crop), so no half-pixel slide appears after rotations and flips.
    """
    data = two_megapixel_jpeg
    if orientation != 1:
        data = gen.jpeg_with_orientation(Image.open(io.BytesIO(data)), orientation)
    exact = preprocess(data, SPEC, LIMITS, draft=False)
    fast = preprocess(data, SPEC, LIMITS, draft=True)
    assert_model_input(fast)
    levels = np.abs(pixels(exact).astype(np.int16) - pixels(fast))
    assert float(levels.mean()) < 1.2
    assert int(levels.max()) <= 40
    assert float(np.abs(exact - fast).mean()) < 0.02


@pytest.mark.parametrize("photo", [p for p in PHOTOS if p.suffix == ".png"], ids=lambda p: p.name)
def test_draft_does_not_touch_other_formats(photo: Path) -> None:
    data = photo.read_bytes()
    assert np.array_equal(
        preprocess(data, SPEC, LIMITS), preprocess(data, SPEC, LIMITS, draft=False)
    )


def test_concurrent_decoding_gives_the_same_arrays() -> None:
    """decode runs on a thread pool: no shared state between calls."""
    blobs = [p.read_bytes() for p in PHOTOS] * 3
    alone = [preprocess(b, SPEC, LIMITS) for b in blobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda b: preprocess(b, SPEC, LIMITS), blobs))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))


# --- fuzz: hostile bytes never escape as anything but our two errors --------------------------

FUZZ_LIMITS = Limits(max_image_bytes=1 << 20, max_image_pixels=1 << 20)
SEEDS = [
    gen.encode(gen.gradient(24, 16), "PNG"),
    gen.encode(gen.gradient(24, 16), "JPEG", quality=80),
    gen.encode(gen.gradient(24, 16).convert("P"), "GIF"),
    gen.encode(gen.gradient(24, 16).convert("RGBA"), "WEBP"),
    gen.encode(gen.gradient(24, 16), "BMP"),
    gen.encode(gen.gradient(24, 16), "TIFF"),
    gen.jpeg_with_orientation(gen.gradient(24, 16), 6),
    gen.animation("GIF", [gen.RED, gen.BLUE], size=(12, 8)),
]


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):  # overwrite a few bytes anywhere
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])  # and maybe cut it short


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_bytes(), draft=st.booleans())
def test_fuzzed_bytes_raise_only_our_errors(data: bytes, draft: bool) -> None:
    """Random bytes, and valid small images with bytes overwritten and/or cut short."""
    try:
        x = preprocess(data, SPEC, FUZZ_LIMITS, draft=draft)
    except (InvalidImage, ImageTooLarge):
        return
    assert_model_input(x)
