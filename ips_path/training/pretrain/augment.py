"""Histology augmentations for self-supervised pretraining: two views of every patch.

A view is a crop at the tile store's own resolution (no resizing: the size of a nucleus in µm is part of
what a lesion looks like, and a rescaling crop would teach the encoder to ignore it), a flip and a
quarter turn (tissue has no orientation), a jitter of the haematoxylin and eosin densities (HED space,
Tellez et al. 2019: what differs between stainers and labs) with a little brightness change, and a
Gaussian blur (focus). Everything runs on the patches' device with the caller's generator, so a seeded
run repeats exactly and its random state can be checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ips_path.stores.loader import Augmentation, augment_patches

__all__ = ["ViewAugmentation", "hed_jitter", "random_blur", "random_crops", "two_views"]

# Optical density of one unit of haematoxylin, eosin and DAB (Ruifrok & Johnston 2001), rows = stains.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


@dataclass(frozen=True)
class ViewAugmentation:
    """How one view of a patch is drawn.

    Attributes
    ----------
    crop : int
        Side of the square crop, in pixels of the tile store (<= its patch size).
    hed : float
        Each stain's density is scaled by a factor from ``[1 - hed, 1 + hed]`` and shifted by up to
        ``hed / 10`` optical-density units; 0 disables it.
    brightness : float
        Intensity factor from ``[1 - brightness, 1 + brightness]``.
    blur : float
        Probability of a Gaussian blur with sigma uniform in 0.1-1.5 px.
    """

    crop: int
    hed: float = 0.2
    brightness: float = 0.1
    blur: float = 0.5


def random_crops(patches: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` crop of each ``(n, C, P, P)`` patch (any dtype)."""
    n, _, height, width = patches.shape
    if size >= height and size >= width:
        return patches
    device = patches.device
    top = (torch.rand(n, generator=generator, device=device) * (height - size + 1)).long().clamp_(max=height - size)
    left = (torch.rand(n, generator=generator, device=device) * (width - size + 1)).long().clamp_(max=width - size)
    rows = (top[:, None] + torch.arange(size, device=device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(size, device=device))[:, None, None, :]
    index = torch.arange(n, device=device)[:, None, None, None]
    channels = torch.arange(patches.shape[1], device=device)[None, :, None, None]
    return patches[index, channels, rows, cols]


def hed_jitter(patches: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Scale and shift each patch's stain densities in HED space; uint8 ``(n, 3, H, W)`` in and out."""
    if strength <= 0:
        return patches
    n, device = patches.shape[0], patches.device
    density = -torch.log(patches.float().clamp(min=1.0) / 255.0)  # (n, 3, H, W), optical density per channel
    stains = torch.einsum("nchw,cs->nshw", density, _HED_FROM_RGB.to(device))
    scale = 1 + (torch.rand((n, 3, 1, 1), generator=generator, device=device) * 2 - 1) * strength
    shift = (torch.rand((n, 3, 1, 1), generator=generator, device=device) * 2 - 1) * strength / 10
    density = torch.einsum("nshw,sc->nchw", stains * scale + shift, _RGB_FROM_HED.to(device)).clamp_(min=0)
    return (255.0 * torch.exp(-density)).round_().clamp_(0, 255).to(torch.uint8)


def random_blur(patches: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Blur each uint8 patch with probability ``probability`` (Gaussian, sigma 0.1-1.5 px, 5-px kernel)."""
    if probability <= 0:
        return patches
    n, c, _, _ = patches.shape
    device = patches.device
    sigma = 0.1 + 1.4 * torch.rand(n, generator=generator, device=device)
    blurred = torch.rand(n, generator=generator, device=device) < probability
    offsets = torch.arange(-2, 3, device=device, dtype=torch.float32)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = torch.where(blurred[:, None], kernel, (offsets == 0).float()[None])  # identity where not blurred
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, 5)
    x = patches.float().reshape(1, n * c, *patches.shape[-2:])
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return x.reshape(patches.shape).round_().clamp_(0, 255).to(torch.uint8)


def _view(patches: torch.Tensor, augmentation: ViewAugmentation, generator: torch.Generator) -> torch.Tensor:
    x = random_crops(patches, augmentation.crop, generator)
    x = augment_patches(x, Augmentation(brightness=augmentation.brightness, contrast=0.0, saturation=0.0), generator)
    x = hed_jitter(x, augmentation.hed, generator)
    return random_blur(x, augmentation.blur, generator)


def two_views(patches: torch.Tensor, augmentation: ViewAugmentation, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented uint8 views ``(n, 3, crop, crop)`` of ``(n, 3, P, P)`` uint8 patches."""
    return _view(patches, augmentation, generator), _view(patches, augmentation, generator)
