"""Patch encoders: ResNet-18/34/50 (torchvision state-dict layout), a small CNN, a projector over cached
features, and optional timm models.

Every encoder has an ``out_dim`` attribute and maps a batch of patches to ``(n, out_dim)`` embeddings.
Pixel encoders take uint8 ``(n, C, H, W)`` patches (floats are taken as already scaled to [0, 1]) and
normalise them inside the module, with buffers, so on the device the model is on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..runtime.errors import BadInputError
from .encoder_base import IMAGENET_MEAN, IMAGENET_STD, PixelNormalizer, load_weights
from .foundation import build_preset
from .presets import ENCODER_PRESETS
from .resnet import RESNET_DEPTHS, BasicBlock, Bottleneck, ResNet, conv_bn, init_conv_weights

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MEASUREMENT_ENCODERS",
    "BasicBlock",
    "Bottleneck",
    "FeatureProjector",
    "PixelEncoder",
    "PixelNormalizer",
    "ResNet",
    "SmallCNN",
    "StainDensity",
    "build_encoder",
    "load_weights",
]


class SmallCNN(nn.Module):
    """A few strided 3x3 conv-BN-ReLU layers and global average pooling: an encoder for CPU work.

    Parameters
    ----------
    in_channels : int
        Channels of the input patches.
    widths : sequence of int
        Output channels of each layer; each layer halves the spatial size. ``out_dim = widths[-1]``.
    mean, std : sequence of float, optional
        Pixel normalisation, see :class:`PixelNormalizer`.
    pool : {"avg", "max"}
        Global pooling of the last feature map. ``"max"`` reports a feature wherever in the patch it
        occurs, undiluted by the empty rest: better when the object is small against the patch and
        lands at any offset (Megapixel MNIST digits); ``"avg"`` suits textures that fill the patch.
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (32, 64, 128, 128),
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, pool: str = "avg"):
        super().__init__()
        pools = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}
        if pool not in pools:
            raise BadInputError(f"smallcnn pool must be 'avg' or 'max', got {pool!r}")
        self.normalize = PixelNormalizer(in_channels, mean, std)
        layers: list[nn.Module] = []
        for width_in, width in zip((in_channels, *widths[:-1]), widths, strict=True):
            layers += [*conv_bn(width_in, width, 3, 2), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.out_dim = widths[-1]
        self.pool = pools[pool](1)
        init_conv_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x)).flatten(1)


#: Encoders whose features are a few handcrafted measurements rather than learned embeddings. The size of such
#: a feature is its message, so the training projector keeps it (no LayerNorm) by default, and a measurement of
#: stain compares slides only once each slide's staining is normalised, so ``ipspath features`` normalises their
#: patches by default (see the README's small-lesion section for the measurements behind both).
MEASUREMENT_ENCODERS = frozenset({"stain_density"})


