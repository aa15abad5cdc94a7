"""``ipspath synth``: write a generated cohort of H&E-like slides with lesions, and its manifest."""

from __future__ import annotations

from pathlib import Path

import click

from ips_path.runtime.errors import BadInputError


def _levels(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated downsamples, e.g. 1,4,16") from None
    if not levels or levels[0] != 1 or any(b <= a or b & (b - 1) for a, b in zip(levels, levels[1:], strict=False)):
        raise click.BadParameter(f"{value!r}: start at 1 and rise in powers of two, e.g. 1,4,16")
    return levels


def _range(low: float, high: float, option: str) -> None:
    if low > high:
        raise BadInputError(f"{option} {low:g} {high:g}: the first number is the smallest, the second the largest")


@click.command("synth")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the slides and manifest.csv (slide_id, slide_path, label, case_id).")
@click.option("-n", "--slides", "n_slides", type=click.IntRange(min=1), default=20, show_default=True,
              help="Number of slides, one patient each.")
@click.option("--positive-fraction", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of slides with lesions (label positive); the others are negative.")
@click.option("--width", type=click.IntRange(min=256), default=4000, show_default=True,
              help="Level-0 width of every slide, px.")
@click.option("--height", type=click.IntRange(min=256), default=3000, show_default=True,
              help="Level-0 height of every slide, px.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="Level-0 pixel size, µm/px (0.5 is a 20x scan).")
@click.option("--lesions", type=click.IntRange(min=1), nargs=2, default=(1, 3), show_default=True,
              metavar="MIN MAX", help="Lesions on each positive slide, between MIN and MAX.")
@click.option("--lesion-diameter", type=click.FloatRange(min=0, min_open=True), nargs=2, default=(300.0, 800.0),
              show_default=True, metavar="MIN MAX",
              help="Lesion diameters in µm, between MIN and MAX: small lesions (e.g. 60 120) make a hard task.")
@click.option("--nucleus-scale", type=click.FloatRange(min=1), default=None,
              help="Subtle lesions: nuclei this many times larger than normal and pleomorphic, instead of the "
                   "default dense dark ones (e.g. 1.4).")
@click.option("--lookalikes", type=click.IntRange(min=0), default=0, show_default=True,
              help="Look-alike clusters of large regular nuclei on every slide, positive or negative: a model "
                   "must tell them from lesions.")
@click.option("--stain-shift", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Variation of the staining between slides (0.15: a realistic spread between labs).")
@click.option("--format", "fmt", type=click.Choice(["svs", "tiff"]), default="svs", show_default=True,
              help="svs: Aperio SVS; tiff: generic pyramidal TIFF with resolution tags.")
@click.option("--levels", default="1,4,16", show_default=True, callback=_levels,
              help="Pyramid downsamples, comma-separated powers of two from 1.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the cohort: the same seed writes the same slides.")
@click.option("--prefix", default="slide", show_default=True,
              help="Slides are named <prefix>_000, ... (cohorts tiled into one folder need different prefixes).")
@click.option("--overwrite", is_flag=True, help="Write into a folder that already holds a manifest.csv.")
def synth_cmd(out_dir: Path, n_slides: int, positive_fraction: float, width: int, height: int, mpp: float,
              lesions: tuple[int, int], lesion_diameter: tuple[float, float], nucleus_scale: float | None,
              lookalikes: int, stain_shift: float, fmt: str, levels: tuple[int, ...], seed: int, prefix: str,
              overwrite: bool) -> None:
    """Write a generated cohort to try ipspath and its options on: H&E-like slides, some with lesions.

    Every slide is a real pyramidal slide file (JPEG tiles) that openslide and tiffslide open, with
    tissue, nuclei and, on positive slides, lesions of denser or larger nuclei. The labels are known,
    so you can see what a model, a tiling or a feature option makes of a task you chose. Then:

    \b
      ipspath tile --manifest OUT/manifest.csv -o tiles/
      ipspath train --manifest OUT/manifest.csv --tiles tiles/ -o run/
    """
    from ips_path.synthetic.synth import write_synthetic_cohort

    _range(*lesions, "--lesions")
    _range(*lesion_diameter, "--lesion-diameter")
    if (out_dir / "manifest.csv").exists() and not overwrite:
        raise BadInputError(f"{out_dir / 'manifest.csv'}: exists; pass --overwrite to write a new cohort there, "
                            "or choose another -o folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        specs = write_synthetic_cohort(out_dir, n_slides, positive_fraction=positive_fraction, size=(width, height),
                                       lesions_per_positive=lesions, lookalikes_per_slide=(lookalikes, lookalikes),
                                       seed=seed, prefix=prefix, mpp=mpp, fmt=fmt, downsamples=levels,
                                       lesion_diameter_um=lesion_diameter, nucleus_scale=nucleus_scale,
                                       stain_shift=stain_shift)
    except ValueError as exc:  # a combination the generator cannot draw (e.g. levels past the slide size)
        raise BadInputError(f"ipspath synth: {exc}") from exc
    positives = sum(spec.label == "positive" for spec in specs)
    click.echo(f"wrote {len(specs)} slides ({positives} positive) and {out_dir / 'manifest.csv'}; next: "
               f"ipspath tile --manifest {out_dir / 'manifest.csv'} -o tiles/", err=True)
