"""``ipspath tile``: slides -> tissue mask + patch coordinates (one zarr store per slide) + QC."""

from __future__ import annotations

from pathlib import Path

import click

from ips_path.cli.options import OutputFolder, verify_option
from ips_path.runtime.errors import BadInputError
from ips_path.tiling.annotations import MaskClasses, class_names
from ips_path.tiling.grid import patch_resolution, patch_stride
from ips_path.tiling.run import SUMMARY_NAME, TilingParams, collect_inputs, exit_code, tile_slides
from ips_path.tiling.tissue import TISSUE_METHODS, TissueParams


@click.command("tile")
@click.argument("inputs", nargs=-1)
@click.option("-o", "--out", "out_dir", required=True, type=OutputFolder(),
              help="Output folder: <slide_id>.zarr stores, qc/<slide_id>.png, tiling_summary.csv.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
              help="CSV with slide_id, slide_path (relative to the CSV's folder) and optional mpp "
                   "(level-0 µm/px); other columns are ignored.")
@click.option("--mpp", "target_mpp", type=float, default=None,
              help="Patch resolution in µm/px.  [default: 0.5]")
@click.option("--mag", type=float, default=None,
              help="Patch resolution as objective magnification instead of --mpp: 10 µm/px at 1x, "
                   "so 20 = 0.5 µm/px, 40 = 0.25 µm/px.")
@click.option("--patch-size", type=int, default=256, show_default=True,
              help="Patch side in px at the patch resolution.")
@click.option("--stride", type=int, default=None,
              help="Step between patches in px at the patch resolution.  [default: --patch-size]")
@click.option("--overlap", type=int, default=None,
              help="Overlap of neighbouring patches in px at the patch resolution (stride = patch size - overlap).")
@click.option("--min-tissue", type=float, default=0.5, show_default=True,
              help="Keep patches whose tissue fraction is at least this (0-1).")
@click.option("--tissue-method", type=click.Choice(TISSUE_METHODS), default="colour", show_default=True,
              help="colour: stain saturation with an Otsu threshold (blank slides give no tissue); "
                   "otsu: darker than Otsu of the grey level; saturation: fixed saturation threshold; "
                   "all: the whole slide.")
@click.option("--tissue-mask", type=click.Path(exists=True, path_type=Path), default=None,
              help="Tile only inside these masks: a file (one slide) or a folder of <slide_id>.png/.npy/.geojson. "
                   "PNG/NPY: non-zero = inside, covering the whole slide at any resolution (µm/px taken from the "
                   "slide's width); GeoJSON: QuPath annotations in level-0 px, Ignore* annotations are holes. "
                   "Tissue is still detected inside the mask (see --mask-only).")
@click.option("--mask-classes", default=None, metavar="NAMES",
              help="GeoJSON masks: only annotations of these QuPath classes count (comma-separated, e.g. "
                   "'Tumor,Stroma'; 'Tumor' also matches 'Tumor: Positive').  [default: every class but the "
                   "exclusions, and unclassified annotations]")
@click.option("--mask-exclude-classes", default=None, metavar="NAMES",
              help="GeoJSON masks: annotations of these classes are holes, as Ignore* always is "
                   "(comma-separated, e.g. 'Necrosis,Pen').")
@click.option("--mask-only", is_flag=True,
              help="Take the mask as it is: tile blank glass inside it too (default: only tissue detected "
                   "inside the mask).")
@click.option("--keep-holes", is_flag=True,
              help="Keep every hole in the tissue (default: fill holes under 0.02 mm²).")
@click.option("--slide-mpp", type=float, default=None,
              help="Level-0 µm/px of every slide, overriding its metadata (for files without it, e.g. plain "
                   "images); a manifest mpp column wins over it.")
@click.option("--backend", type=click.Choice(["auto", "openslide", "tiffslide"]), default="auto",
              show_default=True, help="Slide reader; auto tries openslide, then tiffslide.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Slides tiled in parallel (processes).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Tile on a Dask cluster instead of local processes: a scheduler address (tcp://host:8786) "
                   "or local:N; slides and the output folder must be on storage all workers see "
                   "(needs pip install 'ipspath[dask]').")
