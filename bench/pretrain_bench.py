"""Learned features without labels: `ipspath pretrain` -> `features` -> `train --features` on hard needle cohorts.

The cohorts are those of ``bench/needle_bench.py`` (its ``make_cohort``: 1-2 subtle lesions on half of the
slides, 2-4 look-alike clusters of large regular nuclei on every slide, stain shift 0.15, 1 µm/px; a third
of the slides test, a sixth validation) on slides of ``--slide-um`` (default 12288 x 8192 µm, 4x
needle_bench's area, so that a lesion of 0.1 % of the tissue is 80-140 µm wide, dozens of nuclei, as
micro-metastases are, rather than the handful of nuclei it is on needle_bench's small tissue), made
harder with ``--distractors`` (default 2-4 a slide, on positive and negative slides alike): clusters of
small, dense, deeply stained nuclei, darker than any lesion but of another texture, which a detector of
dark nuclei (``stain_density``) takes for lesions. Lesion diameters per ratio: ``needle_bench.RATIOS`` and
``LOW_RATIOS`` below, scaled with the slide's side.

Variants, each scored by needle_bench's ``_score_test`` on the held-out test slides (test AUC; the share
of tumour test slides whose most attended patch overlaps a lesion, a look-alike, a distractor):

* ``pretrained``: ``ipspath pretrain`` (SmallCNN, ``PRETRAIN`` settings: BYOL, stain jitter 0.05, chosen on
  the tuning seed 10) on the cohort's own tile stores at 1 µm/px, 64 px patches (no labels; test slides
  included, as a lab would pretrain on all its slides), then ``ipspath features --encoder smallcnn
  --pretrained encoder.pt``, then ``ipspath train --features`` with the TrainConfig defaults. Its features
  also get patch-level linear probes (``_patch_probe``: with the truth, an upper bound on what they offer).
* ``random``: the same with the encoder's seeded random initialisation instead of the pretrained weights.
* ``stain_density``: needle_bench's ``defaults`` (the README's recipe: 256 px patches at 1 µm/px,
  ``features --encoder stain_density``, ``train --features stain_density``).
* ``finetune``: ``ipspath train`` from pixels (64 px) starting from the pretrained SmallCNN, every layer
  trained (SmallCNN has no blocks for ``--train-blocks``), ``FINETUNE_EPOCHS`` epochs.
* ``scratch``: the same from the random initialisation: pixels from scratch at the pretrained encoder's tiles.
* ``pixels``: needle_bench's ``pixels_defaults`` (SmallCNN from scratch on 256 px pixels); expensive.

Every stage's wall and CPU seconds (user + system of this process and its children) are recorded.

    python bench/pretrain_bench.py --seeds 11 12 13 --variants pretrained stain_density   # the target
    python bench/pretrain_bench.py --seeds 11 --variants finetune pixels random
    python bench/pretrain_bench.py --ratios 0.03 0.01 --seeds 11 --variants pretrained
    python bench/pretrain_bench.py --seeds 11 --variants pretrained --pretrain-epochs 64   # longer pretraining
    python bench/pretrain_bench.py --seeds 11 12 13 --variants pretrained random --probe-only --workdir W
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ips_path.config import TrainConfig
from ips_path.evaluation.probe import linear_probe_auc
from ips_path.stores.features import extract_features
from ips_path.stores.loader import PatchStreamer
from ips_path.stores.tile_store import TileStore
from ips_path.synthetic.spec import patch_kinds
from ips_path.synthetic.synth import lesion_fractions
from ips_path.training.checkpoint import load_model
from ips_path.training.pretrain import PretrainConfig, pretrain
from ips_path.training.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402
from needle_bench import RATIOS, SLIDE_SIZE, _score_test, cpu_seconds, make_cohort, run_variant  # noqa: E402

LOW_RATIOS = {"0.03": (22.0, 38.0), "0.01": (13.0, 22.0)}  # diameters scaled by sqrt(area) from 0.1 %: 40-70 µm
DIAMETERS = {**RATIOS, **LOW_RATIOS}  # on needle_bench's slides (SLIDE_SIZE); scaled with the tissue's side
SLIDE_UM = (12288, 8192)  # 4x needle_bench's area: a 0.1 % lesion is 80-140 µm, dozens of nuclei, not a handful
PIXEL_TILE = (1.0, 64)  # µm/px, px: the pretrained encoder's patches (a lesion of 40-70 µm fills much of one)
DENSITY_TILE = (1.0, 256)  # the stain_density recipe of the README
PRETRAIN = dict(encoder="smallcnn", method="byol", epochs=8, patches_per_epoch=2048, batch_size=128, crop=48,
                hed=0.05, threads=2, device="cpu")
FINETUNE_EPOCHS = 10
VARIANTS = ("pretrained", "random", "stain_density", "finetune", "scratch", "pixels")


def _features_name(variant: str, method: str) -> str:
    """The features a ``pretrained`` or ``random`` run writes into the stores (and ``--probe-only`` reads)."""
    return f"smallcnn_{variant}_{method}_{PRETRAIN['epochs']}ep"


def _stage(clock: float, cpu: float) -> dict[str, float]:
    return {"wall": round(time.perf_counter() - clock, 1), "cpu": round(cpu_seconds() - cpu, 1)}


def _pretrained_encoder(root: Path, tiles: Path, seed: int, method: str) -> tuple[Path, dict[str, float]]:
    """Pretrain once per cohort (reused by the variants and reruns that share it)."""
    out = root / f"pretrain_{method}_{PRETRAIN['epochs']}ep_hed{PRETRAIN['hed']:g}"
    weights = out / "encoder.pt"
    if weights.exists() and (out / "done").exists():
        return weights, {"reused": True}
    shutil.rmtree(out, ignore_errors=True)
    clock, cpu = time.perf_counter(), cpu_seconds()
    pretrain([tiles], out, PretrainConfig(**{**PRETRAIN, "method": method, "seed": seed}), progress=False)
    (out / "done").touch()
    return weights, _stage(clock, cpu)


def _selection_log(result: Any) -> dict[str, list[float]]:
    return {"train_selected_in_lesion": [round(r.get("train_selected_in_lesion", float("nan")), 4)
                                         for r in result.history],
            "train_lesion_found": [round(r.get("train_lesion_found", float("nan")), 3) for r in result.history],
            "val_auc": [round(r.get("val_auc", float("nan")), 3) for r in result.history],
            "peak_memory_mb": [round(r.get("peak_memory_mb", float("nan")), 1) for r in result.history]}


def _top_in_distractor(model: Any, tiles: Path, specs: list, manifest: Path, features: str | None) -> float:
    """Share of the test slides with distractors whose most attended patch overlaps one (0-1)."""
    with manifest.open(newline="") as f:
        test_ids = {row["slide_id"] for row in csv.DictReader(f) if row["split"] == "test"}
    hits = []
    with PatchStreamer(chunk_size=model.chunk_size, threads=2) as streamer, torch.no_grad():
        for spec in specs:
            if not spec.distractors or spec.path.stem not in test_ids:
                continue
            store = TileStore.open(tiles / f"{spec.path.stem}.zarr")
            chunks = streamer.stream_features(store, features) if features else streamer.stream(store)
            logits = model.predict_slide(chunks).selection.all_logits
            top = store.coords[int(torch.argmax(logits))][None]
            hits.append(bool(lesion_fractions(spec, top, store.patch_size_level0, "distractors")[0] > 0))
    return round(float(np.mean(hits)), 4) if hits else float("nan")


def _patch_probe(tiles: Path, specs: list, manifest: Path, features: str) -> dict[str, float]:
    """Patch-level linear probes of ``features`` (needs the truth: so an upper bound on what a slide model can
    use): fitted on the training and validation slides, scored on the test slides. Patches more than half
    inside a lesion against patches more than half inside each other kind (normal: touching none)."""
    with manifest.open(newline="") as f:
        test_ids = {row["slide_id"] for row in csv.DictReader(f) if row["split"] == "test"}
    parts: dict[bool, list] = {True: [], False: []}
    with PatchStreamer(chunk_size=256, threads=2) as streamer:
        for spec in specs:
            store = TileStore.open(tiles / f"{spec.path.stem}.zarr")
            kind = patch_kinds(spec, store.coords, store.patch_size_level0)
            vectors = torch.cat([c.patches for c in streamer.stream_features(store, features)]).float().numpy()
            parts[spec.path.stem in test_ids].append((vectors[kind != ""], kind[kind != ""]))
    (fit_x, fit_kind), (test_x, test_kind) = ((np.concatenate([v for v, _ in parts[t]]),
                                               np.concatenate([k for _, k in parts[t]])) for t in (False, True))
    fit = fit_kind != "normal"  # lesion against the hard kinds; normal patches would swamp the fit
    fit[np.flatnonzero(fit_kind == "normal")[::20]] = True
    result: dict[str, Any] = {"test_lesion_patches": int((test_kind == "lesion").sum())}
    if not (fit_kind == "lesion").any() or not result["test_lesion_patches"]:
        return {**result, "note": "no patch lies more than half inside a lesion: lesions smaller than the patches"}
    for other in ("normal", "lookalike", "distractor"):
        chosen = (test_kind == "lesion") | (test_kind == other)
        result[f"lesion_vs_{other}"] = round(linear_probe_auc(fit_x[fit], fit_kind[fit] == "lesion", test_x[chosen],
                                                              test_kind[chosen] == "lesion"), 3)
    return result


def run_learned(variant: str, root: Path, manifest: Path, tiles: Path, specs: list, seed: int, method: str) -> dict:
    """``pretrained``, ``random``, ``finetune`` or ``scratch`` on one cohort."""
    seconds: dict[str, Any] = {}
    weights = None
    if variant in ("pretrained", "finetune"):
        weights, seconds["pretrain"] = _pretrained_encoder(root, tiles, seed, method)
    out = root / "runs" / f"{variant}_{method}_{PRETRAIN['epochs']}ep"
    shutil.rmtree(out, ignore_errors=True)
    features = None
    if variant in ("pretrained", "random"):
        features = _features_name(variant, method)
        clock, cpu = time.perf_counter(), cpu_seconds()
        outcomes = extract_features(sorted(tiles.glob("*.zarr")), "smallcnn", name=features, pretrained=weights,
                                    device="cpu", threads=2, progress=False, overwrite=True)
        assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
        seconds["features"] = _stage(clock, cpu)
        config = TrainConfig(features=features, threads=2, device="cpu", seed=seed)
    else:
        config = TrainConfig(encoder="smallcnn", pretrained=str(weights) if weights else None, threads=2,
                             device="cpu", seed=seed, epochs=FINETUNE_EPOCHS)
    clock, cpu = time.perf_counter(), cpu_seconds()
    result = train(manifest, tiles, out, config, progress=False)
    seconds["train"] = _stage(clock, cpu)
    clock, cpu = time.perf_counter(), cpu_seconds()
    model, _ = load_model(out / ("best.pt" if (out / "best.pt").exists() else "last.pt"))
    test = _score_test(model, tiles, specs, manifest, 2, features)
    test["top_patch_in_distractor"] = _top_in_distractor(model, tiles, specs, manifest, features)
    seconds["test"] = _stage(clock, cpu)
    if features:
        test["patch_probe"] = _patch_probe(tiles, specs, manifest, features)
    return {"variant": variant, "method": method, **test, "best_epoch": result.best_epoch,
            **_selection_log(result), "seconds": seconds}


def run_baseline(variant: str, root: Path, manifest: Path, tiles: Path, specs: list, seed: int) -> dict:
    """``stain_density`` (needle_bench ``defaults``) or ``pixels`` (``pixels_defaults``) on one cohort."""
    name = {"stain_density": "defaults", "pixels": "pixels_defaults"}[variant]
    row = run_variant(name, manifest, tiles, specs, root / "runs" / variant, None, seed)
    out = root / "runs" / variant
    model, _ = load_model(out / ("best.pt" if (out / "best.pt").exists() else "last.pt"))
    row["top_patch_in_distractor"] = _top_in_distractor(model, tiles, specs, manifest, row["config"].get("features"))
    seconds = row.pop("seconds")
    row["seconds"] = {"features": {"wall": seconds.get("features_wall"), "cpu": seconds.get("features_cpu")},
                      "train": {"wall": seconds["train_wall"], "cpu": seconds["train_cpu"]},
                      "test": {"wall": seconds["test_wall"], "cpu": seconds["test_cpu"]}}
    return {**row, "variant": variant}


def _summary(rows: list[dict]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key in sorted({(r["ratio_preset_percent"], r["variant"], r.get("method", "")) for r in rows}):
        chosen = [r for r in rows if (r["ratio_preset_percent"], r["variant"], r.get("method", "")) == key]
        summary["/".join(k for k in key if k)] = {
            "seeds": [r["seed"] for r in chosen],
            "test_auc": [r["test_auc"] for r in chosen],
            "top_patch_in_lesion": [r["top_patch_in_lesion"] for r in chosen],
            "cpu_s": [{stage: value.get("cpu") for stage, value in r["seconds"].items() if isinstance(value, dict)}
                      for r in chosen]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", nargs="+", choices=list(DIAMETERS), default=["0.1"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["pretrained", "stain_density"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[11, 12, 13])
    parser.add_argument("--slides", type=int, default=64, help="slides per cohort (train + val + test)")
    parser.add_argument("--distractors", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"),
                        help="dark distractors per slide (0 0: the needle_bench cohorts)")
    parser.add_argument("--method", choices=("simclr", "byol"), default=PRETRAIN["method"])
    parser.add_argument("--hed", type=float, default=PRETRAIN["hed"], help="pretraining's stain jitter")
    parser.add_argument("--slide-um", type=int, nargs=2, default=SLIDE_UM, metavar=("W", "H"),
                        help=f"slide size in µm (default {SLIDE_UM[0]} {SLIDE_UM[1]}); lesion diameters scale with it")
    parser.add_argument("--pretrain-epochs", type=int, default=PRETRAIN["epochs"],
                        help=f"epochs of {PRETRAIN['patches_per_epoch']} patches (default {PRETRAIN['epochs']})")
    parser.add_argument("--probe-only", action="store_true",
                        help="only the patch probes of the pretrained / random features an earlier run left in "
                             "--workdir")
    parser.add_argument("--name", default=None, help="result file bench/results/NAME.json (default: from the ratios)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep cohorts and runs here (default: temporary)")
    args = parser.parse_args()
    if args.probe_only and not (args.workdir and args.workdir.is_dir()):
        parser.error("--probe-only reads the features an earlier run left: give that run's --workdir")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    PRETRAIN["epochs"], PRETRAIN["hed"] = args.pretrain_epochs, args.hed
    side_scale = ((args.slide_um[0] * args.slide_um[1]) / (SLIDE_SIZE[0] * SLIDE_SIZE[1])) ** 0.5
    name = args.name or f"pretrain_{'_'.join(args.ratios)}pct"
    rows: list[dict] = []
    cohorts: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pretrain_bench_") as scratch:
        work = args.workdir or Path(scratch)
        for ratio in args.ratios:
            for seed in args.seeds:
                root = work / (f"ratio{ratio}_seed{seed}_distractors{args.distractors[0]}-{args.distractors[1]}"
                               f"_{args.slide_um[0]}x{args.slide_um[1]}um")
                diameters = tuple(round(d * side_scale, 1) for d in DIAMETERS[ratio])
                cohort: dict[str, Any] = {"ratio_preset_percent": ratio, "seed": seed, "slides": args.slides,
                                          "slide_um": list(args.slide_um),
                                          "lesion_diameter_um": diameters, "distractors": list(args.distractors)}
                tiled = {}
                for tile in (PIXEL_TILE, DENSITY_TILE):
                    manifest, tiles, specs, seconds = make_cohort(root, ratio, args.slides, seed, tile,
                                                                  distractors=tuple(args.distractors),
                                                                  lesion_diameter_um=diameters,
                                                                  slide_um=tuple(args.slide_um))
                    tiled[tile] = tiles
                    cohort[f"seconds_{tile[0]:g}um_{tile[1]}px"] = {k: round(v, 1) for k, v in seconds.items()}
                measured = [s.lesion_area_fraction() for s in specs if s.lesions]
                cohort["lesion_area_percent_median"] = round(100 * float(np.median(measured)), 4)
                cohort["lesion_area_percent_range"] = [round(100 * min(measured), 4), round(100 * max(measured), 4)]
                cohort["patches_per_slide_median"] = {
                    f"{t[1]}px": float(np.median([TileStore.open(tiled[t] / f"{s.path.stem}.zarr").n_patches
                                                  for s in specs])) for t in tiled}
                cohorts.append(cohort)
                print(cohort, flush=True)
                for variant in args.variants:
                    if args.probe_only:
                        features = _features_name(variant, args.method)
                        rows.append({"ratio_preset_percent": ratio, "seed": seed, "variant": variant,
                                     "method": args.method, "patch_probe": _patch_probe(tiled[PIXEL_TILE], specs,
                                                                                        manifest, features)})
                        print(rows[-1], flush=True)
                        save_result(name, {"settings": {"pretrain": PRETRAIN}, "cohorts": cohorts, "runs": rows},
                                    quiet=True)
                        continue
                    if variant in ("stain_density", "pixels"):
                        row = run_baseline(variant, root, manifest, tiled[DENSITY_TILE], specs, seed)
                    else:
                        row = run_learned(variant, root, manifest, tiled[PIXEL_TILE], specs, seed, args.method)
                    rows.append({"ratio_preset_percent": ratio, "seed": seed, **row})
                    print({k: v for k, v in rows[-1].items() if k != "config"}, flush=True)
                    save_result(name, {"settings": {"pretrain": PRETRAIN, "finetune_epochs": FINETUNE_EPOCHS,
                                                    "pixel_tile": PIXEL_TILE, "density_tile": DENSITY_TILE,
                                                    "hit": "the most attended patch overlaps a lesion"},
                                       "cohorts": cohorts, "summary": _summary(rows), "runs": rows}, quiet=True)


if __name__ == "__main__":
    main()
