"""The review report: every slide shown, every reference resolvable offline, text escaped, JS works in a browser."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ips_path.cli.main import cli, main
from ips_path.inference.predictions import read_predictions
from ips_path.review.report import write_report
from ips_path.runtime.errors import BadInputError

CLASSES = ["normal", "tumor"]
CHROMIUM = Path("/usr/bin/chromium")
EVIL_ID = "<script>alert('x')<\\script> & \"quoted\" #1?"  # hostile, but a file name: ids never hold '/'


def _picture(path: Path, seed: int, size: tuple[int, int] = (240, 180)) -> None:
    """A pink blob on white: enough like a slide thumbnail to judge the layout on a screenshot."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    blob = ((yy - cy) / (0.35 * h)) ** 2 + ((xx - cx) / (0.35 * w)) ** 2 < 1
    rgb = np.full((h, w, 3), 245, np.uint8)
    rgb[blob] = (np.array([200, 120, 170]) + rng.integers(-25, 25, (blob.sum(), 3))).clip(0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def make_pred_dir(root: Path, slides: list[dict], metrics: bool = True, run: bool = True) -> Path:
    """A prediction folder in the layout `ipspath predict` + `ipspath heatmap` write.

    Each slide dict: id, label, p (probability of "tumor"; None = failed), heatmap (bool), error.
    """
    pred = root / "pred"
    pred.mkdir(parents=True)
    with open(pred / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "label", "predicted", "prob_normal", "prob_tumor", "n_patches", "status", "error"])
        for i, s in enumerate(slides):
            if s["p"] is None:
                writer.writerow([s["id"], s["label"], "", "", "", "", "failed", s.get("error", "")])
                continue
            writer.writerow([s["id"], s["label"], CLASSES[s["p"] >= 0.5], f"{1 - s['p']:.4f}", f"{s['p']:.4f}",
                             100 + i, "done", ""])
            if s.get("heatmap", True):
                folder = pred / "heatmaps" / s["id"]
                for j, name in enumerate(("thumbnail.png", "overlay.png", "top_patches.png")):
                    _picture(folder / name, seed=3 * i + j, size=(480, 120) if j == 2 else (240, 180))
    if run:
        (pred / "run.json").write_text(json.dumps(
            {"model": "runs/ips/best.pt", "run": "ips-demo", "classes": CLASSES, "target_mpp": 0.5,
             "patch_size": 256, "created": "2024-05-01T10:00:00", "ipspath_version": "0.1.0"}))
    if metrics:
        (pred / "metrics.json").write_text(json.dumps(
            {"auc": 0.875, "auc_ci95": [0.61, 1.0], "balanced_accuracy": 0.75,
             "confusion_matrix": [[2, 1], [0, 3]], "classes": CLASSES, "n_slides": 6}))
        _picture(pred / "roc.png", seed=99, size=(300, 300))
    return pred


COHORT = [
    {"id": "S-10", "label": "tumor", "p": 0.93},
    {"id": "S-2", "label": "normal", "p": 0.81},  # wrong, confident
    {"id": "S-1", "label": "normal", "p": 0.12},
    {"id": "S-3", "label": "tumor", "p": 0.64, "heatmap": False},
    {"id": "S-4", "label": "", "p": 0.40},
    {"id": "S-5", "label": "tumor", "p": None, "error": "S-5.svs: unreadable tile at (512, 1024): Bogus marker"},
]
DONE_IDS = [s["id"] for s in COHORT if s["p"] is not None]