@click.option("--overwrite", is_flag=True,
              help="Tile again slides whose store exists (default: skip stores made with the same parameters "
                   "from the same file, refuse stores made with other parameters).")
@click.option("--h5", "export_h5", is_flag=True,
              help="Also write CLAM/TRIDENT-style coordinates to h5/<slide_id>.h5.")
@click.option("--no-qc", is_flag=True, help="Do not write QC pictures (qc/<slide_id>.png).")
@verify_option
@click.pass_context
def tile_cmd(ctx: click.Context, inputs: tuple[str, ...], out_dir: Path, manifest: Path | None,
             target_mpp: float | None, mag: float | None, patch_size: int, stride: int | None,
             overlap: int | None, min_tissue: float, tissue_method: str, tissue_mask: Path | None,
             mask_classes: str | None, mask_exclude_classes: str | None, mask_only: bool, keep_holes: bool,
             slide_mpp: float | None, backend: str, workers: int, scheduler: str | None,
             overwrite: bool, export_h5: bool, no_qc: bool, verify: str) -> None:
    """Find tissue and lay a patch grid on each slide; write one tile store per slide.

    INPUTS are slide files, folders (searched recursively for slide files) or glob patterns
    (quote them: 'data/**/*.svs'). Slides whose store exists with the same parameters are
    skipped, so an interrupted run can be restarted as is.

    Tissue is detected at about 8 µm/px (stain saturation, Otsu threshold, specks and small
    holes removed); a patch is kept when at least --min-tissue of its area is tissue. With
    --tissue-mask, tissue is what is detected inside the mask (QuPath GeoJSON: Ignore*
    annotations and --mask-exclude-classes are holes). Check qc/<slide_id>.png: green =
    tissue contour, blue = kept patches.

    \b
    Exit status: 0 when every slide was tiled, skipped or had no tissue (zero patches, a
    warning); 2 when every slide failed on bad input (unreadable file, unknown µm/px, ...);
    1 when some slides failed. Each failure is one line on stderr and a row of
    tiling_summary.csv.
    """
    if not inputs and manifest is None:
        raise BadInputError("no slides given: pass slide files, folders or patterns, or --manifest")
    params = TilingParams(
        target_mpp=patch_resolution(target_mpp, mag),
        patch_size=patch_size,
        stride=patch_stride(patch_size, stride, overlap),
        min_tissue=min_tissue,
        tissue=TissueParams(method=tissue_method, keep_holes=keep_holes),
        tissue_mask=tissue_mask,
        mask_classes=MaskClasses(include=class_names(mask_classes, "--mask-classes"),
                                 exclude=class_names(mask_exclude_classes, "--mask-exclude-classes") or ()),
        mask_only=mask_only,
        backend=backend,
        slide_mpp=slide_mpp,
        qc=not no_qc,
        h5=export_h5,
        verify=verify,
    )
    slides = collect_inputs(inputs, manifest)
    quiet = bool((ctx.obj or {}).get("quiet"))
    results = tile_slides(slides, out_dir, params, workers=workers, overwrite=overwrite, progress=not quiet,
                          scheduler=scheduler)
    counts = {status: sum(r.status == status for r in results) for status in ("tiled", "skipped", "no-tissue",
                                                                             "failed")}
    patches = sum(r.n_patches for r in results)
    if not quiet or counts["failed"]:
        click.echo(
            f"{len(results)} slide{'' if len(results) == 1 else 's'}: {counts['tiled']} tiled, "
            f"{counts['skipped']} skipped, "
            f"{counts['no-tissue']} without tissue, {counts['failed']} failed; {patches} patches; "
            f"summary: {out_dir / SUMMARY_NAME}",
            err=True,
        )
    ctx.exit(exit_code(results))
