"""map_slides: same records locally and on a Dask cluster; killed workers neither lose nor repeat a slide."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from ips_path.runtime.errors import BadInputError
from ips_path.runtime.parallel import map_slides

distributed = pytest.importorskip("distributed")


def square_and_log(item: int, log_dir: str) -> tuple[int, int]:
    (Path(log_dir) / f"{item}-{os.getpid()}-{time.monotonic_ns()}").touch()
    return item, item * item


def die_once(item: int, log_dir: str) -> int:
    """Terminates its worker process the first time it sees item 3; the retry succeeds."""
    marker = Path(log_dir) / f"killed-{item}"
    if item == 3 and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    (Path(log_dir) / f"done-{item}-{time.monotonic_ns()}").touch()
    return item


def always_dies(item: int) -> int:
    if item == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return item


def test_local_and_dask_give_the_same_records_in_order(tmp_path):
    items = list(range(7))
    local = map_slides(square_and_log, items, str(tmp_path), workers=2, progress=False)
    dask = map_slides(square_and_log, items, str(tmp_path), scheduler="local:2", shared_paths=[tmp_path],
                      progress=False)
    assert local == dask == [(i, i * i) for i in items]


@pytest.mark.slow
def test_a_killed_worker_loses_no_slide_and_each_gets_one_record(tmp_path):
    items = list(range(6))
    # one record per slide, in order, although a worker died in the middle of slide 3
    assert map_slides(die_once, items, str(tmp_path), scheduler="local:2", progress=False) == items
    assert (tmp_path / "killed-3").exists()
    done = [int(p.name.split("-")[1]) for p in tmp_path.glob("done-*")]
    # Execution is at-least-once: a result still in the dead worker's memory is recomputed, which is
    # why the per-slide functions write their outputs atomically and skip finished slides.
    assert set(done) == set(items) and done.count(3) == 1


@pytest.mark.slow
def test_a_slide_whose_workers_keep_dying_is_recorded_and_the_rest_go_on():
    records = map_slides(always_dies, [0, 1, 2], scheduler="local:2", retries=0, progress=False,
                         on_lost=lambda item, exc: f"lost {item}: {type(exc).__name__}")
    assert records[0] == 0 and records[2] == 2
    assert records[1].startswith("lost 1: ")


def test_workers_that_cannot_see_a_path_are_refused_up_front(tmp_path):
    with pytest.raises(BadInputError, match="cannot see"):
        map_slides(square_and_log, [1], str(tmp_path), scheduler="local:1", shared_paths=[tmp_path / "nope"],
                   progress=False)


def test_an_unreachable_scheduler_fails_clearly_within_seconds():
    started = time.monotonic()
    with pytest.raises(BadInputError, match="no Dask scheduler answered"):
        map_slides(square_and_log, [1], "/tmp", scheduler="tcp://127.0.0.1:9", progress=False)
    assert time.monotonic() - started < 15


def test_bad_local_spec():
    with pytest.raises(BadInputError, match="local:N"):
        map_slides(square_and_log, [1], "/tmp", scheduler="local:zero", progress=False)


def worker_gpu(item: int) -> tuple[int, str | None]:
    return item, os.environ.get("CUDA_VISIBLE_DEVICES")


def gpus_seen() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_gpu_work_on_a_local_cluster_runs_one_pinned_worker_per_visible_gpu(monkeypatch):
    """Tasks asking for GPU=1 finish (a plain LocalCluster offers no such resource: they waited forever),
    on one worker per visible GPU, each seeing only its own."""
    from ips_path.runtime.parallel import dask_client

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    records = map_slides(worker_gpu, list(range(6)), scheduler="local:4", resources={"GPU": 1}, progress=False)
    assert [item for item, _ in records] == list(range(6))
    assert {gpu for _, gpu in records} <= {"3", "5"}
    with dask_client("local:4", gpus=True) as client:
        workers = client.scheduler_info()["workers"].values()
        assert sorted(w["resources"].get("GPU") for w in workers) == [1, 1]
        assert sorted(client.run(gpus_seen).values()) == ["3", "5"]
    with dask_client("local:1", gpus=True) as client:  # at most N workers
        assert list(client.run(gpus_seen).values()) == ["3"]


def test_gpu_work_on_a_local_cluster_without_a_visible_gpu_is_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(BadInputError, match="no GPU is visible"):
        map_slides(worker_gpu, [1], scheduler="local:2", resources={"GPU": 1}, progress=False)
