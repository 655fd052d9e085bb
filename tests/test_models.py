"""The PyTorch MobileNetV3: torchvision's layout, the paper's sizes, and real ImageNet accuracy."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from models.mobilenetv3 import ARCHS, TFSamePadConv2d
from models.weights import resolve
from tests.conftest import IMAGES, SHARED, WEIGHTS
from tests.reference import torchvision_input

PARAMS = {"large": 5_483_032, "small": 2_542_856}


@pytest.mark.parametrize("arch", ["large", "small"])
@pytest.mark.parametrize("padding", ["symmetric", "tf"])
def test_state_dict_matches_torchvision(arch: str, padding: str) -> None:
    reference = json.loads(
        (SHARED / "reference" / f"mobilenet_v3_{arch}.state_dict_shapes.json").read_text()
    )
    model = ARCHS[arch](padding=padding)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(reference)  # same keys, same order
    assert ours == reference
    assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]


def test_paper_structure_small() -> None:
    layers = dict(ARCHS["small"]().named_modules())
    assert layers["features.0.0"].out_channels == 16  # 16 stem filters, hard-swish
    assert isinstance(layers["features.0.2"], torch.nn.Hardswish)
    # The first bneck of Small has squeeze-and-excitation with a hard-sigmoid gate.
    assert isinstance(layers["features.1.block.1.scale_activation"], torch.nn.Hardsigmoid)
    # Efficient last stage: 1x1 conv to 576, pool, then 1024-wide "conv" (Linear) and dropout 0.2.
    assert layers["features.12.0"].out_channels == 576
    assert (layers["classifier.0"].in_features, layers["classifier.0"].out_features) == (576, 1024)
    assert layers["classifier.2"].p == 0.2


def test_tf_padding_is_asymmetric_like_tensorflow_same() -> None:
    """TF SAME on even inputs pads 0 before/1 after for 3x3 and 1/2 for 5x5 stride-2 convs."""
    tf = ARCHS["small"](padding="tf")
    pads = [m._pad for m in tf.modules() if isinstance(m, TFSamePadConv2d)]
    assert pads[:2] == [(0, 1, 0, 1), (0, 1, 0, 1)]  # stem 3x3, first bneck 3x3 depthwise
    assert (1, 2, 1, 2) in pads  # the 5x5 stride-2 depthwise convolutions
    # Strided convolutions only; the output size is unchanged from symmetric padding.
    out = tf.eval()(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 1000)


def test_random_weights_are_reproducible() -> None:
    a, b = resolve("small", "random", None), resolve("small", "random", None)
    assert a.sha256 == b.sha256
    assert a.source == "random"


@pytest.mark.parametrize("image", ["grace_hopper.jpg", "chelsea.png", "coffee.png", "camera.png"])
def test_real_weights_classify_real_photos(image: str, expected: dict[str, Any]) -> None:
    """../shared's TF-slim weights, padding tf and the manifest's mean/std, in PyTorch."""
    weights = resolve("small", str(WEIGHTS), None)
    assert weights.padding == "tf"  # from the manifest beside the checkpoint
    model = ARCHS["small"](padding="tf").eval()
    model.load_state_dict(weights.state_dict, strict=True)
    pre = weights.preprocessing
    x = torch.from_numpy(torchvision_input(IMAGES / image, pre.mean, pre.std))
    with torch.no_grad():
        logits = model(x)[0]
    top5 = logits.topk(5)
    assert int(top5.indices[0]) in expected[image]["acceptable_top1"]
    ref = expected[image]["reference_top5"]
    assert [int(i) for i in top5.indices] == [r[0] for r in ref]
    assert top5.values.tolist() == pytest.approx(expected[image]["reference_logits_top5"], abs=1e-3)
