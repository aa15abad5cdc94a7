"""Pathology foundation models as named encoder presets, built only from local weight files.

The presets are data (:mod:`~ips_path.model.presets`); :func:`build_preset` is the one builder
path: the preset's library builds the backbone (timm or transformers, the optional extra
``foundation``; the ImageNet ResNet-50 baseline uses ipspath's own ResNet), the weights are read
from the file or folder given (nothing is downloaded), and :class:`FoundationEncoder` adds the
card's input pipeline (resize with its interpolation, centre crop, normalisation, on the device the
model is on) and pooling.

In ``train`` from pixels IPS fine-tunes the encoder; with a ViT, ``train_blocks=K`` trains only
the last K transformer blocks (and the final norm) and runs each of them under activation
checkpointing, while the frozen blocks run without keeping activations, so the memory of the
gradient phase stays small and, with ``grad_chunk_size``, flat in M.
"""

from __future__ import annotations

import importlib
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..runtime.errors import BadInputError
from .encoder_base import PixelNormalizer, StateDict, load_weights, read_state_dict
from .presets import ENCODER_PRESETS, EncoderPreset, preset_table
from .resnet import ResNet

__all__ = ["ENCODER_PRESETS", "AttentionalPooler", "ConchVisionTower", "EncoderPreset", "FoundationEncoder",
           "build_preset", "describe_vit", "preset_table", "require_preset_weights"]

EXTRA_HINT = "pip install 'ipspath[foundation]'"
#: Modules after the transformer blocks, trained with the last blocks (CONCH's pooler and norm included).
_AFTER_BLOCKS = frozenset({"norm", "fc_norm", "layernorm", "head", "attn_pool_contrast", "ln_contrast"})


def require_preset_weights(name: str, pretrained: str | os.PathLike | None) -> None:
    """BadInputError when ``name`` is a preset and no weights are given (nothing is downloaded)."""
    preset = ENCODER_PRESETS.get(name)
    if preset is not None and pretrained is None:
        raise BadInputError(f"encoder {name} needs its weights: give --pretrained PATH ({preset.card}: "
                            f"{preset.weights}); nothing is downloaded")


# -- the wrapper --------------------------------------------------------------------------------

class FoundationEncoder(nn.Module):
    """uint8 patches -> the card's input pipeline on the device -> backbone -> pooled ``(n, out_dim)``.

    Parameters
    ----------
    preset : EncoderPreset
    backbone : nn.Module
        Maps normalised ``(n, 3, input_size, input_size)`` pixels to tokens ``(n, T, D)`` (``cls``,
        ``cls+mean`` poolings) or embeddings ``(n, out_dim)`` (``avg``, ``head``).
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
        for name, module in self.backbone.named_modules():  # final norms, poolers and heads after the blocks
            if name.rsplit(".", 1)[-1] in _AFTER_BLOCKS and k > 0:
                module.requires_grad_(True)
        for i, block in enumerate(blocks):
            _wrap_block(block, trained=i >= len(blocks) - k)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) patches ``(n, 3, H, W)`` -> the normalised input the model sees.

        As the card's torchvision transform: the shorter side resized to ``preset.resize`` px
        (antialiased, the card's interpolation; a patch of that size is left as it is), the centre
        ``input_size`` square cropped, mean/std applied.
        """
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        p = self.preset
        h, w = x.shape[-2:]
        if min(h, w) != p.resize:
            size = (p.resize, int(p.resize * w / h)) if h <= w else (int(p.resize * h / w), p.resize)
            x = F.interpolate(x, size=size, mode=p.interpolation, align_corners=False, antialias=True)
            if p.interpolation == "bicubic":  # bicubic overshoots; the card's PIL image is clipped to 0-255
                x = x.clamp(0, 1)
        h, w = x.shape[-2:]
        if (h, w) != (p.input_size, p.input_size):
            top, left = int(round((h - p.input_size) / 2)), int(round((w - p.input_size) / 2))
            x = x[..., top:top + p.input_size, left:left + p.input_size]
        return self.normalize(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        if self._forward_tokens is not None:
            out = self._forward_tokens(self.backbone, x)
        elif self.preset.pooling != "head" and hasattr(self.backbone, "forward_features"):
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
    "cls": _cls, "cls+mean": _cls_mean, "avg": _avg, "head": lambda out, preset: out}


# -- CONCH v1.5: a timm ViT-L trunk and CoCa's attentional pooler --------------------------------

class AttentionalPooler(nn.Module):
    """Learned queries cross-attending to the trunk's tokens (CoCa; CONCH's ``attn_pool_contrast``).

    Parameters
    ----------
    d_model : int
        Width of the queries and the output.
    context_dim : int
        Width of the tokens attended to.
    n_head, n_queries : int
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.scale = (d_model // n_head) ** -0.5
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``(n, T, context_dim)`` -> ``(n, n_queries, d_model)``."""
        n = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(n, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        sim = (q * self.scale) @ k.transpose(-2, -1)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).flatten(2))


