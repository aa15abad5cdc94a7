"""Run one function per slide: in this process, in local worker processes, or on a Dask cluster.

``tile``, ``features`` and ``predict`` all fan out through :func:`map_slides`. Locally it uses
a process pool (``--workers``) and needs no Dask. With ``scheduler`` it sends the per-slide work
to a Dask distributed cluster (``pip install ipspath[dask]``):

- ``"tcp://host:8786"``: a running scheduler (``dask scheduler`` + ``dask worker`` processes,
  or dask-jobqueue on SLURM);
- ``"local:N"``: a LocalCluster of N worker processes on this machine, to try it out. With GPU
  work (the resource ``GPU=1``, as ``--device cuda`` asks) it starts one worker per visible GPU
  instead (at most N), each pinned to its GPU through ``CUDA_VISIBLE_DEVICES`` and offering the
  resource ``GPU=1``, so one slide runs per GPU at a time.

The per-slide functions write their results straight to the shared output folder, atomically,
and return a small picklable record. A worker that dies mid-slide leaves no half-written output;
its slide is run again (locally: alone, so that a second death names it; on Dask: on another
worker), and a slide whose workers keep dying is recorded as failed (through ``on_lost``) while
the others go on. Local workers die with the process that started them, even when it is killed
with ``kill -9``, so no orphan goes on writing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ips_path.runtime.errors import BadInputError, listing
from ips_path.runtime.progress import progress_bar

__all__ = ["CONNECT_TIMEOUT_S", "check_workers_see", "dask_client", "map_slides", "process_object", "visible_gpus"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# prctl(2) option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1

#: Seconds to wait for a scheduler before saying it cannot be reached.
CONNECT_TIMEOUT_S = 5


def map_slides(function: Callable[..., R], items: Sequence[T], *args: Any, workers: int = 1,
               scheduler: str | None = None, shared_paths: Sequence[str | os.PathLike] = (),
               resources: dict[str, float] | None = None, retries: int = 2, progress: bool = True,
               desc: str = "slides", on_lost: Callable[[T, BaseException], R] | None = None,
               patches: Sequence[int] | None = None) -> list[R]:
    """``[function(item, *args) for item in items]``, in parallel, in input order.

    Parameters
    ----------
    function : callable
        A module-level (picklable) function of one slide that handles its own errors and
        returns a record; it runs in worker processes.
    items : sequence
        One per slide.
    *args
        Passed after the item (output folder, parameters, ...).
    workers : int
        Local worker processes when ``scheduler`` is None; 1 runs in this process.
    scheduler : str, optional
        Dask scheduler address, or ``"local:N"`` for a LocalCluster of N processes.
    shared_paths : sequence of path-like
        Files and folders every Dask worker must see (slides, the output folder); checked on
        each worker before any work is sent, with a clear error naming what a worker lacks.
    resources : dict, optional
        Dask worker resources each task needs, e.g. ``{"GPU": 1}`` so one slide runs per GPU.
    retries : int
        Times Dask re-runs a task whose worker died.
    progress : bool
        One progress bar over slides (a log line now and then when stderr is not a terminal,
        see :mod:`ips_path.runtime.progress`).
    desc : str
        Label of the progress bar.
    on_lost : callable, optional
        ``on_lost(item, exception)`` builds the record of a slide whose task failed outside
        ``function`` (its workers kept dying); without it the exception propagates.
    patches : sequence of int, optional
        The patches of each slide: the bar then counts patches (slides done beside them), so that
        its rate and ETA weigh large slides as they are; ``function`` running in this process may
        count its patches as it goes with :func:`ips_path.runtime.progress.advance`.

    Returns
    -------
    list
        The records, in the order of ``items``.
    """
    results: list[Any] = [None] * len(items)
    weights = [1] * len(items) if patches is None else list(patches)
    done = slides_done = 0
    with progress_bar(sum(weights), desc, unit="slide" if patches is None else "patch", enabled=progress) as bar:
        for index, record in _run(function, items, args, workers, scheduler, shared_paths, resources, retries,
                                  on_lost):
            results[index] = record
            done, slides_done = done + weights[index], slides_done + 1
            if patches is not None:
                bar.set_postfix(slides=f"{slides_done}/{len(items)}", refresh=False)
            bar.update(max(0, done - bar.n))  # what advance() has not counted yet
    return results


def _run(function: Callable[..., R], items: Sequence[T], args: tuple, workers: int, scheduler: str | None,
         shared_paths: Sequence[str | os.PathLike], resources: dict[str, float] | None, retries: int,
         on_lost: Callable[[T, BaseException], R] | None) -> Iterator[tuple[int, R]]:
    if scheduler is not None:
        yield from _run_dask(function, items, args, scheduler, shared_paths, resources, retries, on_lost)
    elif workers <= 1 or len(items) <= 1:
        for index, item in enumerate(items):
            yield index, function(item, *args)
    else:
        yield from _run_local(function, items, args, workers, retries, on_lost)


def _run_local(function: Callable[..., R], items: Sequence[T], args: tuple, workers: int, retries: int,
               on_lost: Callable[[T, BaseException], R] | None) -> Iterator[tuple[int, R]]:
    """Local worker processes that die with this process; a slide whose worker dies is retried.

    A worker killed mid-slide (out of memory, kill -9) breaks the whole process pool. The slides
    it was running (each marks itself started in a scratch folder) are the suspects: one suspect
    is the culprit; several are rerun one at a time, where a death names its slide. A culprit is
    rerun alone up to ``retries`` times, then recorded through ``on_lost``; every other slide is
    simply run again, never failed for another slide's death.
    """
    todo, alone = list(range(len(items))), []
    deaths: Counter[int] = Counter()
    unexplained = 0
    with tempfile.TemporaryDirectory(prefix="ipspath-workers-") as scratch:
        marks = Path(scratch)
        while todo or alone:
            batch = [alone.pop(0)] if alone else todo
            if batch is todo:
                todo = []
            broken: BaseException | None = None
            unfinished = []
            with ProcessPoolExecutor(max_workers=min(workers, len(batch)), initializer=_die_with_parent,
                                     initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(_marked, marks, index, function, items[index], *args): index
                           for index in batch}
                for future in as_completed(futures):
                    index = futures[future]
                    try:
                        yield index, future.result()
                    except BrokenProcessPool as exc:  # a worker process died: sorted out below
                        broken = exc
                        unfinished.append(index)
                    except Exception as exc:  # noqa: BLE001 - e.g. a record that cannot be pickled
                        if on_lost is None:
                            raise
                        yield index, on_lost(items[index], exc)
            if broken is None:
                continue
            suspects = [index for index in unfinished if (marks / str(index)).exists()]
            for index in unfinished:
                (marks / str(index)).unlink(missing_ok=True)
            todo = [index for index in unfinished if index not in suspects] + todo
            if len(suspects) > 1:
                alone += suspects
                continue
            if not suspects:  # died before starting any slide
                unexplained += 1
                if unexplained <= retries:
                    continue
                suspects, todo, alone = todo + alone, [], []
            for index in suspects:
                deaths[index] += 1
                if deaths[index] <= retries and unexplained <= retries:
                    log.warning("%s: its worker process died (%s); trying it again alone", items[index], broken)
                    alone.append(index)
                elif on_lost is None:
                    raise broken
                else:
                    yield index, on_lost(items[index], broken)


def _marked(marks: Path, index: int, function: Callable[..., R], item: T, *args: Any) -> R:
    """``function(item, *args)`` in a worker, with a mark saying it runs (see :func:`_run_local`)."""
    mark = marks / str(index)
    mark.touch()
    try:
        return function(item, *args)
    finally:
        mark.unlink(missing_ok=True)


def _die_with_parent(parent_pid: int) -> None:
    """Initializer of a local worker: die at once when the parent process dies, even by kill -9,
    so no orphan goes on writing. Linux: PR_SET_PDEATHSIG; elsewhere a thread watching the parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl failed")
    except (OSError, AttributeError):
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    if os.getppid() != parent_pid:  # the parent died before the signal was set up
        os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _run_dask(function: Callable[..., R], items: Sequence[T], args: tuple, scheduler: str,
              shared_paths: Sequence[str | os.PathLike], resources: dict[str, float] | None, retries: int,
              on_lost: Callable[[T, BaseException], R] | None) -> Iterator[tuple[int, R]]:
    from distributed import as_completed as dask_as_completed

    with dask_client(scheduler, gpus=bool(resources and resources.get("GPU"))) as client:
        check_workers_see(client, shared_paths)
        futures = {}
        for index, item in enumerate(items):
            futures[client.submit(function, item, *args, pure=False, retries=retries, resources=resources)] = index
        for future in dask_as_completed(futures):
            index = futures[future]
            try:
                yield index, future.result()
            except Exception as exc:  # e.g. KilledWorker: the slide's workers kept dying
                if on_lost is None:
                    raise
                yield index, on_lost(items[index], exc)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (else every GPU torch sees)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        names = []
        for name in (n.strip() for n in listed.split(",")):
            if not name or name == "-1":  # CUDA stops at the first invalid entry
                break
            names.append(name)
        return names
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@contextmanager
def dask_client(scheduler: str, gpus: bool = False) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler`` (an address, or ``"local:N"`` for a LocalCluster).

    Parameters
    ----------
    scheduler : str
        ``tcp://host:port`` or ``local:N``.
    gpus : bool
        The work needs the resource ``GPU=1``: ``local:N`` then starts one worker per visible GPU
        (at most N), each seeing only its GPU (``CUDA_VISIBLE_DEVICES``) and offering ``GPU=1``.
        Ignored for a running scheduler, whose GPU workers must be started so (see the README).

    Raises
    ------
    BadInputError
        When Dask is not installed, ``local:N`` is malformed or asks for GPUs where none is
        visible, or the scheduler does not answer within :data:`CONNECT_TIMEOUT_S` seconds.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise BadInputError("--scheduler needs Dask: pip install 'ipspath[dask]'") from exc
    # distributed sets its loggers to INFO when imported: keep its chatter out of the user's terminal.
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if scheduler.startswith("local:"):
        try:
            n_workers = int(scheduler.split(":", 1)[1])
            if n_workers < 1:
                raise ValueError
        except ValueError:
            raise BadInputError(f"--scheduler {scheduler}: use local:N with N >= 1 worker processes") from None
        import dask

        # Dask gives workers MALLOC_TRIM_THRESHOLD_=65536, which also turns off glibc's adaptive mmap
        # threshold: every large array is then mapped and page-faulted afresh, and tiling a slide takes
        # ~40 % longer (bench/cluster_bench.py). Workers of a cluster started by hand: see the README.
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}), \
                (_gpu_cluster(n_workers) if gpus else
                 LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                              scheduler_kwargs={"dashboard": False}, silence_logs=logging.ERROR)) as cluster, \
                Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise BadInputError(f"--scheduler {scheduler}: no Dask scheduler answered within {CONNECT_TIMEOUT_S} s "
                            f"({type(exc).__name__}); start one with `dask scheduler` and check the address") from None
    try:
        yield client
    finally:
        client.close()


