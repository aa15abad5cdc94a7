"""What every pixel encoder shares: ImageNet statistics, the pixel normaliser, and loading a local
weights file into a model, refusing any mismatch.

:mod:`~ips_path.model.encoders` (ResNets, the small CNN, timm) and :mod:`~ips_path.model.foundation`
(the foundation-model presets) both build on this module; neither imports the other's internals.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.errors import BadInputError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PixelNormalizer", "load_weights", "read_state_dict"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The hint of a mismatch when no architecture describer is given (the ResNet encoders' options).
RESNET_HINT = "check the encoder name, stages and in_channels"

StateDict = dict[str, torch.Tensor]


class PixelNormalizer(nn.Module):
    """uint8 pixels -> float32 ``(x / 255 - mean) / std``.

    Parameters
    ----------
    in_channels : int
        Channels C of the patches.
    mean, std : sequence of float, optional
        Per channel, on the [0, 1] scale. Default: ImageNet statistics for 3 channels, 0.5 / 0.5 otherwise.
    """

    def __init__(self, in_channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        if mean is None:
            mean = IMAGENET_MEAN if in_channels == 3 else (0.5,) * in_channels
        if std is None:
            std = IMAGENET_STD if in_channels == 3 else (0.5,) * in_channels
        if len(mean) != in_channels or len(std) != in_channels:
            raise BadInputError(f"pixel mean/std need {in_channels} values each, got {len(mean)} and {len(std)}")
        self.in_channels = in_channels
        # Not persistent: the normalisation is configuration, and state dicts keep the torchvision layout.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise BadInputError(f"pixel encoder expects patches (n, {self.in_channels}, H, W), "
                                f"got shape {tuple(x.shape)}")
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std


def load_weights(module: nn.Module, path: str | os.PathLike, ignore_prefixes: Iterable[str] = (), *,
                 describe: Callable[[Mapping[str, torch.Tensor]], str] | None = None,
                 convert: Callable[[StateDict], StateDict] | None = None, assign: bool = False) -> None:
    """Load a local state-dict file into ``module``, refusing any key or shape mismatch.

    Checkpoints that wrap the weights under ``"state_dict"`` or ``"model"`` and DDP's ``"module."``
    prefix are unwrapped. Keys starting with one of ``ignore_prefixes`` (e.g. a classifier) are skipped.

    Parameters
    ----------
    describe : callable, optional
        State dict -> its architecture in words (e.g. a ViT's depth, width and register tokens); a
        mismatch then names the architecture expected and the one found in the file.
    convert : callable, optional
        Applied to the file's state dict before it is checked (e.g. a position embedding resampled to
        the grid the model runs at).
    assign : bool
        Use the file's tensors as the parameters (cast to the model's dtypes) instead of copying into
        them: for a model built on the meta device, which then never holds a second set of weights.

    Raises
    ------
    BadInputError
        The file is missing, unreadable, or its keys/shapes do not match the model.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: pretrained weights file not found; give the path of a local state dict")
    state = read_state_dict(path)
    ignore_prefixes = tuple(ignore_prefixes)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    if convert is not None:
        state = convert(state)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})"
                   for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
    if problems:
        hint = RESNET_HINT if describe is None else \
            f"the model is {describe(expected)}; the file holds {describe(state)}: check --encoder"
        raise BadInputError(f"{path}: weights do not fit the {type(module).__name__} encoder "
                            f"({'; '.join(problems)}); {hint}")
    if assign:
        state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)


def read_state_dict(path: Path) -> StateDict:
    """The tensors of a local ``.safetensors`` or torch file (BadInputError when it is none)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise BadInputError(f"{path}: reading .safetensors needs the safetensors package") from None
    except Exception as e:  # torch.load raises many types for a corrupt or foreign file
        raise BadInputError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); give a .pth/.pt weights file") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError(f"{path}: does not hold a state dict (a mapping of names to tensors)")
    return dict(state)