class ConchVisionTower(nn.Module):
    """CONCH v1.5's image tower: trunk -> attentional pooler -> LayerNorm, 768-d (keys as its file)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(768, trunk.embed_dim, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


def _conch_position_embedding(grid: int) -> Callable[[StateDict], StateDict]:
    """The file's 14 x 14 position embedding -> ``grid`` x ``grid``, as CONCH v1.5 resamples it.

    Its loader resizes the embedding to the 224 px grid of the trunk it builds (bilinear; a no-op
    for the published 14 x 14) and its forward resamples that to the input's grid bicubically with
    DINO's scale factor (grid + 0.1) / 14. Done once here, the trunk then runs at 448 px as-is.
    """
    def convert(state: StateDict) -> StateDict:
        from timm.layers import resample_abs_pos_embed

        key = "trunk.pos_embed"
        if key not in state:
            return state
        pos = resample_abs_pos_embed(state[key], new_size=(14, 14), num_prefix_tokens=1,
                                     interpolation="bilinear", antialias=False, verbose=False)
        cls, patches = pos[:, :1], pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
        scale = (grid + 0.1) / 14
        patches = F.interpolate(patches.float(), scale_factor=(scale, scale), mode="bicubic")
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
        return {**state, key: torch.cat([cls, patches], dim=1)}

    return convert


# -- architectures in words, for weights that do not fit ---------------------------------------

def describe_vit(state: Mapping[str, torch.Tensor]) -> str:
    """A ViT state dict's architecture in words: depth, width, register tokens, patch size."""
    depth = len({m[1] for k in state if (m := re.search(r"(?:^|\.)(?:blocks|layer)\.(\d+)\.", k))})
    width = next((v.shape[-1] for k, v in state.items() if k.endswith("cls_token")), "?")
    registers = next((v.shape[1] for k, v in state.items() if k.endswith(("reg_token", "register_tokens"))), 0)
    patch = next((v.shape[-1] for k, v in state.items()
                  if k.endswith(("patch_embed.proj.weight", "patch_embeddings.projection.weight"))), "?")
    return f"a ViT of depth {depth}, width {width}, {registers} register tokens, patch {patch} px"


# -- builders, one per library ------------------------------------------------------------------

def _resolve(value: Any) -> Any:
    """``"module:attribute"`` strings -> the object (layer classes in build settings)."""
    if isinstance(value, str) and ":" in value:
        module, attr = value.split(":")
        return getattr(importlib.import_module(module), attr)
    return value


def _import_extra(module: str, preset: EncoderPreset) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - timm also fails when its torchvision does not load
        raise BadInputError(f"encoder {preset.name} needs {module} (the optional extra 'foundation'): "
                            f"{EXTRA_HINT} ({type(exc).__name__}: {exc})") from None


def _weights_file(preset: EncoderPreset, pretrained: str | os.PathLike) -> Path:
    path = Path(pretrained)
    if path.is_dir():
        raise BadInputError(f"{path}: encoder {preset.name} takes a weights file ({preset.card}: {preset.weights}), "
                            "not a folder")
    return path


def _timm_trunk(preset: EncoderPreset, **overrides: Any) -> nn.Module:
    timm = _import_extra("timm", preset)
    kwargs = {k: _resolve(v) for k, v in {**preset.build_kwargs, **overrides}.items()}
    return timm.create_model(preset.architecture, pretrained=False, **kwargs)


def _with_weights(make: Callable[[], nn.Module], path: Path | None, **load: Any) -> nn.Module:
    """``make()``, with the weights of ``path``: built on the meta device and given the file's tensors,
    so that no random initialisation runs and no second copy of a billion weights is ever held."""
    if path is None:
        return make()
    with torch.device("meta"):
        model = make()
    load_weights(model, path, describe=describe_vit, assign=True, **load)
    if any(t.is_meta for t in model.buffers()):  # a buffer the file does not hold: build it for real
        model = make()
        load_weights(model, path, describe=describe_vit, **load)
    return model


def _build_timm(preset: EncoderPreset, pretrained: str | os.PathLike | None) -> FoundationEncoder:
    path = None if pretrained is None else _weights_file(preset, pretrained)
    return FoundationEncoder(preset, _with_weights(lambda: _timm_trunk(preset), path))


def _build_conch(preset: EncoderPreset, pretrained: str | os.PathLike | None) -> FoundationEncoder:
    path = None if pretrained is None else _weights_file(preset, pretrained)
    grid = preset.input_size // (preset.vit_patch or 16)
    # the trunk is built at the input size, so it runs without resampling its position embedding
    tower = _with_weights(lambda: ConchVisionTower(_timm_trunk(preset, img_size=preset.input_size)), path,
                          convert=_conch_position_embedding(grid))
    return FoundationEncoder(preset, tower)


