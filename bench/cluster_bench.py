"""Tiling a cohort locally and through Dask: wall seconds and the scheduler's per-slide overhead.

Three ways to run ``ipspath tile`` over the same generated cohort (each a fresh subprocess, as a
user runs it, with ``--overwrite``):

- ``--workers N`` (local processes, no Dask);
- ``--scheduler local:N`` (a LocalCluster started and stopped by the command);
- ``--scheduler tcp://...`` against a scheduler with N single-threaded worker processes that was
  started beforehand (``dask scheduler`` + ``dask worker``, with the README's worker setting), as
  on a real cluster.

The cohort is one generated 100,000 x 80,000 px SVS (the tiling benchmark's slide) listed under
``--slides`` ids in the manifest, so every slide costs what a real one does (about 1.6 CPU s)
without generating dozens of 400 MB files. The per-slide overhead is
(Dask wall - local wall) / slides, with the running scheduler.

    python -m bench.cluster_bench [--slides 32] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import save_result

# The README's worker setting: without Dask's MALLOC_TRIM_THRESHOLD_ (see ips_path.runtime.parallel).
WORKER_CONFIG = """\
distributed:
  nanny:
    pre-spawn-environ:
      MALLOC_TRIM_THRESHOLD_: null
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tile(manifest: Path, out: Path, extra: list[str]) -> float:
    command = [sys.executable, "-m", "ips_path.cli.main", "-q", "tile", "--manifest", str(manifest), "-o", str(out),
               "--overwrite", *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def _start_cluster(workers: int, config_dir: Path) -> tuple[str, list[subprocess.Popen]]:
    """A scheduler and ``workers`` single-threaded worker processes on this machine."""
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "ipspath.yaml").write_text(WORKER_CONFIG)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    environ = {**os.environ, "DASK_CONFIG": str(config_dir)}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": environ}
    processes = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-dashboard"], **quiet)]
    processes += [subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                    "--no-dashboard"], **quiet) for _ in range(workers)]
    from distributed import Client

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(workers, timeout=60)
    return address, processes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=(100_000, 80_000), help="level-0 px of the slide")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from ips_path.synthetic.synth import write_synthetic_slide

    with tempfile.TemporaryDirectory(prefix="cluster_bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        write_synthetic_slide(work / "slide.svs", *args.size, mpp=0.25, downsamples=(1, 4, 16, 64), seed=1)
        generate_s = time.perf_counter() - started
        manifest = work / "manifest.csv"
        manifest.write_text("slide_id,slide_path\n" + "".join(f"s{i:03d},slide.svs\n" for i in range(args.slides)))
        address, cluster = _start_cluster(args.workers, work / "dask-config")
        try:
            runs: dict[str, list[float]] = {"local_workers": [], "dask_local_cluster": [], "dask_running_scheduler": []}
            for _ in range(args.repeats):  # interleaved, so load changes hit every way alike
                runs["local_workers"].append(_tile(manifest, work / "a", ["--workers", str(args.workers)]))
                runs["dask_local_cluster"].append(_tile(manifest, work / "b",
                                                        ["--scheduler", f"local:{args.workers}"]))
                runs["dask_running_scheduler"].append(_tile(manifest, work / "c", ["--scheduler", address]))
        finally:
            for process in cluster:
                process.terminate()
            for process in cluster:
                process.wait(timeout=30)

    median = {k: statistics.median(v) for k, v in runs.items()}
    local = median["local_workers"]
    result = {
        "command": f"python -m bench.cluster_bench --slides {args.slides} --size {args.size[0]} {args.size[1]} "
                   f"--workers {args.workers} --repeats {args.repeats}",
        "cohort": {"slides": args.slides, "size_px": list(args.size), "mpp": 0.25, "levels": [1, 4, 16, 64],
                   "made_as": "one generated SVS listed under every slide id",
                   "generate_seconds": round(generate_s, 1)},
        "tile_options": "--mpp 0.5 --patch-size 256 (defaults), QC pictures on, --overwrite",
        "workers": args.workers,
        "wall_seconds_median": {k: round(v, 2) for k, v in median.items()},
        "dask_running_scheduler_vs_local": round(median["dask_running_scheduler"] / local, 3),
        "dask_local_cluster_vs_local": round(median["dask_local_cluster"] / local, 3),
        "per_slide_overhead_ms_running_scheduler": round(
            1000 * (median["dask_running_scheduler"] - local) / args.slides, 1),
        "target": "Dask path under 1.10x the local path",
        "raw_seconds": runs,
    }
    save_result("cluster_bench", result)


if __name__ == "__main__":
    main()
