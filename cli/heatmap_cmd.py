"""``ipspath heatmap``: attention overlays from stored scores, without running the model again."""

from __future__ import annotations

from pathlib import Path

import click

from ips_path.cli.options import OutputFolder
from ips_path.review.heatmap import (
    COLORMAPS,
    SCALES,
    check_heatmap_options,
    jobs_from_predictions,
    jobs_from_tiles,
    render_heatmaps,
)
from ips_path.runtime.errors import BadInputError
from ips_path.runtime.jobs import run_exit_code


@click.command("heatmap")
@click.option("--tiles", type=click.Path(exists=True, path_type=Path),
              help="A tile store (.zarr) or the folder of stores from `ipspath tile`; the scores come from each "
                   "store's scores/<run>, written by `ipspath predict`.")
@click.option("--run", help="Score run to draw (scores/<run> in the stores).  [default: the only run in the stores]")
@click.option("--predictions", "pred_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An `ipspath predict` output folder instead of --tiles/--run: run name and tiles folder from "
                   "its run.json, slides done in predictions.csv; writes PRED_DIR/heatmaps/<slide_id>/.")
@click.option("-o", "--out", "out_dir", type=OutputFolder(),
              help="Output folder, one <slide_id>/ folder per slide (required with --tiles; default with "
                   "--predictions: PRED_DIR/heatmaps).")
@click.option("--slides", "slide_ids", multiple=True,
              help="Only these slide ids: --slides S1,S2 or --slides S1 --slides S2.  [default: all]")
@click.option("--thumbnail-size", type=click.IntRange(min=16), default=2048, show_default=True,
              help="Long side of thumbnail.png and overlay.png in px (never more than the slide's).")
@click.option("--smooth-um", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Gaussian smoothing of the colours across neighbouring patches: standard deviation in µm "
                   "(e.g. 100); 0 draws every patch as a flat square.")
@click.option("--colormap", type=click.Choice(COLORMAPS), default="viridis", show_default=True,
              help="Perceptually uniform colormap; dark = low, bright = high attention.")
@click.option("--scale", type=click.Choice(SCALES), default="rank", show_default=True,
              help="What the colours show. rank: each patch's percentile rank within its slide (the full colour "
                   "range on every slide, even when attention is nearly flat); weight: attention weight times the "
                   "number of patches, on one log scale from 1/8x to 8x flat attention for every slide, so a flat "
                   "slide is one even colour and slides compare. The legend names the scale and the spread.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Opacity of the colours over the slide (0-1).")
@click.option("--top-k", type=click.IntRange(min=0), default=16, show_default=True,
              help="Patches in top_patches.png, the most attended first; 0: no gallery.")
@click.option("--no-geojson", is_flag=True, help="Do not write patches.geojson.")
@click.option("--crop", is_flag=True,
              help="Crop thumbnail.png and overlay.png to the tissue (and the patches), with a small margin.")
@click.option("--tiff-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Also write overlay.tiff, a pyramidal TIFF of the overlay at this pixel size in µm/px "
                   "(e.g. 8) that openslide and QuPath open.  [default: no TIFF]")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threads reading slide pixels and composing TIFF tiles.")
@click.pass_context
def heatmap_cmd(ctx: click.Context, tiles: Path | None, run: str | None, pred_dir: Path | None, out_dir: Path | None,
                slide_ids: tuple[str, ...], thumbnail_size: int, smooth_um: float, colormap: str, scale: str,
                alpha: float,
                top_k: int, no_geojson: bool, crop: bool, tiff_mpp: float | None, threads: int) -> None:
    """Draw attention heatmaps from the scores `ipspath predict` stored, without running the model.

    \b
    Either from tile stores:   ipspath heatmap --tiles tiles/ --run RUN -o heatmaps/
    or for a prediction run:   ipspath heatmap --predictions pred/

    \b
    Per slide, in <out>/<slide_id>/:
      thumbnail.png    the slide
      overlay.png      the same size, patches coloured by their attention on --scale (colour bar
                       in a corner, with the spread of the slide's attention), background untouched
      attention.json   the scale shown and the spread: logit range, effective number of patches
      patches.geojson  one QuPath tile per patch in level-0 px, with measurements "attention"
                       (the logit) and "attention_rank" (0-1); QuPath: File > Import objects
      top_patches.png  the --top-k most attended patches as the model saw them, with rank and score
      overlay.tiff     with --tiff-mpp: pyramidal TIFF with the slide's physical extent

    \b
    Exit status: 0 when every slide was drawn, 1 when some failed (one line each on stderr),
    2 when all failed on bad input.
    """
    if (tiles is None) == (pred_dir is None):
        raise BadInputError("give either --tiles (with --run and -o) or --predictions PRED_DIR")
    if pred_dir is not None and run is not None:
        raise BadInputError("--predictions reads the run from PRED_DIR/run.json; drop --run (or use --tiles)")
    options = {"thumbnail_size": thumbnail_size, "smooth_sigma_um": smooth_um, "colormap": colormap, "alpha": alpha,
               "top_k": top_k, "geojson": not no_geojson, "tiff_mpp": tiff_mpp, "threads": threads,
               "scale": scale, "crop": crop}
    check_heatmap_options(options)  # before the stores are read
    ids = [s for value in slide_ids for s in value.split(",") if s]
    if tiles is not None:
        if out_dir is None:
            raise BadInputError("--tiles needs an output folder: -o OUT")
        jobs = jobs_from_tiles(tiles, run, out_dir, ids)
    else:
        jobs = jobs_from_predictions(pred_dir, ids, out_dir)
    quiet = bool((ctx.obj or {}).get("quiet"))
    outcomes = render_heatmaps(jobs, progress=not quiet, **options)
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:
        click.echo(f"ipspath: error: {outcome.slide_id}: {outcome.error}", err=True)
    if not quiet or failed:
        parent = jobs[0].out_dir.parent if jobs else out_dir
        click.echo(f"heatmaps: {len(outcomes) - len(failed)} of {len(outcomes)} slides drawn in {parent}"
                   + (f", {len(failed)} failed" if failed else ""), err=True)
    if failed:
        ctx.exit(run_exit_code(outcomes))
