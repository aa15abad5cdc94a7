"""Find the needle: IPS on generated cohorts whose lesions cover ~1 %, ~0.3 % or ~0.1 % of the tissue.

Each cohort (``ips_path.synthetic.synth``): slides of 6144 x 4096 px at 1 µm/px, one or two subtle lesions on
half of them (nuclei 1.4x larger than normal, pleomorphic), 2-4 look-alike clusters of large regular
nuclei on every slide, a per-slide stain shift. Slides are tiled (``ipspath tile``), the lesion
truth is written into the tile stores (so training logs how often it trains on lesion patches),
then each variant is trained with ``ips_path.training.train.train`` on the train/val slides and scored on
held-out test slides:

* test AUC (best validation checkpoint),
* the share of tumour test slides whose most attended patch overlaps a lesion,
* the share of trained patches that overlapped a lesion, per epoch,
* wall time and CPU time (user + system) of training and testing; generation and tiling apart.

    python bench/needle_bench.py                                  # every ratio and variant, seeds 0-2
    python bench/needle_bench.py --ratios 0.1 --slides 64 --tile 1.0,256 --seeds 3 4 5 \
        --variants defaults_before defaults           # the defaults of `ipspath tile/features/train`, then and now
    python bench/needle_bench.py --ratios 0.1 --variants default explore --seeds 0 --epochs 6
    python bench/needle_bench.py --ratios 0.1 --seeds 0 --probe 2.0,64 1.0,64   # can the encoder see it?
    python bench/needle_bench.py --bags                     # the failure in miniature, seconds
    python bench/needle_bench.py --ratios 0.1 --slides 64 --contrast 1.0,64  # what stain normalisation shows

Variants named ``defaults*`` start from the ``TrainConfig`` defaults (the others from ``BASE``, the CPU
demo settings of the first studies): ``stain_density`` features as ``ipspath features --encoder stain_density``
makes them, trained as ``ipspath train --features stain_density`` does; ``defaults_before`` with the
defaults these had before (quantiles over the whole patch, raw patches, the projector's LayerNorm, greedy
selection), the others with one choice changed; ``pixels_defaults`` (``_before``) is ``ipspath train`` on
pixels.

``--bags`` runs IPS on bags of feature vectors (no pixels): 40 patches, 4 bright look-alikes in every
bag, one lesion patch in positive bags, fresh bags at every step; it compares selection settings
over seeds in seconds.

``--contrast`` asks whether the pixels single the lesion out once stain is normalised, with no model at
all: per patch, the 99th percentile of each channel's optical density (the darkest nuclei), read raw and
through ``PatchStreamer(stain_norm=True)``; AUC of lesion against look-alike patches, and per slide the
AUC of the maximum over its patches and the share of tumour slides whose darkest patch is in a lesion.

``--probe`` answers "does the encoder see the lesion at this resolution and patch size?": a SmallCNN
trained *with patch labels* (lesion-overlapping patches against look-alike and normal ones) on the
training slides, scored on the test slides' patches (AUC lesion vs all, lesion vs look-alike). If
even that fails, no slide-level training can find the lesion at that resolution.
"""

from __future__ import annotations

import argparse
import csv
import os
import pickle
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ips_path.config import TrainConfig
from ips_path.evaluation.metrics import roc_auc
from ips_path.stores.features import extract_features
from ips_path.stores.loader import PatchStreamer
from ips_path.stores.tile_store import TileStore
from ips_path.synthetic.synth import lesion_fractions, write_lesion_truth, write_synthetic_cohort
from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides
from ips_path.training.checkpoint import load_model
from ips_path.training.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

