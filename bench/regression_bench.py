"""Regression on the CPU: how well ``--task regression`` learns each slide's lesion area, and in what time.

Steps (each timed, each the command a user runs, in a subprocess): generate a cohort whose target is
the lesion area in percent of the tissue (:mod:`ips_path.synthetic.synth_regression`), with a ``split`` column
(train / val / test), tile it, cache ``stain_density`` features, ``ipspath train --task regression
--label-columns lesion_area --features stain_density``, then ``ipspath predict`` the held-out test
slides with ``best.pt``: their Pearson and Spearman r, MAE and R^2 with 95 % bootstrap intervals
(``regression_metrics.json``).

    python bench/regression_bench.py                  # writes bench/results/regression_lesion_area.json
    python bench/regression_bench.py --slides 16 --epochs 2 --no-save     # smoke test
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

from ips_path.synthetic.synth_regression import write_regression_cohort  # noqa: E402

SLIDE_SIZE = (2048, 1536)   # px at 1 µm/px: 2 x 1.5 mm
LESION_UM = (150.0, 400.0)
TRAIN_OPTIONS = ["--features", "stain_density", "--n-select", "512", "--chunk-size", "512", "--dim", "32", "--heads",
                 "4", "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "1", "--patience", "0", "--threads", "2",
                 "--device", "cpu"]


def run(work: Path, *, slides: int = 64, epochs: int = 20, loss: str = "mse", seed: int = 0) -> dict:
    """Generate, tile, embed, train, predict the test slides; return the figures (see the module docstring)."""
    seconds = {}
    ipspath = [sys.executable, "-m", "ips_path.cli.main", "-q"]
    tiles, run_dir = work / "tiles", work / "run"
    started = time.perf_counter()
    _, area = write_regression_cohort(work / "slides", slides, seed=seed, size=SLIDE_SIZE, mpp=1.0, downsamples=(1,),
                                      lesion_diameter_um=LESION_UM, positive_fraction=0.75,
                                      lesions_per_positive=(1, 4), workers=2)
    manifest, test_manifest = work / "slides" / "manifest.csv", work / "test.csv"
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    n_test = n_val = slides // 5
    for i, row in enumerate(rows):  # the cohort's slides are drawn independently: the last ones test, then val
        row["split"] = "test" if i >= slides - n_test else "val" if i >= slides - n_test - n_val else "train"
    for path, chosen in ((manifest, rows), (test_manifest, [r for r in rows if r["split"] == "test"])):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows({**r, "slide_path": str(work / "slides" / r["slide_path"])} for r in chosen)
    seconds["generate"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    subprocess.run([*ipspath, "tile", "--manifest", str(manifest), "-o", str(tiles), "--mpp", "2", "--patch-size",
                    "32", "--workers", "2", "--no-qc"], check=True, stdout=sys.stderr)
    subprocess.run([*ipspath, "features", str(tiles), "--encoder", "stain_density"], check=True, stdout=sys.stderr)
    seconds["tile_and_features"] = round(time.perf_counter() - started, 1)

    command = [*ipspath, "train", "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run_dir), "--task",
               "regression", "--label-columns", "lesion_area", "--regression-loss", loss, "--epochs", str(epochs),
               "--seed", str(seed), *TRAIN_OPTIONS]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=sys.stderr)
    seconds["train"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    predict = [*ipspath, "predict", "--model", str(run_dir), "--manifest", str(test_manifest), "--tiles", str(tiles),
               "-o", str(work / "pred"), "--no-heatmaps", "--threads", "2"]
    subprocess.run(predict, check=True, stdout=sys.stderr)
    seconds["predict_test"] = round(time.perf_counter() - started, 1)
    test = json.loads((work / "pred" / "regression_metrics.json").read_text())
    with (run_dir / "metrics.csv").open() as f:
        history = [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]
    return {
        "command": " ".join(["ipspath", *command[len(ipspath) - 1:]]).replace(str(work), "WORK"),
        "predict": " ".join(["ipspath", *predict[len(ipspath) - 1:]]).replace(str(work), "WORK"),
        "cohort": {"slides": slides, "train": slides - n_test - n_val, "val": n_val, "test": n_test,
                   "size_px": list(SLIDE_SIZE), "slide_mpp": 1.0, "lesion_diameter_um": list(LESION_UM),
                   "tile_mpp": 2.0, "patch_size": 32, "lesion_percent": {
                       "min": float(area.min()), "median": float(np.median(area)), "max": float(area.max())}},
        "seconds": seconds,
        "epochs": len(history),
        "val_pearson_per_epoch": [round(r["val_pearson"], 3) for r in history],
        "test": test,
        "load_average_1min_end": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--loss", choices=("mse", "huber"), default="mse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="print only; do not write bench/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp), slides=args.slides, epochs=args.epochs, loss=args.loss, seed=args.seed)
    if args.no_save:
        print(json.dumps(result, indent=2))
    else:
        save_result(f"regression_lesion_area{'' if args.loss == 'mse' else '_' + args.loss}", result)


if __name__ == "__main__":
    main()
