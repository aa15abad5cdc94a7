"""How many threads the CPU work of a process runs on: the one thread policy of ipspath.

A process that streams patches has two kinds of threads: the loader's readers (decoding tiles,
:class:`~ips_path.loader.PatchStreamer`) and torch's intra-op pool (OpenMP, which also sizes MKL).
torch sizes its pool to every core, as if nothing else ran. Beside busy readers, or beside other
processes, its threads then wait for each other at every parallel region: OpenMP's barriers spin
until the last thread arrives, and a thread the kernel has descheduled arrives late. The small
tensors of IPS (a chunk of embeddings, a 128-wide attention) gain nothing from more threads and
lose the most: on 2 cores beside other work, ``ipspath demo`` trained 3-5x slower with torch's
default than with one thread (``bench/threads_bench.py``).

The policy: torch gets the cores the readers leave, keeping at least one core and at most half of
them for the readers, so that torch threads plus busy readers never outnumber the cores. On 2 cores
that is one torch thread; on 16 cores with 4 readers 12 threads, with 16 readers 8, where a
ResNet on the CPU still scales. ``OMP_NUM_THREADS`` set by the user (or by a scheduler such as
SLURM or Dask, which sets it to 1 in its workers) wins over the policy.
"""

from __future__ import annotations

import os

__all__ = ["available_cores", "compute_threads", "use_compute_threads"]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as set by taskset, SLURM or a container)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def compute_threads(readers: int, cores: int | None = None) -> int:
    """torch intra-op threads beside ``readers`` reader threads on ``cores`` cores (default: this process's).

    The cores the readers leave, counting at most half of the cores for them; at least 1.
    """
    cores = available_cores() if cores is None else cores
    return max(1, cores - min(max(readers, 1), cores // 2))


def use_compute_threads(readers: int) -> int:
    """Size torch's intra-op pool by :func:`compute_threads` unless ``OMP_NUM_THREADS`` says otherwise.

    Returns
    -------
    int
        torch's intra-op threads from now on.
    """
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        wanted = compute_threads(readers)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
    return torch.get_num_threads()
