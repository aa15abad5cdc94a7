"""Loader throughput: the streaming loader against a plain openslide loop, and scoring fed by it.

1. Tiles/s of ``PatchStreamer.stream`` against a plain loop of ``openslide.OpenSlide.read_region``
   over the same coordinates, on a generated Aperio-style JPEG SVS: 240-px tiles, as Aperio scanners
   write them, so a 256-px patch straddles up to four tiles, and fine grain (``synth`` ``grain=8``) for
   realistic tile sizes of 10-25 KB (target: >= 1.8x on 2 CPU cores). Also the tiles decoded per patch.
2. No-grad scoring throughput (``IPSModel.select_top_patches``) fed by the loader against the
   same scoring over patches already in memory, with the encoder as the bottleneck
   (target: >= 0.9 of it).

Usage::

    python -m bench.loader_bench [--device cpu|cuda] [--size 24000] [--repeats 3]

On CUDA it also reports the scoring pass of ResNet-18 at 256 px from the slide (target on an
H100: >= 5,000 patches/s) and the peak GPU memory of a training step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide
import torch

from bench.common import save_result
from ips_path.model import IPSModel, Task, build_encoder
from ips_path.model.chunks import PatchChunk
from ips_path.stores.loader import PatchStreamer, available_cores, open_for_reading
from ips_path.stores.tile_store import TileStore
from ips_path.synthetic.synth import write_synthetic_slide
from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides

TILE = 240  # Aperio's tile size
GRAIN = 8  # grey levels of fine noise: median tile ~15 KB at quality 80


def make_store(folder: Path, size: int, patch: int) -> tuple[Path, TileStore]:
    """A generated JPEG SVS at 0.5 µm/px, tiled by ``ipspath tile``'s code: its tissue patches of ``patch`` px."""
    slide_path = folder / "bench.svs"
    write_synthetic_slide(slide_path, size, size, mpp=0.5, fmt="svs", downsamples=(1, 4, 16), tile_size=TILE,
                          seed=7, grain=GRAIN)
    params = TilingParams(target_mpp=0.5, patch_size=patch, qc=False)
    tile_slides(collect_inputs([slide_path]), folder / "tiles", params, progress=False)
    return slide_path, TileStore.open(folder / "tiles" / "bench.zarr")


