"""Shared pytest fixtures: where the real photos, weights and references live (../shared)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
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


def make_settings(model: Path, **overrides: Any) -> Any:
    """Settings for a test server on loopback with ephemeral ports (env MNV3_* ignored)."""
    from service.settings import Settings

    values: dict[str, Any] = {
        "model_path": model,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "grpc_port": 0,
        "max_batch_size": 8,
        "max_batch_delay_ms": 2.0,
        "intra_op_threads": 2,
        "decode_threads": 2,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def serving(settings: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The real app in-process (lifespan, gRPC included), warmed up, with an HTTP client."""
    from service.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await wait_ready(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mnv3") as client:
            yield app, client


async def wait_ready(app: Any) -> None:
    """Until warm-up has finished (the app's classifier turns ready); 30 s at most."""
    async with asyncio.timeout(30):
        while not (getattr(app.state, "classifier", None) and app.state.classifier.ready):
            await asyncio.sleep(0.01)


def metric(app: Any, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample's current value from the app's own registry (0.0 when absent)."""
    value = app.state.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)
