"""The foundation-model presets as data: each model's architecture, input pipeline and native tiles.

One registry (:data:`ENCODER_PRESETS`) states, for each model, what its model card (or TRIDENT's
loader, where the card defers to it) gives: the architecture and its build settings, the input
pipeline (resize the shorter side with the card's interpolation, centre-crop, mean/std), how token
outputs become one embedding, the output dimension, the dtype it is meant to run in, where the
weights come from (card name, file name, gated or not, licence) and the tiles it was trained on
(µm/px and px). :mod:`~ips_path.model.foundation` builds them; this module imports no model library,
so help texts and checks of tile stores need neither timm nor transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .encoder_base import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ENCODER_PRESETS", "EncoderPreset", "native_tiles_note", "preset_table"]

H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderPreset:
    """One foundation model: how to build it, feed it and read its output.

    Attributes
    ----------
    name : str
        The ``--encoder`` name.
    library : {"timm", "transformers", "conch", "ipspath"}
        Who builds the architecture (``conch``: a timm trunk with CONCH's attentional pooler).
    architecture : str
        timm model name, transformers config class, or ipspath ResNet depth.
    build_kwargs : mapping
        Settings of the architecture (timm ``create_model`` keywords, transformers config fields,
        ResNet keywords). Layer classes are named as ``"module:attribute"`` strings, resolved when built.
    input_size : int
        Side (px) of the square the model sees.
    mean, std : tuple of float
        Pixel normalisation on the [0, 1] scale.
    pooling : {"cls", "cls+mean", "avg", "head"}
        ``cls``: the class token; ``cls+mean``: the class token concatenated with the mean of the patch
        tokens (Virchow); ``avg``: the backbone's global average; ``head``: the backbone's own output.
    out_dim : int
        Embedding dimension.
    dtype : {"float32", "float16", "bfloat16"}
        The precision the model is meant to run in on a GPU (autocast).
    card : str
        The model card the weights come from (Hugging Face name, or where else).
    weights : str
        The file (or folder) to pass as ``--pretrained``.
    gated : bool
        Whether the card asks users to request access.
    licence : str
        The weights' licence as the card names it.
    resize : int
        The shorter side is resized to this many px first (antialiased); ``input_size`` is then
        centre-cropped from it (``resize == input_size``: no crop).
    interpolation : {"bilinear", "bicubic"}
        The card's resize interpolation.
    native_mpp : float or None
        µm/px of the tiles the model was trained on (None: several resolutions, or not pathology).
    native_patch : int or None
        Side (px) of the tiles the card feeds, at ``native_mpp`` (None: no pathology tiles, ImageNet).
    vit_patch : int or None
        The ViT's patch (token) size in px.
    prefix_tokens : int
        Tokens before the patch tokens (class + register tokens), for ``cls+mean``.
    blocks : tuple of str
        Attribute path to the transformer blocks (``--train-blocks``).
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
    card: str
    weights: str
    gated: bool
    licence: str
    resize: int
    interpolation: str = "bilinear"
    native_mpp: float | None = 0.5
    native_patch: int | None = 224
    vit_patch: int | None = None
    prefix_tokens: int = 1
    blocks: tuple[str, ...] = field(default=("blocks",))

    @property
    def norm(self) -> str:
        """The pixel normalisation in words: ImageNet, or the model's own mean/std."""
        if (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD):
            return "ImageNet mean/std"
        return f"mean {', '.join(f'{v:.3f}' for v in self.mean)}; std {', '.join(f'{v:.3f}' for v in self.std)}"

    @property
    def native(self) -> str:
        """The tiles the model was trained on, in words."""
        if self.native_patch is None:
            return "ImageNet photographs"
        mpp = "mixed µm/px" if self.native_mpp is None else f"{self.native_mpp:g} µm/px"
        return f"{self.native_patch} px at {mpp}"

    @property
    def pipeline(self) -> str:
        """The input pipeline in words: resize, crop, interpolation."""
        crop = f", crop {self.input_size}" if self.resize != self.input_size else ""
        return f"resize {self.resize} {self.interpolation}{crop}"


def _vit(name: str, architecture: str, out_dim: int, dtype: str, card: str, *, gated: bool, licence: str,
         vit_patch: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling: str = "cls", prefix_tokens: int = 1,
         resize: int = 224, interpolation: str = "bilinear", native_patch: int = 224,
         native_mpp: float | None = 0.5, weights: str = "pytorch_model.bin", input_size: int = 224,
         library: str = "timm", blocks: tuple[str, ...] = ("blocks",), **kwargs: Any) -> EncoderPreset:
    build = {"img_size": 224, "num_classes": 0, "dynamic_img_size": True, **kwargs}
    return EncoderPreset(name, library, architecture, build, input_size, mean, std, pooling, out_dim, dtype, card,
                         weights, gated, licence, resize, interpolation, native_mpp, native_patch, vit_patch,
                         prefix_tokens, blocks)


_SWIGLU = {"mlp_layer": "timm.layers:SwiGLUPacked", "act_layer": "torch.nn:SiLU"}
_NC_ND = "CC-BY-NC-ND-4.0"

#: The presets, by ``--encoder`` name. Settings as the models' cards (and TRIDENT) build them.
ENCODER_PRESETS: dict[str, EncoderPreset] = {p.name: p for p in (
    _vit("uni_v1", "vit_large_patch16_224", 1024, "float16", "MahmoodLab/UNI", gated=True, licence=_NC_ND,
         vit_patch=16, patch_size=16, init_values=1e-5),
    _vit("uni2_h", "vit_giant_patch14_224", 1536, "bfloat16", "MahmoodLab/UNI2-h", gated=True, licence=_NC_ND,
         vit_patch=14, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
         mlp_ratio=2.66667 * 2, no_embed_class=True, reg_tokens=8, **_SWIGLU),
    # CONCH v1.5 (the patch encoder of TITAN): a ViT-L/16 trunk at 448 px and an attentional pooler to 768-d.
    _vit("conch_v15", "vit_large_patch16_224", 768, "float16", "MahmoodLab/conchv1_5", gated=True, licence=_NC_ND,
         vit_patch=16, weights="pytorch_model_vision.bin", input_size=448, resize=448, native_patch=512,
         library="conch", blocks=("trunk", "blocks"), init_values=1.0, pooling="head"),
    _vit("virchow", "vit_huge_patch14_224", 2560, "float16", "paige-ai/Virchow", gated=True, licence="Apache-2.0",
         vit_patch=14, pooling="cls+mean", prefix_tokens=1, interpolation="bicubic", init_values=1e-5,
         mlp_ratio=5.3375, global_pool="", **_SWIGLU),
    _vit("virchow2", "vit_huge_patch14_224", 2560, "float16", "paige-ai/Virchow2", gated=True, licence=_NC_ND,
         vit_patch=14, pooling="cls+mean", prefix_tokens=5, interpolation="bicubic", init_values=1e-5,
         reg_tokens=4, mlp_ratio=5.3375, global_pool="", **_SWIGLU),
    _vit("h_optimus_0", "vit_giant_patch14_reg4_dinov2", 1536, "float16", "bioptimus/H-optimus-0", gated=False,
         licence="Apache-2.0", vit_patch=14, mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD, init_values=1e-5,
         global_pool="token"),
    _vit("h_optimus_1", "vit_giant_patch14_reg4_dinov2", 1536, "float16", "bioptimus/H-optimus-1", gated=True,
         licence=_NC_ND, vit_patch=14, mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD, init_values=1e-5,
         global_pool="token"),
    _vit("gigapath", "vit_giant_patch14_dinov2", 1536, "float16", "prov-gigapath/prov-gigapath", gated=True,
         licence="Apache-2.0", vit_patch=16, resize=256, interpolation="bicubic", native_patch=256,
         in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334),
    _vit("kaiko_vitl14", "vit_large_patch14_reg4_dinov2", 1024, "float32",
         "1aurent/vit_large_patch14_reg4_224.kaiko_ai_towards_large_pathology_fms", gated=False,
         licence="kaiko-non-commercial", vit_patch=14, mean=HALF, std=HALF, native_mpp=None,
         weights="model.safetensors"),
    EncoderPreset("phikon_v2", "transformers", "Dinov2Config",
                  {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 16,
                   "image_size": 224, "mlp_ratio": 4, "layerscale_value": 1e-5},
                  224, IMAGENET_MEAN, IMAGENET_STD, "cls", 1024, "float32", "owkin/phikon-v2",
                  "model.safetensors (or its folder, with config.json)", False,
                  "Owkin non-commercial", 224, vit_patch=16, blocks=("encoder", "layer")),
    EncoderPreset("resnet50_trunc", "ipspath", "resnet50", {"stages": 3}, 224, IMAGENET_MEAN, IMAGENET_STD,
                  "avg", 1024, "float32", "torchvision ResNet-50 ImageNet (IMAGENET1K_V1)", "resnet50-*.pth",
                  False, "BSD-3-Clause", 224, native_mpp=None, native_patch=None, blocks=()),
)}


def preset_table() -> str:
    """Two lines per preset: name, dimension, weights (card, file, access, licence); native tiles, input."""
    rows = []
    for p in ENCODER_PRESETS.values():
        access = "gated" if p.gated else "open"
        token = f", ViT patch {p.vit_patch}" if p.vit_patch else ""
        rows.append(f"{p.name:<14} {p.out_dim:>4}-d  {p.card}: {p.weights} ({access}, {p.licence})")
        rows.append(f"{'':<21}native {p.native}{token}; input {p.input_size} px ({p.pipeline}), {p.dtype}, {p.norm}")
    return "\n".join(rows)


def native_tiles_note(preset: EncoderPreset, mpp: float | None, patch_size: int | None) -> str | None:
    """One line when tiles of ``mpp`` µm/px and ``patch_size`` px are not those ``preset`` was trained on.

    Returns None when they match (µm/px within 5 %, the same px), or when the preset has no native tiles.
    """
    mpp_off = preset.native_mpp is not None and mpp is not None and abs(mpp / preset.native_mpp - 1) > 0.05
    patch_off = None not in (patch_size, preset.native_patch) and patch_size != preset.native_patch
    if not (mpp_off or patch_off):
        return None
    if patch_size is not None and mpp is not None:
        seen = mpp * patch_size / preset.resize  # what one input px covers after the resize
        found = f"{patch_size} px at {mpp:g} µm/px (the model sees {seen:.2f} µm/px)"
    else:
        found = f"{patch_size or '?'} px at {'?' if mpp is None else f'{mpp:g}'} µm/px"
    mpp_arg = preset.native_mpp if preset.native_mpp is not None else mpp
    command = "ipspath tile ..." + ("" if mpp_arg is None else f" --mpp {mpp_arg:g}") + \
        f" --patch-size {preset.native_patch}"
    return (f"note: {preset.name} was trained on {preset.native}; these tiles are {found}; "
            f"`{command}` makes matching tiles")
