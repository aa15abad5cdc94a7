"""Import of a TRIDENT feature folder: 100 slides x 20,000 patches x 1024-d: wall seconds and peak RSS.

Inputs, generated (and deleted afterwards unless ``--keep``):

- one slide, a generated JPEG SVS at 0.5 µm/px (levels 1/4/16/64) just large enough for the grid
  (36,352 px square for 20,000 patches of 256 px), and one
  symbolic link to it per manifest row (``slide_000.svs`` ...): every slide opens and has its
  tissue detected as a real import does, without writing 100 slide files;
- ``features_uni_v1/slide_NNN.h5`` as TRIDENT writes them (``save_h5``: float32 features (N, D)
  and int64 level-0 coords, resizable datasets chunked one row at a time; its coords and features
  attrs): 20,000 patches of 256 px at 20x (the first 20,000 positions of the grid, row-major),
  normal random values. 100 files of 82 MB, about 8 GB. Each file is flushed and dropped from the
  page cache after writing (``posix_fadvise DONTNEED``), so the import reads from disk.

Runs, each in a new process (``ipspath -q features import``; peak RSS = that child's ``ru_maxrss``):

- ``import``: the whole folder into an empty tiles folder (stores made: coordinates, tissue mask,
  features float16);
- ``rerun``: the same command again: every slide is recognised as done (identity of the source
  file: size, mtime, a 192 KiB content fingerprint) and nothing is rewritten.

Usage::

    nice -n 5 python -m bench.import_bench [--slides 100] [--patches 20000] [--dim 1024] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import save_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tool_h5 import write_trident  # noqa: E402  (the writer the tests check the import against)

SLIDE_MPP = 0.5
PATCH = 256


def _write_inputs(root: Path, n_slides: int, n_patches: int, dim: int) -> tuple[Path, Path, float]:
    from ips_path.synthetic.synth import write_synthetic_slide

    side = math.ceil(math.sqrt(n_patches))
    slide_side = side * PATCH
    slide = root / "source.svs"
    write_synthetic_slide(slide, slide_side, slide_side, mpp=SLIDE_MPP, downsamples=(1, 4, 16, 64), seed=1,
                          tissue=4, workers=2)
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_patches] * PATCH
    folder = root / "20x_256px_0px_overlap" / "features_uni_v1"
    manifest = root / "manifest.csv"
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "slide_path", "label"])
        for i in range(n_slides):
            slide_id = f"slide_{i:03d}"
            (root / f"{slide_id}.svs").symlink_to(slide.name)
            writer.writerow([slide_id, f"{slide_id}.svs", "a" if i % 2 else "b"])
            path = write_trident(folder, slide_id, grid, rng.standard_normal((n_patches, dim), dtype=np.float32),
                                 patch_size=PATCH, level0_magnification=20, target_magnification=20,
                                 dimensions=(slide_side, slide_side))
            _drop_from_page_cache(path)
    return folder, manifest, time.perf_counter() - started


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _run_child(command: list[str]) -> dict[str, float]:
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=100)
    parser.add_argument("--patches", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, help="Where the inputs and stores go (default: a temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the generated files.")
    args = parser.parse_args(argv)

    h5_bytes = args.slides * args.patches * (args.dim * 4 + 16)
    root = Path(tempfile.mkdtemp(prefix="import_bench_", dir=args.workdir))
    free = shutil.disk_usage(root).free
    if free < 2.2 * h5_bytes:  # h5 files + float16 stores (+ slack)
        raise SystemExit(f"{root}: {free / 2**30:.1f} GiB free, the benchmark needs {2.2 * h5_bytes / 2**30:.1f}")
    try:
        folder, manifest, write_seconds = _write_inputs(root, args.slides, args.patches, args.dim)
        command = [sys.executable, "-m", "ips_path.cli.main", "-q", "features", "import", str(folder),
                   "--manifest", str(manifest), "-o", str(root / "tiles")]
        first = _run_child(command)
        rerun = _run_child(command)
        store_bytes = sum(f.stat().st_size for f in (root / "tiles").rglob("*") if f.is_file())
        h5_on_disk = sum(f.stat().st_size for f in folder.glob("*.h5"))
        result = {
            "benchmark": "import_bench",
            "what": f"ipspath features import of a TRIDENT folder: {args.slides} slides x {args.patches} patches "
                    f"x {args.dim}-d float32 (h5 read from disk, not the page cache)",
            "slides": args.slides, "patches_per_slide": args.patches, "dim": args.dim,
            "h5_gb": round(h5_on_disk / 1e9, 2), "stores_gb": round(store_bytes / 1e9, 2),
            "h5_write_seconds": round(write_seconds, 1),
            "import": {**first, "seconds_per_slide": round(first["seconds"] / args.slides, 3),
                       "h5_read_mb_per_s": round(h5_on_disk / 1e6 / first["seconds"], 1)},
            "rerun_all_reused": rerun,
            "command": "nice -n 5 python -m bench.import_bench " + " ".join(argv or sys.argv[1:]),
        }
        save_result("import_bench", result)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(json.dumps({"kept": str(root)}))


if __name__ == "__main__":
    main()
