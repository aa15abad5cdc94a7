"""The cohort review report: one static HTML page over a prediction folder.

``write_report`` reads what ``ipspath predict`` and ``ipspath heatmap`` wrote into a prediction
folder (``predictions.csv``, ``run.json``, ``metrics.json``, ``roc.png``,
``heatmaps/<slide_id>/{thumbnail,overlay,top_patches}.png``) and writes ``report.html`` with a
``report_assets/`` folder beside it. The page is plain HTML with a small script for sorting,
filtering and full-size viewing; it loads nothing from the network and every reference is a
relative path, so it opens offline, straight from disk.

Pictures are linked where they lie when the page is written inside the prediction folder (the
default): copying the folder keeps the report working and nothing is stored twice. A page written
elsewhere gets copies of the pictures in its ``report_assets/images/``, so it stands on its own.
"""

from __future__ import annotations

import html
import os
import shutil
from datetime import datetime
from importlib import resources
from pathlib import Path
from string import Template
from urllib.parse import quote

from ips_path import __version__
from ips_path.inference.predictions import PredictionFolder, SlidePrediction
from ips_path.review.heatmap.spread import read_spread
from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.errors import BadInputError
from ips_path.tasks import KINDS, ReportSection, kind_of_run

__all__ = ["write_report"]

ASSETS_DIR_NAME = "report_assets"
DASH = "\u2013"

# (file in heatmaps/<slide_id>/, caption, text shown when the file is missing)
_PAIR_IMAGES = (("thumbnail.png", "Thumbnail", "no thumbnail"), ("overlay.png", "Attention overlay", "no heatmap"))
_TOP_PATCHES = "top_patches.png"
# CSS and JS shipped in the package, copied into report_assets/ next to the page
_STATIC_FILES = ("report.css", "report.js")