def tile_kilobytes(slide_path: Path, store: TileStore) -> float:
    """Median compressed size of the level-0 tiles under the store's patches, in KB."""
    import tifffile

    with tifffile.TiffFile(slide_path) as tif:
        page = tif.series[0].levels[0].keyframe
        counts = np.asarray(page.databytecounts)
        across = -(-page.imagewidth // page.tilewidth)
        index = (store.coords[:, 1] // page.tilelength) * across + store.coords[:, 0] // page.tilewidth
        return round(float(np.median(counts[index])) / 1024, 1)


def decodes_per_patch(store: TileStore, threads: int, chunk: int) -> float:
    """Tiles the direct tile reader decodes per patch in one pass (1.0-1.3 when each tile is decoded once)."""
    with open_for_reading(store) as reader, PatchStreamer(chunk_size=chunk, threads=threads) as streamer:
        for _ in streamer.stream(store, slide=reader):
            pass
        return round(reader.decodes / store.n_patches, 3) if hasattr(reader, "decodes") else float("nan")


def plain_loop(slide_path: Path, coords: np.ndarray, patch: int) -> float:
    """Seconds for a plain loop of openslide read_region + conversion to an RGB array."""
    slide = openslide.OpenSlide(str(slide_path))
    started = time.perf_counter()
    for x, y in coords:
        np.asarray(slide.read_region((int(x), int(y)), 0, (patch, patch)))[..., :3]
    seconds = time.perf_counter() - started
    slide.close()
    return seconds


def loader_pass(store: TileStore, threads: int, chunk: int, device: str, backend: str = "auto",
                in_flight: int = 2) -> float:
    with PatchStreamer(chunk_size=chunk, threads=threads, device=device, backend=backend,
                       in_flight=in_flight) as streamer:
        started = time.perf_counter()
        n = sum(len(c) for c in streamer.stream(store))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    assert n == store.n_patches
    return seconds


def _auto_backend(store: TileStore) -> str:
    with open_for_reading(store) as slide:
        return slide.backend


def scoring_model(device: str, patch: int) -> IPSModel:
    encoder = build_encoder("resnet18")
    model = IPSModel(encoder, [Task("label", 2, "multiclass")], dim=128, n_heads=8, n_select=16, chunk_size=64)
    return model.to(device).eval()


def scoring_in_memory(model: IPSModel, patches: torch.Tensor, chunk: int) -> float:
    def chunks():
        for i in range(0, len(patches), chunk):
            yield PatchChunk(patches[i:i + chunk])
    started = time.perf_counter()
    model.select_top_patches(chunks())
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def scoring_from_loader(model: IPSModel, store, threads: int, chunk: int, n: int) -> float:
    with PatchStreamer(chunk_size=chunk, threads=threads, device=str(model.device)) as streamer:
        started = time.perf_counter()
        model.select_top_patches(streamer.stream(store, indices=np.arange(n)))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=16384, help="slide side in px (level 0)")
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=available_cores(),
                        help="reader threads (default: the cores this process may use)")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--score-patches", type=int, default=256,
                        help="patches scored by ResNet-18 (CPU is slow: keep small there)")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        slide_path, store = make_store(Path(tmp), args.size, args.patch)
        auto_backend = _auto_backend(store)
        n = store.n_patches
        plain = [plain_loop(slide_path, store.coords, args.patch) for _ in range(args.repeats)]
        loaded = [loader_pass(store, args.threads, args.chunk, args.device) for _ in range(args.repeats)]
        loaded_one_in_flight = [loader_pass(store, args.threads, args.chunk, args.device, in_flight=1)
                                for _ in range(args.repeats)]
        loaded_openslide = [loader_pass(store, args.threads, args.chunk, args.device, "openslide")
                            for _ in range(args.repeats)]
        decodes = decodes_per_patch(store, args.threads, args.chunk)
        tile_kb = tile_kilobytes(slide_path, store)
        plain_rate, loader_rate = n / statistics.median(plain), n / statistics.median(loaded)
        openslide_rate = n / statistics.median(loaded_openslide)

        model = scoring_model(args.device, args.patch)
        k = min(args.score_patches, n)
        with PatchStreamer(chunk_size=args.chunk, threads=args.threads, device=args.device) as streamer:
            in_memory = torch.cat([c.patches for c in streamer.stream(store, indices=np.arange(k))])
        scoring_in_memory(model, in_memory[: args.chunk], args.chunk)  # warm-up
        mem = [scoring_in_memory(model, in_memory, args.chunk) for _ in range(args.repeats)]
        fed = [scoring_from_loader(model, store, args.threads, args.chunk, k) for _ in range(args.repeats)]
        mem_rate, fed_rate = k / statistics.median(mem), k / statistics.median(fed)

    result = {
        "command": "python -m bench.loader_bench " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "slide": {"size_px": [args.size, args.size], "format": f"Aperio SVS, JPEG tiles {TILE} px, grain {GRAIN}",
                  "mpp": 0.5, "tile_kb_median_under_patches": tile_kb},
        "patches": n,
        "patches_are": "the tissue patches of the store (default tissue detection, >= 50 % tissue)",
        "loader_backend_auto_picked": auto_backend,
        "patch_size": args.patch,
        "threads": args.threads,
        "plain_openslide_tiles_per_s": round(plain_rate, 1),
        "loader_tiles_per_s": round(loader_rate, 1),
        "loader_speedup": round(loader_rate / plain_rate, 3),
        "loader_speedup_target": 1.8,
        "loader_tile_decodes_per_patch": decodes,
        "loader_one_chunk_in_flight_tiles_per_s": round(n / statistics.median(loaded_one_in_flight), 1),
        "loader_backend_openslide_tiles_per_s": round(openslide_rate, 1),
        "loader_backend_openslide_speedup": round(openslide_rate / plain_rate, 3),
        "scoring_encoder": "resnet18",
        "scoring_patches": k,
        "scoring_in_memory_patches_per_s": round(mem_rate, 2),
        "scoring_from_loader_patches_per_s": round(fed_rate, 2),
        "scoring_ratio": round(fed_rate / mem_rate, 3),
        "scoring_ratio_target": 0.9,
        "repeats": args.repeats,
        "raw_seconds": {"plain": plain, "loader": loaded, "loader_one_in_flight": loaded_one_in_flight,
                        "loader_openslide": loaded_openslide,
                        "scoring_in_memory": mem, "scoring_from_loader": fed},
    }
    save_result(f"loader_bench_{args.device.split(':')[0]}", result)


if __name__ == "__main__":
    main()
