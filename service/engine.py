"""The ONNX Runtime session: loads the model file, reads its metadata, runs batches of inputs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.preprocess import PreprocessSpec

REQUIRED_METADATA = ("arch", "weights", "weights_sha256", "labels")


class ModelLoadError(Exception):
    """The model file is missing, corrupt or lacks what the server needs; the message says which."""


@dataclass(frozen=True)
class ModelInfo:
    """What the model is, as told to clients (GET /v1/model, GetModel, every reply)."""

    name: str  # e.g. "mobilenet_v3_small"
    arch: str  # "large" or "small"
    weights: str  # "imagenet", "random" or the checkpoint's file name
    weights_sha256: str
    version: str  # first 12 hex digits of the .onnx file's sha256
    input_size: int
    num_classes: int


class Engine:
    """One ONNX Runtime session of MobileNetV3 and everything its file says about it."""

    def __init__(self, path: Path, *, intra_op_threads: int, allow_spinning: bool = False) -> None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads cut ~10% of 2-thread latency but burn the core that decoding needs
        # (measured); off unless asked for.
        spin = "1" if allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf types
            first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise ModelLoadError(f"{path} is not a loadable ONNX model: {first_line}") from None

        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise ModelLoadError(
                f"{path} lacks metadata {', '.join(missing)}: make it with python -m models.export"
            )
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] != ["input"] or inputs[0].type != "tensor(float)":
            raise ModelLoadError(f"{path}: expected one float input named 'input'")
        try:
            self.labels: list[str] = json.loads(meta["labels"])
            self.spec = PreprocessSpec.from_metadata(meta)
        except ValueError as exc:
            raise ModelLoadError(f"{path} has bad metadata: {exc}") from None
        self.metadata = dict(meta)
        self.info = ModelInfo(
            name=meta["arch"],
            arch=meta["arch"].removeprefix("mobilenet_v3_"),
            weights=meta["weights"],
            weights_sha256=meta["weights_sha256"],
            version=hashlib.sha256(data).hexdigest()[:12],
            input_size=self.spec.crop,
            num_classes=len(self.labels),
        )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits [N, classes] for a float32 [N, 3, size, size] batch (releases the GIL)."""
        (logits,) = self.session.run(["logits"], {"input": batch})
        return np.asarray(logits)

    def warm_up(self, max_batch_size: int) -> None:
        """Run every batch size once, so no live request pays for ORT's first-run allocations."""
        size = self.spec.crop
        for n in range(1, max_batch_size + 1):
            self.run(np.zeros((n, 3, size, size), dtype=np.float32))
