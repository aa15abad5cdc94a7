"""Train on a generated cohort on the CPU: validation AUC, wall time, throughput and peak memory.

Steps (each timed): generate a cohort of H&E-like slides with small lesions (``ips_path.synthetic.synth``),
tile it (``ipspath tile``), train with the default settings of ``ipspath train`` (the command, in a
subprocess, as a user runs it), then measure the peak RSS (CPU) or GPU memory of one training step
in a fresh process. The target: validation AUC >= 0.9 within 10 minutes of training wall time
(``seconds.to_val_auc_0.9``: from the start of training to the end of the first such epoch).

    python bench/train_bench.py                   # full run, writes bench/results/train_bench.json
    python bench/train_bench.py --slides 8 --epochs 1 --no-save   # smoke test
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from ips_path.config import TrainConfig
from ips_path.model import train_step
from ips_path.stores.loader import Augmentation, PatchStreamer
from ips_path.stores.tile_store import TileStore
from ips_path.synthetic.synth import write_synthetic_cohort
from ips_path.training.checkpoint import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402


def step_memory(tiles: Path, run: Path, device: str) -> dict:
    """Peak memory of one training step on the largest training slides, in this (fresh) process."""
    config = TrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    with (run / "splits.csv").open() as f:
        train_ids = [r["slide_id"] for r in csv.DictReader(f) if r["split"] == "train"]
    stores = sorted((TileStore.open(tiles / f"{s}.zarr") for s in train_ids), key=lambda s: -s.n_patches)
    batch = stores[:config.batch_size]
    model = build_model(config, 2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    streamer = PatchStreamer(chunk_size=config.chunk_size, threads=config.threads, device=device,
                             augmentation=Augmentation())
    targets = {"label": torch.zeros(len(batch), dtype=torch.long)}
    autocast_dtype = torch.bfloat16 if device.startswith("cuda") else None  # as `ipspath train` does
    for warm in (True, False):  # the first step warms the allocator and the threads up
        if not warm:
            rss_before = _current_rss_mb()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
        train_step(model, [streamer.stream(s) for s in batch], targets, optimizer, autocast_dtype=autocast_dtype)
    seconds = time.perf_counter() - started
    streamer.close()
    out = {"slides": len(batch), "patches": sum(s.n_patches for s in batch), "seconds": round(seconds, 3),
           "rss_before_step_mb": round(rss_before, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=48, help="slides in the cohort")
    parser.add_argument("--size", type=int, nargs=2, default=(12000, 9000), help="level-0 width height, px")
    parser.add_argument("--slide-mpp", type=float, default=0.5, help="level-0 µm/px of the generated slides")
    parser.add_argument("--lesion-um", type=float, nargs=2, default=(40.0, 100.0), help="lesion diameters, µm")
    parser.add_argument("--mpp", type=float, default=2.0, help="tiling resolution, µm/px")
    parser.add_argument("--patch-size", type=int, default=64, help="tiling patch size, px")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write bench/results")
    parser.add_argument("--step-memory", nargs=3, metavar=("TILES", "RUN", "DEVICE"),
                        help=argparse.SUPPRESS)  # the child process of the memory measurement
    args, train_options = parser.parse_known_args()
    if args.step_memory:
        tiles, run, device = args.step_memory
        print(json.dumps(step_memory(Path(tiles), Path(run), device)))
        return

    with tempfile.TemporaryDirectory(prefix="train_bench-") as tmp:
        work = args.work or Path(tmp)
        result = run_bench(args, train_options, work)
    if args.no_save:
        print(json.dumps(result, indent=2))
    else:
        save_result("train_bench", result)


def run_bench(args: argparse.Namespace, train_options: list[str], work: Path) -> dict:
    load_start = round(os.getloadavg()[0], 2)  # other work on the machine slows every figure here
    started = time.perf_counter()
    specs = write_synthetic_cohort(work / "slides", args.slides, size=tuple(args.size), mpp=args.slide_mpp,
                                   downsamples=(1, 4, 16), lesion_diameter_um=tuple(args.lesion_um), seed=0)
    generate_s = time.perf_counter() - started
    manifest, tiles, run = work / "slides" / "manifest.csv", work / "tiles", work / "run"

    ipspath = [sys.executable, "-m", "ips_path.cli.main", "-q"]
    started = time.perf_counter()
    subprocess.run([*ipspath, "tile", "--manifest", str(manifest), "-o", str(tiles), "--mpp", str(args.mpp),
                    "--patch-size", str(args.patch_size), "--workers", str(os.cpu_count() or 1), "--no-qc"],
                   check=True, stdout=sys.stderr)
    tile_s = time.perf_counter() - started

    command = [*ipspath, "train", "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run),
               "--val-fraction", str(args.val_fraction), "--device", args.device, *train_options]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=sys.stderr)  # stdout is for the JSON result
    train_s = time.perf_counter() - started

    with (run / "metrics.csv").open() as f:
        history = [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]
    config = yaml.safe_load((run / "config.yaml").read_text())
    memory = json.loads(subprocess.run(
        [sys.executable, __file__, "--step-memory", str(tiles), str(run), args.device],
        check=True, capture_output=True, text=True).stdout)

    n_patches = sorted(TileStore.open(tiles / f"{s.path.stem}.zarr").n_patches for s in specs)
    best = torch.load(run / "best.pt", weights_only=True)["early_stopping"]
    reached = next((r for r in history if r["val_auc"] is not None and r["val_auc"] >= 0.9), None)
    return {
        "command": " ".join(["ipspath", *command[4:]]).replace(str(work), "WORK"),
        "cohort": {"slides": args.slides, "positive": sum(s.label == "positive" for s in specs),
                   "size_px": list(args.size), "slide_mpp": args.slide_mpp, "lesion_diameter_um": list(args.lesion_um),
                   "tile_mpp": args.mpp, "patch_size": args.patch_size,
                   "patches_per_slide_median": n_patches[len(n_patches) // 2],
                   "patches_per_slide_range": [n_patches[0], n_patches[-1]]},
        "config": config,
        "seconds": {"generate": round(generate_s, 1), "tile": round(tile_s, 1), "train_wall": round(train_s, 1),
                    "epoch_median": _median(r["train_seconds"] for r in history),
                    "to_val_auc_0.9": None if reached is None else round(reached["elapsed_seconds"], 1)},
        "epochs_run": len(history),
        "first_epoch_with_val_auc_0.9": None if reached is None else int(reached["epoch"]),
        "val_auc_final": history[-1]["val_auc"],
        "val_balanced_accuracy_final": history[-1]["val_balanced_accuracy"],
        "best_pt": {"epoch": best["best_epoch"], "val_auc": best["best"], "val_loss": best["best_loss"]},
        "throughput_median": {"slides_per_s": _median(r["slides_per_s"] for r in history),
                              "patches_per_s": _median(r["patches_per_s"] for r in history)},
        "peak_rss_training_process_mb": round(max(r["peak_memory_mb"] for r in history), 1),
        "one_step": memory,
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "target_met": reached is not None and reached["elapsed_seconds"] <= 600,
        "history": history,
    }


def _median(values) -> float:
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2], 2)


if __name__ == "__main__":
    main()