def _gpu_cluster(max_workers: int) -> Any:
    """A local cluster of one single-threaded worker process per visible GPU, pinned to it, offering ``GPU=1``.

    A plain LocalCluster's workers offer no resources, so tasks asking for ``GPU=1`` would wait forever.
    """
    from distributed import Nanny, Scheduler, SpecCluster

    gpus = visible_gpus()[:max_workers]
    if not gpus:
        raise BadInputError("--device cuda with --scheduler local:N: no GPU is visible to this process "
                            "(CUDA_VISIBLE_DEVICES, or torch sees none); use --device cpu or run on a GPU machine")
    options = dict(host="127.0.0.1", nthreads=1, dashboard=False, dashboard_address=None, resources={"GPU": 1},
                   silence_logs=logging.ERROR)
    workers = {f"gpu-{gpu}": {"cls": Nanny, "options": {**options, "env": {"CUDA_VISIBLE_DEVICES": gpu}}}
               for gpu in gpus}
    scheduler = {"cls": Scheduler, "options": dict(host="127.0.0.1", port=0, dashboard=False, dashboard_address=None)}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR, name="ipspath-gpus")


# One object per kind per worker process (a model, a patch streamer), kept for the following
# slides of the run: a worker predicts many slides with one model.
_PROCESS_OBJECTS: dict[str, tuple[Any, Any]] = {}


