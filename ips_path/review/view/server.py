"""The viewer's HTTP server: the standard library's threaded server, one thread per connection.

Routes (GET and HEAD only)::

    /                                   the report page (report.html) if the folder has one, else a slide list
    /<file the report references>       its pictures, CSS and script, inside the prediction folder
    /view/<slide_id>                    the viewer page of one slide
    /api/slide/<slide_id>               what the page needs: geometry, prediction, patches, contours (JSON)
    /tiles/<slide_id>/<version>/slide/<level>/<col>_<row>.jpeg
    /tiles/<slide_id>/<version>/attention/<level>/<col>_<row>.png
    /tiles/<slide_id>/<version>/attention-<task>/<level>/<col>_<row>.png   task number <task> of a multi-task run
    /tiles/<slide_id>/<version>/weight[-<task>]/<level>/<col>_<row>.png    the same on the weight scale
    /static/<asset>                     the viewer's script, style and OpenSeadragon, shipped in the package

Every name in a URL is looked up in what :func:`~ips_path.review.view.cohort.open_cohort` recorded or
in the assets loaded at start; no URL is ever turned into a file path, so no request can read a
file the prediction folder does not record. Tiles are made in the request's thread (slide reads
and numpy release the GIL, so the browser's parallel requests run in parallel), kept in a
:class:`~ips_path.review.view.tiles.TileCache`, and carry the slide's version in their URL, so browsers
may keep them for good.

Access: bound to 127.0.0.1 by default, where only requests naming a loopback host are answered
(a web page elsewhere cannot reach the viewer through a DNS name pointing at 127.0.0.1). On any
other address a random token is required: the printed URL carries it, the first page sets it as a
cookie for the requests that follow, and requests without it get 403.
"""

from __future__ import annotations

import hmac
import html
import http.cookies
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from string import Template
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np

from ips_path.review.heatmap import COLORMAPS, SCALES, ScoreGrid, attention_spread, colormap_lut, scale_legend
from ips_path.review.view.cohort import REPORT_NAME, Cohort, SlideView, folder_state, open_cohort
from ips_path.review.view.tiles import (
    EMPTY_TILE_PNG,
    DeepZoomGeometry,
    TileCache,
    TileNotFound,
    attention_tile,
    slide_tile,
)
from ips_path.runtime.errors import BadInputError, IpspathError

__all__ = ["TOKEN_COOKIE", "ViewerApp", "make_server", "new_token", "serve", "viewer_url"]

log = logging.getLogger(__name__)

TOKEN_COOKIE = "ipspath_view_token"
_LOOPBACK_NAMES = ("localhost",)
_CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                  ".png": "image/png", ".jpeg": "image/jpeg", ".jpg": "image/jpeg", ".txt": "text/plain; charset=utf-8",
                  ".html": "text/html; charset=utf-8", ".json": "application/json", ".geojson": "application/json",
                  ".svg": "image/svg+xml"}
