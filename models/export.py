"""The export CLI: build MobileNetV3, load weights, write ONE checked .onnx with its metadata."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from models.mobilenetv3 import ARCHS, MobileNetV3
from models.weights import Weights, WeightsError, check_fits, resolve

EXPORTER_VERSION = "mnv3-serve-export 1"
OPSET = 17
PARITY_TOLERANCE = 1e-4
PARITY_BATCHES = (1, 8)


def imagenet_labels() -> list[str]:
    """The ImageNet-1k class names in torchvision's order (index 652 = 'military uniform')."""
    labels = files("models").joinpath("imagenet_classes.txt").read_text().splitlines()
    assert len(labels) == 1000
    return labels


def build(arch: str, weights: Weights) -> MobileNetV3:
    """The network for `arch` with `weights` loaded strictly, in eval mode."""
    model = ARCHS[arch](padding=weights.padding)
    check_fits(model, weights.state_dict, f"checkpoint {weights.source!r}")
    model.load_state_dict(weights.state_dict, strict=True)
    return model.eval()


def to_onnx(model: MobileNetV3, size: int) -> onnx.ModelProto:
    """Trace to ONNX with a dynamic batch axis: input `input` [N,3,H,W] -> `logits` [N,1000]."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The TorchScript exporter is deprecated upstream but deterministic and dependency-free;
        # its constant-folding notes about the Pad subgraph are noise (ORT folds it at load).
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        path = Path(tmp) / "model.onnx"
        _export_torchscript(model, size, path)
        return onnx.load(str(path))


def _export_torchscript(model: MobileNetV3, size: int, path: Path) -> None:
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, size, size),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )


def metadata(arch: str, weights: Weights) -> dict[str, str]:
    """Everything the server needs to know, stored in the file's metadata_props."""
    pre = weights.preprocessing
    return {
        "arch": f"mobilenet_v3_{arch}",
        "weights": weights.source,
        "weights_sha256": weights.sha256,
        "padding": weights.padding,
        "resize_shorter": str(pre.resize_shorter),
        "crop": str(pre.crop),
        "interpolation": pre.interpolation,
        "mean": json.dumps(list(pre.mean)),
        "std": json.dumps(list(pre.std)),
        "labels": json.dumps(imagenet_labels()),
        "input_layout": "NCHW float32, normalised: (x/255 - mean) / std",
        "exporter_version": f"{EXPORTER_VERSION}; torch {torch.__version__}; opset {OPSET}",
    }


def parity(model: MobileNetV3, serialized: bytes, size: int) -> float:
    """Max |ONNX Runtime - PyTorch| over the parity batches, on fixed random inputs."""
    session = ort.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for n in PARITY_BATCHES:
        x = rng.standard_normal((n, 3, size, size), dtype=np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        (got,) = session.run(["logits"], {"input": x})
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def export(arch: str, weights: Weights, out: Path) -> float:
    """Write the checked model to `out` (atomically); returns the parity figure.

    Raises ValueError, writing nothing, when ONNX Runtime disagrees with PyTorch.
    """
    model = build(arch, weights)
    size = weights.preprocessing.crop
    proto = to_onnx(model, size)
    onnx.helper.set_model_props(proto, metadata(arch, weights))
    onnx.checker.check_model(proto)
    serialized = proto.SerializeToString()
    diff = parity(model, serialized, size)
    print(f"parity: max |onnxruntime - torch| = {diff:.3g} at batch {PARITY_BATCHES}")
    if not diff <= PARITY_TOLERANCE:  # `not <=` also refuses NaN
        raise ValueError(f"ONNX Runtime disagrees with PyTorch by {diff:.3g} > {PARITY_TOLERANCE}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".tmp", delete=False) as tmp:
        tmp.write(serialized)
    os.chmod(tmp.name, 0o644)  # readable by the container's non-root user
    os.replace(tmp.name, out)
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.export", description="Export MobileNetV3 to one checked ONNX file."
    )
    parser.add_argument("--arch", choices=sorted(ARCHS), required=True)
    parser.add_argument(
        "--weights",
        required=True,
        help="imagenet (torchvision's checkpoint, downloaded and cached), random, or a path to a "
        "torchvision-layout state_dict (a JSON manifest with the same stem may set padding, "
        "mean and std)",
    )
    parser.add_argument("--manifest", type=Path, help="manifest for PATH weights, if not beside it")
    parser.add_argument(
        "--padding",
        choices=["symmetric", "tf"],
        help="override: tf = TensorFlow SAME padding for weights trained in TensorFlow",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        weights = resolve(args.arch, args.weights, args.padding, manifest=args.manifest)
        diff = export(args.arch, weights, args.out)
    except (WeightsError, ValueError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    w = weights
    print(
        f"wrote {args.out}: mobilenet_v3_{args.arch}, weights {w.source} (sha256 {w.sha256[:12]}), "
        f"padding {w.padding}, parity {diff:.2g}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