def process_object(kind: str, key: Any, build: Callable[[], R]) -> R:
    """The worker process's object of ``kind``, built by ``build()`` unless one with an equal ``key`` exists.

    An object replaced by one with another key is closed (when it has ``close``).
    """
    held = _PROCESS_OBJECTS.get(kind)
    if held is not None and held[0] == key:
        return held[1]
    if held is not None and hasattr(held[1], "close"):
        held[1].close()
    obj = build()
    _PROCESS_OBJECTS[kind] = (key, obj)
    return obj


def _missing_paths(paths: list[str]) -> list[str]:
    """On a worker: which of ``paths`` it cannot see (folders must also be writable)."""
    missing = []
    for raw in paths:
        path = Path(raw)
        if not path.exists() or (path.is_dir() and not os.access(path, os.W_OK | os.X_OK)):
            missing.append(raw)
    return missing


def check_workers_see(client: Any, paths: Sequence[str | os.PathLike]) -> None:
    """Fail clearly, before any work, when a Dask worker cannot see a slide or the output folder."""
    if not paths:
        return
    wanted = [str(Path(p).resolve()) for p in paths]
    workers = client.scheduler_info().get("workers", {})
    if not workers:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S * 6)
    for worker, missing in client.run(_missing_paths, wanted).items():
        if missing:
            shown = listing(missing)
            raise BadInputError(f"Dask worker {worker} cannot see (or write) {shown}; paths must be on storage "
                                "shared by all workers, with the same absolute paths")