# Tile URLs hold the slide's version: a changed slide or rerun gets new URLs, so tiles never go stale.
_TILE_CACHE_CONTROL = "private, max-age=31536000, immutable"
_ASSET_CACHE_CONTROL = "private, max-age=3600"
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}
# Marks a report page served by the viewer: report.js then shows the cards' viewer links.
_REPORT_MARK = '<meta name="ipspath-viewer" content="view/">'
_TOP_K = 16
_MAX_QUERY_FIELDS = 8
_COLOUR_BAR_STOPS = 11


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class ViewerApp:
    """What the handler serves: a cohort, its tiles, the packaged assets and the access rule.

    Parameters
    ----------
    cohort : Cohort
    token : str, optional
        Access token every request must carry (query ``token=`` or the cookie it sets); None
        for none (loopback only).
    colormap : str
        One of :data:`~ips_path.review.heatmap.COLORMAPS`.
    cache_bytes : int
        Budget of the tile cache, bytes.
    """

    def __init__(self, cohort: Cohort, *, token: str | None = None, colormap: str = "viridis",
                 cache_bytes: int = 256 * 2**20):
        if colormap not in COLORMAPS:
            raise BadInputError(f"unknown colormap {colormap!r}: use one of {', '.join(COLORMAPS)}")
        self._cohort = cohort
        self._state = folder_state(cohort.pred_dir)
        self._reload_lock = threading.Lock()
        self._retired: list[Cohort] = []  # replaced cohorts, closed at the end: a request may still read them
        self.token = token
        self.colormap = colormap
        self.lut = colormap_lut(colormap)
        self.cache = TileCache(cache_bytes)
        self.assets = _load_assets()
        self.loopback_only = token is None
        self._info: dict[str, bytes] = {}
        self._page = Template(resources.files(__package__).joinpath("viewer.html").read_text(encoding="utf-8"))

    @property
    def cohort(self) -> Cohort:
        """The folder's slides as they are now: read again when ``ipspath predict`` rewrote the folder
        (another model, ``--overwrite``), so pages never mix the old predictions with the new ones.

        Raises
        ------
        _HttpError
            503 while the rewritten folder cannot be read (predict is still writing it).
        """
        if folder_state(self._cohort.pred_dir) != self._state:
            with self._reload_lock:
                state = folder_state(self._cohort.pred_dir)
                if state != self._state:
                    try:
                        cohort = open_cohort(self._cohort.pred_dir)
                    except BadInputError as exc:
                        raise _HttpError(HTTPStatus.SERVICE_UNAVAILABLE, f"the prediction folder changed and cannot "
                                         f"be read now ({exc}); reload the page once `ipspath predict` has "
                                         "finished") from None
                    log.warning("%s changed (predicted again): showing its %d slides as they are now",
                                cohort.pred_dir, len(cohort.ids))
                    self._retired.append(self._cohort)
                    self._cohort, self._state, self._info = cohort, state, {}
        return self._cohort

    def close(self) -> None:
        """Close every slide of the cohorts shown."""
        for cohort in (*self._retired, self._cohort):
            cohort.close()

    # -- pages ---------------------------------------------------------------------------------

    def index_page(self) -> tuple[bytes, str]:
        files = self.cohort.report_files()
        if REPORT_NAME in files:
            text = files[REPORT_NAME].read_text(encoding="utf-8", errors="replace")
            text = text.replace("<head>", "<head>" + _REPORT_MARK, 1)
            return text.encode(), _CONTENT_TYPES[".html"]
        items = "".join(f'<li><a href="view/{quote(s, safe="")}">{html.escape(s)}</a></li>' for s in self.cohort.ids)
        text = (f'<!doctype html><html><head><meta charset="utf-8"><title>ipspath view</title>'
                f'<link rel="stylesheet" href="static/viewer.css"></head><body class="index"><h1>Slides in '
                f'{html.escape(self.cohort.pred_dir.resolve().name)}</h1><ul>{items}</ul></body></html>')
        return text.encode(), _CONTENT_TYPES[".html"]

    def viewer_page(self, slide_id: str) -> bytes:
        self._require_slide(slide_id)
        return self._page.substitute(title=html.escape(f"{slide_id} \u2013 ipspath view"),
                                     slide_id=html.escape(slide_id, quote=True)).encode()

    def slide_info(self, slide_id: str) -> bytes:
        """The JSON the viewer page loads for ``slide_id`` (made once per slide)."""
        self._require_slide(slide_id)
        if slide_id not in self._info:
            self._info[slide_id] = json.dumps(self._describe(self.cohort.slide(slide_id)),
                                              separators=(",", ":")).encode()
        return self._info[slide_id]

    def _describe(self, view: SlideView) -> dict[str, Any]:
        cohort, store, row = self.cohort, view.store, view.prediction
        previous, following = cohort.neighbours(view.slide_id)
        width, height = view.slide.dimensions
        geometry = DeepZoomGeometry(width, height)
        stops = [[int(v) for v in self.lut[round(i * 255 / (_COLOUR_BAR_STOPS - 1))]]
                 for i in range(_COLOUR_BAR_STOPS)]
        return {
            "slide_id": view.slide_id, "position": cohort.ids.index(view.slide_id) + 1, "n_slides": len(cohort.ids),
            "previous": previous, "next": following, "version": view.version,
            "width": width, "height": height, "tile_size": geometry.tile_size, "max_level": geometry.max_level,
            "mpp": list(view.slide.level0_mpp) if view.slide.level0_mpp else None,
            "prediction": {"predicted": row.predicted, "label": row.label, "outcome": row.outcome,
                           "classes": cohort.classes,
                           "probabilities": [p if p is None else round(p, 4) for p in row.probabilities]},
            "run": cohort.run, "colormap": self.colormap, "colour_stops": stops,
            # what each colour scale shows (the layer attention or weight), and how spread the attention is
            "scales": {scale: scale_legend(scale) for scale in SCALES},
            "spread": attention_spread(view.scores).as_dict(),
            "top_k": _TOP_K,
            "patches": {"size": store.patch_size_level0, "stride": store.stride_level0,
                        "coords": store.coords.reshape(-1).tolist(),
                        "scores": _rounded(view.scores)},
            # a multi-task run: each task's scores, shown by the layer attention-<number>
            "tasks": [{"name": name, "layer": f"attention-{number}", "scores": _rounded(view.task_scores[number]),
                       "spread": attention_spread(view.task_scores[number]).as_dict()}
                      for number, name in enumerate(view.tasks)],
            "contours": view.contours(),
        }

    # -- tiles ---------------------------------------------------------------------------------

    def tile(self, slide_id: str, version: str, layer: str, level: str, position: str) -> tuple[bytes | None, str]:
        """Encoded tile bytes (None: an empty attention tile) and its content type."""
        view = self._require_version(slide_id, version)
        level_number = _small_int(level)
        col, row = (_small_int(part) for part in position.split("_", 1)) if "_" in position else (-1, -1)
        geometry = DeepZoomGeometry(*view.slide.dimensions)
        key = (slide_id, version, layer, self.colormap, level_number, col, row)
        content_type = _CONTENT_TYPES[".jpeg" if layer == "slide" else ".png"]
        grid = None if layer == "slide" else _layer_grid(view, layer)
        found, tile = self.cache.get(key)
        if not found:
            try:
                tile = (slide_tile(view.slide, geometry, level_number, col, row) if grid is None else
                        attention_tile(grid, geometry, level_number, col, row, self.lut))
            except TileNotFound as exc:
                raise _HttpError(HTTPStatus.NOT_FOUND, str(exc)) from None
            self.cache.put(key, tile)
        return tile, content_type

    def _require_slide(self, slide_id: str) -> None:
        if slide_id not in self.cohort:
            raise _HttpError(HTTPStatus.NOT_FOUND, "no such slide in this prediction folder")

    def _require_version(self, slide_id: str, version: str) -> SlideView:
        self._require_slide(slide_id)
        view = self.cohort.slide(slide_id)
        if not hmac.compare_digest(version, view.version):
            raise _HttpError(HTTPStatus.NOT_FOUND, "stale tile address: reload the page")
        return view

    # -- access --------------------------------------------------------------------------------

    def token_ok(self, query_token: str | None, cookie_header: str | None) -> bool:
        if self.token is None:
            return True
        candidates = [query_token or ""]
        if cookie_header:
            cookies = http.cookies.SimpleCookie()
            try:
                cookies.load(cookie_header)
            except http.cookies.CookieError:
                pass
            if TOKEN_COOKIE in cookies:
                candidates.append(cookies[TOKEN_COOKIE].value)
        return any(hmac.compare_digest(c.encode(), self.token.encode()) for c in candidates if c)


