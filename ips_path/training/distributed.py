"""Several training processes (``torchrun``): who this process is, its device, and what they share.

Under torchrun (``WORLD_SIZE`` > 1) every process trains on its own shard of each epoch's slides
(:func:`shard_epoch`); the gradient phase runs inside :class:`GradientPhaseDDP`, which averages the
gradients in ``backward``; BatchNorm running statistics are averaged after each step
(:func:`average_buffers`); losses and counts are combined with :func:`mean_over_processes` and
:func:`sum_over_processes`. The random states of every process are saved in checkpoints
(:func:`rng_state`, :func:`set_rng_states`) so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ips_path.runtime.errors import BadInputError
from ips_path.stores.loader import PatchStreamer

log = logging.getLogger(__name__)

__all__ = ["CudaDevices", "GradientPhaseDDP", "Processes", "average_buffers", "init_processes", "mean_over_processes",
           "resolve_device", "rng_state", "seed_everything", "set_rng_states", "shard_epoch", "sum_over_processes"]


@dataclass(frozen=True)
class Processes:
    """This process's place in a (possibly one-process) run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class CudaDevices:
    """What this process sees of CUDA: whether it is usable, how many GPUs, which one is current."""

    available: bool
    count: int
    current: int

    @classmethod
    def visible(cls) -> CudaDevices:
        """Ask torch (without making a CUDA context when there is no GPU)."""
        if not torch.cuda.is_available():
            return cls(False, 0, 0)
        return cls(True, torch.cuda.device_count(), torch.cuda.current_device())


def resolve_device(requested: str, env: Mapping[str, str] | None = None,
                   cuda: CudaDevices | None = None) -> torch.device:
    """The device a training (or prediction) process computes on, always with an index on CUDA.

    Parameters
    ----------
    requested : str
        ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    env : mapping, optional
        Environment (default ``os.environ``): under torchrun ``WORLD_SIZE``, ``LOCAL_RANK`` and
        ``LOCAL_WORLD_SIZE`` (processes on this machine).
    cuda : CudaDevices, optional
        What CUDA offers (default: asked from torch).

    Returns
    -------
    torch.device
        ``cpu``, or ``cuda:i`` where ``i`` is ``LOCAL_RANK`` under torchrun, else the given index,
        else the current device (``torch.cuda.set_device`` needs an index).

    Raises
    ------
    BadInputError
        Not a device, or one this machine cannot compute on (``meta``; ``mps`` without Apple's Metal);
        CUDA asked for but not visible; an index beyond the visible GPUs; ``cuda:N``
        for several processes on one machine (they would all share GPU N).
    """
    env = os.environ if env is None else env
    cuda = CudaDevices.visible() if cuda is None else cuda
    world_size = _env_int(env, "WORLD_SIZE", 1)
    local_rank = _env_int(env, "LOCAL_RANK", None)
    local_world_size = _env_int(env, "LOCAL_WORLD_SIZE", world_size)
    if requested == "auto":
        requested = "cuda" if cuda.available else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise BadInputError(f"--device {requested!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "mps" and _mps_available():
        return device
    if device.type not in ("cpu", "cuda"):  # meta holds no data; mps, xpu, ... need a build and a machine with them
        raise BadInputError(f"--device {requested}: this machine (or this build of torch) cannot compute on "
                            f"{device.type}; use auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if not cuda.available:
        raise BadInputError(f"--device {requested}: no CUDA GPU is visible to this process; use --device cpu")
    if device.index is not None and local_world_size > 1:
        raise BadInputError(
            f"--device {requested} with {local_world_size} processes on this machine would put them all on GPU "
            f"{device.index}; use --device cuda (each process takes the GPU of its LOCAL_RANK) and choose the GPUs "
            "with CUDA_VISIBLE_DEVICES")
    index = device.index if device.index is not None else local_rank if local_rank is not None else cuda.current
    if not 0 <= index < cuda.count:
        origin = "LOCAL_RANK" if device.index is None and local_rank is not None else "--device"
        raise BadInputError(f"{origin} asks for GPU {index} but this process sees {cuda.count} GPU(s) "
                            f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}); use cuda:0 to "
                            f"cuda:{cuda.count - 1}, or start fewer processes per machine")
    return torch.device("cuda", index)


