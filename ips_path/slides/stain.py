"""Per-slide stain normalisation in optical density: every slide's staining brought to one reference.

Slides from different labs, stainers or days differ in how much of each stain they took up. In optical
density (OD = -log(I / I_background), Ruifrok & Johnston 2001), more or less stain scales the density of
each colour channel; so dividing each channel's OD by the slide's mean tissue OD and multiplying by a
reference (the idea of Reinhard et al. 2001, in OD instead of Lab) removes a slide's stain strength while
keeping what differs *within* it, such as nuclei darker than the slide's other nuclei.

A slide's statistic comes from an evenly spaced sample of its own patches (:func:`slide_stain_od`, at the
tile store's resolution), and the normalisation is one ``(3, 256)`` lookup table per slide
(:func:`normalization_lut`), applied to uint8 patches on their device by :func:`apply_lut`. The patch
loader does this when asked (``stain_norm``); training saves the choice in its configuration, so
prediction normalises the same way.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["BACKGROUND_RGB", "REFERENCE_OD", "SAMPLE_PATCHES", "apply_lut", "normalization_lut",
           "optical_density", "slide_stain_od"]

#: Intensity of unstained glass, the I_background of optical density.
BACKGROUND_RGB = (242.0, 241.0, 244.0)
#: Mean tissue optical density per channel (R, G, B) that every slide is brought to: typical H&E.
REFERENCE_OD = (0.13, 0.45, 0.09)
#: Patches read per slide to measure its staining.
SAMPLE_PATCHES = 64
# Pixels whose summed OD is below this are glass or gaps, left out of a slide's tissue statistic.
_TISSUE_OD = 0.15


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Optical density of uint8 RGB pixels ``(..., 3)``: ``max(0, -log(I / I_background))`` per channel."""
    background = np.asarray(BACKGROUND_RGB, dtype=np.float32)
    return np.maximum(-np.log(np.maximum(rgb.astype(np.float32), 1.0) / background), 0.0)


def slide_stain_od(patches: np.ndarray) -> np.ndarray:
    """Mean optical density per channel of the tissue pixels of ``patches`` (uint8, ``(n, h, w, 3)``).

    Returns
    -------
    (3,) float64 array
        The slide's staining; :data:`REFERENCE_OD` when the patches hold no tissue pixel.
    """
    density = optical_density(patches).reshape(-1, 3)
    tissue = density[density.sum(axis=1) > _TISSUE_OD]
    if len(tissue) == 0:
        return np.asarray(REFERENCE_OD, dtype=np.float64)
    return np.maximum(tissue.mean(axis=0, dtype=np.float64), 1e-3)


def normalization_lut(slide_od: np.ndarray) -> np.ndarray:
    """``(3, 256)`` uint8 table mapping a slide's intensities to the reference staining.

    Channel c's optical density is multiplied by ``REFERENCE_OD[c] / slide_od[c]``; intensities
    brighter than the background (no stain) are kept.
    """
    values = np.arange(256, dtype=np.float64)
    lut = np.empty((3, 256), dtype=np.uint8)
    for channel, (background, reference) in enumerate(zip(BACKGROUND_RGB, REFERENCE_OD, strict=True)):
        density = -np.log(np.clip(values, 1.0, background) / background)
        scaled = background * np.exp(-density * reference / float(slide_od[channel]))
        lut[channel] = np.where(values > background, values, np.clip(scaled + 0.5, 0, 255)).astype(np.uint8)
    return lut


def apply_lut(patches: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Map uint8 patches ``(n, 3, H, W)`` through a per-channel table ``(3, 256)`` (uint8, same device)."""
    channel = torch.arange(3, device=patches.device).view(1, 3, 1, 1)
    return lut[channel, patches.long()]
