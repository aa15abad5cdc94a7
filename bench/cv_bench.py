"""Cross-validated training on cached features: wall time of ``ipspath train --folds K`` and the per-fold AUC spread.

Steps (each timed): generate a cohort (half the slides with lesions), tile it, cache SmallCNN
features (``ipspath features``), then ``ipspath train --features smallcnn --folds K`` as a user runs
it (a subprocess). The figures are the wall time of the cross-validation, seconds per fold, and the
per-fold validation AUC, balanced accuracy and AUPRC with their mean, sd and range, read from
``cv_summary.json``.

    python bench/cv_bench.py                               # writes bench/results/cv_bench.json
    python bench/cv_bench.py --slides 20 --epochs 1 --no-save   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

from ips_path.synthetic.synth import write_synthetic_cohort  # noqa: E402

SLIDE_SIZE = (2048, 1536)  # px at 1 µm/px
TRAIN_OPTIONS = ["--features", "smallcnn", "--n-select", "16", "--chunk-size", "256", "--dim", "64", "--heads", "4",
                 "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "1", "--patience", "0", "--threads", "2",
                 "--device", "cpu"]


def run(work: Path, *, slides: int = 60, folds: int = 5, epochs: int = 8, seed: int = 0) -> dict:
    """Generate, tile, extract features, cross-validate; return the figures (see the module docstring)."""
    load_start = round(os.getloadavg()[0], 2)
    ipspath = [sys.executable, "-m", "ips_path.cli.main", "-q"]
    seconds = {}
    started = time.perf_counter()
    write_synthetic_cohort(work / "slides", slides, size=SLIDE_SIZE, mpp=1.0, downsamples=(1, 4), seed=seed,
                           workers=2, lesion_diameter_um=(150.0, 300.0))
    seconds["generate"] = round(time.perf_counter() - started, 1)
    manifest, tiles, run_dir = work / "slides" / "manifest.csv", work / "tiles", work / "cv"
    started = time.perf_counter()
    subprocess.run([*ipspath, "tile", "--manifest", str(manifest), "-o", str(tiles), "--mpp", "2", "--patch-size",
                    "32", "--workers", "2", "--no-qc"], check=True, stdout=sys.stderr)
    seconds["tile"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    subprocess.run([*ipspath, "features", str(tiles), "--encoder", "smallcnn", "--name", "smallcnn", "--threads", "2"],
                   check=True, stdout=sys.stderr)
    seconds["features"] = round(time.perf_counter() - started, 1)
    command = [*ipspath, "train", "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run_dir), "--folds",
               str(folds), "--epochs", str(epochs), "--seed", str(seed), *TRAIN_OPTIONS]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=sys.stderr)
    seconds["cross_validation_wall"] = round(time.perf_counter() - started, 1)
    summary = json.loads((run_dir / "cv_summary.json").read_text())
    aucs = [r["val_auc"] for r in summary["per_fold"] if r["val_auc"] is not None]
    return {
        "command": " ".join(["ipspath", *command[len(ipspath):]]).replace(str(work), "WORK"),
        "cohort": {"slides": slides, "size_px": list(SLIDE_SIZE), "slide_mpp": 1.0, "tile_mpp": 2.0,
                   "patch_size": 32},
        "folds": folds, "epochs": epochs,
        "seconds": seconds,
        "seconds_per_fold": round(seconds["cross_validation_wall"] / folds, 1),
        "per_fold": summary["per_fold"],
        "summary": summary["summary"],
        "auc_range": [min(aucs), max(aucs)] if aucs else None,
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=60, help="slides (one patient each)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write bench/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cv_bench-") as tmp:
        result = run(args.work or Path(tmp), slides=args.slides, folds=args.folds, epochs=args.epochs, seed=args.seed)
    if args.no_save:
        print(json.dumps(result, indent=2, default=str))
    else:
        save_result("cv_bench", result)


if __name__ == "__main__":
    main()