def write_report(pred_dir: str | os.PathLike, out_path: str | os.PathLike | None = None,
                 title: str | None = None) -> Path:
    """Write the review page of a prediction folder.

    Parameters
    ----------
    pred_dir : path
        Folder written by ``ipspath predict`` (``predictions.csv``; optionally ``run.json``,
        ``metrics.json``, ``roc.png`` and ``heatmaps/<slide_id>/`` from ``ipspath heatmap``).
    out_path : path, optional
        The HTML file; default ``<pred_dir>/report.html``. ``report_assets/`` is written beside it.
    title : str, optional
        Page title; default "Slide review - <run name>" (or the folder name without ``run.json``).

    Returns
    -------
    Path
        The HTML file written.

    Raises
    ------
    BadInputError
        ``pred_dir`` is not a prediction folder, or one of its files cannot be read.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise BadInputError(f"{pred_dir}: not a folder; give the output folder of `ipspath predict`")
    folder = PredictionFolder(pred_dir)
    classes, rows = folder.read_predictions()
    run = folder.read_run()
    out_path = Path(out_path) if out_path is not None else pred_dir / "report.html"
    if out_path.is_dir():
        raise BadInputError(f"{out_path}: is a folder; give the HTML file to write, e.g. {out_path}/report.html")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if title is None:
        title = f"Slide review {DASH} {run.get('run') or pred_dir.resolve().name}"

    assets = _AssetPlacer(pred_dir, out_path.parent)
    done = [r for r in rows if r.ok]
    labels, predicted = kind_of_run(run).report_filters(run, classes, done)  # the filters' choices
    page = Template(resources.files(__package__).joinpath("report_template.html").read_text(encoding="utf-8"))
    text = page.substitute(
        title=_esc(title), version=_esc(__version__), created=_esc(datetime.now().strftime("%Y-%m-%d %H:%M")),
        pred_dir_name=_esc(pred_dir.resolve().name), css_href=assets.static_url("report.css"),
        js_src=assets.static_url("report.js"), run_info=_run_info_html(run), summary=_summary_html(rows),
        metrics="".join(_section_html(section, assets) for kind in KINDS.values()
                        for section in kind.report_sections(pred_dir, run)),
        sort_options=_options_html([("id", "slide id (A\u2192Z)"), ("wrong", "wrong first"),
                                    ("conf", "confidence (highest first)")]
                                   + [(f"p{i}", f"P({c}) (highest first)") for i, c in enumerate(classes)]),
        pred_options=_options_html([(c, c) for c in predicted]), label_options=_options_html([(c, c) for c in labels]),
        cards="\n".join(_card_html(order, row, classes, pred_dir, assets)
                        for order, row in sorted(enumerate(rows), key=lambda item: item[1].slide_id)
                        if row.ok) or '<p class="empty">No slide was predicted.</p>',
        failed=_failed_html([r for r in rows if not r.ok]),
    )
    return write_atomically(out_path, lambda partial: partial.write_text(text, encoding="utf-8"))


class _AssetPlacer:
    """Relative URLs of the pictures: links when the page lies inside the prediction folder, copies otherwise."""

    def __init__(self, pred_dir: Path, html_dir: Path):
        self.html_dir = html_dir.resolve()
        self.assets_dir = self.html_dir / ASSETS_DIR_NAME
        self.link = self.html_dir.is_relative_to(pred_dir.resolve())
        # copies of an earlier report may belong to slides no longer in the cohort
        shutil.rmtree(self.assets_dir / "images", ignore_errors=True)
        self.assets_dir.mkdir(exist_ok=True)
        for name in _STATIC_FILES:
            (self.assets_dir / name).write_bytes(resources.files(__package__).joinpath(name).read_bytes())

    def static_url(self, name: str) -> str:
        return _url(Path(ASSETS_DIR_NAME, name))

    def image_url(self, src: Path, copy_name: str) -> str:
        if self.link:
            return _url(Path(os.path.relpath(src.resolve(), self.html_dir)))
        target = self.assets_dir / "images" / copy_name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, target)
        return _url(target.relative_to(self.html_dir))


def _url(relative: Path) -> str:
    """A relative path as an escaped URL for an attribute: percent-encoded, then HTML-escaped."""
    return _esc(quote(relative.as_posix()))


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _percent(p: float | None) -> str:
    return DASH if p is None else f"{p:.1%}"


def _options_html(options: list[tuple[str, str]]) -> str:
    return "".join(f'<option value="{_esc(value)}">{_esc(text)}</option>' for value, text in options)


def _run_info_html(run: dict) -> str:
    fields = [("Run", run.get("run")), ("Model", run.get("model")),
              ("Classes", ", ".join(map(str, run.get("classes") or [])) or None),
              ("Patch resolution", f"{run['target_mpp']} \u00b5m/px" if run.get("target_mpp") else None),
              ("Patch size", f"{run['patch_size']} px" if run.get("patch_size") else None),
              ("Predicted on", run.get("created")), ("ipspath", run.get("ipspath_version"))]
    return "".join(f'<span class="fact"><b>{_esc(k)}</b> {_esc(v)}</span>' for k, v in fields if v)


def _summary_html(rows: list[SlidePrediction]) -> str:
    done = [r for r in rows if r.ok]
    counts = [(f"{len(rows)} slides", "total"), (f"{len(done)} predicted", "done"),
              (f"{len(rows) - len(done)} failed", "failed")]
    for outcome in ("correct", "wrong", "unlabelled"):
        n = sum(r.outcome == outcome for r in done)
        if n:
            counts.append((f"{n} {outcome}", outcome))
    return "".join(f'<span class="chip chip-{kind}">{_esc(text)}</span>' for text, kind in counts)


def _section_html(section: ReportSection, assets: _AssetPlacer) -> str:
    """An outcome kind's section: its key figures (over slides, then patients), confusion matrix, pictures."""
    parts = [f'<section class="{_esc(section.css_class)}"><h2>{_esc(section.title)}</h2><div class="metrics-body">'
             '<div class="key-figures">']
    parts.append(_figures_html(section.figures))
    if section.patient_figures:  # the manifest named patients: the same figures over them, beside
        parts.append(_figures_html(section.patient_figures))
    parts.append("</div>")
    if section.confusion is not None:
        parts.append(_confusion_html(*section.confusion))
    for path, what in section.pictures:
        url = assets.image_url(path, path.name)
        parts.append(f'<figure class="roc"><a class="zoom" href="{url}" target="_blank">'
                     f'<img src="{url}" alt="{_esc(what)}"></a><figcaption>{_esc(what)}</figcaption></figure>')
    parts.append("</div></section>")
    return "".join(parts)


def _figures_html(figures: list[tuple[str, str, str]]) -> str:
    """Key figures as boxes: (name, value as HTML, note)."""
    return "".join(f'<div class="figure-box"><div class="figure-name">{_esc(name)}</div>'
                   f'<div class="figure-value">{_esc(value)}</div><div class="figure-note">{_esc(note)}</div></div>'
                   for name, value, note in figures)


