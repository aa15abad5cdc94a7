"""``ipspath inspect``: what a slide file holds."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import click

from ips_path.runtime.errors import IpspathError
from ips_path.slides.slide import BACKENDS, Slide


@click.command("inspect")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (one object per slide) instead of text.")
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True,
              help="Slide reader; auto tries openslide, then tiffslide.")
@click.option("--slide-mpp", type=click.FloatRange(min=0, min_open=True), metavar="MICRONS",
              help="Level-0 pixel size in µm/px, used instead of what the files say.")
def inspect_cmd(slides: tuple[pathlib.Path, ...], as_json: bool, backend: str, slide_mpp: float | None) -> None:
    """Show what each SLIDE holds: reader, vendor, size, pyramid levels with their µm/px,
    the pixel size and where it comes from, objective power, associated images.

    The pixel size comes from, in order: --slide-mpp, scanner metadata, TIFF resolution tags
    (not the 72/96 dpi defaults), the objective power (10 µm/px at 1x, with a warning).

    Each slide is also checked to decode: one region at the centre of its smallest level is read.
    With several slides, the ones that fail are reported on stderr, one line each, after the others
    are shown; the exit status is then 2 (a file that is not a slide) or 1 (pixels that do not decode).

    \b
    Examples:
      ipspath inspect slide.svs
      ipspath inspect --json slides/*.svs > slides.json
    """
    descriptions: list[dict[str, Any]] = []
    failures: list[IpspathError] = []
    for path in slides:
        try:
            with Slide(path, backend=backend, slide_mpp=slide_mpp) as slide:
                description = slide.describe()
                _check_pixels_decode(slide)
        except IpspathError as exc:
            if len(slides) == 1:
                raise
            failures.append(exc)
            continue
        descriptions.append(description)
        if not as_json:
            click.echo(format_description(description))
    if as_json:
        click.echo(json.dumps(descriptions, indent=2))
    for exc in failures:
        click.echo(f"ipspath: error: {exc}", err=True)
    if failures:
        raise click.exceptions.Exit(max(exc.exit_code for exc in failures))


def _check_pixels_decode(slide: Slide) -> None:
    """Read up to 256 x 256 px at the centre of the smallest level; raises IpspathError if it fails."""
    level = slide.level_count - 1
    level_w, level_h = slide.level_dimensions[level]
    size = (min(256, level_w), min(256, level_h))
    downsample = slide.level_downsamples[level]
    centre = (int((level_w - size[0]) // 2 * downsample), int((level_h - size[1]) // 2 * downsample))
    slide.read_region(centre, level, size)


def format_description(description: dict[str, Any]) -> str:
    """Human-readable lines for one :meth:`Slide.describe` dict."""
    width, height = description["dimensions"]
    vendor = description["vendor"] or "unknown"
    if description["level0_mpp"]:
        mpp_x, mpp_y = description["level0_mpp"]
        mpp = f"{mpp_x:.4g} x {mpp_y:.4g} µm/px ({description['mpp_source']})"
    else:
        mpp = "unknown (pass --slide-mpp)"
    power = description["objective_power"]
    level_mpp = description["level_mpp"] or [None] * len(description["levels"])
    lines = [
        str(description["path"]),
        f"  backend            {description['backend']} (vendor: {vendor})",
        f"  dimensions         {width} x {height} px",
        f"  mpp                {mpp}",
        f"  objective power    {f'{power:g}x' if power else 'unknown'}",
        f"  levels             {len(description['levels'])}",
        f"    {'level':<6} {'size (px)':<18} {'downsample':<11} µm/px",
    ]
    for level, ((level_w, level_h), downsample, mpp_at_level) in enumerate(
            zip(description["levels"], description["downsamples"], level_mpp, strict=True)):
        mpp_text = f"{mpp_at_level:.4g}" if mpp_at_level else "-"
        lines.append(f"    {level:<6} {f'{level_w} x {level_h}':<18} {downsample:<11.4g} {mpp_text}")
    lines.append(f"  associated images  {', '.join(description['associated_images']) or 'none'}")
    return "\n".join(lines)
