"""``ipspath report``: one static HTML page to review the predictions of a cohort."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("pred_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file to write; report_assets/ goes beside it.  [default: PRED_DIR/report.html]")
@click.option("--title", help="Page title.  [default: 'Slide review - <run name>']")
def report_cmd(pred_dir: Path, out_path: Path | None, title: str | None) -> None:
    """Write a review page of the predictions in PRED_DIR (the output folder of `ipspath predict`).

    One card per slide: prediction, class probabilities, true label, thumbnail beside the attention
    overlay, and the top attended patches (from `ipspath heatmap`; "no heatmap" where missing).
    With labels, AUC with its 95 % CI, balanced accuracy, the confusion matrix and the ROC curve
    come first; failed slides are listed with their error. Cards can be sorted and filtered in the
    page; click a picture to see it at full size.

    \b
    The page loads nothing from the network. Written inside PRED_DIR (the default) it links the
    pictures where they are, so copy the whole folder to share it; written elsewhere with -o, it
    copies them into report_assets/images/ and the HTML file plus report_assets/ stand alone.
    """
    from ips_path.review.report import write_report

    click.echo(f"report: {write_report(pred_dir, out_path, title)}")
