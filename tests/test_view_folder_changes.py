"""A prediction folder replaced by another model shows that model only; the viewer serves no file outside it.

Before, ``predict --overwrite`` with another model left the old ``report.html`` and ``report_assets/``,
a running ``view`` kept showing the old probabilities, and ``view`` served a ``report.html`` that was
a link to a file outside the folder.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import io
import json
import shutil
import threading

import pytest
import torch
from tool_manifest import first_slides

from ips_path.cli.main import main
from ips_path.review.view.cohort import open_cohort
from ips_path.review.view.server import ViewerApp, make_server


def _ipspath(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    return exited.value.code, out.getvalue()


class _Viewer:
    """``ipspath view`` of a folder on a free port, in a thread."""

    def __init__(self, pred):
        self.app = ViewerApp(open_cohort(pred), cache_bytes=2**20)
        self.server = make_server(self.app, "127.0.0.1", 0)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def get(self, path: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.server.server_address[1], timeout=30)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.app.close()


@pytest.fixture()
def predicted(cohort, trained_run, tmp_path):
    """Two slides predicted into ``pred`` (no heatmaps) with their report, and the predict command."""
    manifest, tiles = cohort
    subset = tmp_path / "two.csv"
    first_slides(manifest, 2, subset)
    pred = tmp_path / "pred"
    command = ["-q", "predict", "--manifest", subset, "--tiles", tiles, "-o", pred, "--device", "cpu", "--no-heatmaps"]
    assert _ipspath(*command, "--model", trained_run)[0] == 0
    assert _ipspath("-q", "report", pred)[0] == 0
    assert (pred / "report.html").is_file() and (pred / "report_assets").is_dir()
    return pred, command


def _other_model(run, out):
    """A copy of ``run`` whose best.pt holds other weights: another model with the same classes."""
    out.mkdir(parents=True)
    checkpoint = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(1)
    for name, value in checkpoint["model"].items():
        if value.is_floating_point() and "running_" not in name:
            value.add_(torch.randn(value.shape, generator=generator) * 0.5)
    torch.save(checkpoint, out / "best.pt")
    return out


def test_overwrite_with_another_model_clears_the_old_report_and_a_running_view_shows_the_new_model(
        predicted, trained_run, tmp_path):
    pred, command = predicted
    viewer = _Viewer(pred)
    try:
        status, page = viewer.get("/")
        assert status == 200 and b"report" in page.lower()
        old = json.loads(viewer.get("/api/slide/slide_000")[1])["prediction"]["probabilities"]

        code, output = _ipspath(*command, "--model", _other_model(trained_run, tmp_path / "other"), "--overwrite")
        assert code == 0, output
        # every output of the old model is gone, its report included
        assert not (pred / "report.html").exists() and not (pred / "report_assets").exists()

        status, page = viewer.get("/")  # no report any more: the list of the new predictions' slides
        assert status == 200 and b"Slides in" in page and b"slide_000" in page
        new = json.loads(viewer.get("/api/slide/slide_000")[1])["prediction"]["probabilities"]
        with (pred / "predictions.csv").open(newline="") as f:
            written = next(r for r in csv.DictReader(f) if r["slide_id"] == "slide_000")
        assert new != old and new == [round(float(written[f"prob_{c}"]), 4) for c in ("negative", "positive")]
    finally:
        viewer.close()


def test_view_serves_no_report_page_linked_to_a_file_outside_the_folder(predicted, tmp_path):
    pred, _ = predicted
    secret = tmp_path / "outside" / "secret.html"
    secret.parent.mkdir()
    secret.write_text("<html><head></head><body>SECRET outside the folder</body></html>")
    shutil.move(pred / "report.html", tmp_path / "report.html")
    (pred / "report.html").symlink_to(secret)
    viewer = _Viewer(pred)
    try:
        status, page = viewer.get("/")
        assert status == 200 and b"SECRET" not in page and b"Slides in" in page
        assert viewer.get("/report.html")[0] == 404
    finally:
        viewer.close()
