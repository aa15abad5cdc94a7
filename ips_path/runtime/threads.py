"""How many threads the CPU work of a process runs on: the one thread policy of ipspath.

A process that streams patches has two kinds of threads: the loader's readers (decoding tiles,
:class:`~ips_path.stores.loader.PatchStreamer`) and torch's intra-op pool (OpenMP, which also sizes MKL),
besides the Python thread that runs the loop. torch sizes its pool to every core, as if nothing
else ran. Beside busy readers, or beside other processes, its threads then wait for each other at
every parallel region: OpenMP's barriers spin until the last thread arrives, and a thread the
kernel has descheduled arrives late. The small tensors of IPS (a chunk of embeddings, a 128-wide
attention) gain nothing from more threads and lose the most (``bench/threads_bench.py``).

The policy: torch gets every core but one (the calling thread is one of its threads), and that one
stays for the readers and whatever else runs (decoding a tile costs far less than encoding it).
On 2 cores that is one torch thread, the setting the issue measured 3x faster; on 16 cores 15,
where a compute-bound encoder (a ResNet or ViT embedding patches on the CPU) loses at most 1/16
against all 16, and torch's threads never outnumber the cores. ``OMP_NUM_THREADS`` set by the user
(or by a launcher: torchrun and Dask set it to 1 in their workers) wins over the policy.
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


def compute_threads(cores: int | None = None) -> int:
    """torch intra-op threads on ``cores`` cores (default: this process's): all but one, at least 1."""
    cores = available_cores() if cores is None else cores
    return max(1, cores - 1)


def use_compute_threads() -> int:
    """Size torch's intra-op pool by :func:`compute_threads` unless ``OMP_NUM_THREADS`` says otherwise.

    Returns
    -------
    int
        torch's intra-op threads from now on.
    """
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        wanted = compute_threads()
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
    return torch.get_num_threads()