def _tile_extension(layer: str) -> str:
    """``.jpeg`` for slide tiles, ``.png`` for attention and weight layers; ``/`` (which no file name ends with)
    otherwise."""
    return ".jpeg" if layer == "slide" else ".png" if layer.startswith(("attention", "weight")) else "/"


def _rounded(scores: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in scores.tolist()]


def _layer_grid(view: SlideView, layer: str) -> ScoreGrid:
    """The score grid of an attention layer: ``attention`` (ranks of the mean) or ``attention-<task number>``;
    ``weight`` and ``weight-<task number>`` the same on the weight scale shared by all slides."""
    scale, dash, number = layer.partition("-")
    grids = {"attention": (view.grid, view.task_grids), "weight": (view.weight_grid, view.task_weight_grids)}
    if scale in grids:
        mean, per_task = grids[scale]
        if not dash and mean is not None:
            return mean
        if number.isdigit() and int(number) < len(per_task):
            return per_task[int(number)]
    raise _HttpError(HTTPStatus.NOT_FOUND, "no such layer")


def _small_int(text: str) -> int:
    """A non-negative decimal integer from a URL part (at most 9 digits), else 404."""
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise _HttpError(HTTPStatus.NOT_FOUND, f"not a tile address: {text[:40]!r}")
    return int(text)