def _build_transformers(preset: EncoderPreset, pretrained: str | os.PathLike | None) -> FoundationEncoder:
    transformers = _import_extra("transformers", preset)
    config = getattr(transformers, preset.architecture)(**preset.build_kwargs)
    if pretrained is None:
        backbone = transformers.AutoModel.from_config(config)
    elif Path(pretrained).is_dir():
        backbone = _from_folder(transformers, preset, Path(pretrained))
    else:
        backbone = _from_file(transformers, preset, config, Path(pretrained))
    return FoundationEncoder(preset, backbone, lambda model, x: model(pixel_values=x).last_hidden_state)


_HF_WEIGHTS = {".safetensors": "model.safetensors", ".bin": "pytorch_model.bin", ".pt": "pytorch_model.bin",
               ".pth": "pytorch_model.bin"}


def _from_file(transformers: Any, preset: EncoderPreset, config: Any, path: Path) -> nn.Module:
    """Load one weights file the way transformers loads its model folder, so that every transformers
    version maps the file's key names (transformers 5 renamed the attention weights) to its own."""
    name = _HF_WEIGHTS.get(path.suffix)
    if name is None:
        raise BadInputError(f"{path}: give {preset.name}'s {preset.weights} (.safetensors or .bin)")
    if not path.is_file():
        raise BadInputError(f"{path}: pretrained weights file not found; give the path of {preset.weights}")
    with tempfile.TemporaryDirectory(prefix="ipspath-hf-") as folder:
        config.save_pretrained(folder)
        os.symlink(path.resolve(), Path(folder) / name)
        return _load_folder(transformers, preset, Path(folder), path)


def _from_folder(transformers: Any, preset: EncoderPreset, folder: Path) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise BadInputError(f"{folder}: not a Hugging Face model folder (no config.json); give {preset.weights}")
    config = transformers.AutoConfig.from_pretrained(os.fspath(folder), local_files_only=True)
    wrong = [f"{k} {getattr(config, k, None)} (expected {v})" for k, v in preset.build_kwargs.items()
             if getattr(config, k, None) != v]
    if wrong:
        raise BadInputError(f"{folder}/config.json is not {preset.name}'s ({'; '.join(wrong)}); check --encoder")
    return _load_folder(transformers, preset, folder, folder)


def _load_folder(transformers: Any, preset: EncoderPreset, folder: Path, named: Path) -> nn.Module:
    try:
        model, info = transformers.AutoModel.from_pretrained(os.fspath(folder), local_files_only=True,
                                                             output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BadInputError(f"{named}: transformers cannot load it as {preset.name} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    problems = [f"{len(keys)} {what}: {', '.join(map(str, list(keys)[:3]))}{', ...' if len(keys) > 3 else ''}"
                for what, keys in (("missing", info.get("missing_keys") or []),
                                   ("unexpected", info.get("unexpected_keys") or []),
                                   ("wrong shape", info.get("mismatched_keys") or [])) if keys]
    if problems:
        found = _weights_in(folder)
        raise BadInputError(f"{named}: weights do not fit {preset.name} ({'; '.join(problems)}); the model is "
                            f"{describe_vit(model.state_dict())}"
                            + (f"; the file holds {describe_vit(found)}" if found else "") + ": check --encoder")
    return model


def _weights_in(folder: Path) -> StateDict | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return read_state_dict(folder / name)
    return None


def _build_ipspath(preset: EncoderPreset, pretrained: str | os.PathLike | None) -> FoundationEncoder:
    backbone = ResNet(preset.architecture, **preset.build_kwargs)
    backbone.normalize = nn.Identity()  # the wrapper normalises, after resizing
    if pretrained is not None:
        load_weights(backbone, _weights_file(preset, pretrained), ignore_prefixes=backbone.ignored_weight_prefixes())
    return FoundationEncoder(preset, backbone, lambda model, x: model.pool(model.forward_features(x)).flatten(1))


_BUILDERS: dict[str, Callable[[EncoderPreset, str | os.PathLike | None], FoundationEncoder]] = {
    "timm": _build_timm, "conch": _build_conch, "transformers": _build_transformers, "ipspath": _build_ipspath}


def build_preset(name: str, pretrained: str | os.PathLike | None = None, *,
                 train_blocks: int | None = None) -> FoundationEncoder:
    """Build the encoder of preset ``name``, with the weights of the local file ``pretrained``.

    Parameters
    ----------
    name : str
        A key of :data:`ENCODER_PRESETS`.
    pretrained : path-like, optional
        Local weights file in the card's format (``.bin``/``.pth``/``.pt`` state dict or
        ``.safetensors``); for transformers models also the model's folder (``config.json`` and its
        weights). None builds the architecture only (its weights then come from an ipspath checkpoint).
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
