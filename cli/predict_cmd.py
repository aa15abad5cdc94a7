"""``ipspath predict``: predictions and attention scores for a cohort of slides."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from ips_path.cli.options import OutputFolder, verify_option


@click.command("predict")
@click.argument("slides", nargs=-1, type=click.Path())
@click.option("--model", "model", required=True, type=click.Path(exists=True),
              help="Training run folder (uses its best.pt), a cross-validated run folder (`train --folds K`: "
                   "the mean of its fold models) or a checkpoint .pt file.")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False),
              help="CSV with slide_id, slide_path and optional label (the model's label columns), mpp (labels "
                   "give metrics).")
@click.option("-o", "--out", "out_dir", required=True, type=OutputFolder(),
              help="Output folder; running again resumes (finished slides are skipped).")
@click.option("--tiles", "tiles_dir", type=click.Path(file_okay=False),
              help="Folder of tile stores from `ipspath tile`; slides without a store are tiled into it. "
                   "Default: OUT/tiles.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, or auto (cuda if available).")
@click.option("--threads", type=int, default=None,
              help="Threads reading tiles from each slide file. Default: the CPU cores this process may use.")
@click.option("--chunk-size", type=int, help="Patches scored at a time (default: the model's chunk size).")
@click.option("--backend", type=click.Choice(["auto", "openslide", "tiffslide"]), default="auto",
              show_default=True, help="Slide reader.")
@click.option("--heatmaps/--no-heatmaps", default=True, show_default=True,
              help="Also write attention heatmaps to OUT/heatmaps/<slide_id>/.")
@click.option("--thumbnail-size", default=2048, show_default=True, help="Long side of the heatmap pictures, px.")
@click.option("--top-k", default=16, show_default=True, help="Most attended patches in each slide's gallery.")
@click.option("--tiff-mpp", type=float, help="Also write a pyramidal TIFF overlay at this resolution (µm/px).")
@click.option("--overwrite", is_flag=True,
              help="Replace results in OUT made by another model or from other slide files (otherwise refused), "
                   "and predict every slide again.")
@click.option("--scheduler", help="Dask scheduler address, or local:N, to predict on a cluster "
                                  "(GPU workers need --resources GPU=1). Default: this process.")
@verify_option
@click.pass_context
def predict_cmd(ctx: click.Context, slides: tuple[str, ...], model: str, manifest: str | None, out_dir: Path,
                tiles_dir: str | None, device: str, threads: int | None, chunk_size: int | None, backend: str,
                heatmaps: bool,
                thumbnail_size: int, top_k: int, tiff_mpp: float | None, overwrite: bool, scheduler: str | None,
                verify: str) -> int:
    """Predict every slide in SLIDES (files, folders, glob patterns) and/or --manifest with a trained model.

    \b
    Writes to OUT:
      predictions.csv            one row per slide: predicted class, one probability per class
                                 (several label columns: predicted_<task>, prob_<task>=<class>)
      metrics.json, roc.png      with labels: AUC, AUPRC, balanced accuracy (bootstrap 95% CIs),
      reliability.png            calibration error, confusion matrix; with case_id also per patient
                                 (several label columns: per task, roc_<task>.png ...)
      patients.csv               survival models: risk (and curve) per patient (case_id)
      survival_metrics.json, km.png  survival models with time/event: C-index, Kaplan-Meier curves
      scores/<id>_scores.h5      attention logit of every patch (coords + attention_scores)
      heatmaps/<id>/             overlay.png, patches.geojson (QuPath), top_patches.png
      status/<id>.json           per-slide record: status, what made it (slide file, store, model)
    A failing slide is recorded and the rest go on; running again resumes. OUT holds one model's
    results: another model, or a slide file replaced under the same id, is refused unless --overwrite.
    The attention logits also go into each tile store as scores/<run>-<model key>. Review with
    `ipspath report OUT`.
    """
    from ips_path.inference.predict import predict
    from ips_path.runtime.errors import BadInputError

    if not slides and manifest is None:
        raise BadInputError("give slides (files, folders, patterns) or --manifest")
    options = {"thumbnail_size": thumbnail_size, "top_k": top_k, "tiff_mpp": tiff_mpp}
    result = predict(model, out_dir, inputs=slides, manifest=manifest, tiles_dir=tiles_dir, device=device,
                     threads=threads, chunk_size=chunk_size, backend=backend, heatmaps=heatmaps,
                     heatmap_options=options, scheduler=scheduler, overwrite=overwrite, progress=not ctx.obj["quiet"],
                     verify=verify)
    counts = Counter(o.status.value for o in result.outcomes)
    shown = ", ".join(f"{n} {status}" for status, n in counts.items() if status != "done")
    click.echo(f"predicted {sum(o.ok for o in result.outcomes)} of {len(result.outcomes)} slides"
               f"{f' ({shown})' if shown else ''} -> {result.out_dir / 'predictions.csv'}")
    if result.metrics and result.kind is not None:
        for line in result.kind.summary_lines(result.metrics, result.out_dir):
            click.echo(line)
    click.echo(f"review: ipspath report {result.out_dir}")
    return result.exit_code
