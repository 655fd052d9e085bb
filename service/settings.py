"""The server's settings: one pydantic-settings class read from MNV3_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the server; each field is the env variable MNV3_<FIELD NAME IN CAPITALS>."""

    model_config = SettingsConfigDict(env_prefix="MNV3_", frozen=True, extra="ignore")

    model_path: Path = Field(
        Path("build/mobilenet_v3_large.onnx"),
        description="The .onnx file made by `python -m models.export`; the server reads only it.",
    )
    http_host: str = Field("0.0.0.0", description="Address the REST API and gRPC bind to.")
    http_port: int = Field(8000, ge=0, le=65535, description="REST port (0: any free port).")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port).")
    max_batch_size: int = Field(
        8, ge=1, le=64, description="Most images per ONNX Runtime call; warm-up runs each size."
    )
    max_batch_delay_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="Longest a batch waits for company after its first image arrived. Batches "
        "also grow by themselves while the previous one computes, so this can stay small.",
    )
    max_queue: int = Field(
        32,
        ge=1,
        le=100_000,
        description="Images admitted but not yet computed (decoding or waiting); beyond it "
        "requests are shed at once with 503 / RESOURCE_EXHAUSTED. It bounds the worst queueing "
        "delay to about MAX_QUEUE / throughput: ~0.15-0.3 s on a 2-core box.",
    )
    request_timeout_ms: int = Field(
        10_000,
        ge=1,
        le=600_000,
        description="Default deadline when the client sends none (X-Request-Timeout-Ms header "
        "or the gRPC deadline); images not computed by then are dropped with 504.",
    )
    max_image_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="Largest image, in bytes."
    )
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        le=500_000_000,
        description="Largest image, in width x height from its header, checked before decoding.",
    )
    max_batch_images: int = Field(
        16, ge=1, le=256, description="Most images in one /v1/classify/batch or ClassifyBatch."
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="ONNX Runtime threads per batch (0: one per CPU). On 2 cores, 2 gives the "
        "best throughput; decoding shares the same cores.",
    )
    decode_threads: int = Field(
        0, ge=0, le=256, description="Threads that decode and resize images (0: one per CPU)."
    )
    jpeg_draft: bool = Field(
        True,
        description="Let libjpeg downscale JPEGs while decoding (about 4x cheaper on photos); "
        "false gives exact torchvision preprocessing.",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, le=3600, description="On SIGTERM, how long in-flight work may take to finish."
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )

    @property
    def transport_limit(self) -> int:
        """Requests each transport holds at once before refusing new ones unread.

        The core sheds beyond MAX_QUEUE + MAX_BATCH_SIZE admitted images, with a proper 503 or
        RESOURCE_EXHAUSTED; but a flood of clients could still make the transports buffer
        thousands of uploads waiting for the event loop (measured: 225 -> 955 MB RSS at 3x
        overload). Twice the core's capacity plus room for probes bounds that memory.
        """
        return 2 * (self.max_queue + self.max_batch_size) + 32

    @property
    def intra_threads(self) -> int:
        return self.intra_op_threads or (os.cpu_count() or 1)

    @property
    def decode_workers(self) -> int:
        return self.decode_threads or (os.cpu_count() or 1)


def describe(error: ValidationError) -> str:
    """One line naming each bad variable, its value and what is wrong with it."""
    parts = []
    for e in error.errors():
        name = "MNV3_" + "_".join(str(p) for p in e["loc"]).upper()
        value = e.get("input")
        parts.append(f"{name}={value!r}: {e['msg']}")
    return "invalid settings: " + "; ".join(parts)
