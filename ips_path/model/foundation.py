"""Pathology foundation models as named encoder presets, built only from local weight files.

One registry (:data:`ENCODER_PRESETS`) states, for each model, its architecture and build
settings as its model card gives them, the input size patches are resized to (on the device the
model is on), the pixel mean/std, how token outputs become one embedding, the output dimension
and the dtype it is meant to run in. :func:`build_preset` is the one builder path: the preset's
library builds the backbone (timm or transformers, the optional extra ``foundation``; the
ImageNet ResNet-50 baseline uses ipspath's own ResNet), the weights are read from the file given
(nothing is downloaded), and :class:`FoundationEncoder` adds resizing, normalisation and pooling.

In ``train`` from pixels IPS fine-tunes the encoder; with a ViT, ``train_blocks=K`` trains only
the last K transformer blocks (and the final norm) and runs each of them under activation
checkpointing, while the frozen blocks run without keeping activations, so the memory of the
gradient phase stays small and, with ``grad_chunk_size``, flat in M.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..runtime.errors import BadInputError
from .encoders import IMAGENET_MEAN, IMAGENET_STD, PixelNormalizer, ResNet, load_weights

__all__ = ["ENCODER_PRESETS", "EncoderPreset", "FoundationEncoder", "build_preset", "preset_table",
           "require_preset_weights"]

H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
EXTRA_HINT = "pip install 'ipspath[foundation]'"


@dataclass(frozen=True)
class EncoderPreset:
    """One foundation model: how to build it, feed it and read its output.

    Attributes
    ----------
    name : str
        The ``--encoder`` name.
    library : {"timm", "transformers", "ipspath"}
        Who builds the architecture.
    architecture : str
        timm model name, transformers config class, or ipspath ResNet depth.
    build_kwargs : mapping
        Settings of the architecture (timm ``create_model`` keywords, transformers config fields,
        ResNet keywords). Layer classes are named as ``"module:attribute"`` strings, resolved when built.
    input_size : int
        Side (px) patches are resized to before the model.
    mean, std : tuple of float
        Pixel normalisation on the [0, 1] scale.
    pooling : {"cls", "cls+mean", "avg"}
        ``cls``: the class token (timm's pooled output); ``cls+mean``: the class token concatenated
        with the mean of the patch tokens (Virchow); ``avg``: the backbone's global average.
    out_dim : int
        Embedding dimension.
    dtype : {"float32", "float16", "bfloat16"}
        The precision the model is meant to run in on a GPU (autocast).
    prefix_tokens : int
        Tokens before the patch tokens (class + register tokens), for ``cls+mean``.
    weights : str
        Where the weights file comes from (for messages).
    """

    name: str
    library: str
    architecture: str
    build_kwargs: Mapping[str, Any]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str
    out_dim: int
    dtype: str
    weights: str
    prefix_tokens: int = 1
    blocks: tuple[str, ...] = field(default=("blocks",))

    @property
    def norm(self) -> str:
        """The pixel normalisation in words: ImageNet, or the model's own mean/std."""
        if (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD):
            return "ImageNet mean/std"
        return f"mean {', '.join(f'{v:.3f}' for v in self.mean)}; std {', '.join(f'{v:.3f}' for v in self.std)}"


def _vit(name: str, architecture: str, out_dim: int, dtype: str, weights: str, *, mean=IMAGENET_MEAN,
         std=IMAGENET_STD, pooling: str = "cls", prefix_tokens: int = 1, **kwargs: Any) -> EncoderPreset:
    build = {"img_size": 224, "num_classes": 0, "dynamic_img_size": True, **kwargs}
    return EncoderPreset(name, "timm", architecture, build, 224, mean, std, pooling, out_dim, dtype, weights,
                         prefix_tokens)


_SWIGLU = {"mlp_layer": "timm.layers:SwiGLUPacked", "act_layer": "torch.nn:SiLU"}

#: The presets, by ``--encoder`` name. Settings as the models' cards (and TRIDENT) build them.
ENCODER_PRESETS: dict[str, EncoderPreset] = {p.name: p for p in (
    _vit("uni_v1", "vit_large_patch16_224", 1024, "float16", "hf.co/MahmoodLab/UNI pytorch_model.bin",
         patch_size=16, init_values=1e-5),
    _vit("uni2_h", "vit_giant_patch14_224", 1536, "bfloat16", "hf.co/MahmoodLab/UNI2-h pytorch_model.bin",
         patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2,
         no_embed_class=True, reg_tokens=8, **_SWIGLU),
    _vit("virchow2", "vit_huge_patch14_224", 2560, "float16", "hf.co/paige-ai/Virchow2 pytorch_model.bin",
         pooling="cls+mean", prefix_tokens=5, init_values=1e-5, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
         **_SWIGLU),
    _vit("h_optimus_0", "vit_giant_patch14_reg4_dinov2", 1536, "float16",
         "hf.co/bioptimus/H-optimus-0 pytorch_model.bin", mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD,
         init_values=1e-5, global_pool="token"),
    _vit("h_optimus_1", "vit_giant_patch14_reg4_dinov2", 1536, "float16",
         "hf.co/bioptimus/H-optimus-1 pytorch_model.bin", mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD,
         init_values=1e-5, global_pool="token"),
    _vit("gigapath", "vit_giant_patch14_dinov2", 1536, "float16",
         "hf.co/prov-gigapath/prov-gigapath pytorch_model.bin", in_chans=3, patch_size=16, embed_dim=1536,
         depth=40, num_heads=24, mlp_ratio=5.33334),
    EncoderPreset("phikon_v2", "transformers", "Dinov2Config",
                  {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 16,
                   "image_size": 224, "mlp_ratio": 4, "layerscale_value": 1e-5},
                  224, IMAGENET_MEAN, IMAGENET_STD, "cls", 1024, "float32",
                  "hf.co/owkin/phikon-v2 model.safetensors (or its folder, with config.json)",
                  blocks=("encoder", "layer")),
    EncoderPreset("resnet50_trunc", "ipspath", "resnet50", {"stages": 3}, 224, IMAGENET_MEAN, IMAGENET_STD,
                  "avg", 1024, "float32", "torchvision resnet50 ImageNet weights (resnet50-*.pth)", blocks=()),
)}


def preset_table() -> str:
    """One line per preset: name, output dimension, input size, dtype, architecture, normalisation."""
    return "\n".join(f"{p.name:<14} {p.out_dim:>4}-d  {p.input_size}px  {p.dtype:<8}  {p.architecture:<29}  {p.norm}"
                     for p in ENCODER_PRESETS.values())


def require_preset_weights(name: str, pretrained: str | os.PathLike | None) -> None:
    """BadInputError when ``name`` is a preset and no weights file is given (nothing is downloaded)."""
    preset = ENCODER_PRESETS.get(name)
    if preset is not None and pretrained is None:
        raise BadInputError(f"encoder {name} needs its weights: give --pretrained PATH ({preset.weights}); "
                            "nothing is downloaded")


# -- the wrapper --------------------------------------------------------------------------------

class FoundationEncoder(nn.Module):
    """uint8 patches -> resized on the device -> normalised -> backbone -> pooled ``(n, out_dim)``.

    Parameters
    ----------
    preset : EncoderPreset
    backbone : nn.Module
        Maps normalised ``(n, 3, input_size, input_size)`` pixels to tokens ``(n, T, D)`` (``cls``,
        ``cls+mean`` poolings) or embeddings ``(n, out_dim)`` (``avg``).
    forward_tokens : callable, optional
        ``backbone, x -> tokens``; default: ``backbone.forward_features`` when present, else ``backbone``.
    """

    def __init__(self, preset: EncoderPreset, backbone: nn.Module,
                 forward_tokens: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.preset = preset
        self.normalize = PixelNormalizer(3, preset.mean, preset.std)
        self.backbone = backbone
        self.out_dim = preset.out_dim
        self.train_blocks: int | None = None
        self._forward_tokens = forward_tokens

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order (BadInputError for a backbone without)."""
        module: Any = self.backbone
        for attr in self.preset.blocks:
            module = getattr(module, attr, None)
        if not self.preset.blocks or not isinstance(module, (nn.ModuleList, nn.Sequential)):
            raise BadInputError(f"encoder {self.preset.name} has no transformer blocks; --train-blocks needs a ViT")
        return module

    def set_train_blocks(self, k: int | None) -> None:
        """Train only the last ``k`` blocks (and what follows them); None: train everything.

        The frozen blocks then run without gradients; each trained block runs under activation
        checkpointing (its activations are recomputed in the backward pass instead of kept).
        """
        for p in self.backbone.parameters():
            p.requires_grad_(k is None)
        self.train_blocks = k
        if k is None:
            return
        blocks = self.blocks()
        if not 0 <= k <= len(blocks):
            raise BadInputError(f"--train-blocks {k}: encoder {self.preset.name} has {len(blocks)} blocks")
        for block in list(blocks)[len(blocks) - k:]:
            block.requires_grad_(True)
        for name, module in self.backbone.named_children():  # final norms and heads after the blocks
            if name in ("norm", "fc_norm", "layernorm", "head") and k > 0:
                module.requires_grad_(True)
        for i, block in enumerate(blocks):
            _wrap_block(block, trained=i >= len(blocks) - k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        size = self.preset.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = self.normalize(x)
        if self._forward_tokens is not None:
            out = self._forward_tokens(self.backbone, x)
        elif hasattr(self.backbone, "forward_features"):
            out = self.backbone.forward_features(x)
        else:
            out = self.backbone(x)
        return _POOLINGS[self.preset.pooling](out, self.preset)


def _wrap_block(block: nn.Module, *, trained: bool) -> None:
    """Run ``block`` without gradients (frozen) or under activation checkpointing (trained)."""
    original = block.__class__.forward

    def frozen(*args: Any, **kw: Any) -> Any:
        with torch.no_grad():
            return original(block, *args, **kw)

    def checkpointed(*args: Any, **kw: Any) -> Any:
        if torch.is_grad_enabled() and block.training:
            return checkpoint(original, block, *args, use_reentrant=False, **kw)
        return original(block, *args, **kw)

    block.forward = checkpointed if trained else frozen  # type: ignore[method-assign]


def _cls(out: torch.Tensor, preset: EncoderPreset) -> torch.Tensor:
    return out[:, 0] if out.ndim == 3 else out


def _cls_mean(out: torch.Tensor, preset: EncoderPreset) -> torch.Tensor:
    return torch.cat([out[:, 0], out[:, preset.prefix_tokens:].mean(1)], dim=-1)


def _avg(out: torch.Tensor, preset: EncoderPreset) -> torch.Tensor:
    return out.mean(dim=(2, 3)) if out.ndim == 4 else out


_POOLINGS: dict[str, Callable[[torch.Tensor, EncoderPreset], torch.Tensor]] = {
    "cls": _cls, "cls+mean": _cls_mean, "avg": _avg}


# -- builders, one per library ------------------------------------------------------------------

def _resolve(value: Any) -> Any:
    """``"module:attribute"`` strings -> the object (layer classes in build settings)."""
    if isinstance(value, str) and ":" in value:
        import importlib

        module, attr = value.split(":")
        return getattr(importlib.import_module(module), attr)
    return value


def _import_extra(module: str, preset: EncoderPreset) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - timm also fails when its torchvision does not load
        raise BadInputError(f"encoder {preset.name} needs {module} (the optional extra 'foundation'): "
                            f"{EXTRA_HINT} ({type(exc).__name__}: {exc})") from None


def _build_timm(preset: EncoderPreset, pretrained: str | os.PathLike | None) -> FoundationEncoder:
    timm = _import_extra("timm", preset)
    kwargs = {k: _resolve(v) for k, v in preset.build_kwargs.items()}
    backbone = timm.create_model(preset.architecture, pretrained=False, **kwargs)
    if pretrained is not None:
        load_weights(backbone, pretrained)
    return FoundationEncoder(preset, backbone)


def _build_transformers(preset: EncoderPreset, pretrained: str | os.PathLike | None) -> FoundationEncoder:
    transformers = _import_extra("transformers", preset)
    if pretrained is not None and os.path.isdir(pretrained):  # a local model folder: config.json + weights
        backbone = transformers.AutoModel.from_pretrained(os.fspath(pretrained), local_files_only=True)
    else:
        config = getattr(transformers, preset.architecture)(**preset.build_kwargs)
        backbone = transformers.AutoModel.from_config(config)
        if pretrained is not None:
            load_weights(backbone, pretrained)
    return FoundationEncoder(preset, backbone, lambda model, x: model(pixel_values=x).last_hidden_state)


def _build_ipspath(preset: EncoderPreset, pretrained: str | os.PathLike | None) -> FoundationEncoder:
    backbone = ResNet(preset.architecture, **preset.build_kwargs)
    backbone.normalize = nn.Identity()  # the wrapper normalises, after resizing
    if pretrained is not None:
        load_weights(backbone, pretrained, ignore_prefixes=backbone.ignored_weight_prefixes())
    return FoundationEncoder(preset, backbone, lambda model, x: model.pool(model.forward_features(x)).flatten(1))


_BUILDERS: dict[str, Callable[[EncoderPreset, str | os.PathLike | None], FoundationEncoder]] = {
    "timm": _build_timm, "transformers": _build_transformers, "ipspath": _build_ipspath}


def build_preset(name: str, pretrained: str | os.PathLike | None = None, *,
                 train_blocks: int | None = None) -> FoundationEncoder:
    """Build the encoder of preset ``name``, with the weights of the local file ``pretrained``.

    Parameters
    ----------
    name : str
        A key of :data:`ENCODER_PRESETS`.
    pretrained : path-like, optional
        Local weights file (``.bin``/``.pth``/``.pt`` state dict or ``.safetensors``; for
        transformers models also the model's folder). None builds the architecture only (its
        weights then come from an ipspath checkpoint).
    train_blocks : int, optional
        Train only the last K transformer blocks (see :meth:`FoundationEncoder.set_train_blocks`).

    Raises
    ------
    BadInputError
        Unknown name, the optional extra missing, or weights that do not fit the architecture.
    """
    preset = ENCODER_PRESETS.get(name)
    if preset is None:
        raise BadInputError(f"unknown encoder preset {name!r}; choose one of {', '.join(ENCODER_PRESETS)}")
    encoder = _BUILDERS[preset.library](preset, pretrained)
    if train_blocks is not None:
        encoder.set_train_blocks(train_blocks)
    return encoder
