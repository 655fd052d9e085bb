"""Where weights come from: torchvision's published checkpoints, a local file, or random."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# torchvision's published ImageNet checkpoints. The 8-hex-digit suffix is a prefix of the file's
# sha256, checked on download exactly as torch.hub does.
CHECKPOINTS = {
    "large": "mobilenet_v3_large-8738ca79.pth",
    "small": "mobilenet_v3_small-047dcff4.pth",
}
DEFAULT_BASE_URL = "https://download.pytorch.org/models/"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(Exception):
    """Weights could not be had or do not fit; the message says what failed and what to do."""


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for these weights (stored in the model file's metadata)."""

    resize_shorter: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


@dataclass(frozen=True)
class Weights:
    """A state_dict ready to load, with where it came from and how it expects its inputs."""

    state_dict: dict[str, torch.Tensor]
    source: str  # "imagenet", "random" or the checkpoint's file name
    sha256: str
    padding: str
    preprocessing: Preprocessing = field(default_factory=Preprocessing)


def cache_dir() -> Path:
    """Downloaded checkpoints live here (MNV3_CACHE_DIR, else ~/.cache/mnv3-serve)."""
    default = Path.home() / ".cache" / "mnv3-serve"
    return Path(os.environ.get("MNV3_CACHE_DIR", default)) / "checkpoints"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_tensors(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def download_imagenet(arch: str) -> Path:
    """The torchvision checkpoint for `arch`, from the cache or downloaded into it (progress bar).

    MNV3_WEIGHTS_BASE_URL points at a mirror for boxes that cannot reach the default host.
    """
    name = CHECKPOINTS[arch]
    target = cache_dir() / name
    if target.is_file():
        return target
    base = os.environ.get("MNV3_WEIGHTS_BASE_URL", DEFAULT_BASE_URL)
    url = base.rstrip("/") + "/" + name
    target.parent.mkdir(parents=True, exist_ok=True)
    hash_prefix = name.rsplit("-", 1)[1].split(".")[0]
    try:
        # Writes to a temporary file and renames on success, so the cache never holds a
        # partial or corrupt checkpoint.
        torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_prefix, progress=True)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsError(
            f"could not download {url} ({reason}). Offline? Fetch {name} on a connected machine "
            f"and pass --weights /path/to/{name}, or copy it to {target}"
        ) from None
    except RuntimeError as exc:  # torch.hub's hash check
        raise WeightsError(f"downloaded {url} but it is corrupt: {exc}") from None
    return target


def _read_manifest(manifest: Path, arch: str) -> tuple[str | None, Preprocessing]:
    """The checkpoint's optional JSON manifest: padding and input statistics."""
    if not manifest.is_file():
        return None, Preprocessing()
    try:
        data: dict[str, Any] = json.loads(manifest.read_text())
        declared = data.get("arch")
        if declared is not None and declared != f"mobilenet_v3_{arch}":
            raise WeightsError(
                f"{manifest.name} describes {declared}, not mobilenet_v3_{arch}: use --arch "
                f"{str(declared).removeprefix('mobilenet_v3_')}"
            )
        spec = data.get("input", {})
        pre = Preprocessing(
            resize_shorter=int(spec.get("resize_shorter", 256)),
            crop=int(spec.get("crop", 224)),
            interpolation=str(spec.get("interpolation", "bilinear")),
            mean=tuple(float(v) for v in spec.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in spec.get("std", IMAGENET_STD)),
        )
        padding = data.get("padding")
    except (ValueError, TypeError, AttributeError) as exc:
        raise WeightsError(f"manifest {manifest} is not valid: {exc}") from None
    if len(pre.mean) != 3 or len(pre.std) != 3:
        raise WeightsError(f"manifest {manifest}: mean and std need 3 values each")
    if padding not in (None, "symmetric", "tf"):
        raise WeightsError(f"manifest {manifest}: padding must be 'symmetric' or 'tf'")
    return padding, pre


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint: {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # training scripts often wrap the state_dict
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def check_fits(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Refuse a checkpoint whose keys or shapes differ from the model's, saying how."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {list(state_dict[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or extra or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected keys (e.g. {extra[0]})")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes (e.g. {wrong[0]}, checkpoint vs model)")
    raise WeightsError(
        f"{what} does not fit {type(model).__name__}: {'; '.join(problems)}. "
        "Is it a checkpoint of the other architecture (--arch large/small)?"
    )


def resolve(arch: str, source: str, padding: str | None, manifest: Path | None = None) -> Weights:
    """Weights for `arch` from `source` ("imagenet", "random" or a path); padding=None: default.

    A path's manifest is `manifest`, else the JSON file with the checkpoint's stem beside it.
    """
    if source == "random":
        from models.mobilenetv3 import ARCHS

        torch.manual_seed(0)  # the same command gives the same file
        sd = ARCHS[arch]().state_dict()
        return Weights(sd, "random", _sha256_tensors(sd), padding or "symmetric")
    if source == "imagenet":
        path = download_imagenet(arch)
        # torchvision's checkpoints were trained with symmetric padding and ImageNet statistics.
        return Weights(
            _load_checkpoint(path), "imagenet", _sha256_file(path), padding or "symmetric"
        )
    path = Path(source)
    if not path.is_file():
        raise WeightsError(f"no checkpoint at {path} (expected imagenet, random or a file path)")
    if manifest is not None and not manifest.is_file():
        raise WeightsError(f"no manifest at {manifest}")
    manifest_padding, pre = _read_manifest(manifest or path.with_suffix(".json"), arch)
    return Weights(
        _load_checkpoint(path),
        path.name,
        _sha256_file(path),
        padding or manifest_padding or "symmetric",
        pre,
    )