def _load_assets() -> dict[str, bytes]:
    """The files under static/, by path relative to it ("openseadragon/images/home_rest.png")."""
    assets: dict[str, bytes] = {}

    def walk(folder: Any, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif not entry.name.startswith("."):
                assets[prefix + entry.name] = entry.read_bytes()

    walk(resources.files(__package__).joinpath("static"), "")
    return assets


class _Handler(BaseHTTPRequestHandler):
    """Routes one request of a :class:`ViewerApp` (``self.server.app``)."""

    protocol_version = "HTTP/1.1"  # keep-alive: the browser reuses its connections for tiles
    # Headers and body leave in one write, without waiting: otherwise Nagle's algorithm and the
    # client's delayed ACK hold every response on a kept-alive connection for about 40 ms.
    disable_nagle_algorithm = True
    wbufsize = 1 << 16
    server_version = "ipspath-view"
    sys_version = ""
    server: _ViewerHTTPServer

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        self._respond(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(with_body=False)

    def _refuse_method(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"only GET and HEAD\n", "text/plain; charset=utf-8",
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the standard library's signature
        log.debug("%s - %s", self.address_string(), format % args)

    def _respond(self, with_body: bool) -> None:
        self._with_body = with_body
        app = self.server.app
        try:
            parts = urlsplit(self.path)
            try:
                query = parse_qs(parts.query, max_num_fields=_MAX_QUERY_FIELDS)
            except ValueError:
                raise _HttpError(HTTPStatus.BAD_REQUEST, "too many query fields") from None
            if not self._host_allowed(app):
                raise _HttpError(HTTPStatus.FORBIDDEN, "this viewer answers requests for 127.0.0.1 or localhost only")
            query_token = (query.get("token") or [None])[0]
            if not app.token_ok(query_token, self.headers.get("Cookie")):
                raise _HttpError(HTTPStatus.FORBIDDEN, "this viewer needs its access token: open the URL that "
                                                       "`ipspath view` printed (it ends in ?token=...)")
            cookie = None
            if app.token is not None and query_token:
                cookie = f"{TOKEN_COOKIE}={app.token}; Path=/; HttpOnly; SameSite=Strict"
            self._route(app, parts.path, cookie)
        except _HttpError as exc:
            self._send(exc.status, f"{exc.status.value} {exc.status.phrase}: {exc}\n".encode(),
                       "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except IpspathError as exc:
            log.error("%s", exc)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, f"500 Internal Server Error: {exc}\n".encode(),
                       "text/plain; charset=utf-8")
        except Exception:  # noqa: BLE001 - a request must never end the server or show a traceback
            log.exception("ipspath view: error answering %s", self.path[:200])
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"500 Internal Server Error (see the server's log)\n",
                       "text/plain; charset=utf-8")

    def _host_allowed(self, app: ViewerApp) -> bool:
        if not app.loopback_only:
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        return name in _LOOPBACK_NAMES or _is_loopback_address(name)

    def _route(self, app: ViewerApp, raw_path: str, cookie: str | None) -> None:
        segments = raw_path.split("/")[1:]
        try:
            names = [unquote(s, errors="strict") for s in segments]
        except UnicodeDecodeError:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "the address is not UTF-8") from None
        if any(name in (".", "..") or "\x00" in name for name in names):
            raise _HttpError(HTTPStatus.NOT_FOUND, "no such page")
        head = names[0] if names else ""
        if raw_path == "/":
            body, content_type = app.index_page()
            self._send(HTTPStatus.OK, body, content_type, cache="no-cache", cookie=cookie)
        elif head == "view" and len(names) == 2 and names[1]:
            self._send(HTTPStatus.OK, app.viewer_page(names[1]), _CONTENT_TYPES[".html"], cache="no-cache",
                       cookie=cookie)
        elif head == "api" and len(names) == 3 and names[1] == "slide":
            self._send(HTTPStatus.OK, app.slide_info(names[2]), _CONTENT_TYPES[".json"], cache="no-cache")
        elif head == "tiles" and len(names) == 6 and names[5].endswith(_tile_extension(names[3])):
            position = names[5][:-len(_tile_extension(names[3]))]
            self._send_tile(*app.tile(names[1], names[2], names[3], names[4], position))
        elif head == "static" and "/".join(names[1:]) in app.assets:
            name = "/".join(names[1:])
            self._send(HTTPStatus.OK, app.assets[name], _content_type(name), cache=_ASSET_CACHE_CONTROL)
        else:
            files = app.cohort.report_files()
            wanted = unquote(raw_path[1:])
            match = next((path for ref, path in files.items() if unquote(ref) == wanted), None)
            if match is None or wanted == REPORT_NAME:
                raise _HttpError(HTTPStatus.NOT_FOUND, "no such page")
            self._send(HTTPStatus.OK, match.read_bytes(), _content_type(match.name), cache="no-cache")

    def _send_tile(self, tile: bytes | None, content_type: str) -> None:
        # no patch in this attention tile: a 1 x 1 transparent picture (an error would be logged and retried)
        self._send(HTTPStatus.OK, EMPTY_TILE_PNG if tile is None else tile, content_type, cache=_TILE_CACHE_CONTROL)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, *, cache: str = "no-store",
              cookie: str | None = None, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for name, value in {**_SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        if cookie:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        if getattr(self, "_with_body", True):
            self.wfile.write(body)


def _content_type(name: str) -> str:
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return _CONTENT_TYPES.get(suffix, "application/octet-stream")


class _ViewerHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many tile requests at once must not be refused

    def __init__(self, address: tuple[str, int], app: ViewerApp):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        super().__init__(address, _Handler)


def make_server(app: ViewerApp, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server for ``app`` bound to ``host:port`` (port 0: a free one); call ``serve_forever()``.

    Raises
    ------
    BadInputError
        When the address cannot be bound (port in use, unknown host), naming the fix.
    """
    try:
        return _ViewerHTTPServer((host, port), app)
    except OSError as exc:
        raise BadInputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port "
                            "(0 picks a free one) or --host") from None


def viewer_url(server: ThreadingHTTPServer, token: str | None) -> str:
    """The URL to open: the server's address, and the token when one is required."""
    host, port = server.server_address[:2]
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def new_token() -> str:
    """A random access token (32 url-safe characters)."""
    return secrets.token_urlsafe(24)


def serve(pred_dir: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, colormap: str = "viridis",
          cache_mb: int = 256, announce: Callable[[str], None] = print) -> None:
    """Serve the viewer of a prediction folder until interrupted (Ctrl+C).

    Parameters
    ----------
    pred_dir : path-like
        An ``ipspath predict`` output folder.
    host : str
        Address to listen on; anything but a loopback address requires a random token, which
        the announced URL carries.
    port : int
        Port; 0 picks a free one.
    colormap : str
        One of :data:`~ips_path.review.heatmap.COLORMAPS`.
    cache_mb : int
        Tile cache budget, MiB.
    announce : callable
        Receives the line with the URL to open, once the server listens.

    Raises
    ------
    BadInputError
        Not a prediction folder (or a slide of it is gone), or the address cannot be bound.
    """
    from ips_path.review.view.cohort import open_cohort

    if cache_mb < 0:
        raise BadInputError(f"--cache-mb must be 0 or more, got {cache_mb}")
    loopback = host in _LOOPBACK_NAMES or _is_loopback_address(host)
    token = None if loopback else new_token()
    app = ViewerApp(open_cohort(pred_dir), token=token, colormap=colormap, cache_bytes=cache_mb * 2**20)
    server = make_server(app, host, port)
    _stop_on_interrupt_and_term()  # before the announcement: whoever reads it may stop the server at once
    announce(f"ipspath view: {len(app.cohort.ids)} slides of {app.cohort.pred_dir} at {viewer_url(server, token)} "
             "(Ctrl+C to stop)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
        app.close()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_on_interrupt_and_term() -> None:
    """Ctrl+C (SIGINT) and SIGTERM stop the server, even where it was started with SIGINT ignored, as
    shells start background jobs (``ipspath view ... &`` in a script) and as children inherit it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _raise_interrupt)
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
