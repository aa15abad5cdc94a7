"""Sinusoidal positional encodings of patches: by stream index (1-D, as in the IPS paper) or by grid
position on the slide (2-D).

Computed on the fly from the positions (no table, so no maximum length) in float64 and rounded to
float32: a patch's encoding is then the same bits whatever batch it is computed in, which keeps the
selection scores independent of how the patches are chunked.
"""

from __future__ import annotations

import torch

__all__ = ["grid_encoding", "sinusoidal_encoding"]


def sinusoidal_encoding(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Transformer sine/cosine encoding of integer positions.

    Parameters
    ----------
    positions : Tensor
        Any shape ``S``, integer positions (e.g. patch index in the stream).
    dim : int
        Encoding dimension, even.
    base : float
        Longest wavelength, in positions, is ``2 * pi * base``.

    Returns
    -------
    Tensor
        ``S + (dim,)`` float32; channel ``2i`` is ``sin(p / base**(2i/dim))``, channel ``2i+1`` the cosine.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal encoding needs an even dimension, got {dim}")
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    encoding = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return encoding.to(torch.float32)


def grid_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sinusoidal encoding of grid positions: row in the first ``dim/2`` channels, column in the rest.

    Parameters
    ----------
    positions : Tensor
        ``S + (2,)`` integer (row, col) grid positions, in patches.
    dim : int
        Encoding dimension, a multiple of 4.

    Returns
    -------
    Tensor
        ``S + (dim,)`` float32.
    """
    if dim % 4:
        raise ValueError(f"2-D positional encoding needs a dimension divisible by 4, got {dim}")
    if positions.shape[-1] != 2:
        raise ValueError(f"2-D positional encoding needs (..., 2) grid positions, got {tuple(positions.shape)}")
    return torch.cat((sinusoidal_encoding(positions[..., 0], dim // 2),
                      sinusoidal_encoding(positions[..., 1], dim // 2)), dim=-1)
