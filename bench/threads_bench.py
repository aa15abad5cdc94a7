"""Default threads against one thread: the CPU work of ``ipspath`` with its thread policy, timed.

Each workload runs in fresh processes, one per setting and repeat, the settings interleaved so that
they share whatever else the machine is doing (the load average is recorded):

- ``default``: no thread variable set: ipspath's policy (:mod:`ips_path.runtime.threads`) sizes torch's pool;
- ``omp1``: ``OMP_NUM_THREADS=1``, the best single setting the issue measured on 2 cores;
- ``torch_default``: ``OMP_NUM_THREADS=<cores>``, torch's own default (every core), i.e. before the policy.

Workloads:

- ``demo``: the demo chain at a smaller size (generate, tile, train, predict with heatmaps, report);
- ``train_features``: ``ipspath train --features stain_density`` on a generated cohort (epochs read
  cached features, no pixels), the run the issue timed at 2.8-6 s an epoch against 0.3-1.1 s.

The result holds every time, the medians, and the ratios ``default / omp1`` and ``default / best``
(best: the fastest median of the other settings); the target is ``default / best <= 1.1``.

    python bench/threads_bench.py                         # both workloads, 3 repeats
    python bench/threads_bench.py --workloads train_features --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def settings(cores: int) -> dict[str, dict[str, str]]:
    return {"default": {}, "omp1": {"OMP_NUM_THREADS": "1"}, "torch_default": {"OMP_NUM_THREADS": str(cores)}}


def prepare_features(root: Path, n_slides: int) -> tuple[Path, Path]:
    """A generated cohort, tiled, with stain_density features: (manifest, tiles)."""
    from ips_path.stores.features import extract_features
    from ips_path.stores.tile_store import find_stores
    from ips_path.synthetic.synth import write_synthetic_cohort
    from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides

    write_synthetic_cohort(root / "slides", n_slides, size=(2048, 1536), mpp=1.0, downsamples=(1, 4), seed=1,
                           lesion_diameter_um=(150.0, 300.0))
    manifest = root / "slides" / "manifest.csv"
    tiles = root / "tiles"
    tile_slides(collect_inputs([], manifest), tiles, TilingParams(target_mpp=2.0, patch_size=32, qc=False),
                progress=False)
    outcomes = extract_features(find_stores([tiles]), "stain_density", device="cpu", progress=False)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    return manifest, tiles


def worker(workload: str, scratch: Path, data: dict[str, str]) -> dict[str, float]:
    """Run one workload in this process; seconds of its parts."""
    import torch

    if workload == "demo":
        from dataclasses import replace

        from ips_path.synthetic.demo import DemoSettings, run_demo

        settings = DemoSettings()
        settings = replace(settings, n_train=12, n_test=6, train=replace(settings.train, epochs=3))
        started = time.perf_counter()
        result = run_demo(scratch / "demo", settings, progress=False)
        return {"total": time.perf_counter() - started, **result.seconds, "torch_threads": torch.get_num_threads()}
    from ips_path.config import TrainConfig
    from ips_path.training.train import train

    config = TrainConfig(features="stain_density", epochs=4, device="cpu", warmup_epochs=1.0, patience=0)
    started = time.perf_counter()
    train(Path(data["manifest"]), Path(data["tiles"]), scratch / "run", config, progress=False)
    seconds = time.perf_counter() - started
    with open(scratch / "run" / "metrics.csv", encoding="utf-8") as f:
        epochs = sum(1 for _ in f) - 1
    return {"total": seconds, "per_epoch": seconds / max(epochs, 1), "torch_threads": torch.get_num_threads()}


def run_once(workload: str, env_extra: dict[str, str], data: dict[str, str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(env_extra)
    with tempfile.TemporaryDirectory(prefix="threads-bench-") as scratch:
        done = subprocess.run([sys.executable, __file__, "--worker", workload, "--scratch", scratch,
                               "--data", json.dumps(data)], env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{workload} with {env_extra or 'no thread variable'} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(workload: str, repeats: int, data: dict[str, str], cores: int) -> dict:
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in settings(cores)}
    for _ in range(repeats):
        for name, env in settings(cores).items():  # interleaved: the settings share the machine's load
            runs[name].append(run_once(workload, env, data))
            print(f"{workload} {name}: {json.dumps(runs[name][-1])}", file=sys.stderr)
    key = "per_epoch" if workload == "train_features" else "total"
    medians = {name: round(statistics.median(r[key] for r in rs), 3) for name, rs in runs.items()}
    parts = {name: {part: round(statistics.median(r[part] for r in rs), 2) for part in rs[0]}
             for name, rs in runs.items()}
    best_other = min(v for name, v in medians.items() if name != "default")
    return {"workload": workload, "measure": f"median {key} seconds", "repeats": repeats, "cores": cores,
            "medians": medians, "median_parts": parts,
            "ratio_default_over_omp1": round(medians["default"] / medians["omp1"], 3),
            "ratio_default_over_best": round(medians["default"] / best_other, 3),
            "ratio_torch_default_over_default": round(medians["torch_default"] / medians["default"], 3),
            "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["train_features", "demo"],
                        choices=["train_features", "demo"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slides", type=int, default=16, help="Slides of the train_features cohort.")
    parser.add_argument("--no-save", action="store_true", help="Print only; write no result file.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--data", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.scratch), json.loads(args.data))))
        return
    from ips_path.runtime.threads import available_cores

    cores = available_cores()
    with tempfile.TemporaryDirectory(prefix="threads-bench-data-") as root:
        data: dict[str, str] = {}
        if "train_features" in args.workloads:
            manifest, tiles = prepare_features(Path(root), args.slides)
            data = {"manifest": str(manifest), "tiles": str(tiles)}
        for workload in args.workloads:
            result = bench(workload, args.repeats, data, cores)
            if args.no_save:
                print(json.dumps(result, indent=2))
            else:
                save_result(f"threads_{workload}_{cores}cores", result)


if __name__ == "__main__":
    main()
