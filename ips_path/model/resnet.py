"""ResNet-18/34/50 with torchvision's state-dict layout, so published weights load unchanged."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..runtime.errors import BadInputError
from .encoder_base import PixelNormalizer

__all__ = ["RESNET_DEPTHS", "BasicBlock", "Bottleneck", "ResNet", "conv_bn", "init_conv_weights"]

RESNET_DEPTHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                 "resnet50": ("bottleneck", (3, 4, 6, 3))}


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    """A bias-free convolution (padding ``kernel_size // 2``) and its BatchNorm."""
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels)]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, channels, 3, stride)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv_bn(channels, channels, 3)
        self.downsample = _downsample(in_channels, channels * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, as torchvision's ResNet v1.5) -> 1x1 with a residual connection (ResNet-50)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, channels, 1)
        self.conv2, self.bn2 = conv_bn(channels, channels, 3, stride)
        self.conv3, self.bn3 = conv_bn(channels, channels * self.expansion, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, channels * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(*conv_bn(in_channels, out_channels, 1, stride))


class ResNet(nn.Module):
    """ResNet without its classifier, with torchvision's state-dict keys (``conv1``, ``bn1``,
    ``layer1.0.conv1``, ..., ``layer4.2.downsample.0``), so published weights load unchanged.

    Parameters
    ----------
    depth : {"resnet18", "resnet34", "resnet50"}
    stages : int
        Residual stages kept, 1 to 4. The Megapixel MNIST setting of the IPS paper uses the first two
        stages of ResNet-18 (``out_dim`` 128).
    in_channels : int
        Channels of the input patches.
    mean, std : sequence of float, optional
        Pixel normalisation, see :class:`PixelNormalizer`.
    """

    def __init__(self, depth: str = "resnet18", stages: int = 4, in_channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise BadInputError(f"unknown ResNet depth {depth!r}; choose one of {sorted(RESNET_DEPTHS)}")
        if not 1 <= stages <= 4:
            raise BadInputError(f"ResNet stages must be 1 to 4, got {stages}")
        kind, blocks_per_stage = RESNET_DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.stages = stages
        self.normalize = PixelNormalizer(in_channels, mean, std)
        self.conv1, self.bn1 = conv_bn(in_channels, 64, 7, 2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels_in = 64
        for stage in range(stages):
            channels = 64 * 2**stage
            blocks = []
            for i in range(blocks_per_stage[stage]):
                blocks.append(block(channels_in, channels, stride=2 if stage > 0 and i == 0 else 1))
                channels_in = channels * block.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.out_dim = channels_in
        self.pool = nn.AdaptiveAvgPool2d(1)
        init_conv_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> feature map ``(n, out_dim, h, w)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        for stage in range(self.stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x)).flatten(1)

    def ignored_weight_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of a full ResNet file that this (possibly truncated) model does not use."""
        return ("fc.",) + tuple(f"layer{s}." for s in range(self.stages + 1, 5))


def init_conv_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions, unit BatchNorm: the ResNet initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
