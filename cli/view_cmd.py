"""``ipspath view``: pan and zoom the slides of a prediction folder with their attention, in a browser."""

from __future__ import annotations

from pathlib import Path

import click

from ips_path.review.heatmap import COLORMAPS


@click.command("view")
@click.argument("pred_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on; 0 picks a free one.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Only this machine can connect to 127.0.0.1; any other address "
                   "(e.g. 0.0.0.0 for the whole network) requires the random token in the printed URL.")
@click.option("--colormap", type=click.Choice(COLORMAPS), default="viridis", show_default=True,
              help="Colours of the attention, dark = low, bright = high.")
@click.option("--cache-mb", type=click.IntRange(min=0), default=256, show_default=True,
              help="Memory for tiles already made, MiB (least recently used go first).")
def view_cmd(pred_dir: Path, port: int, host: str, colormap: str, cache_mb: int) -> None:
    """Serve the slides of PRED_DIR (the output folder of `ipspath predict`) with their attention.

    Open the printed URL: the cohort's report (each card links to its slide), and per slide a
    deep-zoom viewer: the slide at full resolution with the attention over it (opacity slider,
    colour bar; colours are the rank of each patch's attention within the slide), tissue contour
    and patch grid, attention value and rank of the patch under the pointer, the most attended
    patches (click one to zoom to it), the prediction, probabilities and true label, and the
    previous/next slide. Tiles are made from the slide files when asked for; nothing is written.

    \b
    Only the slides and files PRED_DIR records are served. Stop with Ctrl+C.
    """
    from ips_path.review.view import serve

    serve(pred_dir, host=host, port=port, colormap=colormap, cache_mb=cache_mb,
          announce=lambda line: click.echo(line, err=True))
