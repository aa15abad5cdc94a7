"""`ipspath view`: tiles that match the slide and its scores, a server that serves only what the
prediction folder records, a token that is enforced, and a viewer that draws in a real browser."""

from __future__ import annotations

import http.client
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import h5py
import numpy as np
import pytest
from PIL import Image

from ips_path.inference.predict import predict
from ips_path.review.heatmap import colormap_lut, percentile_ranks, score_grid
from ips_path.review.report import write_report
from ips_path.review.view.cohort import open_cohort
from ips_path.review.view.server import TOKEN_COOKIE, ViewerApp, make_server
from ips_path.review.view.tiles import DeepZoomGeometry, TileCache, TileNotFound, attention_tile, slide_tile

CHROMIUM = Path("/usr/bin/chromium")
VIRIDIS_TOP = colormap_lut("viridis")[255].astype(int)


@pytest.fixture(scope="module")
def pred(cohort, trained_run, tmp_path_factory) -> Path:
    """A prediction folder of the generated cohort (real model, real stores), with its report."""
    manifest, tiles = cohort
    out = tmp_path_factory.mktemp("view") / "pred"
    predict(trained_run, out, manifest=manifest, tiles_dir=tiles, heatmap_options={"thumbnail_size": 256, "top_k": 4},
            progress=False)
    write_report(out)
    return out


