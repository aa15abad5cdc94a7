"""Benchmark of ``ipspath tile``: the whole command in a subprocess, as a user runs it.

Slides: a generated 100,000 x 80,000 px Aperio-style SVS at 0.25 µm/px (levels at downsample
1, 4, 16, 64; JPEG tiles), written once to a scratch folder (not the repository), and the real
CMU-1-Small-Region.svs. Each is tiled at 0.5 µm/px, 256 px patches, ``--overwrite``, several
times; reported are medians of wall seconds (interpreter start and imports included), CPU
seconds (user + system of the child) and peak RSS, and the patch count.

Target: under 2 s wall and 500 MB peak RSS for the large slide (mask + grid + store + QC
picture). Anchor: CLAM's create_patches_fp takes 3.9 s and 682 MB on such a slide.

    .venv/bin/python -m bench.tile_bench [--runs 5] [--scratch /tmp/ipspath_tile_bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import save_result

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("IPSPATH_TEST_DATA", REPO.parent / "shared" / "data"))
IPSPATH = Path(sys.executable).with_name("ipspath")
LARGE = {"width": 100_000, "height": 80_000, "mpp": 0.25, "downsamples": (1, 4, 16, 64), "seed": 0}


def large_slide(scratch: Path) -> Path:
    """The generated large slide, written on first use."""
    from ips_path.synthetic.synth import write_synthetic_slide

    path = scratch / "tile_bench_100k_x_80k.svs"
    if not path.is_file():
        start = time.perf_counter()
        write_synthetic_slide(path, LARGE["width"], LARGE["height"], mpp=LARGE["mpp"],
                              downsamples=LARGE["downsamples"], seed=LARGE["seed"])
        print(f"generated {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def run_once(slide: Path, out_dir: Path) -> dict[str, float]:
    """One ``ipspath tile`` in a child process: wall s, CPU s (user + system), peak RSS MB."""
    command = [str(IPSPATH), "-q", "tile", str(slide), "-o", str(out_dir), "--overwrite"]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    stderr = child.stderr.read().decode() if child.stderr else ""
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}): {stderr}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def bench_slide(slide: Path, runs: int, scratch: Path) -> dict:
    """Medians over ``runs`` runs, plus every run, the slide and the patch count."""
    from ips_path.slides.slide import Slide
    from ips_path.stores.tile_store import TileStore, slide_id_from_path

    out_dir = scratch / "out"
    samples = [run_once(slide, out_dir) for _ in range(runs)]
    store = TileStore.open(out_dir / f"{slide_id_from_path(slide)}.zarr")
    with Slide(slide) as opened:
        width, height = opened.dimensions
        levels = opened.level_downsamples
    mask, mask_mpp = store.mask()
    return {
        "slide": {"path": str(slide), "width": width, "height": height, "level0_mpp": list(store.level0_mpp),
                  "downsamples": list(levels), "gigapixels": width * height / 1e9,
                  "file_mb": slide.stat().st_size / 2**20},
        "n_patches": store.n_patches,
        "mask": {"shape": list(mask.shape), "mpp": mask_mpp, "tissue_fraction": float(mask.mean())},
        **{f"median_{key}": statistics.median(s[key] for s in samples) for key in samples[0]},
        "cpu_s_per_gigapixel": statistics.median(s["cpu_s"] for s in samples) / (width * height / 1e9),
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per slide (median reported)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "ipspath_tile_bench",
                        help="folder for the generated slide and the outputs (outside the repository)")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    slides = {"generated_100k_x_80k_svs": large_slide(args.scratch)}
    small = DATA / "slides" / "CMU-1-Small-Region.svs"
    if small.is_file():
        slides["CMU-1-Small-Region.svs"] = small
    result = {
        "command": "ipspath -q tile SLIDE -o OUT --overwrite  (defaults: --mpp 0.5 --patch-size 256)",
        "runs": args.runs,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "slides": {name: bench_slide(path, args.runs, args.scratch) for name, path in slides.items()},
        "target": {"wall_s": 2.0, "peak_rss_mb": 500},
        "anchor_clam_create_patches_fp": {"wall_s": 3.9, "peak_rss_mb": 682},
    }
    save_result("tile_bench", result)


if __name__ == "__main__":
    main()