SLIDE_SIZE = (6144, 4096)
SLIDE_MPP = 1.0
# Lesion diameters (µm) that give about these object-to-image ratios (lesion area / tissue area) on
# these slides with 1-2 lesions; the measured ratios are in the results.
RATIOS = {"1": (170.0, 240.0), "0.3": (90.0, 130.0), "0.1": (40.0, 70.0)}
TILE_MPP, PATCH_SIZE = 2.0, 64
WHOLE_PATCH = 1 << 16  # a stain_density window no patch exceeds: quantiles over the whole patch
BASE = dict(encoder="smallcnn", n_select=16, chunk_size=128, dim=64, heads=4, lr=3e-4, warmup_epochs=1.0,
            batch_size=4, epochs=8, patience=0, explore=0.0, threads=2, device="cpu")
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "explore": {"explore": 0.5},
    "instance": {"instance_loss": 0.5},
    "large_m": {"n_select": 64},
    "large_m_explore": {"n_select": 64, "explore": 0.5},
    "all_patches": {"n_select": 512},  # M >= N: every patch of these slides is trained on
    "stain_norm": {"stain_norm": True},
    # Cached stain_density features (optical-density quantiles, no weights) of stain-normalised patches,
    # read by the projector without its LayerNorm, M = 16 of which half drawn as the slide's most atypical
    # patches; then each of these choices undone alone.
    "density": {"features": "stain_density", "stain_norm": True, "feature_norm": "none", "explore": 0.5,
                "explore_mode": "atypical", "epochs": 20, "lr": 3e-3},
    "density_uniform": {"features": "stain_density", "stain_norm": True, "feature_norm": "none", "explore": 0.5,
                        "epochs": 20, "lr": 3e-3},
    "density_greedy": {"features": "stain_density", "stain_norm": True, "feature_norm": "none", "epochs": 20,
                       "lr": 3e-3},
    "density_layernorm": {"features": "stain_density", "stain_norm": True, "explore": 0.5,
                          "explore_mode": "atypical", "epochs": 20, "lr": 3e-3},
    "density_raw": {"features": "stain_density", "feature_norm": "none", "explore": 0.5, "explore_mode": "atypical",
                    "epochs": 20, "lr": 3e-3},
    # Over the TrainConfig defaults ("base": "defaults"), at whatever --tile gives (the `ipspath tile` defaults
    # are 256 px at the slide's own resolution, here 1 µm/px): `ipspath features --encoder stain_density`, then
    # `ipspath train --features stain_density`, with the defaults of before and of now, then each choice alone.
    # "features_window" / "features_stain_norm" are of the features (None: the encoder's default).
    "defaults_before": {"base": "defaults", "features": "stain_density", "features_window": WHOLE_PATCH,
                        "features_stain_norm": False, "feature_norm": "layer", "explore": 0.0},
    "defaults": {"base": "defaults", "features": "stain_density"},
    "defaults_greedy": {"base": "defaults", "features": "stain_density", "explore": 0.0},
    "defaults_raw": {"base": "defaults", "features": "stain_density", "features_stain_norm": False},
    "defaults_layernorm": {"base": "defaults", "features": "stain_density", "feature_norm": "layer"},
    "defaults_whole_patch": {"base": "defaults", "features": "stain_density", "features_window": WHOLE_PATCH},
    "defaults_atypical": {"base": "defaults", "features": "stain_density", "explore_mode": "atypical"},
    "defaults_instance": {"base": "defaults", "features": "stain_density", "instance_loss": 0.5},
    "pixels_defaults": {"base": "defaults"},  # `ipspath train` on pixels: SmallCNN learned from the slide labels
    "pixels_defaults_before": {"base": "defaults", "explore": 0.0},
}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children, s."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_cohort(root: Path, ratio: str, n_slides: int, seed: int, tile: tuple[float, int] = (TILE_MPP, PATCH_SIZE),
                slide_mpp: float = SLIDE_MPP, distractors: tuple[int, int] = (0, 0),
                lesion_diameter_um: tuple[float, float] | None = None,
                slide_um: tuple[int, int] = SLIDE_SIZE) -> tuple[Path, Path, list, dict[str, float]]:
    """Generate and split the cohort (by label: a third test, a sixth validation), or reuse what an earlier
    run left in ``root``; tile it at ``tile`` (µm/px, patch px) and write the truth into the stores.
    ``distractors``: range of dark distractors per slide (``ips_path.synthetic.synth``); ``lesion_diameter_um``: instead
    of ``RATIOS[ratio]``; ``slide_um``: slide width and height in µm. Returns (manifest, tiles, specs, seconds)."""
    saved = root / "specs.pickle"
    manifest = root / "slides" / "manifest.csv"
    seconds = {}
    if saved.exists():
        specs = pickle.loads(saved.read_bytes())
    else:
        clock, cpu = time.perf_counter(), cpu_seconds()
        size = tuple(round(side / slide_mpp) for side in slide_um)  # the same tissue in µm
        specs = write_synthetic_cohort(root / "slides", n_slides, size=size, mpp=slide_mpp, downsamples=(1, 4),
                                       seed=seed, prefix=f"r{ratio.replace('.', '')}s{seed}",
                                       lesion_diameter_um=lesion_diameter_um or RATIOS[ratio],
                                       lesions_per_positive=(1, 2), lookalikes_per_slide=(2, 4),
                                       distractors_per_slide=distractors, nucleus_scale=1.4, stain_shift=0.15,
                                       workers=2)
        seconds["generate_wall"], seconds["generate_cpu"] = time.perf_counter() - clock, cpu_seconds() - cpu
        _add_splits(manifest, specs, seed)
        saved.write_bytes(pickle.dumps(specs))
    tiles = root / ("tiles" if tile == (TILE_MPP, PATCH_SIZE) else f"tiles_{tile[0]:g}_{tile[1]}")
    if not (tiles / "tiling_summary.csv").exists():
        clock, cpu = time.perf_counter(), cpu_seconds()
        tile_slides(collect_inputs([], manifest), tiles, TilingParams(target_mpp=tile[0], patch_size=tile[1], qc=False),
                    workers=2, progress=False)
        for spec in specs:
            write_lesion_truth(spec, TileStore.open(tiles / f"{spec.path.stem}.zarr"))
        seconds["tile_wall"], seconds["tile_cpu"] = time.perf_counter() - clock, cpu_seconds() - cpu
    return manifest, tiles, specs, seconds