def _confusion_html(classes: list, matrix: list[list]) -> str:
    if not classes or len(matrix) != len(classes):
        return ""
    head = "".join(f'<th scope="col">{_esc(c)}</th>' for c in classes)
    body = "".join(f'<tr><th scope="row">{_esc(true)}</th>'
                   + "".join(f'<td class="{"diag" if i == j else "off"}">{_esc(n)}</td>' for j, n in enumerate(row))
                   + "</tr>" for i, (true, row) in enumerate(zip(classes, matrix, strict=True)))
    return (f'<table class="confusion"><caption>Confusion matrix: rows are true labels, columns predictions'
            f'</caption><thead><tr><th class="corner">true \\ predicted</th>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _heatmap_dir(pred_dir: Path, slide_id: str) -> Path | None:
    """heatmaps/<slide_id>/, or None for an id that would lead out of heatmaps/ (``..``, absolute)."""
    try:
        return PredictionFolder(pred_dir).heatmap_dir(slide_id)
    except BadInputError:
        return None


def _image_html(path: Path | None, copy_name: str, caption: str, missing: str, slide_id: str,
                assets: _AssetPlacer) -> str:
    if path is None or not path.is_file():
        return f'<figure class="missing"><div class="placeholder">{_esc(missing)}</div></figure>'
    url = assets.image_url(path, copy_name)
    return (f'<figure><a class="zoom" href="{url}" target="_blank" title="open full size">'
            f'<img src="{url}" alt="{_esc(caption)} of {_esc(slide_id)}" loading="lazy"></a>'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _card_html(order: int, row: SlidePrediction, classes: list[str], pred_dir: Path, assets: _AssetPlacer) -> str:
    confidence = row.probability_of(classes, row.predicted)
    data = {"order": order, "id": row.slide_id, "pred": row.predicted, "label": row.label, "outcome": row.outcome,
            "conf": "" if confidence is None else repr(confidence)}
    data.update({f"p{i}": "" if p is None else repr(p) for i, p in enumerate(row.probabilities)})
    attrs = " ".join(f'data-{k}="{_esc(v)}"' for k, v in data.items())
    badge = {"correct": "correct", "wrong": "wrong", "unlabelled": "no label", "valued": "true value"}[row.outcome]
    bars = "".join(f'<div class="prob-row{" prob-pred" if c == row.predicted else ""}"><span class="prob-class">'
                   f'{_esc(c)}</span><span class="bar"><span style="width:{0 if p is None else 100 * p:.1f}%">'
                   f'</span></span><span class="prob-value">{_percent(p)}</span></div>'
                   for c, p in zip(classes, row.probabilities, strict=True))
    folder = _heatmap_dir(pred_dir, row.slide_id)
    pair = "".join(_image_html(folder and folder / name, f"{order:05d}-{name}", caption, missing, row.slide_id, assets)
                   for name, caption, missing in _PAIR_IMAGES)
    top = folder / _TOP_PATCHES if folder else None
    top_html = (_image_html(top, f"{order:05d}-{_TOP_PATCHES}", "Top attended patches", "", row.slide_id, assets)
                if top and top.is_file() else "")
    return (f'<article class="card card-{row.outcome}" {attrs}>'
            f'<header class="card-head"><h3 class="slide-id" title="{_esc(row.slide_id)}">{_esc(row.slide_id)}</h3>'
            f'<span class="badge badge-{row.outcome}">{badge}</span></header>'
            f'<dl class="facts"><div><dt>Predicted</dt><dd class="predicted">{_esc(row.predicted)} '
            f'<span class="confidence">{_percent(confidence)}</span></dd></div>'
            f'<div><dt>True label</dt><dd class="label">{_esc(row.label) or "unknown"}</dd></div>'
            f'<div><dt>Patches</dt><dd>{_esc(row.n_patches) or DASH}</dd></div></dl>'
            f'<div class="probs">{bars}</div><div class="pair">{pair}</div>{_spread_html(folder)}{top_html}</article>')


def _spread_html(folder: Path | None) -> str:
    """The overlay's scale and the spread of the slide's attention (heatmaps/<id>/attention.json)."""
    shown = read_spread(folder) if folder else None
    if not shown:
        return ""
    spread = shown["spread"]
    return (f'<p class="spread{" flat" if spread.get("flat") else ""}"><span class="scale">Colours: '
            f'{_esc(shown["title"])} ({_esc(shown["low"])} {DASH} {_esc(shown["high"])})</span> '
            f'<span class="figures">{_esc(spread["text"])}</span></p>')


def _failed_html(failed: list[SlidePrediction]) -> str:
    if not failed:
        return ""
    rows = "".join(f'<tr><td>{_esc(r.slide_id)}</td><td>{_esc(r.error) or "no error recorded"}</td></tr>'
                   for r in sorted(failed, key=lambda r: r.slide_id))
    return (f'<section class="failed"><h2>Failed slides ({len(failed)})</h2><table class="failed-table">'
            f'<thead><tr><th scope="col">Slide</th><th scope="col">Error</th></tr></thead><tbody>{rows}</tbody>'
            "</table></section>")