class Running:
    """A viewer server on a free port, in a thread."""

    def __init__(self, pred_dir: Path, token: str | None = None):
        self.cohort = open_cohort(pred_dir)
        self.app = ViewerApp(self.cohort, token=token, cache_bytes=8 * 2**20)
        self.server = make_server(self.app, "127.0.0.1", 0)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
        """The raw path is sent as is (no normalisation), like a hostile client would."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in {"Host": f"127.0.0.1:{self.port}", **(headers or {})}.items():
                connection.putheader(name, value)
            connection.endheaders()
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.cohort.close()


@pytest.fixture(scope="module")
def running(pred):
    server = Running(pred)
    yield server
    server.close()


def _top_patch(cohort, slide_id):
    view = cohort.slide(slide_id)
    index = int(np.argmax(view.scores))
    return view, index, view.store.coords[index]


def _tile_url(view, layer: str, level: int, col: int, row: int) -> str:
    ext = "jpeg" if layer == "slide" else "png"
    return f"/tiles/{quote(view.slide_id, safe='')}/{view.version}/{layer}/{level}/{col}_{row}.{ext}"


# -- tiles ------------------------------------------------------------------------------------------

def test_deep_zoom_geometry_halves_down_to_one_pixel():
    geometry = DeepZoomGeometry(1000, 700, tile_size=256)
    assert geometry.max_level == 10  # 2**10 = 1024 >= 1000
    assert geometry.level_size(10) == (1000, 700)
    assert geometry.level_size(9) == (500, 350)
    assert geometry.level_size(0) == (1, 1)
    origin, size, downsample = geometry.tile_region(10, 3, 2)
    assert origin == (768, 512) and size == (232, 188) and downsample == 1
    assert geometry.tile_region(8, 0, 0) == ((0, 0), (250, 175), 4)
    for bad in [(11, 0, 0), (-1, 0, 0), (10, 4, 0), (10, 0, 3), (10, -1, 0)]:
        with pytest.raises(TileNotFound):
            geometry.tile_region(*bad)
    assert DeepZoomGeometry(1, 1).max_level == 0


def test_slide_tiles_are_the_slide_pixels(running):
    view = running.cohort.slide(running.cohort.ids[0])
    geometry = DeepZoomGeometry(*view.slide.dimensions)
    tile = np.asarray(Image.open(io.BytesIO(slide_tile(view.slide, geometry, geometry.max_level, 1, 1))))
    truth = view.slide.read_region((256, 256), 0, tile.shape[1::-1])
    assert tile.shape == (256, 256, 3)
    assert np.abs(tile.astype(int) - truth).mean() < 4  # JPEG
    # a coarser level is the same picture, halved
    half = np.asarray(Image.open(io.BytesIO(slide_tile(view.slide, geometry, geometry.max_level - 1, 0, 0))))
    expected = np.asarray(Image.fromarray(view.slide.read_region((0, 0), 0, (512, 512))).reduce(2))
    assert np.abs(half.astype(int) - expected).mean() < 6


def test_attention_tiles_colour_patches_by_rank_and_nothing_else():
    coords = np.array([[0, 0], [32, 0], [64, 32]])
    scores = np.array([0.1, 5.0, -2.0])
    grid = score_grid(coords, percentile_ranks(scores), 32, 32)
    lut = colormap_lut("viridis")
    geometry = DeepZoomGeometry(128, 96, tile_size=256)
    rgba = np.asarray(Image.open(io.BytesIO(attention_tile(grid, geometry, geometry.max_level, 0, 0, lut))))
    assert rgba.shape == (96, 128, 4)
    assert (rgba[0:32, 32:64] == [*lut[255], 255]).all()  # the top patch, sharp to the pixel
    assert (rgba[32:64, 64:96] == [*lut[0], 255]).all()
    assert (rgba[40:, :60, 3] == 0).all() and (rgba[0:32, 96:, 3] == 0).all()  # transparent off the patches
    # two levels down, a tile pixel covers 4 x 4 slide pixels: still edges on the patch borders
    low = np.asarray(Image.open(io.BytesIO(attention_tile(grid, geometry, geometry.max_level - 2, 0, 0, lut))))
    assert low.shape == (24, 32, 4) and (low[0:8, 8:16] == [*lut[255], 255]).all()
    far = DeepZoomGeometry(10_000, 10_000)
    assert attention_tile(grid, far, far.max_level, 5, 5, lut) is None


def test_tile_cache_keeps_the_most_recent_within_its_budget():
    cache = TileCache(max_bytes=3 * (128 + 1000))
    for key in "abc":
        cache.put((key,), b"x" * 1000)
    assert cache.get(("a",)) == (True, b"x" * 1000)  # a is now the most recent
    cache.put(("d",), b"y" * 1000)
    assert cache.get(("b",)) == (False, None) and cache.get(("a",))[0] and cache.get(("d",))[0]
    assert cache.size_bytes <= cache.max_bytes
    cache.put(("empty",), None)
    assert cache.get(("empty",)) == (True, None)
    cache.put(("huge",), b"z" * 10_000)  # larger than the budget: not kept, nothing evicted for it
    assert cache.get(("huge",)) == (False, None) and cache.get(("d",))[0]


# -- the server -------------------------------------------------------------------------------------

def test_server_serves_report_viewer_info_and_tiles(running, pred):
    cohort = running.cohort
    status, headers, body = running.get("/")
    assert status == 200 and b'name="ipspath-viewer"' in body and b"report_assets/report.js" in body
    status, _, css = running.get("/report_assets/report.css")
    assert status == 200 and css == (pred / "report_assets" / "report.css").read_bytes()
    slide_id = cohort.ids[0]
    assert running.get(f"/heatmaps/{quote(slide_id)}/overlay.png")[0] == 200
    status, headers, page = running.get(f"/view/{quote(slide_id, safe='')}")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"openseadragon.min.js" in page
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    status, _, raw = running.get(f"/api/slide/{quote(slide_id, safe='')}")
    info = json.loads(raw)
    view, index, (x, y) = _top_patch(cohort, slide_id)
    assert status == 200 and (info["width"], info["height"]) == view.slide.dimensions
    assert info["prediction"]["classes"] == ["negative", "positive"]
    assert len(info["patches"]["coords"]) == 2 * view.store.n_patches and info["contours"]
    assert info["next"] == cohort.ids[1] and info["previous"] is None
    level = info["max_level"]
    status, headers, jpeg = running.get(_tile_url(view, "slide", level, 0, 0))
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and "immutable" in headers["Cache-Control"]
    assert Image.open(io.BytesIO(jpeg)).size == (256, 256)
    col, row = int(x + 8) // 256, int(y + 8) // 256
    status, headers, png = running.get(_tile_url(view, "attention", level, col, row))
    rgba = np.asarray(Image.open(io.BytesIO(png)))
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert (rgba[int(y + 8) % 256, int(x + 8) % 256] == [*VIRIDIS_TOP, 255]).all()
    hits = running.app.cache.hits
    assert running.get(_tile_url(view, "slide", level, 0, 0))[2] == jpeg and running.app.cache.hits == hits + 1
    assert running.get(_tile_url(view, "slide", level, 0, 0), method="HEAD")[0] == 200


def test_without_a_report_the_first_page_lists_the_slides(pred, tmp_path):
    bare = tmp_path / "pred"
    shutil.copytree(pred, bare, ignore=shutil.ignore_patterns("report.html", "report_assets"))
    server = Running(bare)
    try:
        status, _, body = server.get("/")
        assert status == 200 and body.count(b'href="view/') == len(server.cohort.ids)
        assert server.get("/report.html")[0] == 404 and server.get("/report_assets/report.js")[0] == 404
    finally:
        server.close()


def test_concurrent_tile_requests_all_get_their_tile(running):
    view = running.cohort.slide(running.cohort.ids[1])
    geometry = DeepZoomGeometry(*view.slide.dimensions)
    level = geometry.max_level - 1
    columns, rows = (-(-side // 256) for side in geometry.level_size(level))
    urls = [_tile_url(view, layer, level, col, row) for layer in ("slide", "attention")
            for col in range(columns) for row in range(rows)] * 4
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(running.get, urls))
    assert all(status == 200 for status, _, _ in results)
    by_url: dict[str, set[bytes]] = {}
    for url, (_, _, body) in zip(urls, results, strict=True):
        by_url.setdefault(url, set()).add(body)
    assert all(len(bodies) == 1 for bodies in by_url.values())  # the same bytes, cached or not


HOSTILE = [
    "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/cohort.py", "/static/..%2f..%2fcohort.py", "/heatmaps/../run.json", "/run.json",
    "/predictions.csv", "/status/", "/scores/", "/view/..%2F..%2Fetc%2Fpasswd", "/view/", "/view/nope",
    "/api/slide/..%2Frun.json", "/api/slide/", "/tiles/%2E%2E/x/slide/0/0_0.jpeg", "/report.html%00.png",
    "/heatmaps/%00/overlay.png", "/%ff%fe", "//etc/passwd", "/static//etc/passwd", "/tiles/{id}/{v}/slide/99/0_0.jpeg",
    "/tiles/{id}/{v}/slide/-1/0_0.jpeg", "/tiles/{id}/{v}/slide/5/99999_0.jpeg", "/tiles/{id}/{v}/slide/abc/0_0.jpeg",
    "/tiles/{id}/{v}/slide/3/0_0_0.jpeg", "/tiles/{id}/{v}/slide/99999999999999999999/0_0.jpeg",
    "/tiles/{id}/{v}/slide/3/0.jpeg", "/tiles/{id}/{v}/slide/3/%D9%A1_0.jpeg", "/tiles/{id}/{v}/attention/0/3/0_0.png",
    "/tiles/{id}/{v}/attention/3/0_0.jpeg", "/tiles/{id}/{v}/slide/3/0_0.png", "/tiles/{id}/{v}/slide/3/.jpeg",
    "/tiles/{id}/0000/slide/3/0_0.jpeg", "/tiles/{id}/{v}/other/3/0_0.jpeg",
    "/tiles/nope/{v}/slide/3/0_0.jpeg", "http://evil.example/etc/passwd", "/?token=x&" + "a=1&" * 50,
    "/" + "a" * 70_000,
]


def test_hostile_urls_get_4xx_and_no_file_content(running, pred):
    view = running.cohort.slide(running.cohort.ids[0])
    secrets = [b"root:", b"import ", (pred / "run.json").read_bytes()[:40], b"slide_id,label"]
    for template in HOSTILE:
        path = template.replace("{id}", quote(view.slide_id, safe="")).replace("{v}", view.version)
        status, headers, body = running.get(path)
        assert 400 <= status < 500, (path[:80], status)
        if status != 200:
            assert b"Traceback" not in body and not any(s in body for s in secrets), path[:80]
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        assert running.get("/", method=method)[0] == 405
    # a page on another site reaching 127.0.0.1 through its own DNS name is refused
    status, _, _ = running.get("/", headers={"Host": "evil.example:80"})
    assert status == 403
    assert running.get("/", headers={"Host": f"localhost:{running.port}"})[0] == 200


def test_token_is_required_when_set(pred):
    server = Running(pred, token="s3cret-token")
    try:
        slide_id = quote(server.cohort.ids[0], safe="")
        paths = ("/", f"/view/{slide_id}", f"/api/slide/{slide_id}", "/static/viewer.js", "/report_assets/report.css")
        for path in paths:
            status, _, body = server.get(path)
            assert status == 403 and b"token" in body, path
            assert server.get(path + "?token=wrong")[0] == 403
            assert server.get(path, headers={"Cookie": f"{TOKEN_COOKIE}=wrong"})[0] == 403
        status, headers, _ = server.get("/?token=s3cret-token")
        assert status == 200 and "HttpOnly" in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        assert server.get(f"/api/slide/{slide_id}", headers={"Cookie": cookie})[0] == 200
        # with a token the Host header is free: the server is meant to be reached by name
        assert server.get("/?token=s3cret-token", headers={"Host": "pathology-box:8000"})[0] == 200
    finally:
        server.close()


def test_cli_refuses_what_it_cannot_serve(tmp_path, pred, capsys):
    from ips_path.cli.main import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["view", str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "predictions.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["view", str(pred), "--port", "-1"])
    assert exit_info.value.code == 2
    busy = Running(pred)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["view", str(pred), "--port", str(busy.port)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"127.0.0.1:{busy.port}" in err and "--port" in err
        assert "Traceback" not in err
    finally:
        busy.close()
    # a tile store that disappeared is found at start, not at the first tile
    moved = tmp_path / "moved"
    shutil.copytree(pred, moved)
    run = json.loads((moved / "run.json").read_text())
    shutil.copytree(run["tiles"], tmp_path / "tiles")
    run["tiles"] = str(tmp_path / "tiles")
    (moved / "run.json").write_text(json.dumps(run))
    shutil.rmtree(tmp_path / "tiles" / f"{open_cohort(pred).ids[0]}.zarr")
    with pytest.raises(SystemExit) as exit_info:
        main(["view", str(moved)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no tile store" in err and open_cohort(pred).ids[0] in err


def test_ipspath_view_on_all_addresses_prints_a_token_and_enforces_it(pred):
    process = subprocess.Popen([sys.executable, "-m", "ips_path.cli.main", "view", str(pred), "--port", "0",
                                "--host", "0.0.0.0"], stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        url = line.split(" at ")[1].split()[0]
        assert "?token=" in url, line
        port, token = int(url.split(":")[2].split("/")[0]), url.split("?token=")[1]
        assert len(token) >= 30

        def status(path: str) -> int:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", path)
            return connection.getresponse().status

        assert status("/") == 403 and status("/static/viewer.js") == 403
        assert status(f"/?token={token}") == 200 and status(f"/static/viewer.js?token={token}") == 200
    finally:
        process.send_signal(2)
        process.wait(timeout=30)


def test_ipspath_view_serves_until_interrupted(pred):
    process = subprocess.Popen([sys.executable, "-m", "ips_path.cli.main", "view", str(pred), "--port", "0"],
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert "http://127.0.0.1:" in line and "token" not in line, line
        url = line.split(" at ")[1].split()[0]
        port = int(url.rsplit(":", 1)[1].strip("/"))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/")
        assert connection.getresponse().status == 200
    finally:
        process.send_signal(2)
        process.wait(timeout=30)
    assert process.returncode == 130


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ipspath_view_started_with_ctrl_c_ignored_still_stops_on_it_and_on_sigterm(pred, stop):
    # Shells start background jobs (`ipspath view ... &` in a script) with SIGINT ignored, and children
    # inherit that; the server must stop anyway.
    process = subprocess.Popen([sys.executable, "-m", "ips_path.cli.main", "view", str(pred), "--port", "0"],
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert "http://127.0.0.1:" in process.stderr.readline()
        process.send_signal(stop)
        assert process.wait(timeout=30) == 130
    finally:
        process.kill()
        process.wait()


# -- in a real browser ------------------------------------------------------------------------------

class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (no extra package).

    Unlike ``--screenshot``, it waits for a condition in the page before taking the picture and
    keeps the viewport's size fixed, so what is measured is what the page drew.
    """

    def __init__(self, profile: Path, width: int = 1200, height: int = 800):
        import os

        self._commands_read, self._commands = os.pipe()
        self._replies, self._replies_write = os.pipe()
        wanted = {3: self._commands_read, 4: self._replies_write}

        def pipes_on_3_and_4():  # Chromium reads commands from fd 3 and writes replies to fd 4
            for target, fd in wanted.items():
                os.dup2(os.dup(fd), target)

        self.process = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), preexec_fn=pipes_on_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(self._commands_read)
        os.close(self._replies_write)
        self._buffer = b""
        self._next_id = 0
        target = self._call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _call(self, method: str, session: str | None = None, **params) -> dict:
        import os

        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._replies, 1 << 20)
                assert chunk, "chromium closed the pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def call(self, method: str, **params) -> dict:
        return self._call(method, self._session, **params)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def open(self, url: str, until: str = "true", timeout: float = 60) -> None:
        """Load ``url`` and wait until the JavaScript expression ``until`` is true."""
        self.call("Page.navigate", url="about:blank")  # a new document even when only the #fragment differs
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"document.readyState === 'complete' && Boolean({until})"):
            assert time.monotonic() < deadline, f"timed out waiting for {until} on {url}"
            time.sleep(0.2)

    def screenshot(self) -> np.ndarray:
        import base64

        self.evaluate("new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
        data = self.call("Page.captureScreenshot", format="png")["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)

    def close(self) -> None:
        import os

        os.close(self._commands)
        os.close(self._replies)
        self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture()
def browser(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    browser = Browser(tmp_path / "chromium-profile")
    yield browser
    browser.close()


# every layer loaded, nothing moving: the picture is final
DRAWN = ("window.ipspathViewer && ipspathViewer.world.getItemCount() === 2 && "
         "ipspathViewer.world.getItemAt(0).getFullyLoaded() && ipspathViewer.world.getItemAt(1).getFullyLoaded() && "
         "!ipspathViewer.world.needsDraw()")


def test_browser_draws_slide_and_attention_and_zooms_to_the_top_patch(running, browser):
    slide_id = running.cohort.ids[0]
    page = f"{running.url}/view/{quote(slide_id, safe='')}"
    browser.open(page + "#opacity=0", until=DRAWN)
    data = browser.evaluate("Object.assign({}, document.body.dataset)")
    assert data["ready"] == "1" and int(data["slideTiles"]) > 0 and int(data["attentionTiles"]) > 0
    assert "failedTiles" not in data
    # the slide is drawn: not a blank page
    viewer = browser.screenshot()[100:700, 100:850]
    assert viewer.std() > 10 and (np.abs(viewer - [255, 255, 255]).sum(axis=2) > 60).mean() > 0.05
    # zoomed to the most attended patch (outlined in red) with the overlay opaque: the top colour fills it
    browser.open(page + "#opacity=100&top=1", until=DRAWN)
    assert browser.evaluate("document.body.dataset.zoomedRank") == "1"
    pixels = browser.screenshot()
    x0, y0, x1, y1 = _selection_box(pixels)
    assert x1 - x0 > 100 and abs((x1 - x0) - (y1 - y0)) <= 2, "zoomed in, the square patch fills a good part"
    inner = pixels[y0 + 6:y1 - 6, x0 + 6:x1 - 6]
    assert np.abs(inner.mean(axis=(0, 1)) - VIRIDIS_TOP).max() < 12, inner.mean(axis=(0, 1))
    # with the overlay transparent the same place shows the slide, not the top colour
    browser.open(page + "#opacity=0&top=1", until=DRAWN)
    plain = browser.screenshot()
    assert _selection_box(plain) == (x0, y0, x1, y1)
    assert np.abs(plain[y0 + 6:y1 - 6, x0 + 6:x1 - 6].mean(axis=(0, 1)) - VIRIDIS_TOP).max() > 60
    # the pointer on a neighbour of the top patch tells that patch's rank and attention logit
    view, _, (x, y) = _top_patch(running.cohort, slide_id)
    size = view.store.patch_size_level0
    neighbours = [(dx, dy, np.flatnonzero((view.store.coords == [x + dx * size, y + dy * size]).all(axis=1)))
                  for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
    dx, dy, (index,) = next(n for n in neighbours if len(n[2]))
    side = x1 - x0
    browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=(x0 + x1) / 2 + dx * side,
                 y=(y0 + y1) / 2 + dy * side)
    info = browser.evaluate("document.getElementById('patch-info').textContent")
    rank = 1 + int((view.scores > view.scores[index]).sum())
    assert f"rank: {rank} of {view.store.n_patches}" in info, info
    shown = float(re.search(r"attention logit: ([-+.\de]+)", info).group(1))
    assert shown == pytest.approx(float(view.scores[index]), rel=2e-3), info
    # tissue contour and patch grid are drawn only when asked for
    contour_colour = np.array([27, 110, 243])
    browser.evaluate("document.getElementById('show-contour').click()")
    assert _pixels_near(browser.screenshot(), contour_colour) > _pixels_near(plain, contour_colour) + 50
    browser.open(page + "#opacity=0", until=DRAWN)
    before = browser.screenshot()
    browser.evaluate("document.getElementById('show-grid').click()")
    after = browser.screenshot()
    darker = (after.sum(axis=2) < before.sum(axis=2) - 60).sum()
    assert darker > 200, "the grid darkens the patch borders"


def _pixels_near(pixels: np.ndarray, colour: np.ndarray, tolerance: int = 40) -> int:
    return int((np.abs(pixels - colour).sum(axis=2) < tolerance).sum())


def _selection_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the red outline the viewer draws around the selected patch."""
    red = (pixels[..., 0] > 220) & (pixels[..., 1] < 90) & (pixels[..., 2] > 50) & (pixels[..., 2] < 130)
    ys, xs = np.nonzero(red)
    assert len(xs) > 100, "no selection outline in the screenshot"
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def test_browser_needs_the_token_and_report_links_to_the_viewer(pred, browser):
    server = Running(pred, token="t0ken-for-the-browser")
    try:
        browser.open(server.url + "/")
        assert "needs its access token" in browser.evaluate("document.body.textContent")
        shown = "(document.getElementById('shown-count') || {}).textContent"
        browser.open(server.url + "/?token=t0ken-for-the-browser", until=shown)
        # the cookie set with the page let its script load: it ran, and linked each card to its viewer
        assert browser.evaluate(shown) == "Showing 8 of 8 slides"
        hrefs = browser.evaluate("Array.from(document.querySelectorAll('a.viewer-link'), (a) => a.href)")
        assert sorted(hrefs) == sorted(f"{server.url}/view/{quote(s, safe='')}" for s in server.cohort.ids)
        browser.open(hrefs[0], until=DRAWN)  # and the viewer works with the cookie alone
        assert int(browser.evaluate("document.body.dataset.slideTiles")) > 0
    finally:
        server.close()
    browser.open((pred / "report.html").as_uri(), until="document.getElementById('shown-count').textContent")
    assert browser.evaluate("document.querySelectorAll('a.viewer-link').length") == 0  # offline: no links


@pytest.fixture(scope="module")
def two_task_pred(pred, tmp_path_factory) -> Path:
    """The prediction folder as a two-task run would leave it: each store also holds ``task_scores/<run>``
    (task "tumour" = the run's attention, task "margin" = its reverse), on copies of the stores."""
    from ips_path.inference.predictions import PredictionFolder
    from ips_path.review.heatmap import TASK_SCORES_GROUP
    from ips_path.stores.tile_store import TileStore

    root = tmp_path_factory.mktemp("two_tasks")
    out = root / "pred"
    shutil.copytree(pred, out)
    folder = PredictionFolder(out)
    info = folder.read_run()
    shutil.copytree(info["tiles"], root / "tiles")
    folder.write_run({**info, "tiles": str(root / "tiles")})
    for path in (root / "tiles").glob("*.zarr"):
        store = TileStore.open(path)
        scores = store.read_array(f"scores/{info['run']}")
        store.write_array(f"{TASK_SCORES_GROUP}/{info['run']}", np.stack([scores, -scores]),
                          attrs={"tasks": ["tumour", "margin"]})
    return out


def test_a_multi_task_run_shows_each_tasks_attention(two_task_pred, pred):
    one_task = Running(pred)
    running = Running(two_task_pred)
    try:
        slide_id = running.cohort.ids[0]
        _, _, body = one_task.get(f"/api/slide/{quote(slide_id)}")
        assert json.loads(body)["tasks"] == []  # one task: no chooser, and predict kept no per-task copy
        assert one_task.cohort.slide(slide_id).store.array_names("task_scores") == []
        with h5py.File(pred / "scores" / f"{slide_id}_scores.h5") as f:
            assert "attention_scores" in f and "task_attention_scores" not in f
        status, _, body = running.get(f"/api/slide/{quote(slide_id)}")
        info = json.loads(body)
        assert status == 200 and [t["name"] for t in info["tasks"]] == ["tumour", "margin"]
        view = running.cohort.slide(slide_id)
        top_first, top_second = (int(np.argmax(t["scores"])) for t in info["tasks"])
        assert top_first != top_second and top_second == int(np.argmin(view.scores))
        geometry = DeepZoomGeometry(*view.slide.dimensions)
        level = geometry.max_level - 2
        tiles = []
        for task in info["tasks"]:
            status, _, tile = running.get(_tile_url(view, task["layer"], level, 0, 0))
            assert status == 200
            tiles.append(np.asarray(Image.open(io.BytesIO(tile))).astype(int))
        # the same patches, coloured in reverse: the top patch of one task is the bottom of the other
        opaque = tiles[0][..., 3] == 255
        assert opaque.any() and (tiles[1][..., 3] == tiles[0][..., 3]).all()
        assert np.abs(tiles[0][opaque][:, :3] - tiles[1][opaque][:, :3]).mean() > 30
        mean_layer = np.asarray(Image.open(io.BytesIO(running.get(_tile_url(view, "attention", level, 0, 0))[2])))
        assert (mean_layer == tiles[0]).all()  # task "tumour" holds the run's attention itself
        for bad in ("attention-2", "attention-x", "attention-", "attentionx"):
            assert running.get(_tile_url(view, bad, level, 0, 0))[0] == 404
    finally:
        running.close()
        one_task.close()


def test_browser_task_chooser_switches_attention_layer_and_top_list(two_task_pred, running, browser):
    slide_id = running.cohort.ids[0]
    browser.open(f"{running.url}/view/{quote(slide_id, safe='')}", until=DRAWN)
    assert browser.evaluate("document.getElementById('task-chooser').hidden") is True  # one task: no chooser
    multi = Running(two_task_pred)
    try:
        view = multi.cohort.slide(slide_id)
        browser.open(f"{multi.url}/view/{quote(slide_id, safe='')}#opacity=100", until=DRAWN)
        first_top = "Number(document.querySelector('#top-list li').dataset.index)"
        assert browser.evaluate("document.getElementById('task-chooser').hidden") is False
        assert browser.evaluate("Array.from(document.getElementById('task').options).map((o) => o.text)") == [
            "all tasks (mean)", "tumour", "margin"]
        assert browser.evaluate(first_top) == int(np.argmax(view.scores))
        before = browser.screenshot()
        browser.evaluate("const s = document.getElementById('task'); s.value = 'attention-1';"
                         "s.dispatchEvent(new Event('change'))")
        deadline = time.monotonic() + 60
        while not browser.evaluate(f"document.body.dataset.task === 'attention-1' && {DRAWN}"):
            assert time.monotonic() < deadline, "the margin task's layer never drew"
            time.sleep(0.2)
        assert browser.evaluate(first_top) == int(np.argmax(view.task_scores[1]))
        assert browser.evaluate(first_top) != int(np.argmax(view.scores))
        after = browser.screenshot()
        assert np.abs(after[100:700, 100:850].astype(int) - before[100:700, 100:850]).mean() > 5
    finally:
        multi.close()