def _add_splits(manifest: Path, specs: list, seed: int) -> None:
    """A third of each label to test, a sixth to validation, the rest to training."""
    rng = np.random.default_rng([seed, 13])
    split = {}
    for label in ("positive", "negative"):
        ids = [s.path.stem for s in specs if s.label == label]
        rng.shuffle(ids)
        n_test, n_val = round(len(ids) / 3), round(len(ids) / 6)
        split.update({i: "test" for i in ids[:n_test]})
        split.update({i: "val" for i in ids[n_test:n_test + n_val]})
        split.update({i: "train" for i in ids[n_test + n_val:]})
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, [*rows[0].keys(), "split"])
        writer.writeheader()
        writer.writerows({**row, "split": split[row["slide_id"]]} for row in rows)


def run_variant(name: str, manifest: Path, tiles: Path, specs: list, out: Path, epochs: int | None, seed: int
                ) -> dict:
    """Train variant ``name`` (over ``BASE``, or the TrainConfig defaults) and score it on the test slides."""
    variant = dict(VARIANTS[name])
    base = {"threads": 2, "device": "cpu"} if variant.pop("base", None) == "defaults" else BASE
    window, stain_norm = variant.pop("features_window", None), variant.pop("features_stain_norm", None)
    settings = {**base, "seed": seed, **({} if epochs is None else {"epochs": epochs}), **variant}
    clock, cpu = time.perf_counter(), cpu_seconds()
    features_seconds = {}
    if settings.get("features"):  # cached once per cohort and kind, reused by the variants that share them
        encoder = settings["features"]
        if base is BASE:  # the studies before the defaults: features normalised as the training is
            stain_norm = bool(settings.get("stain_norm"))
        settings["features"] = "_".join([encoder, *(["stain_norm"] if stain_norm else []),
                                         *(["raw"] if stain_norm is False and base is not BASE else []),
                                         *([f"w{window}"] if window else [])])
        outcomes = extract_features(sorted(tiles.glob("*.zarr")), encoder, name=settings["features"], device="cpu",
                                    threads=2, stain_norm=stain_norm, progress=False,
                                    encoder_options=None if window is None else {"window": window})
        assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
        features_seconds = {"features_wall": round(time.perf_counter() - clock, 1),
                            "features_cpu": round(cpu_seconds() - cpu, 1),
                            "features_reused": all(o.status == "reused" for o in outcomes)}
        clock, cpu = time.perf_counter(), cpu_seconds()
    config = TrainConfig(**settings)
    shutil.rmtree(out, ignore_errors=True)  # a run left by an earlier sweep in --workdir: measure anew
    result = train(manifest, tiles, out, config, progress=False)
    train_wall, train_cpu = time.perf_counter() - clock, cpu_seconds() - cpu
    clock, cpu = time.perf_counter(), cpu_seconds()
    model, checkpoint = load_model(out / ("best.pt" if (out / "best.pt").exists() else "last.pt"))
    test = _score_test(model, tiles, specs, manifest, config.threads, config.features)
    return {"variant": name, "config": checkpoint["config"], **test,  # as the run resolved it
            "best_epoch": result.best_epoch,
            "train_selected_in_lesion": [round(r.get("train_selected_in_lesion", float("nan")), 4)
                                         for r in result.history],
            "train_lesion_found": [round(r.get("train_lesion_found", float("nan")), 3) for r in result.history],
            "train_loss": [round(r["train_loss"], 4) for r in result.history],
            "val_auc": [round(r.get("val_auc", float("nan")), 3) for r in result.history],
            "seconds": {**features_seconds, "train_wall": round(train_wall, 1), "train_cpu": round(train_cpu, 1),
                        "test_wall": round(time.perf_counter() - clock, 1), "test_cpu": round(cpu_seconds() - cpu, 1)}}