def _mps_available() -> bool:
    """Whether Apple's Metal device is there (torch builds without it lack or stub ``torch.backends.mps``)."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _env_int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise BadInputError(f"environment variable {name}={value!r} is not a non-negative whole number "
                            "(torchrun sets it; unset it to run one process)")
    return number


def init_processes(device: str) -> Processes:
    """Rank, world size and device of this process; starts the process group under ``torchrun``.

    The device is :func:`resolve_device`'s. Under torchrun (``WORLD_SIZE`` > 1) the processes join a
    NCCL group (gloo on CPU).
    """
    world_size = _env_int(os.environ, "WORLD_SIZE", 1)
    rank = _env_int(os.environ, "RANK", 0)
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Processes(rank, world_size, chosen)


def seed_everything(seed: int, rank: int) -> None:
    """Seed python and numpy per process (``seed + rank``) and torch alike on every process."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed)  # the same initial weights on every process (DDP also broadcasts rank 0's)


def rng_state(streamer: PatchStreamer, device: torch.device) -> dict[str, Any]:
    """This process's random states, as tensors, lists and numbers (loadable with weights_only)."""
    version, mt_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        # Only this process's GPU: asking for all of them would make a CUDA context on each.
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        # The loader keeps its augmentation generator private; checkpoints need its state.
        "augmentation": streamer.generator.get_state(),
    }


def set_rng_states(states: Sequence[Mapping[str, Any]], procs: Processes, streamer: PatchStreamer) -> None:
    """Restore this process's random states from a checkpoint's ``rng`` list (one entry per process)."""
    if len(states) != procs.world_size:  # the random streams then stay seeded as at a fresh start
        log.warning("the run was saved with %d process(es) and resumes with %d: it will not repeat an "
                    "uninterrupted run exactly", len(states), procs.world_size)
        return
    state = states[procs.rank]
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and procs.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], procs.device)
    streamer.generator.set_state(state["augmentation"])


def shard_epoch(n_slides: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The training slides (indices) this process takes in ``epoch``, in order.

    All processes shuffle alike with ``(seed, epoch)``, drop the last ``n_slides % world_size`` of the
    shuffled order, and take every ``world_size``-th from their rank on: the shards are disjoint, of
    equal size, and cover every slide but the dropped few (none with one process).
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_slides)
    kept = order[: n_slides - n_slides % world_size]
    return [int(i) for i in kept[rank::world_size]]


class GradientPhaseDDP(DistributedDataParallel):
    """DDP around an :class:`IPSModel` whose ``forward`` is the gradient phase.

    :func:`~ips_path.model.train_step` calls ``forward_selected`` (here: DDP's forward, whose backward
    all-reduces the gradients) and everything else (``select_top_patches``, ``stack_selections``,
    ``tasks``) on the wrapped model, outside DDP.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def forward_selected(self, patches: torch.Tensor, positions: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None, *, with_scores: bool = False) -> tuple[Any, ...]:
        return self(patches, positions, mask, with_scores=with_scores)


def average_buffers(model: torch.nn.Module, world_size: int) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the processes."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().flatten().float() for b in buffers])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def mean_over_processes(value: float, procs: Processes) -> float:
    """The mean of ``value`` over the processes (``value`` itself in a one-process run)."""
    if not procs.distributed:
        return value
    return sum_over_processes(value, procs) / procs.world_size


def sum_over_processes(value: float, procs: Processes) -> float:
    """The sum of ``value`` over the processes (``value`` itself in a one-process run)."""
    if not procs.distributed:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=procs.device)
    dist.all_reduce(tensor)
    return float(tensor.item())
