"""One command that exercises every CUDA path of ipspath and measures its GPU figures.

    python bench/gpu_check.py                          # a GPU machine: under 8 minutes on one H100/H200
    python bench/gpu_check.py --device cpu --smoke     # toy sizes on the CPU (CI runs this)

Writes ``bench/results/gpu_check.json`` (``gpu_check_smoke.json`` with ``--smoke``) after every step,
and the per-benchmark files ``gpu_check_memory_n.json`` and ``gpu_check_memory_m.json`` (``_smoke``
likewise). Each step runs in its own process under its own time limit (:data:`STEPS`): a step that
fails, runs out of memory or outlives its limit is recorded as such, with what it printed so far, and
the next step still runs. Exit code 0 when every step passed, 1 otherwise.

Steps:

``environment``
    torch, CUDA, GPU, CPU cores, and which of the project's packages are importable.
``loader``
    Patches from a generated Aperio-style JPEG SVS (240-px tiles, realistic tile sizes) delivered on the
    device equal the CPU loader's bit for bit, and within 1 grey level after resizing on the device,
    while the consumer keeps the GPU busier than the readers (so the pinned ring would show a reuse race).
``selection``
    Under bf16 autocast the selection (indices and every patch's logit) is identical however the
    incoming stream is cut (chunks of I, of 37, of 3I + 5), for both scores.
``train_step``
    One bf16 training step with checkpointed pieces, augmentation on the device, a padding mask (one
    slide with fewer than M patches) and 2-D positions: a finite loss and a finite gradient on every
    trainable parameter.
``cli``
    ``ipspath tile``, ``train`` (one process), ``predict``, ``features extract`` and ``train --features``
    on a small generated cohort with ``--device`` of the check.
``memory_features``
    Peak memory of one step in the features setting (2048-d, D = 512, M = I = 5000, B = 16) at N = 10k,
    100k and 250k, plain and checkpointed (``bench/memory_bench.py``). Targets: < 5 % growth in N;
    checkpointed peak under 1 GB.
``memory_pixels``
    Pixels (ResNet-18, 256 px, B = 16): peak memory flat in M with checkpointing; the plain step beside
    it (skipped where it would not fit).
``scoring``
    Scoring throughput of ResNet-18 at 256 px in bf16: from patches already on the device, and fed by the
    loader from the slide file; the loader alone. Targets: >= 20,000 patches/s from the slide file and
    >= 0.9 of the rate from patches on the device.
``mnist``
    Megapixel MNIST at the paper's settings for a part of an epoch and the test set: time per training
    step and per test image, and from them the time of one full epoch (5000 images + 1000 tests), to plan
    the 150 epochs; test accuracy after the steps run.

``--smoke`` shrinks every size so that the whole check runs in about a minute on 2 CPU cores; its
figures only show the code paths run, not speeds. The packages it needs beyond torch (zarr, tiffslide,
openslide...) are imported inside the steps: on a machine without them each such step fails with the
missing package named, and ``bench/README.md`` gives the commands that install them first.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, save_result  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "numpy", "openslide-python", "openslide-bin", "tiffslide", "tifffile", "imagecodecs", "zarr",
            "numcodecs", "scikit-image", "h5py", "click", "pyyaml", "timm", "torchvision", "ipspath")
PARTIAL = "PARTIAL "  # a child's line that holds what it measured so far


# -- sizes --------------------------------------------------------------------------------------------

def sizes(smoke: bool) -> dict[str, Any]:
    """Every size the steps use; ``smoke`` the toy ones."""
    if smoke:
        return {"slide_px": 2560, "encoder": "smallcnn", "chunk": 8, "n_select": 8, "cohort": 4,
                "cohort_px": (1024, 768), "score_slide_px": 1536, "score_repeats": 1,
                "memory_n": [1_000, 2_000], "memory_batch": 2, "memory_mi": 200,
                "memory_m": [4, 8], "memory_m_batch": 1, "memory_patch": 64, "memory_chunk": 8,
                "mnist": {"n_train": 8, "n_test": 4, "steps": 2, "batch_size": 4}}
    return {"slide_px": 8192, "encoder": "resnet18", "chunk": 64, "n_select": 16, "cohort": 8,
            "cohort_px": (3072, 2048), "score_slide_px": 40960, "score_repeats": 5,
            "memory_n": [10_000, 100_000, 250_000], "memory_batch": 16, "memory_mi": 5000,
            "memory_m": [16, 64, 256], "memory_m_batch": 16, "memory_patch": 256, "memory_chunk": 64,
            "mnist": {"n_train": 5000, "n_test": 1000, "steps": 60, "tests": 200}}


def partial(**figures: Any) -> None:
    """Print figures measured so far: a step stopped at its time limit keeps them."""
    print(PARTIAL + json.dumps(figures, default=str), flush=True)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def aperio_slide(work: Path, side: int, name: str = "aperio") -> tuple[Path, Any]:
    """A generated Aperio-style SVS (JPEG, 240-px tiles, grain for 10-25 KB tiles) tiled at 0.5 µm/px, 256 px.

    Made once per work folder; later steps reuse it.
    """
    from ips_path.stores.tile_store import TileStore
    from ips_path.synthetic.synth import write_synthetic_slide
    from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides

    slide_path, tiles = work / f"{name}.svs", work / f"{name}_tiles"
    if not (tiles / f"{name}.zarr").exists():
        write_synthetic_slide(slide_path, side, side, mpp=0.5, fmt="svs", downsamples=(1, 4, 16), tile_size=240,
                              seed=7, tissue=3, grain=8)
        tile_slides(collect_inputs([slide_path]), tiles, TilingParams(target_mpp=0.5, patch_size=256, qc=False),
                    progress=False)
        tile_slides(collect_inputs([slide_path]), work / f"{name}_tiles_resized",
                    TilingParams(target_mpp=1.0, patch_size=128, qc=False), progress=False)
    return slide_path, TileStore.open(tiles / f"{name}.zarr")


def tile_kilobytes(store: Any) -> float:
    """Median compressed size of the level-0 tiles under the store's patches, in KB."""
    import numpy as np
    import tifffile

    with tifffile.TiffFile(store.slide_path) as tif:
        page = tif.series[0].levels[0].keyframe
        across = -(-page.imagewidth // page.tilewidth)
        counts = np.asarray(page.databytecounts)
        rows, cols = store.coords[:, 1] // page.tilelength, store.coords[:, 0] // page.tilewidth
        return round(float(np.median(counts[rows * across + cols])) / 1024, 1)


def ips_model(encoder: str, device: str, **options: Any) -> Any:
    from ips_path.model import IPSModel, Task, build_encoder

    return IPSModel(build_encoder(encoder), [Task("label", 2, "binary")], dim=128, n_heads=8, **options).to(device)


def autocast(device: str) -> Any:
    import torch

    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)


