"""Shared pytest fixtures: where the real photos, weights and references live (../shared)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo beside a copy of shared/; MNV3_SHARED points elsewhere when needed.
SHARED = Path(os.environ.get("MNV3_SHARED", REPO.parent / "shared")).resolve()
IMAGES = SHARED / "images"
WEIGHTS = SHARED / "weights" / "mobilenet_v3_small-tfslim-8bit.pth"


@pytest.fixture(scope="session")
def expected() -> dict[str, Any]:
    """EXPECTED.json: acceptable top-1 classes and the reference top-5 per photo."""
    data: dict[str, Any] = json.loads((IMAGES / "EXPECTED.json").read_text())["images"]
    return data


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """../shared's real ImageNet weights as ONNX (Small, padding tf, the manifest's mean/std)."""
    from models.export import export
    from models.weights import resolve

    out = tmp_path_factory.mktemp("model") / "mobilenet_v3_small-tf.onnx"
    export("small", resolve("small", str(WEIGHTS), None), out)
    return out
