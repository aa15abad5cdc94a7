"""`ipspath view` tile latency and throughput, many requests at once, on a generated 100k x 80k px SVS.

The slide is the one of ``bench.tile_bench`` (Aperio JPEG, 0.25 µm/px, levels 1/4/16/64, three
tissue blobs), written on first use; it is tiled at 0.5 µm/px, 256 px, and given attention scores
(a smooth field over the patches: the model is not what is measured here). The viewer's own HTTP
server serves it on a free port, and clients on keep-alive connections ask for the tiles a viewer
asks for: the whole slide at the home zoom, then views of 5 x 4 tiles at the three finest levels
around patches and around background, slide and attention layers alike.

Each pass asks for every tile once: "cold" with an empty tile cache (the slide file itself is in the
page cache after the first pass, as on a workstation), then "warm" (every tile cached). Figures: median and
95th-percentile ms per 256 px tile as the client sees it (HTTP included), and tiles per second, for
1 and for 16 concurrent clients. For comparison, the same slide tiles are made in this process (no
HTTP, no cache, one thread) by the viewer's tile function and by openslide's DeepZoomGenerator.

    python -m bench.view_bench [--clients 16] [--views 12] [--scratch DIR]
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import save_result
from bench.tile_bench import large_slide

VIEW_TILES = (5, 4)  # columns x rows of tiles a 1280 x 1024 viewer shows


def prepare(scratch: Path) -> tuple[Path, str]:
    """The tiled large slide with attention scores: (tile store, score run)."""
    from ips_path.stores.tile_store import TileStore, slide_id_from_path
    from ips_path.tiling.run import SlideInput, TilingParams, tile_slide

    slide = large_slide(scratch)
    tiles = scratch / "view_tiles"
    store_path = tiles / f"{slide_id_from_path(slide)}.zarr"
    if not store_path.exists():
        tile_slide(SlideInput(slide_id_from_path(slide), slide), tiles, TilingParams(target_mpp=0.5, patch_size=256))
    store = TileStore.open(store_path)
    run = "bench"
    if not store.has_array(f"scores/{run}"):
        centre = store.coords.mean(axis=0)
        distance = np.linalg.norm(store.coords - centre, axis=1)
        store.write_array(f"scores/{run}", (-distance / distance.max()).astype(np.float32))
    return store_path, run


def serve(store_path: Path, run: str, cache_mb: int):
    """A running viewer server for the one slide: (server, app, slide id)."""
    from ips_path.inference.predictions import SlidePrediction
    from ips_path.review.view.cohort import Cohort
    from ips_path.review.view.server import ViewerApp, make_server

    slide_id = store_path.stem
    row = SlidePrediction(slide_id, "positive", "positive", (0.1, 0.9), "", "done", "")
    cohort = Cohort(store_path.parent, ["negative", "positive"], {slide_id: row}, {slide_id: store_path}, run)
    app = ViewerApp(cohort, cache_bytes=cache_mb * 2**20)
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, app, slide_id


def tile_requests(app, slide_id: str, n_views: int, seed: int = 0) -> list[str]:
    """URLs of the tiles a viewer asks for: the home view, then ``n_views`` zoomed views."""
    from urllib.parse import quote

    from ips_path.review.view.tiles import DeepZoomGeometry

    view = app.cohort.slide(slide_id)
    geometry = DeepZoomGeometry(*view.slide.dimensions)
    base = f"/tiles/{quote(slide_id, safe='')}/{view.version}"
    wanted: list[tuple[int, int, int]] = []
    home = next(level for level in range(geometry.max_level, -1, -1) if max(geometry.level_size(level)) <= 1600)
    for level in range(home + 1):
        width, height = geometry.level_size(level)
        wanted += [(level, c, r) for c in range(-(-width // 256)) for r in range(-(-height // 256))]
    rng = np.random.default_rng(seed)
    coords = view.store.coords
    for index in range(n_views):
        level = geometry.max_level - index % 3
        scale = 2 ** (geometry.max_level - level)
        if index % 4 == 3:  # a view of background
            x, y = rng.uniform(0, geometry.width), rng.uniform(0, geometry.height)
        else:
            x, y = coords[rng.integers(len(coords))]
        width, height = geometry.level_size(level)
        c0, r0 = int(x / scale) // 256 - VIEW_TILES[0] // 2, int(y / scale) // 256 - VIEW_TILES[1] // 2
        wanted += [(level, c, r) for c in range(c0, c0 + VIEW_TILES[0]) for r in range(r0, r0 + VIEW_TILES[1])
                   if 0 <= c * 256 < width and 0 <= r * 256 < height]
    wanted = list(dict.fromkeys(wanted))
    return ([f"{base}/slide/{level}/{c}_{r}.jpeg" for level, c, r in wanted]
            + [f"{base}/attention/{level}/{c}_{r}.png" for level, c, r in wanted])


def run_pass(port: int, urls: list[str], clients: int) -> dict:
    """Every URL once, from ``clients`` threads with a keep-alive connection each: latencies and rate."""
    local = threading.local()

    def fetch(url: str) -> tuple[str, float]:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        start = time.perf_counter()
        local.connection.request("GET", url)
        response = local.connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
        return url, (time.perf_counter() - start) * 1000

    order = list(urls)
    np.random.default_rng(1).shuffle(order)  # a browser asks for both layers and several levels at once
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(fetch, order))
    wall = time.perf_counter() - start
    summary = {"tiles": len(results), "wall_s": round(wall, 3), "tiles_per_s": round(len(results) / wall, 1)}
    for layer in ("slide", "attention"):
        ms = [latency for url, latency in results if f"/{layer}/" in url]
        summary[layer] = {"median_ms": round(statistics.median(ms), 2),
                          "p95_ms": round(float(np.percentile(ms, 95)), 2), "n": len(ms)}
    ms = [latency for _, latency in results]
    summary["all"] = {"median_ms": round(statistics.median(ms), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}
    return summary


def in_process(slide, urls: list[str]) -> dict:
    """The same slide tiles made in this process, one thread, JPEG included (no HTTP, no cache): with
    the viewer's :func:`~ips_path.review.view.tiles.slide_tile` and with openslide's DeepZoomGenerator."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    from ips_path.review.view.tiles import JPEG_QUALITY, DeepZoomGeometry, slide_tile

    tiles = []
    for url in urls:
        if "/slide/" in url:
            level, position = url.rsplit("/", 2)[1:]
            col, row = position.removesuffix(".jpeg").split("_")
            tiles.append((int(level), int(col), int(row)))
    geometry = DeepZoomGeometry(*slide.dimensions)

    def ipspath_tile(level: int, col: int, row: int) -> None:
        slide_tile(slide, geometry, level, col, row)

    with openslide.OpenSlide(str(slide.path)) as handle:
        generator = DeepZoomGenerator(handle, tile_size=256, overlap=0)

        def openslide_tile(level: int, col: int, row: int) -> None:
            generator.get_tile(level, (col, row)).save(io.BytesIO(), format="JPEG", quality=JPEG_QUALITY)

        result = {}
        for name, make in (("ipspath_slide_tile", ipspath_tile), ("openslide_deep_zoom_generator", openslide_tile)):
            ms = []
            for tile in tiles:
                start = time.perf_counter()
                make(*tile)
                ms.append((time.perf_counter() - start) * 1000)
            result[name] = {"median_ms": round(statistics.median(ms), 2),
                            "p95_ms": round(float(np.percentile(ms, 95)), 2), "n": len(ms)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the parallel passes")
    parser.add_argument("--views", type=int, default=12, help="zoomed views (5 x 4 tiles each) after the home view")
    parser.add_argument("--cache-mb", type=int, default=256, help="tile cache of the server, MiB")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "ipspath_tile_bench",
                        help="folder for the generated slide and its tile store (outside the repository)")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    store_path, run = prepare(args.scratch)
    server, app, slide_id = serve(store_path, run, args.cache_mb)
    try:
        view = app.cohort.slide(slide_id)
        urls = tile_requests(app, slide_id, args.views)
        port = server.server_address[1]
        passes = {}
        for clients in (1, args.clients):
            app.cache.clear()
            passes[f"{clients}_clients"] = {"cold": run_pass(port, urls, clients),
                                            "warm": run_pass(port, urls, clients)}
        result = {
            "command": f"python -m bench.view_bench --clients {args.clients} --views {args.views}",
            "load_avg_at_start": load_at_start,
            "slide": {"path": str(view.slide.path), "dimensions": list(view.slide.dimensions),
                      "backend": view.slide.backend, "downsamples": list(view.slide.level_downsamples),
                      "n_patches": view.store.n_patches},
            "tile_px": 256, "requests_per_pass": len(urls), "cache_mb": args.cache_mb,
            "passes": passes,
            "slide_tiles_in_process_1_thread": in_process(view.slide, urls),
        }
    finally:
        server.shutdown()
        server.server_close()
        app.cohort.close()
    save_result("view_bench", result)


if __name__ == "__main__":
    main()