# -- steps --------------------------------------------------------------------------------------------

def step_environment(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    import torch

    from ips_path.stores.loader import available_cores

    versions, missing = {}, []
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            missing.append(package)
    info: dict[str, Any] = {"versions": versions, "missing": missing, "cores_available": available_cores(),
                            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
    needed = {"openslide-python", "openslide-bin", "tiffslide", "zarr", "numcodecs", "imagecodecs"}
    info["ok"] = not (needed & set(missing)) and (not device.startswith("cuda") or torch.cuda.is_available())
    return info


def step_loader(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    import torch

    from ips_path.stores.loader import PatchStreamer
    from ips_path.stores.tile_store import TileStore

    s = sizes(smoke)
    _, store = aperio_slide(work, s["slide_px"])
    resized = TileStore.open(work / "aperio_tiles_resized" / "aperio.zarr")
    lag = torch.randn(256 if smoke else 4096, 256 if smoke else 4096, device=device)
    result: dict[str, Any] = {"patches": store.n_patches, "tile_kb_median": tile_kilobytes(store)}
    for name, tiles in (("same_size", store), ("resized_on_device", resized)):
        with PatchStreamer(chunk_size=s["chunk"], device="cpu") as cpu:
            reference = torch.cat([c.patches for c in cpu.stream(tiles)])
        delivered = []
        with PatchStreamer(chunk_size=s["chunk"], device=device, in_flight=2) as streamer:
            for chunk in streamer.stream(tiles):
                for _ in range(2 if smoke else 20):  # the GPU lags: readers refill the ring meanwhile
                    lag = (lag @ lag).tanh_()
                delivered.append(chunk.patches.cpu())
        got = torch.cat(delivered)
        diff = int((got.int() - reference.int()).abs().max()) if got.shape == reference.shape else None
        result[name] = {"patches": len(got), "identical": bool(torch.equal(got, reference)), "max_abs_diff": diff}
    result["ok"] = result["same_size"]["identical"] and result["resized_on_device"]["max_abs_diff"] is not None \
        and result["resized_on_device"]["max_abs_diff"] <= 1
    return result


def _chunks(patches: Any, size: int) -> Iterator[Any]:
    from ips_path.model import PatchChunk

    for start in range(0, len(patches), size):
        yield PatchChunk(patches[start:start + size])


def step_selection(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    import torch

    from ips_path.stores.loader import PatchStreamer

    s = sizes(smoke)
    _, store = aperio_slide(work, s["slide_px"])
    with PatchStreamer(chunk_size=s["chunk"], device=device) as streamer:
        patches = torch.cat([c.patches for c in streamer.stream(store)])
    chunk = s["chunk"]
    result: dict[str, Any] = {"patches": len(patches), "chunk_size": chunk, "n_select": s["n_select"]}
    ok = True
    for score in ("logit", "paper"):
        torch.manual_seed(0)
        model = ips_model(s["encoder"], device, n_select=s["n_select"], chunk_size=chunk, score=score)
        runs = {}
        for cut in (chunk, 37, 3 * chunk + 5):
            with autocast(device):
                selection = model.select_top_patches(_chunks(patches, cut))
            runs[cut] = (selection.indices.cpu(), selection.all_logits.cpu())
        first = runs[chunk]
        same = all(torch.equal(r[0], first[0]) and torch.equal(r[1], first[1]) for r in runs.values())
        # Another I is another batch shape: near-tied patches may swap (reported, not a failure).
        model.chunk_size = 2 * chunk
        with autocast(device):
            other = model.select_top_patches(_chunks(patches, 2 * chunk)).indices.cpu()
        result[score] = {"identical_across_incoming_cuts": same,
                         "kept_by_both_i_and_2i": len(set(other.tolist()) & set(first[0].tolist()))}
        ok = ok and same
    result["ok"] = ok
    return result


def step_train_step(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    import torch

    from ips_path.model import IPSModel, Task, build_encoder, train_step
    from ips_path.stores.loader import Augmentation, PatchStreamer

    s = sizes(smoke)
    _, store = aperio_slide(work, s["slide_px"])
    torch.manual_seed(0)
    m = s["n_select"]
    model = IPSModel(build_encoder(s["encoder"]), [Task("label", 2, "binary")], dim=128, n_heads=8, n_select=m,
                     chunk_size=s["chunk"], pos_encoding="2d", grad_chunk_size=max(2, m // 2),
                     checkpoint=True).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with PatchStreamer(chunk_size=s["chunk"], device=device, augmentation=Augmentation(), seed=1) as streamer:
        slides = [streamer.stream(store), streamer.stream(store, indices=range(m // 2))]  # the second is padded
        started = time.perf_counter()
        stats = train_step(model, slides, {"label": torch.tensor([1, 0], device=device)}, optimizer,
                           autocast_dtype=torch.bfloat16, grad_clip=1.0)
        synchronize(device)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    no_grad = [name for name, p in trainable if p.grad is None or not bool(torch.isfinite(p.grad).all())]
    result = {"loss": stats["loss"], "n_selected": stats["n_selected"], "grad_norm": stats["grad_norm"],
              "trainable_parameters": len(trainable), "without_finite_gradient": no_grad[:20],
              "seconds": round(time.perf_counter() - started, 2)}
    result["ok"] = bool(torch.isfinite(torch.tensor(stats["loss"]))) and not no_grad and stats["n_selected"] == [
        min(m, store.n_patches), m // 2]
    return result


def step_cli(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    from ips_path.synthetic.synth import write_synthetic_cohort

    s = sizes(smoke)
    cohort = work / "cohort"
    write_synthetic_cohort(cohort, s["cohort"], size=s["cohort_px"], mpp=1.0, downsamples=(1, 4), seed=3)
    manifest, tiles = cohort / "manifest.csv", work / "cohort_tiles"
    encoder = s["encoder"]
    train_options = ["--epochs", "1" if smoke else "2", "--batch-size", "2", "--n-select", "8", "--chunk-size", "32",
                     "--dim", "64", "--heads", "4", "--device", device]
    commands = {
        "tile": ["tile", "--manifest", manifest, "-o", tiles, "--mpp", "2", "--patch-size", "64"],
        "train": ["train", "--manifest", manifest, "--tiles", tiles, "-o", work / "run", "--encoder", encoder,
                  *train_options],
        "predict": ["predict", "--model", work / "run", "--manifest", manifest, "--tiles", tiles, "-o",
                    work / "predictions", "--device", device, "--no-heatmaps"],
        "features": ["features", "extract", tiles, "--encoder", encoder, "--name", "check", "--device", device],
        "train_features": ["train", "--manifest", manifest, "--tiles", tiles, "-o", work / "run_features",
                           "--features", "check", *train_options],
    }
    result: dict[str, Any] = {}
    for name, arguments in commands.items():
        started = time.perf_counter()
        # Run outside the source tree, so the installed package (with ips_path.tiling and .cli) is used.
        completed = subprocess.run([sys.executable, "-m", "ips_path.cli.main", *map(str, arguments)], cwd=work,
                                   capture_output=True, text=True, check=False)
        last = (completed.stderr.strip() or completed.stdout.strip()).splitlines()[-3:]
        result[name] = {"exit_code": completed.returncode, "seconds": round(time.perf_counter() - started, 1),
                        "last_lines": last}
        partial(**result)
    result["ok"] = all(r["exit_code"] == 0 for r in result.values())
    return result


def _memory_bench(smoke: bool) -> Any:
    import memory_bench

    s = sizes(smoke)
    if smoke:  # toy settings: M = I and the pixel patches shrink with the grids
        toy = {"n_select": s["memory_mi"], "chunk_size": s["memory_mi"]}
        memory_bench.SETTINGS["features"] = {**memory_bench.SETTINGS["features"], **toy}
        memory_bench.SETTINGS["features_checkpointed"] = {**memory_bench.SETTINGS["features_checkpointed"], **toy,
                                                          "grad_chunk_size": s["memory_mi"]}
        memory_bench.SETTINGS["pixels"] = {**memory_bench.SETTINGS["pixels"], "patch_size": s["memory_patch"],
                                           "chunk_size": s["memory_chunk"]}
    return memory_bench


def step_memory_features(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    s = sizes(smoke)
    memory_bench = _memory_bench(smoke)
    cut = {"n": s["memory_n"], "batch_size": s["memory_batch"]}
    name = "gpu_check_memory_n" + ("_smoke" if smoke else "")
    result = memory_bench.bench_n(device, 2, ["features", "features_checkpointed"], False,
                                  grid={"features": cut, "features_checkpointed": cut}, name=name,
                                  timeout_s=120)
    figures: dict[str, Any] = {"file": str(RESULTS_DIR / f"{name}.json")}
    for setting, summary in result["settings"].items():
        runs = summary["runs"]
        figures[setting] = {"peak_mb": [r.get("peak_mb") for r in runs],
                            "peak_reserved_mb": [r.get("peak_reserved_mb") for r in runs],
                            "skipped": [r["skipped"] for r in runs if "skipped" in r],
                            "peak_growth_pct": summary["peak_growth_pct"]}
    flat = all(f["peak_growth_pct"] is not None and f["peak_growth_pct"] < 5 and not f["skipped"]
               for k, f in figures.items() if k != "file")
    peaks = [p for p in figures["features_checkpointed"]["peak_mb"] if p is not None]
    under_1gb = bool(peaks) and max(peaks) < 1024
    figures["targets"] = {"flat_in_n_below_5_pct": flat, "checkpointed_peak_below_1_gb": under_1gb}
    # The 1 GB target is the GPU's (allocator peak); on CPU the figure is the whole process's RSS.
    figures["ok"] = flat and (under_1gb or not device.startswith("cuda"))
    return figures


def step_memory_pixels(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    s = sizes(smoke)
    memory_bench = _memory_bench(smoke)
    name = "gpu_check_memory_m" + ("_smoke" if smoke else "")
    result = memory_bench.bench_m(device, 2, grid={"m": s["memory_m"], "batch_size": s["memory_m_batch"],
                                                   "grad_chunk_size": s["memory_m"][0]}, name=name, timeout_s=120)
    growth = result["checkpointed_peak_growth_pct"]
    return {"file": str(RESULTS_DIR / f"{name}.json"),
            "checkpointed_peak_mb": [r["peak_mb"] for r in result["checkpointed"]],
            "plain_peak_mb": [r["peak_mb"] for r in result["plain"]], "skipped": result["skipped"],
            "checkpointed_peak_growth_pct": growth, "plain_peak_growth_pct": result["plain_peak_growth_pct"],
            "ok": growth is not None and growth < 5}


def step_scoring(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    import torch

    from ips_path.model import PatchChunk
    from ips_path.stores.loader import PatchStreamer, available_cores

    s = sizes(smoke)
    _, store = aperio_slide(work, s["score_slide_px"], name="scoring")
    n, chunk, repeats = store.n_patches, 4 * s["chunk"], s["score_repeats"]
    result: dict[str, Any] = {"patches": n, "tile_kb_median": tile_kilobytes(store), "chunk_size": chunk,
                              "reader_threads": available_cores(), "encoder": s["encoder"], "precision": "bf16"}
    partial(**result)

    def rate(run: Callable[[], None]) -> float:
        run()  # warm-up: cuDNN's choices, the pinned ring, the page cache
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            synchronize(device)
            seconds.append(time.perf_counter() - started)
        return round(n / statistics.median(seconds), 1)

    with PatchStreamer(chunk_size=chunk, device=device) as streamer:
        result["loader_alone_patches_per_s"] = rate(lambda: [None for _ in streamer.stream(store)])
        partial(**result)
        torch.manual_seed(0)
        bank = next(iter(streamer.stream(store))).patches.clone()
        for memory_format in ("contiguous", "channels_last"):
            fmt = getattr(torch, "channels_last" if memory_format == "channels_last" else "contiguous_format")
            model = ips_model(s["encoder"], device, n_select=s["n_select"], chunk_size=chunk).to(memory_format=fmt)
            on_device = [PatchChunk(bank.contiguous(memory_format=fmt))] * -(-n // chunk)
            result[memory_format] = {
                "from_device_patches_per_s": rate(functools.partial(_select, model, on_device.copy, device)),
                "from_slide_patches_per_s": rate(functools.partial(_select, model, lambda: streamer.stream(store),
                                                                   device))}
            r = result[memory_format]
            r["ratio"] = round(r["from_slide_patches_per_s"] / r["from_device_patches_per_s"], 3)
            partial(**result)
    best = max((result[f] for f in ("contiguous", "channels_last")), key=lambda r: r["from_slide_patches_per_s"])
    result["targets"] = {"from_slide_at_least_20000": best["from_slide_patches_per_s"] >= 20_000,
                         "ratio_at_least_0.9": best["ratio"] >= 0.9}
    result["ok"] = True if smoke else all(result["targets"].values())
    return result


def _select(model: Any, chunks: Callable[[], Any], device: str) -> None:
    with autocast(device):
        model.select_top_patches(chunks())


def step_mnist(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    import mnist_bench
    import torch
    from torch.utils.data import DataLoader

    from ips_path.model import IPSModel, build_encoder, train_step
    from ips_path.synthetic.megapixel_mnist import MEGAPIXEL_MNIST_TASKS, MegapixelMNIST

    s = sizes(smoke)["mnist"]
    cfg = {**mnist_bench.PAPER, **(mnist_bench.PRESETS["cpu_smoke"] if smoke else {}),
           "n_train": s["n_train"], "n_test": s["n_test"], "batch_size": s.get("batch_size", 16)}
    data = REPO_ROOT / ".gpu_data" / "mnist"
    data = data if data.is_dir() else REPO_ROOT.parent / "shared" / "data" / "mnist"
    torch.manual_seed(0)
    train_set = MegapixelMNIST(data, "train", cfg["n_train"], canvas=cfg["canvas"], seed=0,
                               n_noise_strokes=cfg["noise_strokes"])
    test_set = MegapixelMNIST(data, "test", cfg["n_test"], canvas=cfg["canvas"], seed=0,
                              n_noise_strokes=cfg["noise_strokes"])
    loader = DataLoader(train_set, batch_size=cfg["batch_size"], shuffle=True, drop_last=True,
                        num_workers=0 if smoke else min(8, os.cpu_count() or 1))
    model = IPSModel(build_encoder(cfg["encoder"], in_channels=1, **cfg["encoder_kw"]), MEGAPIXEL_MNIST_TASKS,
                     dim=cfg["dim"], n_heads=cfg["n_heads"], n_select=cfg["n_select"], chunk_size=cfg["chunk_size"],
                     pos_encoding=cfg["pos_encoding"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    device_obj = torch.device(device)
    step_seconds = []
    for images, targets in loader:
        started = time.perf_counter()
        targets = {name: value.to(device_obj) for name, value in targets.items()}
        train_step(model, mnist_bench.slide_streams(images, cfg, device_obj), targets, optimizer)
        synchronize(device)
        step_seconds.append(time.perf_counter() - started)
        if len(step_seconds) >= s["steps"]:
            break
        if len(step_seconds) % 10 == 0:
            partial(steps=len(step_seconds), median_step_s=statistics.median(step_seconds))
    step_s = statistics.median(step_seconds[1:] or step_seconds)  # the first step compiles and tunes
    tests = _first(test_set, s.get("tests", len(test_set)))
    started = time.perf_counter()
    accuracy, digits_selected = mnist_bench.evaluate(model, tests, cfg, device_obj)
    per_test_s = (time.perf_counter() - started) / len(tests)
    steps_per_epoch = mnist_bench.PAPER["n_train"] // cfg["batch_size"]
    epoch_s = step_s * steps_per_epoch + per_test_s * mnist_bench.PAPER["n_test"]
    return {"config": {k: cfg[k] for k in ("canvas", "patch_size", "n_select", "chunk_size", "encoder", "batch_size")},
            "steps_run": len(step_seconds), "median_step_s": round(step_s, 4),
            "test_images": len(tests), "per_test_image_s": round(per_test_s, 4),
            "paper_epoch_s_estimated": round(epoch_s, 1),
            "paper_150_epochs_h_estimated": round(150 * epoch_s / 3600, 2),
            "test_accuracy_after_steps": accuracy, "test_digits_selected": round(digits_selected, 3),
            "peak_memory_mb": round(mnist_bench.peak_memory_mb(device_obj), 1), "ok": True}


class _first:
    """The first ``n`` images of a Megapixel MNIST test set (``evaluate`` renders by index)."""

    def __init__(self, dataset: Any, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def render(self, index: int) -> Any:
        return self.dataset.render(index)


# name -> (function, time limit in s on a GPU, time limit in s with --smoke)
STEPS: dict[str, tuple[Callable[[str, bool, Path], dict[str, Any]], float, float]] = {
    "environment": (step_environment, 30, 60),
    "loader": (step_loader, 45, 120),
    "selection": (step_selection, 30, 120),
    "train_step": (step_train_step, 30, 120),
    "cli": (step_cli, 90, 300),
    "memory_features": (step_memory_features, 75, 200),
    "memory_pixels": (step_memory_pixels, 45, 200),
    "scoring": (step_scoring, 75, 120),
    "mnist": (step_mnist, 60, 120),
}


# -- the parent ---------------------------------------------------------------------------------------

def run_step(name: str, device: str, smoke: bool, work: Path, limit_s: float) -> dict[str, Any]:
    """One step in its own process under ``limit_s``; its result, or why it has none, and what it printed."""
    command = [sys.executable, __file__, "--step", name, "--device", device, "--work", str(work)]
    command += ["--smoke"] if smoke else []
    started = time.perf_counter()
    # Its own process group: a step stopped at its limit takes the processes it started (memory_bench's
    # children, ipspath commands) with it.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=limit_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        timed_out = True
    record: dict[str, Any] = {"seconds": round(time.perf_counter() - started, 1), "limit_s": limit_s}
    lines = stdout.strip().splitlines()
    partials = [json.loads(line[len(PARTIAL):]) for line in lines if line.startswith(PARTIAL)]
    if timed_out:
        record.update(status="timed out", measured_so_far=partials[-1] if partials else None)
    elif process.returncode != 0 or not lines or lines[-1].startswith(PARTIAL):
        record.update(status="error", measured_so_far=partials[-1] if partials else None,
                      error=stderr.strip().splitlines()[-6:])
    else:
        result = json.loads(lines[-1])
        record.update(status="passed" if result.pop("ok") else "failed", result=result)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (CI, CPU)")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS), help="default: all")
    parser.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)  # one step, in a child process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        function = STEPS[args.step][0]
        print(json.dumps(function(args.device, args.smoke, args.work), default=str), flush=True)
        return 0
    name = "gpu_check" + ("_smoke" if args.smoke else "")
    result: dict[str, Any] = {"benchmark": "gpu_check", "device": args.device, "smoke": args.smoke,
                              "command": "python bench/gpu_check.py " + " ".join(argv or sys.argv[1:]), "steps": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ipspath-gpu-check-") as work:
        for step in args.steps:
            limit = STEPS[step][2 if args.smoke else 1]
            record = run_step(step, args.device, args.smoke, Path(work), limit)
            result["steps"][step] = record
            result["wall_s"] = round(time.perf_counter() - started, 1)
            print(f"{step}: {record['status']} ({record['seconds']} s)", file=sys.stderr, flush=True)
            save_result(name, result, quiet=True)
    result["passed"] = all(r["status"] == "passed" for r in result["steps"].values())
    save_result(name, result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
