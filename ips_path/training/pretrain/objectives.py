"""Self-supervised objectives over two views of a batch of patches: SimCLR and BYOL.

* ``simclr`` (Chen et al. 2020): a projector MLP after the encoder and the NT-Xent loss: each view must
  pick its partner among the ``2n - 1`` other views of the batch (temperature ``temperature``). One
  network, no target copy: the cheapest per step. Under torchrun each process contrasts its own batch
  (negatives are not gathered across processes).
* ``byol`` (Grill et al. 2020; what the IPS authors pretrained CAMELYON16 with): an online network
  (encoder, projector, predictor) regresses the projection of the other view by a target network,
  the exponential moving average of the online encoder and projector (``ema`` rising to 1 along a
  cosine over the run). No negatives, but one more forward pass per view for the target.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["METHODS", "SelfSupervised"]

METHODS = ("simclr", "byol")


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class SelfSupervised(nn.Module):
    """An encoder with the heads of a self-supervised method; ``forward(view_a, view_b)`` is the loss.

    Parameters
    ----------
    encoder : nn.Module
        Maps uint8 patches ``(n, 3, H, W)`` to ``(n, encoder.out_dim)``.
    method : {"simclr", "byol"}
    proj_dim : int
        Output size of the projector (and predictor).
    hidden : int
        Hidden size of the projector (and predictor) MLPs.
    temperature : float
        NT-Xent temperature (simclr).
    ema : float
        Starting momentum of the BYOL target network (rises to 1 along a cosine, :meth:`update_target`).
    """

    def __init__(self, encoder: nn.Module, method: str, proj_dim: int = 128, hidden: int = 512,
                 temperature: float = 0.2, ema: float = 0.99):
        super().__init__()
        self.encoder = encoder
        self.method = method
        self.temperature = temperature
        self.ema = ema
        self.projector = _mlp(int(encoder.out_dim), hidden, proj_dim)
        if method == "byol":
            self.predictor = _mlp(proj_dim, hidden, proj_dim)
            self.target = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "projector": copy.deepcopy(self.projector)})
            self.target.requires_grad_(False)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        z = self.projector(self.encoder(torch.cat([view_a, view_b])))
        if self.method == "simclr":
            return _nt_xent(z, self.temperature)
        with torch.no_grad():
            target = self.target["projector"](self.target["encoder"](torch.cat([view_b, view_a])))
        prediction = F.normalize(self.predictor(z), dim=1)
        return (2 - 2 * (prediction * F.normalize(target, dim=1)).sum(1)).mean()

    @torch.no_grad()
    def update_target(self, progress: float) -> None:
        """BYOL: move the target network towards the online one; ``progress`` is the share of the run done."""
        if self.method != "byol":
            return
        momentum = 1 - (1 - self.ema) * (math.cos(math.pi * min(1.0, progress)) + 1) / 2
        for online, target in ((self.encoder, self.target["encoder"]), (self.projector, self.target["projector"])):
            for p, q in zip(online.parameters(), target.parameters(), strict=True):
                q.mul_(momentum).add_(p.detach(), alpha=1 - momentum)
            for b, c in zip(online.buffers(), target.buffers(), strict=True):
                c.copy_(b)


def _nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over ``2n`` projections, the partner of row ``i`` being row ``(i + n) % 2n``."""
    z = F.normalize(z.float(), dim=1)
    n2 = z.shape[0]
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    partner = (torch.arange(n2, device=z.device) + n2 // 2) % n2
    return F.cross_entropy(similarity, partner)