def _score_test(model: Any, tiles: Path, specs: list, manifest: Path, threads: int, features: str | None) -> dict:
    with manifest.open(newline="") as f:
        test_ids = {row["slide_id"] for row in csv.DictReader(f) if row["split"] == "test"}
    labels, probabilities, hits, lookalike_tops = [], [], [], []
    with PatchStreamer(chunk_size=model.chunk_size, threads=threads) as streamer, torch.no_grad():
        for spec in specs:
            if spec.path.stem not in test_ids:
                continue
            store = TileStore.open(tiles / f"{spec.path.stem}.zarr")
            chunks = streamer.stream_features(store, features) if features else streamer.stream(store)
            prediction = model.predict_slide(chunks)
            labels.append(bool(spec.lesions))
            probabilities.append(float(prediction.probabilities["label"][1]))
            top = store.coords[int(torch.argmax(prediction.selection.all_logits))][None]
            if spec.lesions:
                hits.append(bool(lesion_fractions(spec, top, store.patch_size_level0)[0] > 0))
            lookalike_tops.append(bool(lesion_fractions(spec, top, store.patch_size_level0, "lookalikes")[0] > 0))
    return {"test_auc": round(roc_auc(np.array(labels), np.array(probabilities)), 4),
            "top_patch_in_lesion": round(float(np.mean(hits)), 4),
            "top_patch_in_lookalike": round(float(np.mean(lookalike_tops)), 4),
            "n_test": len(labels), "n_test_tumour": len(hits)}


