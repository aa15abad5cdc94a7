"""Survival training on the CPU: validation and test C-index of a generated cohort, wall time.

Steps (each timed): generate a training cohort and a held-out test cohort whose survival times
depend on the lesion share of the tissue (:mod:`ips_path.synthetic.synth_survival`: exponential event times,
rate growing with lesion area, random censoring), tile them (``ipspath tile``), train with
``ipspath train --task survival`` (the command, in a subprocess, as a user runs it), then score the
test cohort with ``best.pt``. The C-index a perfect model would reach is printed beside it
(``oracle``: ranking the patients by their true event rate), as the outcomes are noisy by design.

    python bench/survival_bench.py                    # writes bench/results/survival_bench_cox.json
    python bench/survival_bench.py --patients 16 --test-patients 8 --epochs 1 --no-save   # smoke test
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

from ips_path.stores.loader import PatchStreamer
from ips_path.stores.tile_store import TileStore
from ips_path.synthetic.synth_survival import SurvivalOutcomes, write_survival_cohort
from ips_path.tasks.survival import harrell_c_index, survival_metrics
from ips_path.training.checkpoint import load_model

SLIDE_SIZE = (4096, 3072)   # px at 1 µm/px: 4 x 3 mm, as the demo
LESION_UM = (200.0, 400.0)
TRAIN_OPTIONS = ["--encoder", "smallcnn", "--n-select", "16", "--chunk-size", "128", "--dim", "64", "--heads", "4",
                 "--batch-size", "8", "--lr", "3e-4", "--warmup-epochs", "1", "--patience", "0", "--threads", "2",
                 "--device", "cpu", "--val-fraction", "0.25"]


def run(work: Path, *, patients: int = 48, test_patients: int = 24, epochs: int = 4, loss: str = "cox",
        seed: int = 0, progress: bool = False, score_only: bool = False) -> dict:
    """Generate, tile, train, score; return the figures (see the module docstring).

    ``score_only``: score the run already in ``work`` (from an earlier call); the generated lesion
    areas are then unknown (no oracle) and the training time is the run's own ``elapsed_seconds``.
    """
    load_start = round(os.getloadavg()[0], 2)
    seconds = {}
    outcomes = SurvivalOutcomes()
    ipspath = [sys.executable, "-m", "ips_path.cli.main", *([] if progress else ["-q"])]
    tiles, run_dir = work / "tiles", work / "run"
    command = [*ipspath, "train", "--manifest", str(work / "train" / "manifest.csv"), "--tiles", str(tiles), "-o",
               str(run_dir), "--task", "survival", "--survival-loss", loss, "--time-unit", "months", "--epochs",
               str(epochs), "--seed", str(seed), *TRAIN_OPTIONS]
    lesion: dict[str, float] = {}
    if not score_only:
        started = time.perf_counter()
        cohort = dict(size=SLIDE_SIZE, mpp=1.0, downsamples=(1, 4), lesion_diameter_um=LESION_UM,
                      positive_fraction=0.7, lesions_per_positive=(1, 4), outcomes=outcomes)
        for part, n, part_seed in (("train", patients, seed), ("test", test_patients, seed + 10_000)):
            specs, _, _ = write_survival_cohort(work / part, n, seed=part_seed, prefix=part, **cohort)
            lesion.update({s.path.stem: 100 * s.lesion_area_fraction() for s in specs})
        seconds["generate"] = round(time.perf_counter() - started, 1)

        started = time.perf_counter()
        for part in ("train", "test"):
            subprocess.run([*ipspath, "tile", "--manifest", str(work / part / "manifest.csv"), "-o", str(tiles),
                            "--mpp", "2", "--patch-size", "64", "--workers", "2", "--no-qc"], check=True,
                           stdout=sys.stderr)
        seconds["tile"] = round(time.perf_counter() - started, 1)

        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=sys.stderr)
        seconds["train_wall"] = round(time.perf_counter() - started, 1)
    train_ids, train_time, train_event = _outcomes(work / "train" / "manifest.csv")
    test_ids, test_time, test_event = _outcomes(work / "test" / "manifest.csv")

    started = time.perf_counter()
    model, checkpoint = load_model(run_dir / "best.pt")
    task = model.tasks[0]
    streamer = PatchStreamer(chunk_size=128, threads=2)
    with torch.no_grad():
        logits = torch.stack([model.predict_slide(streamer.stream(TileStore.open(tiles / f"{s}.zarr")))
                              .logits[task.name].float() for s in test_ids])
    streamer.close()
    seconds["score_test"] = round(time.perf_counter() - started, 1)
    state = checkpoint["survival"]
    test = survival_metrics(test_time, test_event, task.risk(logits).numpy(),
                            reference=(np.array(state["reference_time"]), np.array(state["reference_event"])))

    with (run_dir / "metrics.csv").open() as f:
        history = [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]
    with (run_dir / "splits.csv").open() as f:
        split_of = {r["slide_id"]: r["split"] for r in csv.DictReader(f)}
    summary = json.loads((run_dir / "survival_metrics.json").read_text())
    val_index = [i for i, s in enumerate(train_ids) if split_of[s] == "val"]
    if score_only:
        seconds["train_elapsed_in_run"] = round(history[-1]["elapsed_seconds"], 1)
    return {
        "command": " ".join(["ipspath", *command[len(ipspath):]]).replace(str(work), "WORK"),
        "cohort": {"patients_train_val": patients, "patients_test": test_patients, "size_px": list(SLIDE_SIZE),
                   "slide_mpp": 1.0, "lesion_diameter_um": list(LESION_UM), "tile_mpp": 2.0, "patch_size": 64,
                   "outcomes": vars(outcomes),
                   "events_train_val": int(train_event.sum()), "events_test": int(test_event.sum()),
                   "lesion_percent_median": round(float(np.median(list(lesion.values()))), 2) if lesion else None},
        "seconds": seconds,
        "epochs": len(history),
        "val_c_index_per_epoch": [r["val_c_index"] for r in history],
        "validation": summary.get("validation"),
        "test": test,
        "oracle_c_index": {
            "validation": harrell_c_index(train_time[val_index], train_event[val_index],
                                          [lesion[train_ids[i]] for i in val_index]),
            "test": harrell_c_index(test_time, test_event, [lesion[s] for s in test_ids])} if lesion else None,
        "train_c_index_best_pt": summary.get("train_c_index"),
        "epoch_seconds_median": sorted(r["train_seconds"] for r in history)[len(history) // 2],
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
    }


def _outcomes(manifest: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Slide ids, times and events of a generated cohort's manifest."""
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return ([r["slide_id"] for r in rows], np.array([float(r["time"]) for r in rows]),
            np.array([int(r["event"]) for r in rows]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=48, help="patients (one slide each) to train and validate on")
    parser.add_argument("--test-patients", type=int, default=24, help="patients of the held-out test cohort")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--loss", choices=("cox", "nll"), default="cox")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write bench/results")
    parser.add_argument("--score-only", action="store_true",
                        help="score the run an earlier call left in --work (no oracle C-index then)")
    args = parser.parse_args()
    if args.score_only and args.work is None:
        parser.error("--score-only needs the --work folder of an earlier run")
    with tempfile.TemporaryDirectory(prefix="survival_bench-") as tmp:
        result = run(args.work or Path(tmp), patients=args.patients, test_patients=args.test_patients,
                     epochs=args.epochs, loss=args.loss, seed=args.seed, score_only=args.score_only)
    if args.no_save:
        print(json.dumps(result, indent=2, default=str))
    else:
        save_result(f"survival_bench_{args.loss}", result)


if __name__ == "__main__":
    main()
