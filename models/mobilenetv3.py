"""The MobileNetV3 network (Howard et al., 2019) with torchvision's parameter names and layout."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Padding = Literal["symmetric", "tf"]


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 without losing more than 10% (as the paper's code does)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


@dataclass(frozen=True)
class Bneck:
    """One row of the paper's Tables 1 and 2: a bottleneck (inverted residual) block."""

    input_channels: int
    kernel: int
    expanded_channels: int  # "exp size"
    out_channels: int  # "#out"
    use_se: bool  # "SE"
    use_hs: bool  # "NL": hard-swish (HS) or ReLU (RE)
    stride: int  # "s"


RE, HS = False, True

# Table 1: MobileNetV3-Large.  in  k  exp  out  SE     NL  s
LARGE: tuple[Bneck, ...] = (
    Bneck(16, 3, 16, 16, False, RE, 1),
    Bneck(16, 3, 64, 24, False, RE, 2),
    Bneck(24, 3, 72, 24, False, RE, 1),
    Bneck(24, 5, 72, 40, True, RE, 2),
    Bneck(40, 5, 120, 40, True, RE, 1),
    Bneck(40, 5, 120, 40, True, RE, 1),
    Bneck(40, 3, 240, 80, False, HS, 2),
    Bneck(80, 3, 200, 80, False, HS, 1),
    Bneck(80, 3, 184, 80, False, HS, 1),
    Bneck(80, 3, 184, 80, False, HS, 1),
    Bneck(80, 3, 480, 112, True, HS, 1),
    Bneck(112, 3, 672, 112, True, HS, 1),
    Bneck(112, 5, 672, 160, True, HS, 2),
    Bneck(160, 5, 960, 160, True, HS, 1),
    Bneck(160, 5, 960, 160, True, HS, 1),
)
LARGE_LAST_CHANNEL = 1280

# Table 2: MobileNetV3-Small.  in  k  exp  out  SE     NL  s
SMALL: tuple[Bneck, ...] = (
    Bneck(16, 3, 16, 16, True, RE, 2),
    Bneck(16, 3, 72, 24, False, RE, 2),
    Bneck(24, 3, 88, 24, False, RE, 1),
    Bneck(24, 5, 96, 40, True, HS, 2),
    Bneck(40, 5, 240, 40, True, HS, 1),
    Bneck(40, 5, 240, 40, True, HS, 1),
    Bneck(40, 5, 120, 48, True, HS, 1),
    Bneck(48, 5, 144, 48, True, HS, 1),
    Bneck(48, 5, 288, 96, True, HS, 2),
    Bneck(96, 5, 576, 96, True, HS, 1),
    Bneck(96, 5, 576, 96, True, HS, 1),
)
SMALL_LAST_CHANNEL = 1024

# BatchNorm as in the TF reference implementation (and torchvision).
_BatchNorm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class TFSamePadConv2d(nn.Conv2d):
    """A strided convolution padded like TensorFlow's "SAME": the extra pixel goes after.

    Weights trained in TensorFlow expect it; torchvision pads symmetrically. Inputs here are
    always even-sized (224 -> 112 -> 56 -> 28 -> 14), so the padding is a constant and exports
    to ONNX as one Pad node.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, groups=groups, bias=False)
        total = self.kernel_size[0] - self.stride[0]  # SAME's total pad for even input sizes
        before = total // 2
        self._pad = (before, total - before, before, total - before)  # left, right, top, bottom
        self.padding = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self._pad))


class ConvBNAct(nn.Sequential):
    """Convolution, BatchNorm, optional activation: torchvision's Conv2dNormActivation layout."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        activation: Callable[[], nn.Module] | None = None,
        padding: Padding = "symmetric",
    ) -> None:
        conv: nn.Conv2d
        if padding == "tf" and stride > 1:
            conv = TFSamePadConv2d(in_channels, out_channels, kernel_size, stride, groups)
        else:
            pad = (kernel_size - 1) // 2
            conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, pad, groups=groups, bias=False
            )
        layers: list[nn.Module] = [conv, _BatchNorm(out_channels)]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation with a hard-sigmoid gate (torchvision.ops.SqueezeExcitation names)."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale: torch.Tensor = self.scale_activation(
            self.fc2(self.activation(self.fc1(self.avgpool(x))))
        )
        return x * scale


class InvertedResidual(nn.Module):
    """The bottleneck block: 1x1 expand, depthwise kxk, optional SE, 1x1 linear projection."""

    def __init__(self, row: Bneck, padding: Padding = "symmetric") -> None:
        super().__init__()
        act = nn.Hardswish if row.use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if row.expanded_channels != row.input_channels:
            layers.append(ConvBNAct(row.input_channels, row.expanded_channels, 1, activation=act))
        layers.append(
            ConvBNAct(
                row.expanded_channels,
                row.expanded_channels,
                row.kernel,
                row.stride,
                groups=row.expanded_channels,
                activation=act,
                padding=padding,
            )
        )
        if row.use_se:
            squeeze = _make_divisible(row.expanded_channels // 4)
            layers.append(SqueezeExcitation(row.expanded_channels, squeeze))
        layers.append(ConvBNAct(row.expanded_channels, row.out_channels, 1))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = row.stride == 1 and row.input_channels == row.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3(nn.Module):
    """Stem (16 filters, hard-swish), the bottleneck rows, and the efficient last stage."""

    def __init__(
        self,
        rows: Sequence[Bneck],
        last_channel: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
        padding: Padding = "symmetric",
    ) -> None:
        super().__init__()
        stem = rows[0].input_channels
        last_conv = 6 * rows[-1].out_channels
        self.features = nn.Sequential(
            ConvBNAct(3, stem, 3, stride=2, activation=nn.Hardswish, padding=padding),
            *(InvertedResidual(row, padding) for row in rows),
            ConvBNAct(rows[-1].out_channels, last_conv, 1, activation=nn.Hardswish),
        )
        # The efficient last stage: pool first, then the 1x1 "convolution" (a Linear on 1x1
        # maps) runs on a single pixel instead of 7x7 — the paper's Figure 5.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channel),
            nn.Hardswish(),
            nn.Dropout(p=dropout),
            nn.Linear(last_channel, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        out: torch.Tensor = self.classifier(x)
        return out


def mobilenet_v3_large(num_classes: int = 1000, padding: Padding = "symmetric") -> MobileNetV3:
    """MobileNetV3-Large (Table 1)."""
    return MobileNetV3(LARGE, LARGE_LAST_CHANNEL, num_classes, padding=padding)


def mobilenet_v3_small(num_classes: int = 1000, padding: Padding = "symmetric") -> MobileNetV3:
    """MobileNetV3-Small (Table 2)."""
    return MobileNetV3(SMALL, SMALL_LAST_CHANNEL, num_classes, padding=padding)


ARCHS: dict[str, Callable[..., MobileNetV3]] = {
    "large": mobilenet_v3_large,
    "small": mobilenet_v3_small,
}