def probe(specs: list, manifest: Path, root: Path, mpp: float, patch_size: int, epochs: int,
          seed: int) -> dict:
    """Supervised patch-level probe at ``mpp`` / ``patch_size`` (see the module docstring)."""
    from ips_path.model import build_encoder
    from ips_path.stores.loader import Augmentation, augment_patches

    tiles = root / f"probe_tiles_{mpp:g}_{patch_size}"
    tile_slides(collect_inputs([], manifest), tiles, TilingParams(target_mpp=mpp, patch_size=patch_size, qc=False),
                workers=2, progress=False)
    with manifest.open(newline="") as f:
        split = {row["slide_id"]: row["split"] for row in csv.DictReader(f)}
    rng = np.random.default_rng(seed)
    sets: dict[str, list] = {"train": [], "test": []}
    with PatchStreamer(chunk_size=256, threads=2) as streamer:
        for spec in specs:
            part = "test" if split[spec.path.stem] == "test" else "train"
            store = TileStore.open(tiles / f"{spec.path.stem}.zarr")
            lesion = lesion_fractions(spec, store.coords, store.patch_size_level0) > 0
            mimic = lesion_fractions(spec, store.coords, store.patch_size_level0, "lookalikes") > 0
            normal = np.flatnonzero(~lesion & ~mimic)
            normal = rng.choice(normal, min(len(normal), 8 if part == "train" else 40), replace=False)
            chosen = np.concatenate([np.flatnonzero(lesion), np.flatnonzero(mimic & ~lesion), normal])
            kind = np.concatenate([np.full(lesion.sum(), 2), np.full((mimic & ~lesion).sum(), 1),
                                   np.zeros(len(normal))])
            if len(chosen):
                pixels = torch.cat([c.patches for c in streamer.stream(store, indices=chosen)])
                sets[part].append((pixels, kind))
    x_train = torch.cat([p for p, _ in sets["train"]])
    kind_train = np.concatenate([k for _, k in sets["train"]])
    x_test = torch.cat([p for p, _ in sets["test"]])
    kind_test = np.concatenate([k for _, k in sets["test"]])
    y = torch.tensor(kind_train == 2, dtype=torch.float32)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(build_encoder("smallcnn", pool="max"), torch.nn.LazyLinear(1))
    model(x_train[:2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    weight = torch.where(y > 0, (y == 0).sum() / y.sum().clamp(min=1), torch.tensor(1.0))
    generator = torch.Generator().manual_seed(seed)
    clock, cpu = time.perf_counter(), cpu_seconds()
    curve = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            logits = model(augment_patches(x_train[batch], Augmentation(), generator)).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[batch], weight=weight[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            scores = torch.cat([model(x_test[i:i + 256]).squeeze(1) for i in range(0, len(x_test), 256)]).numpy()
        not_normal = kind_test != 0
        curve.append({"lesion_vs_all": round(roc_auc(kind_test == 2, scores), 3),
                      "lesion_vs_lookalike": round(roc_auc(kind_test[not_normal] == 2, scores[not_normal]), 3)})
    return {"mpp": mpp, "patch_size": patch_size, "patch_um": mpp * patch_size,
            "train_patches": {"lesion": int((kind_train == 2).sum()), "lookalike": int((kind_train == 1).sum()),
                              "normal": int((kind_train == 0).sum())},
            "test_patches": {"lesion": int((kind_test == 2).sum()), "lookalike": int((kind_test == 1).sum()),
                             "normal": int((kind_test == 0).sum())},
            "auc_by_epoch": curve, "seconds": {"wall": round(time.perf_counter() - clock, 1),
                                               "cpu": round(cpu_seconds() - cpu, 1)}}


def contrast(specs: list, manifest: Path, root: Path, mpp: float, patch_size: int) -> dict:
    """Darkest-nuclei statistic per patch, raw and stain-normalised (see the module docstring)."""
    from ips_path.slides.stain import optical_density

    tiles = root / f"probe_tiles_{mpp:g}_{patch_size}"
    tile_slides(collect_inputs([], manifest), tiles, TilingParams(target_mpp=mpp, patch_size=patch_size, qc=False),
                workers=2, progress=False)
    clock = time.perf_counter()
    out: dict[str, Any] = {"mpp": mpp, "patch_size": patch_size}
    for stain_norm in (False, True):
        patch_stat, patch_kind, slide_max, slide_label, hits = [], [], [], [], []
        with PatchStreamer(chunk_size=256, threads=2, stain_norm=stain_norm) as streamer:
            for spec in specs:
                store = TileStore.open(tiles / f"{spec.path.stem}.zarr")
                pixels = torch.cat([c.patches for c in streamer.stream(store)]).permute(0, 2, 3, 1).numpy()
                density = optical_density(pixels).reshape(len(pixels), -1, 3)
                stat = np.quantile(density, 0.99, axis=1)  # (n, 3)
                lesion = lesion_fractions(spec, store.coords, store.patch_size_level0)
                mimic = lesion_fractions(spec, store.coords, store.patch_size_level0, "lookalikes")
                kind = np.where(lesion > 0.25, 2, np.where((mimic > 0.25) & (lesion == 0), 1, 0))
                patch_stat.append(stat[kind > 0])
                patch_kind.append(kind[kind > 0])
                slide_max.append(stat.max(axis=0))
                slide_label.append(bool(spec.lesions))
                if spec.lesions:
                    hits.append(lesion[stat.argmax(axis=0)] > 0)
        stats, kinds = np.concatenate(patch_stat), np.concatenate(patch_kind)
        maxima, labels = np.array(slide_max), np.array(slide_label)
        out["normalised" if stain_norm else "raw"] = {
            channel: {"patch_auc_lesion_vs_lookalike": round(roc_auc(kinds == 2, stats[:, c]), 3),
                      "slide_auc_of_max": round(roc_auc(labels, maxima[:, c]), 3),
                      "darkest_patch_in_lesion": round(float(np.mean([h[c] for h in hits])), 3)}
            for c, channel in enumerate(("red", "green", "blue"))}
    out["patches"] = {"lesion": int((kinds == 2).sum()), "lookalike": int((kinds == 1).sum())}
    out["seconds"] = round(time.perf_counter() - clock, 1)
    return out


def _feature_bags(n: int, generator: torch.Generator, dim: int = 8) -> tuple[list[torch.Tensor], torch.Tensor]:
    bags, labels = [], []
    for i in range(n):
        x = torch.randn(40, dim, generator=generator) * 0.5
        x[:4, 0] += 3.0  # look-alikes: bright in features 0 and 2
        x[:4, 2] += 3.0
        if i % 2:  # the lesion shares feature 2 with them and adds feature 1
            x[20, 1] += 3.0
            x[20, 2] += 3.0
        bags.append(x)
        labels.append(i % 2)
    return bags, torch.tensor(labels)


def feature_bag_study(seeds: list[int], steps: int = 150) -> list[dict]:
    """IPS on feature bags with a needle, for several M / explore / instance-loss settings."""
    from ips_path.model import IPSModel, PatchChunk, Task, build_encoder, train_step

    settings = [dict(n_select=4), dict(n_select=4, explore=0.5), dict(n_select=4, instance_loss=1.0),
                dict(n_select=12), dict(n_select=12, explore=0.67), dict(n_select=40)]
    rows = []
    for seed in seeds:
        for setting in settings:
            torch.manual_seed(seed)
            model = IPSModel(build_encoder("features", in_features=8, out_dim=16), [Task("label", 2)], dim=16,
                             n_heads=2, n_select=setting["n_select"], chunk_size=8, dropout=0.0, attn_dropout=0.0)
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
            generator = torch.Generator().manual_seed(seed)
            found = []
            for _ in range(steps):
                bags, labels = _feature_bags(4, generator)
                out = train_step(model, [[PatchChunk(x[i:i + 8]) for i in range(0, 40, 8)] for x in bags],
                                 {"label": labels}, optimizer, explore=setting.get("explore", 0.0),
                                 instance_loss=setting.get("instance_loss", 0.0))
                found += [20 in s.tolist() for s, y in zip(out["selected"], labels, strict=True) if y]
            model.n_select = 4  # tested as deployed: greedy top-4
            bags, labels = _feature_bags(16, torch.Generator().manual_seed(99))
            predictions = [model.predict_slide([PatchChunk(x[i:i + 8]) for i in range(0, 40, 8)]) for x in bags]
            tops = [int(p.selection.indices[0]) == 20 for p, y in zip(predictions, labels, strict=True) if y]
            probabilities = np.array([float(p.probabilities["label"][1]) for p in predictions])
            rows.append({"seed": seed, **setting, "lesion_trained_first_50_steps": round(float(np.mean(found[:50])), 2),
                         "lesion_trained_last_50_steps": round(float(np.mean(found[-50:])), 2),
                         "top_patch_in_lesion": round(float(np.mean(tops)), 3),
                         "test_auc": round(roc_auc(labels.numpy().astype(bool), probabilities), 3)})
            print(rows[-1], flush=True)
    return rows


def _save(name: str, args: argparse.Namespace, cohorts: list, rows: list) -> None:
    """Write what has been measured so far (called after every run, so an interrupted sweep keeps its runs)."""
    summary = {}
    for ratio in args.ratios:
        for variant in args.variants:
            chosen = [r for r in rows if r["ratio_preset_percent"] == ratio and r["variant"] == variant]
            if not chosen:
                continue
            summary[f"{ratio}%/{variant}"] = {
                key: {"median": float(np.median([r[key] for r in chosen])),
                      "min": float(min(r[key] for r in chosen)), "max": float(max(r[key] for r in chosen))}
                for key in ("test_auc", "top_patch_in_lesion")} | {
                "seeds": [r["seed"] for r in chosen],
                "train_wall_s_median": float(np.median([r["seconds"]["train_wall"] for r in chosen])),
                "train_cpu_s_median": float(np.median([r["seconds"]["train_cpu"] for r in chosen]))}
    save_result(name, {"settings": {"slide_size_um": [side * SLIDE_MPP for side in SLIDE_SIZE],
                                    "slide_mpp": args.slide_mpp, "tile_mpp": args.tile[0],
                                    "patch_size": args.tile[1], "base_config": BASE, "epochs": args.epochs,
                                    "variants": {v: VARIANTS[v] for v in args.variants},
                                    "lesion_diameter_um": {r: RATIOS[r] for r in args.ratios},
                                    "hit": "the most attended patch overlaps a lesion"},
                       "cohorts": cohorts, "summary": summary, "runs": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", nargs="+", choices=list(RATIOS), default=list(RATIOS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--slides", type=int, default=48, help="slides per cohort (train + val + test)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs of every variant (default: {BASE['epochs']} over BASE, the TrainConfig default "
                             "over the defaults)")
    parser.add_argument("--tile", type=lambda v: (float(v.split(",")[0]), int(v.split(",")[1])),
                        default=(TILE_MPP, PATCH_SIZE), metavar="MPP,PATCH",
                        help=f"training resolution and patch size (default {TILE_MPP:g},{PATCH_SIZE})")
    parser.add_argument("--slide-mpp", type=float, default=SLIDE_MPP,
                        help=f"µm/px the slides are written at (the tissue keeps its µm; default {SLIDE_MPP:g})")
    parser.add_argument("--name", default="needle_bench", help="result file bench/results/NAME.json")
    parser.add_argument("--workdir", type=Path, default=None, help="keep cohorts and runs here (default: temporary)")
    parser.add_argument("--probe", nargs="+", metavar="MPP,PATCH", default=None,
                        help="instead of training: the supervised patch probe at these resolutions, e.g. 2.0,64")
    parser.add_argument("--probe-epochs", type=int, default=30)
    parser.add_argument("--contrast", nargs="+", metavar="MPP,PATCH", default=None,
                        help="instead of training: the darkest-nuclei statistic raw and stain-normalised, e.g. 1.0,64")
    parser.add_argument("--bags", action="store_true", help="only the feature-bag study (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.bags:
        torch.set_num_threads(1)
        save_result(args.name if args.name != "needle_bench" else "needle_bags",
                    {"what": "IPS on feature bags: 40 patches, 4 look-alikes, 1 lesion patch in positive bags; "
                             "150 steps of 4 fresh bags; tested greedy with M = 4 on 16 other bags",
                     "runs": feature_bag_study(args.seeds)})
        return
    rows, cohorts = [], []
    with tempfile.TemporaryDirectory(prefix="needle_bench_") as scratch:
        work = args.workdir or Path(scratch)
        for ratio in args.ratios:
            for seed in args.seeds:
                root = work / (f"ratio{ratio}_seed{seed}" + ("" if args.slide_mpp == SLIDE_MPP else
                                                             f"_mpp{args.slide_mpp:g}"))
                manifest, tiles, specs, seconds = make_cohort(root, ratio, args.slides, seed, args.tile,
                                                              args.slide_mpp)
                measured = [s.lesion_area_fraction() for s in specs if s.lesions]
                cohorts.append({"ratio_preset_percent": ratio, "seed": seed, "slides": len(specs),
                                "lesion_area_percent_median": round(100 * float(np.median(measured)), 4),
                                "lesion_area_percent_range": [round(100 * min(measured), 4),
                                                              round(100 * max(measured), 4)],
                                "patches_per_slide_median": float(np.median(
                                    [TileStore.open(tiles / f"{s.path.stem}.zarr").n_patches for s in specs])),
                                "seconds": {k: round(v, 1) for k, v in seconds.items()}})
                print(cohorts[-1], flush=True)
                if args.contrast:
                    for setting in args.contrast:
                        mpp, size = setting.split(",")
                        cohorts[-1].setdefault("contrast", []).append(
                            contrast(specs, manifest, root, float(mpp), int(size)))
                        print(cohorts[-1]["contrast"][-1], flush=True)
                    _save(args.name, args, cohorts, rows)
                    continue
                if args.probe:
                    for setting in args.probe:
                        mpp, size = setting.split(",")
                        cohorts[-1].setdefault("probes", []).append(
                            probe(specs, manifest, root, float(mpp), int(size), args.probe_epochs, seed))
                        print(cohorts[-1]["probes"][-1], flush=True)
                    _save(args.name, args, cohorts, rows)
                    continue
                for variant in args.variants:
                    row = run_variant(variant, manifest, tiles, specs, root / "runs" / variant, args.epochs, seed)
                    rows.append({"ratio_preset_percent": ratio, "seed": seed, **row})
                    _save(args.name, args, cohorts, rows)


if __name__ == "__main__":
    main()
