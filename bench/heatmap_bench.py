"""Heatmap rendering of a 250k-patch slide: wall seconds and peak RSS, each run in a fresh process.

Slide: a generated 128,000 x 128,000 px JPEG SVS at 0.25 µm/px with levels 1/4/16/64 (about
2 GB; made once, about a minute on 2 cores, and kept in ``--cache``). Store: every grid position
of 256 px patches at 0.5 µm/px (512 level-0 px) with a stride of 256 level-0 px (half overlap),
249,001 patches, written with ``write_tile_store``; normal random scores as ``scores/bench``.

Runs, each ``--repeats`` times in a new Python process (peak RSS = the child's ``ru_maxrss``):

- ``png_geojson``: ``render_slide_heatmaps`` as ``ipspath heatmap`` runs it by default:
  thumbnail.png + overlay.png (2048 px), patches.geojson, top_patches.png (16 patches);
- ``tiff_8um``: ``write_overlay_tiff`` alone at 8 µm/px (4000 x 4000 px level 0 + pyramid).

Targets: each under 10 s and under 1 GB. One more child times the steps of ``png_geojson``.

Usage::

    python -m bench.heatmap_bench [--cache DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SLIDE_SIDE = 128_000
SLIDE_MPP = 0.25
PATCH_LEVEL0 = 512
STRIDE_LEVEL0 = 256
TIFF_MPP = 8.0
RUN = "bench"
TARGET_SECONDS = 10.0
TARGET_RSS_MB = 1024.0


def prepare(cache: Path) -> Path:
    """The generated slide (reused when present) and a fresh store with scores; returns the store."""
    from ips_path.stores.tile_store import write_tile_store
    from ips_path.synthetic.synth import write_synthetic_slide

    slide_path = cache / f"slide_{SLIDE_SIDE}px_{SLIDE_MPP}mpp.svs"
    if not slide_path.exists():
        rows, cols = np.mgrid[-1:1:64j, -1:1:64j]
        started = time.perf_counter()
        write_synthetic_slide(slide_path, SLIDE_SIDE, SLIDE_SIDE, mpp=SLIDE_MPP, downsamples=(1, 4, 16, 64),
                              tissue=rows**2 + cols**2 < 0.98, seed=11)
        print(f"generated {slide_path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    positions = np.arange(0, SLIDE_SIDE - PATCH_LEVEL0 + 1, STRIDE_LEVEL0)
    coords = np.stack(np.meshgrid(positions, positions), axis=-1).reshape(-1, 2)
    store = write_tile_store(
        cache / "bench.zarr", coords, np.ones(len(coords), np.float32), np.ones((64, 64), np.uint8),
        SLIDE_SIDE * SLIDE_MPP / 64,
        {"slide_path": str(slide_path), "slide_id": "bench", "level0_mpp": [SLIDE_MPP, SLIDE_MPP],
         "target_mpp": 0.5, "patch_size": 256, "patch_size_level0": PATCH_LEVEL0, "stride_level0": STRIDE_LEVEL0,
         "read_level": 0, "read_size": PATCH_LEVEL0, "slide_dimensions": [SLIDE_SIDE, SLIDE_SIDE]})
    store.write_array(f"scores/{RUN}", np.random.default_rng(0).normal(size=store.n_patches).astype(np.float32))
    return store.path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(mode: str, store_path: Path, out_dir: Path) -> dict:
    """One measured run (in its own process); the timed part starts after imports."""
    from ips_path.review import heatmap
    from ips_path.stores.tile_store import TileStore

    rss_after_imports = _peak_rss_mb()
    started = time.perf_counter()
    store = TileStore.open(store_path)
    scores = heatmap.load_scores(store, RUN)
    steps: dict[str, float] = {}
    if mode == "png_geojson":
        files = heatmap.render_slide_heatmaps(store, scores, out_dir)
    elif mode == "tiff_8um":
        ranks = heatmap.percentile_ranks(scores)
        grid = heatmap.score_grid(store.coords, ranks, store.stride_level0, store.patch_size_level0)
        with heatmap.open_store_slide(store) as slide:
            files = {"tiff": heatmap.write_overlay_tiff(out_dir / "overlay.tiff", slide, grid, TIFF_MPP,
                                                        float(np.mean(store.level0_mpp)))}
    elif mode == "steps":
        files = _timed_steps(heatmap, store, scores, out_dir, steps)
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "rss_after_imports_mb": rss_after_imports,
            "steps_s": steps, "file_mb": {k: os.path.getsize(p) / 2**20 for k, p in files.items()}}


def _timed_steps(heatmap, store, scores, out_dir: Path, steps: dict[str, float]) -> dict[str, Path]:
    """The steps of render_slide_heatmaps one by one, each timed."""
    def timed(name, function, *args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        steps[name] = time.perf_counter() - started
        return result

    ranks = timed("ranks", heatmap.percentile_ranks, scores)
    grid = timed("score_grid", heatmap.score_grid, store.coords, ranks, store.stride_level0, store.patch_size_level0)
    with heatmap.open_store_slide(store) as slide:
        thumbnail, downsample = timed("thumbnail_read", heatmap.slide_thumbnail, slide, 2048)
        overlay, _ = timed("overlay_compose", heatmap.overlay_picture, thumbnail, downsample, grid)
        files = {"thumbnail": timed("thumbnail_png", heatmap.save_png, thumbnail, out_dir / "thumbnail.png"),
                 "overlay": timed("overlay_png", heatmap.save_png, overlay, out_dir / "overlay.png")}
        files["geojson"] = timed("geojson", heatmap.write_patches_geojson, out_dir / "patches.geojson", store.coords,
                                 store.patch_size_level0, scores, ranks=ranks)
        gallery = timed("top16_gallery", heatmap.top_patch_gallery, slide, store.coords, scores, top_k=16,
                        read_level=store.read_level, read_size=store.read_size, patch_size=store.patch_size)
        files["top_patches"] = timed("top16_png", heatmap.save_png, gallery.image, out_dir / "top_patches.png")
    return files


def run_child(mode: str, store_path: Path) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        command = [sys.executable, "-m", "bench.heatmap_bench", "--child", mode, "--store", str(store_path),
                   "--out", out_dir]
        completed = subprocess.run(command, check=True, capture_output=True, text=True,
                                   cwd=Path(__file__).resolve().parents[1])
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["load_average_1min"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ipspath_heatmap_bench",
                        help="Folder for the generated slide (about 2 GB, kept) and the store.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.store, args.out)))
        return

    from bench.common import save_result
    from ips_path.stores.tile_store import TileStore

    args.cache.mkdir(parents=True, exist_ok=True)
    store_path = prepare(args.cache)
    store = TileStore.open(store_path)
    runs = {}
    for mode in ("png_geojson", "tiff_8um"):
        samples = [run_child(mode, store_path) for _ in range(args.repeats)]
        runs[mode] = {
            "median_s": statistics.median(s["seconds"] for s in samples),
            "median_peak_rss_mb": statistics.median(s["peak_rss_mb"] for s in samples),
            "under_targets": all(s["seconds"] < TARGET_SECONDS and s["peak_rss_mb"] < TARGET_RSS_MB for s in samples),
            "samples": samples,
        }
    steps = run_child("steps", store_path)
    save_result("heatmap_bench", {
        "slide": {"width": SLIDE_SIDE, "height": SLIDE_SIDE, "mpp": SLIDE_MPP, "format": "svs (JPEG)",
                  "downsamples": [1, 4, 16, 64]},
        "n_patches": store.n_patches,
        "patch_size_level0": PATCH_LEVEL0,
        "stride_level0": STRIDE_LEVEL0,
        "tiff_mpp": TIFF_MPP,
        "thumbnail_size": 2048,
        "targets": {"seconds": TARGET_SECONDS, "peak_rss_mb": TARGET_RSS_MB},
        "repeats": args.repeats,
        "runs": runs,
        "steps_s": steps["steps_s"],
        "command": "python -m bench.heatmap_bench",
    })


if __name__ == "__main__":
    main()