class StainDensity(nn.Module):
    """Quantiles of each colour channel's optical density, at their largest over a patch's windows: a
    descriptor without parameters.

    How much stain a region holds (the median) and how dark its darkest structures are (the upper
    quantiles: nuclei, and hyperchromatic nuclei above all). The quantiles are taken in each
    ``window`` x ``window`` px window of the patch and each one's largest value kept, so a small dark focus
    counts as much in a large patch as in a small one (taken over a whole 256 px patch, the top 1 % of
    its pixels would mostly be ordinary nuclei). Nothing to train or download, and cheap on a CPU; meant
    for ``ipspath features`` on stain-normalised patches (its default for this encoder), where darker
    means darker than the reference rather than a darker lab.

    Parameters
    ----------
    quantiles : sequence of float
        Quantiles (0-1) taken per channel; ``out_dim = 3 * len(quantiles)``, ordered channel-major
        (R at each quantile, then G, then B).
    window : int
        Side of the windows in px at the patch resolution; a patch no larger is one window. Windows
        step by ``window`` and the last row and column of them end at the patch's edge.
    """

    def __init__(self, quantiles: Sequence[float] = (0.5, 0.9, 0.99), window: int = 64):
        super().__init__()
        if not quantiles or not all(0 <= q <= 1 for q in quantiles):
            raise BadInputError(f"stain_density quantiles must lie in [0, 1], got {list(quantiles)}")
        if window < 1:
            raise BadInputError(f"stain_density window must be at least 1 px, got {window}")
        self.quantiles = tuple(float(q) for q in quantiles)
        self.window = int(window)
        self.out_dim = 3 * len(self.quantiles)
        #: What makes these features what they are, recorded with cached features (no weights to digest).
        self.identity = {"quantiles": list(self.quantiles), "window": self.window}
        from ips_path.slides.stain import BACKGROUND_RGB

        self.register_buffer("background", torch.tensor(BACKGROUND_RGB).view(1, 1, 3, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise BadInputError(f"stain_density expects RGB patches (n, 3, H, W), got shape {tuple(x.shape)}")
        windows = _windows(x, self.window)  # (n, k, 3, w*w)
        intensity = windows.float() if x.dtype == torch.uint8 else windows.float() * 255
        density = (-torch.log(intensity.clamp_min(1) / self.background)).clamp_min(0)
        ordered = density.sort(dim=3).values
        last = ordered.shape[3] - 1
        picks = torch.tensor([round(q * last) for q in self.quantiles], device=x.device)
        return ordered[..., picks].amax(dim=1).flatten(1)


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(n, C, H, W)`` -> ``(n, k, C, h * w)``: windows of at most ``window`` px a side covering the patch."""
    def starts(size: int) -> list[int]:
        if size <= window:
            return [0]
        return sorted(set(range(0, size - window + 1, window)) | {size - window})

    h, w = min(window, x.shape[2]), min(window, x.shape[3])
    return torch.stack([x[:, :, r:r + h, c:c + w].flatten(2) for r in starts(x.shape[2]) for c in starts(x.shape[3])],
                       dim=1)


class FeatureProjector(nn.Module):
    """LayerNorm -> Linear -> BatchNorm -> ReLU over cached patch embeddings (``encoder="features"``).

    Parameters
    ----------
    in_features : int
        Dimension D of the cached features, ``(n, D)`` float16 or float32.
    out_dim : int
        Output dimension.
    layer_norm : bool
        Start with a LayerNorm over each patch's D features. It rescales every patch to the same mean and
        spread, so whatever a patch says through the size of its features is lost: a patch whose every
        feature is high (darker nuclei in every stain channel) looks like one whose every feature is low,
        and with D = 1 every patch looks the same. False keeps those sizes (Linear -> BatchNorm -> ReLU).
    """

    def __init__(self, in_features: int, out_dim: int = 128, layer_norm: bool = True):
        super().__init__()
        self.in_features = in_features
        self.norm = nn.LayerNorm(in_features) if layer_norm else nn.Identity()
        self.fc = nn.Linear(in_features, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        self.relu = nn.ReLU(inplace=True)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise BadInputError(f"the 'features' encoder expects cached features (n, {self.in_features}), "
                                f"got shape {tuple(x.shape)}; build it with the in_features of the cache")
        return self.relu(self.bn(self.fc(self.norm(x.float()))))


class PixelEncoder(nn.Module):
    """A backbone that maps normalised pixels to ``(n, out_dim)``, preceded by :class:`PixelNormalizer`."""

    def __init__(self, backbone: nn.Module, out_dim: int, normalize: PixelNormalizer):
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


def build_encoder(name: str, *, pretrained: str | os.PathLike | None = None, in_features: int | None = None,
                  in_channels: int = 3, **kw: Any) -> nn.Module:
    """Build a patch encoder by name.

    Parameters
    ----------
    name : str
        ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` (keyword ``stages`` keeps the first 1-4 stages),
        ``"smallcnn"`` (keywords ``widths``, ``pool``), ``"stain_density"`` (:class:`StainDensity`, keywords
        ``quantiles``, ``window``), ``"features"`` (projector over cached embeddings; needs
        ``in_features``, keywords ``out_dim``, default 128, and ``layer_norm``, default True),
        ``"timm:<model name>"`` (needs timm), or a
        foundation-model preset of :data:`~ips_path.model.presets.ENCODER_PRESETS` (``uni_v1``, ...,
        ``resnet50_trunc``; keyword ``train_blocks``).
    pretrained : path, optional
        Local state-dict file (``.pth``/``.pt``, read with ``weights_only=True``, or ``.safetensors``).
        ResNets take torchvision/timm ResNet files; their ``fc.*`` keys and the keys of dropped stages
        are ignored. Nothing is ever downloaded.
    in_features : int, optional
        Dimension of the cached features, for ``"features"``.
    in_channels : int
        Channels of pixel patches (3 for RGB).
    **kw
        Passed to the encoder; pixel encoders take ``mean`` and ``std`` (on the [0, 1] scale).

    Returns
    -------
    nn.Module
        With ``out_dim``; ``forward(x)`` returns ``(n, out_dim)`` float embeddings.
    """
    if name in RESNET_DEPTHS:
        encoder: nn.Module = ResNet(name, in_channels=in_channels, **kw)
        ignore = encoder.ignored_weight_prefixes()
    elif name == "smallcnn":
        encoder, ignore = SmallCNN(in_channels=in_channels, **kw), ()
    elif name == "stain_density":
        encoder, ignore = StainDensity(**kw), ()
    elif name == "features":
        if in_features is None:
            raise BadInputError("encoder 'features' needs in_features, the dimension of the cached embeddings")
        encoder, ignore = FeatureProjector(in_features, **kw), ()
    elif name.startswith("timm:"):
        return _build_timm(name.removeprefix("timm:"), pretrained, in_channels, **kw)
    elif name in ENCODER_PRESETS:
        return build_preset(name, pretrained, **kw)
    else:
        raise BadInputError(f"unknown encoder {name!r}; choose resnet18, resnet34, resnet50, smallcnn, stain_density, "
                            f"features, timm:<name> or a preset ({', '.join(ENCODER_PRESETS)})")
    if pretrained is not None:
        load_weights(encoder, pretrained, ignore_prefixes=ignore)
    return encoder


def _build_timm(model_name: str, pretrained: str | os.PathLike | None, in_channels: int,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                **kw: Any) -> PixelEncoder:
    try:
        import timm
    except ImportError:
        raise BadInputError(f"encoder 'timm:{model_name}' needs timm: pip install 'ipspath[timm]'") from None
    try:
        backbone = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_channels, **kw)
    except RuntimeError as e:  # timm's "Unknown model"
        raise BadInputError(f"timm cannot build {model_name!r}: {e}") from None
    if pretrained is not None:
        classifier = backbone.pretrained_cfg.get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        load_weights(backbone, pretrained, ignore_prefixes=tuple(f"{c}." for c in classifier))
    cfg = backbone.pretrained_cfg
    if in_channels == 3:
        mean = mean if mean is not None else cfg.get("mean")
        std = std if std is not None else cfg.get("std")
    return PixelEncoder(backbone, backbone.num_features, PixelNormalizer(in_channels, mean, std))