class PageParser(HTMLParser):
    """What a test needs from a page: referenced URLs, the slide cards (in order) and their text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.refs: list[str] = []
        self.scripts: list[dict] = []
        self.cards: list[dict] = []
        self.failed_text = ""
        self._card: dict | None = None
        self._tags: list[str] = []
        self._in_failed = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.refs += [attrs[k] for k in ("src", "href") if attrs.get(k)]
        if tag == "script":
            self.scripts.append(attrs)
        if tag == "section" and "failed" in (attrs.get("class") or ""):
            self._in_failed = True
        if tag == "article" and "card" in (attrs.get("class") or "").split():
            self._card = {"attrs": attrs, "hidden": "hidden" in attrs, "text": "", "title": ""}
            self.cards.append(self._card)
        self._tags.append(tag)

    def handle_endtag(self, tag):
        if tag == "article":
            self._card = None
        if tag == "section":
            self._in_failed = False
        if self._tags and self._tags[-1] == tag:
            self._tags.pop()

    def handle_data(self, data):
        if self._card is not None:
            self._card["text"] += data
            if self._tags and self._tags[-1] == "h3":
                self._card["title"] += data
        if self._in_failed:
            self.failed_text += data

    def card(self, slide_id: str) -> dict:
        (found,) = [c for c in self.cards if c["attrs"]["data-id"] == slide_id]
        return found


def assert_references_resolve(html_path: Path) -> list[Path]:
    """Every src/href is a relative path to an existing file; returns the files."""
    files = []
    for ref in PageParser(html_path.read_text(encoding="utf-8")).refs:
        parts = urlsplit(ref)
        assert not parts.scheme and not parts.netloc and not ref.startswith("/"), f"not relative: {ref}"
        target = html_path.parent / unquote(parts.path)
        assert target.is_file(), f"{ref} -> {target} does not exist"
        files.append(target)
    return files


@pytest.fixture()
def pred_dir(tmp_path) -> Path:
    return make_pred_dir(tmp_path, COHORT)


def test_every_slide_has_a_card_and_every_reference_exists(pred_dir):
    out = write_report(pred_dir)
    assert out == pred_dir / "report.html"
    page = PageParser(out.read_text(encoding="utf-8"))
    assert sorted(c["attrs"]["data-id"] for c in page.cards) == sorted(DONE_IDS)
    assert "S-5" in page.failed_text and "Bogus marker" in page.failed_text
    files = assert_references_resolve(out)
    names = {f.name for f in files}
    assert {"report.css", "report.js", "roc.png", "thumbnail.png", "overlay.png", "top_patches.png"} <= names
    # written inside the prediction folder, the page links the pictures instead of copying them
    assert not (pred_dir / "report_assets" / "images").exists()
    wrong = page.card("S-2")
    assert wrong["attrs"]["data-outcome"] == "wrong" and wrong["attrs"]["data-pred"] == "tumor"
    assert "81.0%" in wrong["text"] and "normal" in wrong["text"]
    assert page.card("S-4")["attrs"]["data-outcome"] == "unlabelled"


def test_missing_heatmaps_and_no_metrics(tmp_path):
    pred = make_pred_dir(tmp_path, COHORT, metrics=False, run=False)
    text = write_report(pred).read_text(encoding="utf-8")
    page = PageParser(text)
    assert "no heatmap" in page.card("S-3")["text"]
    assert "no heatmap" not in page.card("S-1")["text"]
    assert "Performance" not in text and "roc.png" not in text
    assert "Slide review \u2013 pred" in text  # title falls back to the folder name without run.json
    assert_references_resolve(pred / "report.html")


def test_metrics_block(pred_dir):
    text = write_report(pred_dir).read_text(encoding="utf-8")
    assert "0.875" in text and "95 % CI 0.610\u20131.000" in text and "0.750" in text
    table = text[text.index('<table class="confusion"'):]
    table = table[:table.index("</table>")]
    cells = [c.split(">")[1].split("<")[0] for c in table.split("<td")[1:]]
    assert cells == ["2", "1", "0", "3"]


def test_text_is_escaped(tmp_path):
    pred = make_pred_dir(tmp_path, [{"id": EVIL_ID, "label": "normal", "p": 0.7},
                                    {"id": "<img src=x onerror=alert(1)>", "label": "", "p": None,
                                     "error": "<b>bad</b> & worse"}])
    out = write_report(pred, title="<i>cohort</i> & co")
    text = out.read_text(encoding="utf-8")
    page = PageParser(text)
    assert page.scripts == [{"src": "report_assets/report.js"}]  # the only script is ours
    assert "<script>alert" not in text and "<img src=x" not in text and "<b>bad" not in text
    assert "<i>cohort" not in text and "&lt;i&gt;cohort&lt;/i&gt; &amp; co" in text
    card = page.card(EVIL_ID)  # attribute value round-trips exactly
    assert card["title"] == EVIL_ID
    assert "<img src=x onerror=alert(1)>" in page.failed_text and "<b>bad</b> & worse" in page.failed_text
    # the pictures of a slide id full of URL syntax still resolve (link + image of each)
    assert sum(f.name == "overlay.png" for f in assert_references_resolve(out)) == 2


def test_page_survives_being_copied_elsewhere(pred_dir, tmp_path):
    inside = write_report(pred_dir)
    moved = tmp_path / "elsewhere" / "pred copy"
    shutil.copytree(pred_dir, moved)
    # written outside the prediction folder: pictures are copied beside the page, which stands alone
    write_report(pred_dir, tmp_path / "share" / "cohort.html")
    shutil.rmtree(pred_dir)
    assert len(assert_references_resolve(moved / inside.name)) > 10
    alone = tmp_path / "moved share"
    shutil.move(tmp_path / "share", alone)
    files = assert_references_resolve(alone / "cohort.html")
    assert all(f.resolve().is_relative_to(alone.resolve()) for f in files)
    assert len(PageParser((alone / "cohort.html").read_text(encoding="utf-8")).cards) == len(DONE_IDS)


def test_bad_inputs_name_the_file(tmp_path, pred_dir):
    with pytest.raises(BadInputError, match="predictions.csv.*ipspath predict"):
        write_report(tmp_path)
    good = (pred_dir / "predictions.csv").read_text()
    (pred_dir / "predictions.csv").write_text(good.replace(",done,", ",finished,", 1))
    with pytest.raises(BadInputError, match="line 2: status 'finished'"):
        read_predictions(pred_dir / "predictions.csv")
    (pred_dir / "predictions.csv").write_text(good.replace(",0.9300,", ",high,", 1))
    with pytest.raises(BadInputError, match="line 2: prob_tumor 'high' is not a number"):
        read_predictions(pred_dir / "predictions.csv")
    (pred_dir / "predictions.csv").write_text(good)
    (pred_dir / "metrics.json").write_text("{not json")
    with pytest.raises(BadInputError, match="metrics.json"):
        write_report(pred_dir)


def test_read_predictions_keeps_class_order(pred_dir):
    classes, rows = read_predictions(pred_dir / "predictions.csv")
    assert classes == CLASSES
    assert [r.slide_id for r in rows] == [s["id"] for s in COHORT]
    assert rows[0].probabilities == (pytest.approx(0.07), pytest.approx(0.93))
    assert rows[-1].status == "failed" and rows[-1].probabilities == (None, None)


def test_cli(pred_dir, tmp_path, capsys):
    result = CliRunner().invoke(cli, ["report", str(pred_dir), "-o", str(tmp_path / "r.html"), "--title", "Review"],
                                obj={})
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"report: {tmp_path / 'r.html'}"
    assert "<title>Review</title>" in (tmp_path / "r.html").read_text(encoding="utf-8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert "predictions.csv" in capsys.readouterr().err


def _render(url: str, tmp_path: Path, *extra: str) -> str:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *extra, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_browser_shows_every_card_and_sorts_and_filters(pred_dir, tmp_path):
    out = write_report(pred_dir)
    dom = _render(out.as_uri(), tmp_path, "--dump-dom")
    page = PageParser(dom)
    # the script ran: it fills the count and sorts by slide id in natural order (S-2 before S-10)
    assert f"Showing {len(DONE_IDS)} of {len(DONE_IDS)} slides" in dom
    assert [c["attrs"]["data-id"] for c in page.cards] == ["S-1", "S-2", "S-3", "S-4", "S-10"]
    assert not any(c["hidden"] for c in page.cards)
    # a view in the address: labelled slides predicted tumor, highest P(tumor) first
    view = PageParser(_render(out.as_uri() + "#sort=p1&pred=tumor&outcome=wrong", tmp_path, "--dump-dom"))
    assert [c["attrs"]["data-id"] for c in view.cards if not c["hidden"]] == ["S-2"]
    view = PageParser(_render(out.as_uri() + "#sort=wrong&q=s-1", tmp_path, "--dump-dom"))
    # wrong first, then unlabelled, then correct; within each the most confident first
    assert [c["attrs"]["data-id"] for c in view.cards] == ["S-2", "S-4", "S-10", "S-1", "S-3"]
    assert [c["attrs"]["data-id"] for c in view.cards if not c["hidden"]] == ["S-10", "S-1"]
