"""``ipspath demo``: the whole chain on a generated cohort, on a laptop CPU, in minutes.

1. generate H&E-like slides, half of them with small lesions (:mod:`ips_path.synthetic.synth`): a training
   cohort and a held-out test cohort from other seeds;
2. tile them (``ipspath tile``);
3. train an IPS classifier (``ipspath train``) on the training cohort;
4. predict the test cohort (``ipspath predict``), with heatmaps;
5. write the review report (``ipspath report``);
6. score localisation: on how many positive test slides the most attended patch lies in a lesion
   (the generator knows where the lesions are).

Every step writes where the real commands would, so the demo folder shows a user what they get.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ips_path.config import TrainConfig

__all__ = ["DemoResult", "DemoSettings", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """The demo cohort and run; the defaults fit 5 minutes on 2 CPU cores.

    Slides are ``slide_size`` px at ``slide_mpp`` µm/px, tiled at ``tile_mpp`` into ``patch_size``
    px patches; lesions are ``lesion_um`` µm across, so a lesion covers a few patches.
    """

    n_train: int = 24
    n_test: int = 12
    slide_size: tuple[int, int] = (4096, 3072)
    slide_mpp: float = 1.0
    lesion_um: tuple[float, float] = (200.0, 400.0)
    tile_mpp: float = 2.0
    patch_size: int = 64
    seed: int = 0
    train: TrainConfig = TrainConfig(epochs=8, batch_size=4, n_select=16, chunk_size=128, dim=64, heads=4,
                                     lr=3e-4, warmup_epochs=1.0, patience=0, threads=2, device="cpu",
                                     val_fraction=0.25)


@dataclass
class DemoResult:
    """Figures the demo prints, and where its outputs are."""

    out_dir: Path
    report: Path
    test_auc: float | None
    localisation: float | None
    n_positive_test: int
    seconds: dict[str, float]


def run_demo(out_dir: str | Path, settings: DemoSettings = DemoSettings(), *, progress: bool = True) -> DemoResult:
    """Run the demo into ``out_dir`` (slides/, tiles/, run/, predictions/ with report.html)."""
    from ips_path.inference.predict import predict
    from ips_path.review.report import write_report
    from ips_path.synthetic.synth import in_lesion, write_synthetic_cohort
    from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides
    from ips_path.training.train import train

    out = Path(out_dir).resolve()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now
        log.info("demo: %s done in %.1f s", name, seconds[name])

    common = {"size": settings.slide_size, "mpp": settings.slide_mpp, "downsamples": (1, 4),
              "lesion_diameter_um": settings.lesion_um}
    write_synthetic_cohort(out / "slides" / "train", settings.n_train, seed=settings.seed, prefix="train",
                           **common)
    test_specs = write_synthetic_cohort(out / "slides" / "test", settings.n_test, seed=settings.seed + 10_000,
                                        prefix="test", **common)
    lap("generate")

    tiles = out / "tiles"
    params = TilingParams(target_mpp=settings.tile_mpp, patch_size=settings.patch_size)
    train_manifest, test_manifest = out / "slides" / "train" / "manifest.csv", out / "slides" / "test" / "manifest.csv"
    tile_slides(collect_inputs([], train_manifest) + collect_inputs([], test_manifest), tiles, params,
                workers=2, progress=progress)  # the prefixes keep the two cohorts' slide ids apart
    lap("tile")

    run = out / "run"
    train(train_manifest, tiles, run, settings.train, resume=(run / "last.pt").exists(), progress=progress)
    lap("train")

    pred_dir = out / "predictions"
    result = predict(run, pred_dir, manifest=test_manifest, tiles_dir=tiles, device=settings.train.device,
                     threads=settings.train.threads, heatmap_options={"thumbnail_size": 1024, "top_k": 8, "crop": True},
                     overwrite=True, progress=progress)  # the demo's own folder: a retrained model replaces it
    lap("predict")

    report = write_report(pred_dir, title="ipspath demo: generated slides with lesions")
    lap("report")

    from ips_path.inference.predictions import PredictionFolder
    from ips_path.stores.tile_store import TileStore

    scores = f"scores/{PredictionFolder(pred_dir).read_run()['run']}"
    hits = []
    for spec in test_specs:
        if not spec.lesions:
            continue
        store = TileStore.open(tiles / f"{spec.path.stem}.zarr")
        logits = store.read_array(scores)
        top = store.coords[int(np.argmax(logits))][None]
        hits.append(bool(in_lesion(spec, top, store.patch_size_level0)[0]))
    localisation = float(np.mean(hits)) if hits else None
    metrics = result.metrics or {}
    demo = DemoResult(out, report, metrics.get("auc"), localisation, len(hits), seconds)
    (out / "demo.json").write_text(json.dumps({**asdict(demo), "out_dir": str(out), "report": str(report),
                                               "settings": _settings_dict(settings)}, indent=2, default=str))
    return demo


def _settings_dict(settings: DemoSettings) -> dict:
    values = asdict(settings)
    values["train"] = settings.train.as_dict()
    return values
