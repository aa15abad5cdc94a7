"""Generated H&E-like whole-slide images: real pyramidal SVS / TIFF files for tests, benchmarks and
the demo, deterministic by seed.

The tissue layout is a low-resolution mask (a few smooth random blobs), so it scales to any slide
size. Pixels come from periodic stain textures (:mod:`ips_path.synthetic.synth_paint`, which paints them)
composed tile by tile at each pyramid level on a thread pool, so a 100,000 x 80,000 px slide is
written in seconds with little memory; background tiles are encoded once. This module holds the
layout, the ground truth and the file writing.
Lesions (dense, large, dark nuclei) are star-shaped regions inside the tissue whose geometry comes
back in the :class:`SlideSpec`, so tests and the demo know which patches hold them.

Command line (used by ``make demo``)::

    python -m ips_path.synthetic.synth OUT.svs --width 20000 --height 15000 --mpp 0.25 --lesions 2
    python -m ips_path.synthetic.synth OUT_DIR --cohort 40 --width 4000 --height 3000
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from ips_path.runtime.atomic import write_atomically
from ips_path.stores.lesion_truth import LESION_TRUTH_ARRAY
from ips_path.synthetic.spec import Lesion, SlideSpec, in_lesion, lesion_fractions, star_radius
from ips_path.synthetic.synth_paint import BACKGROUND_RGB, MAX_DOWNSAMPLE, Painter, stain_shift_lut
from ips_path.synthetic.synth_tiff import grain_bank, thumbnail_downsample, write_pyramid

if TYPE_CHECKING:
    from ips_path.stores.tile_store import TileStore

__all__ = ["BACKGROUND_RGB", "Lesion", "SlideSpec", "in_lesion", "lesion_fractions", "write_lesion_truth",
           "write_synthetic_cohort", "write_synthetic_slide"]

# The tissue mask has at most this many cells along the long side, and at least 16 level-0 px each.
_MASK_LONG_SIDE = 1024


def write_lesion_truth(spec: SlideSpec, store: TileStore) -> np.ndarray:
    """Write the lesion fraction of every patch of ``store`` (tiled from ``spec``'s slide) as the float32
    array ``truth/lesion``, which ``ipspath train`` reads to report how often it trains on lesions.

    Returns
    -------
    (N,) float32 array, the values written
    """
    fractions = lesion_fractions(spec, store.coords, store.patch_size_level0).astype(np.float32)
    store.write_array(LESION_TRUTH_ARRAY, fractions, attrs={"source": "ipspath.synth", "seed": spec.seed})
    return fractions


# -- writing ---------------------------------------------------------------------------------------

def write_synthetic_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    mpp: float = 0.5,
    fmt: str = "svs",
    resolution_tags: bool = True,
    downsamples: Sequence[int] = (1, 4, 16),
    tile_size: int = 256,
    jpeg_quality: int = 80,
    seed: int = 0,
    tissue: int | np.ndarray = 3,
    lesions: int | Sequence[tuple[float, float, float]] = 0,
    lesion_diameter_um: tuple[float, float] = (300.0, 800.0),
    nucleus_scale: float | None = None,
    lookalikes: int | Sequence[tuple[float, float, float]] = 0,
    lookalike_diameter_um: tuple[float, float] | None = None,
    stain_shift: float = 0.0,
    texture_seed: int = 0,
    workers: int | None = None,
    grain: float = 0.0,
    distractors: int | Sequence[tuple[float, float, float]] = 0,
    distractor_diameter_um: tuple[float, float] | None = None,
) -> SlideSpec:
    """Write a pyramidal, JPEG-compressed, H&E-like slide file.

    Parameters
    ----------
    path : str or os.PathLike
        Output file; written to a temporary sibling first, so it never exists half-written.
    width, height : int
        Level-0 size in pixels.
    mpp : float
        Level-0 pixel size in µm/px (also sets the Aperio AppMag to 10 / mpp).
    fmt : {"svs", "tiff"}
        "svs": Aperio SVS (openslide vendor "aperio"; MPP and AppMag in the description) with a
        thumbnail and a label image. "tiff": generic tiled pyramidal TIFF.
    resolution_tags : bool
        For "tiff": write the pixel size as TIFF resolution in pixels per centimetre; without
        them the file has no pixel size at all (readers then need ``--slide-mpp``).
    downsamples : sequence of int
        Pyramid levels, powers of two from 1 up to 512, starting with 1.
    tile_size : int
        TIFF tile width and height in pixels, a multiple of 16.
    jpeg_quality : int
        JPEG quality, 1-100.
    seed : int
        Everything (tissue, textures, lesions) follows from it; same seed, same bytes.
    tissue : int or 2-D array
        Number of tissue blobs (0: an empty slide), or a boolean mask stretched over the slide.
    lesions : int or sequence of (x, y, radius)
        Number of lesions to place inside the tissue (fewer if the tissue has no room left), or
        explicit circles in level-0 pixels.
    lesion_diameter_um : (float, float)
        Range of the diameters of placed lesions, in µm.
    nucleus_scale : float, optional
        None: classic lesions (dense, large, dark nuclei; easy). A number: subtle lesions whose nuclei are
        this many times larger than normal on average (1.4: 40 % larger) and pleomorphic, in stroma
        much like the normal one; look-alike clusters then have nuclei as large but regular.
    lookalikes : int or sequence of (x, y, radius)
        Benign clusters of large, regular nuclei (on any slide, label unchanged): a number placed in
        the tissue apart from the lesions, or explicit circles in level-0 pixels.
    lookalike_diameter_um : (float, float), optional
        Range of their diameters in µm; default: ``lesion_diameter_um``.
    stain_shift : float
        Per-slide staining variation: each colour channel's optical density is scaled by
        ``exp(N(0, stain_shift))`` (0: every slide stained alike; 0.15: a realistic spread).
    texture_seed : int
        Seed of the stain textures. Slides sharing it share their staining, as if from one lab,
        and the textures (the slowest part for small slides) are made once per process; where
        the textures start, the tissue and the lesions follow ``seed``.
    workers : int, optional
        Threads composing and encoding tiles; default: the number of CPUs.
    grain : float
        Fine pixel noise (standard deviation in grey levels) on the tissue, as real scans carry. The
        smooth generated texture compresses to ~2 KB per 256-px JPEG tile, a tenth of an Aperio scan;
        ``grain=8`` at quality 80 gives Aperio-like tiles of 10-25 KB, which decoding benchmarks need
        (``bench/loader_bench.py``). 0 (default) writes the same bytes as before the option existed.
    distractors : int or sequence of (x, y, radius)
        Benign clusters *darker* than any lesion but of another texture (on any slide, label unchanged):
        small, round, densely packed, deeply stained nuclei, as lymphocyte aggregates look; a number placed
        in the tissue apart from lesions and look-alikes, or explicit circles in level-0 pixels. They
        defeat a detector of dark nuclei; 0 (default) writes the same bytes as before the option existed.
    distractor_diameter_um : (float, float), optional
        Range of their diameters in µm; default: ``lesion_diameter_um``.

    Returns
    -------
    SlideSpec
    """
    path = pathlib.Path(path)
    if not 0 <= grain <= 64:
        raise ValueError(f"grain must be within 0-64 grey levels, got {grain}")
    downsamples = tuple(int(d) for d in downsamples)
    _check_arguments(width, height, mpp, fmt, downsamples, tile_size, jpeg_quality)
    mask_field, cell_px = _tissue_field(tissue, width, height, np.random.default_rng([seed, 1]))
    tissue_mask = mask_field > 0.5
    if nucleus_scale is not None and not nucleus_scale > 0:
        raise ValueError(f"nucleus_scale must be positive, got {nucleus_scale}")
    if not stain_shift >= 0:
        raise ValueError(f"stain_shift must be >= 0, got {stain_shift}")
    placed = _lesions(lesions, tissue_mask, cell_px, mpp, lesion_diameter_um, np.random.default_rng([seed, 2]))
    mimics = _lesions(lookalikes, tissue_mask, cell_px, mpp, lookalike_diameter_um or lesion_diameter_um,
                      np.random.default_rng([seed, 7]), avoid=placed)
    darker = _lesions(distractors, tissue_mask, cell_px, mpp, distractor_diameter_um or lesion_diameter_um,
                      np.random.default_rng([seed, 10]), avoid=(*placed, *mimics))
    spec = SlideSpec(path=path, width=width, height=height, mpp=float(mpp), fmt=fmt, downsamples=downsamples,
                     seed=seed, tissue_mask=tissue_mask, mask_mpp=cell_px * mpp, lesions=placed, lookalikes=mimics,
                     distractors=darker)
    thumb_downsample = thumbnail_downsample(width, height)
    painter = Painter(mask_field, cell_px, placed, mpp, texture_seed, np.random.default_rng([seed, 6]),
                      lookalikes=mimics, distractors=darker, nucleus_scale=nucleus_scale,
                      stain_lut=stain_shift_lut(stain_shift, np.random.default_rng([seed, 8])))

    path.parent.mkdir(parents=True, exist_ok=True)
    noise = grain_bank(grain, tile_size, seed) if grain else None
    write_atomically(path, lambda partial: write_pyramid(partial, spec, painter, tile_size, jpeg_quality,
                                                          resolution_tags, thumb_downsample,
                                                          workers or os.cpu_count() or 1, noise))
    return spec


def write_synthetic_cohort(
    out_dir: str | os.PathLike,
    n_slides: int,
    *,
    positive_fraction: float = 0.5,
    size: tuple[int, int] = (4000, 3000),
    lesions_per_positive: tuple[int, int] = (1, 3),
    lookalikes_per_slide: tuple[int, int] = (0, 0),
    distractors_per_slide: tuple[int, int] = (0, 0),
    seed: int = 0,
    prefix: str = "slide",
    **slide_options: object,
) -> list[SlideSpec]:
    """Write ``n_slides`` slides and ``manifest.csv`` (slide_id, slide_path, label, case_id).

    Parameters
    ----------
    out_dir : str or os.PathLike
        Folder for the slides and the manifest (slide paths in it are relative to it).
    n_slides : int
        Number of slides, one per case.
    positive_fraction : float
        Share of slides with lesions (label "positive"); the others are "negative".
    size : (int, int)
        Level-0 (width, height) of every slide, in pixels.
    lesions_per_positive : (int, int)
        Inclusive range of the number of lesions on a positive slide.
    lookalikes_per_slide : (int, int)
        Inclusive range of the number of look-alike clusters on every slide, positive or negative.
    distractors_per_slide : (int, int)
        Inclusive range of the number of dark distractors on every slide (see :func:`write_synthetic_slide`).
    seed : int
        Seed of the whole cohort; each slide gets its own seed from it.
    prefix : str
        Slides are ``<prefix>_000`` ... and cases ``<prefix>_case_000`` ...; cohorts that share a
        tiles folder need different prefixes (the slide id names the tile store).
    **slide_options
        Passed to :func:`write_synthetic_slide` (mpp, fmt, downsamples, ...).

    Returns
    -------
    list of SlideSpec, in manifest order
    """
    out_dir = pathlib.Path(out_dir)
    rng = np.random.default_rng([seed, 3])
    n_positive = round(n_slides * positive_fraction)
    positive = np.zeros(n_slides, dtype=bool)
    positive[rng.permutation(n_slides)[:n_positive]] = True
    suffix = ".svs" if slide_options.get("fmt", "svs") == "svs" else ".tiff"
    # its own generator, so cohorts without look-alikes keep the slides they always had
    lookalike_counts = np.random.default_rng([seed, 9]).integers(lookalikes_per_slide[0], lookalikes_per_slide[1] + 1,
                                                                   n_slides)
    distractor_counts = np.random.default_rng([seed, 10]).integers(distractors_per_slide[0],
                                                                     distractors_per_slide[1] + 1, n_slides)
    specs = []
    for index in range(n_slides):
        n_lesions = int(rng.integers(lesions_per_positive[0], lesions_per_positive[1] + 1)) if positive[index] else 0
        specs.append(write_synthetic_slide(
            out_dir / f"{prefix}_{index:03d}{suffix}", *size, seed=int(rng.integers(2**31)),
            tissue=int(rng.integers(2, 5)), lesions=n_lesions, lookalikes=int(lookalike_counts[index]),
            distractors=int(distractor_counts[index]), **slide_options))
    with open(out_dir / "manifest.csv", "w", newline="") as manifest:
        writer = csv.writer(manifest)
        writer.writerow(["slide_id", "slide_path", "label", "case_id"])
        for index, spec in enumerate(specs):
            writer.writerow([spec.path.stem, spec.path.name, spec.label, f"{prefix}_case_{index:03d}"])
    return specs


def _check_arguments(width: int, height: int, mpp: float, fmt: str, downsamples: tuple[int, ...],
                     tile_size: int, jpeg_quality: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"slide size must be positive, got {width}x{height}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if fmt not in ("svs", "tiff"):
        raise ValueError(f"fmt must be 'svs' or 'tiff', got {fmt!r}")
    powers_of_two = all(d >= 1 and d & (d - 1) == 0 and d <= MAX_DOWNSAMPLE for d in downsamples)
    if not downsamples or downsamples[0] != 1 or not powers_of_two or list(downsamples) != sorted(set(downsamples)):
        raise ValueError(f"downsamples must start at 1 and rise in powers of two up to {MAX_DOWNSAMPLE}, "
                         f"got {downsamples}")
    if tile_size < 16 or tile_size % 16:
        raise ValueError(f"tile_size must be a multiple of 16 (JPEG blocks), got {tile_size}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be 1-100, got {jpeg_quality}")


# -- layout ----------------------------------------------------------------------------------------

def _tissue_field(tissue: int | np.ndarray, width: int, height: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A smooth float32 field over the slide, tissue where > 0.5, and its cell size in level-0 px."""
    cell_px = max(16, math.ceil(max(width, height) / _MASK_LONG_SIDE))
    shape = (math.ceil(height / cell_px), math.ceil(width / cell_px))
    if isinstance(tissue, np.ndarray):
        if tissue.ndim != 2 or tissue.size == 0:
            raise ValueError(f"a tissue mask must be a non-empty 2-D array, got shape {tissue.shape}")
        rows = (np.arange(shape[0]) + 0.5) * tissue.shape[0] / shape[0]
        cols = (np.arange(shape[1]) + 0.5) * tissue.shape[1] / shape[1]
        layout = tissue.astype(bool)[rows.astype(int)[:, None], cols.astype(int)[None, :]].astype(np.float32)
        return ndimage.gaussian_filter(layout, 1.0), float(cell_px)
    if tissue < 0:
        raise ValueError(f"tissue must be a number of blobs >= 0 or a mask, got {tissue}")
    levels = np.full(shape, -1.0, dtype=np.float32)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    for _ in range(tissue):
        centre_x, centre_y = rng.uniform(0.25, 0.75) * shape[1], rng.uniform(0.25, 0.75) * shape[0]
        radius = rng.uniform(0.12, 0.22) * min(shape) * (3 / max(tissue, 3)) ** 0.5
        harmonics = [(rng.uniform(0, a), rng.uniform(0, 2 * np.pi)) for a in (0.25, 0.12, 0.06)]
        stretch = rng.uniform(0.7, 1.4)
        dx, dy = (xx - centre_x) / stretch, (yy - centre_y) * stretch
        edge = star_radius(radius, harmonics, np.arctan2(dy, dx))
        levels = np.maximum(levels, 1 - np.hypot(dx, dy) / edge)
    wobble = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4.0, mode="wrap")
    wobble /= wobble.std() + 1e-12
    inside = levels + 0.08 * wobble > 0
    return ndimage.gaussian_filter(inside.astype(np.float32), 1.0), float(cell_px)


def _lesions(lesions: int | Sequence[tuple[float, float, float]], tissue_mask: np.ndarray, cell_px: float,
             mpp: float, diameter_um: tuple[float, float], rng: np.random.Generator,
             avoid: Sequence[Lesion] = ()) -> tuple[Lesion, ...]:
    """Lesions as given, or ``lesions`` of them placed at random well inside the tissue, apart from each
    other and from the regions in ``avoid``."""
    if not isinstance(lesions, int | np.integer):
        return tuple(Lesion(float(x), float(y), float(r)) for x, y, r in lesions)
    if lesions <= 0:
        return ()
    if not tissue_mask.any():
        raise ValueError("cannot place lesions on a slide without tissue")
    depth_px = ndimage.distance_transform_edt(tissue_mask) * cell_px
    rows, cols = np.indices(tissue_mask.shape)
    cell_x, cell_y = (cols + 0.5) * cell_px, (rows + 0.5) * cell_px
    placed: list[Lesion] = []
    for _ in range(lesions):
        radius = rng.uniform(*diameter_um) / 2 / mpp
        harmonics = tuple((rng.uniform(0, a), rng.uniform(0, 2 * np.pi)) for a in (0.12, 0.07, 0.04))
        reach = radius * (1 + sum(a for a, _ in harmonics))
        free = depth_px.copy()
        for other in (*avoid, *placed):  # keep regions apart
            free[np.hypot(cell_x - other.x, cell_y - other.y) < other.max_radius + reach] = 0
        candidates = np.flatnonzero(free >= reach)
        if candidates.size == 0:  # tissue too thin for this size: shrink it to the deepest spot
            best = int(np.argmax(free))
            if free.flat[best] <= cell_px:
                break
            candidates = np.array([best])
            scale = free.flat[best] / reach
            radius, reach = radius * scale, free.flat[best]
        row, col = np.unravel_index(rng.choice(candidates), free.shape)
        placed.append(Lesion(x=float((col + 0.5) * cell_px), y=float((row + 0.5) * cell_px), radius=float(radius),
                             harmonics=tuple((float(a), float(phase)) for a, phase in harmonics)))
    return tuple(placed)


# -- command line ----------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ips_path.synthetic.synth``: write one generated slide, or a cohort with its manifest."""
    parser = argparse.ArgumentParser(prog="python -m ips_path.synthetic.synth", description=main.__doc__)
    parser.add_argument("out", help="output slide file (.svs/.tiff), or folder with --cohort")
    parser.add_argument("--width", type=int, default=4000, help="level-0 width in pixels")
    parser.add_argument("--height", type=int, default=3000, help="level-0 height in pixels")
    parser.add_argument("--mpp", type=float, default=0.5, help="level-0 pixel size in µm/px")
    parser.add_argument("--fmt", choices=("svs", "tiff"), default=None,
                        help="file format (default: from the file suffix; svs for a cohort)")
    parser.add_argument("--no-resolution-tags", action="store_true", help="tiff: leave the pixel size out")
    parser.add_argument("--downsamples", type=lambda s: tuple(int(v) for v in s.split(",")), default=(1, 4, 16),
                        help="pyramid downsamples, comma-separated powers of two (default 1,4,16)")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tissue", type=int, default=3, help="number of tissue blobs")
    parser.add_argument("--lesions", type=int, default=0, help="number of lesions")
    parser.add_argument("--lesion-diameter", type=float, nargs=2, default=(300.0, 800.0), metavar=("MIN", "MAX"),
                        help="range of lesion diameters in µm (default 300 800)")
    parser.add_argument("--nucleus-scale", type=float, default=None,
                        help="subtle lesions: nuclei this many times larger than normal, pleomorphic "
                             "(default: classic dense dark lesions)")
    parser.add_argument("--lookalikes", type=int, default=0,
                        help="look-alike clusters of large regular nuclei per slide")
    parser.add_argument("--distractors", type=int, default=0,
                        help="dark distractors (dense small dark nuclei, darker than any lesion) per slide")
    parser.add_argument("--stain-shift", type=float, default=0.0,
                        help="per-slide stain variation (0.15: realistic spread; default 0)")
    parser.add_argument("--cohort", type=int, metavar="N", help="write N slides and manifest.csv into OUT")
    parser.add_argument("--positive-fraction", type=float, default=0.5, help="with --cohort")
    args = parser.parse_args(argv)
    options = dict(mpp=args.mpp, resolution_tags=not args.no_resolution_tags, downsamples=args.downsamples,
                   tile_size=args.tile_size, jpeg_quality=args.quality, lesion_diameter_um=tuple(args.lesion_diameter),
                   nucleus_scale=args.nucleus_scale, stain_shift=args.stain_shift)
    if args.cohort is not None:
        specs = write_synthetic_cohort(args.out, args.cohort, positive_fraction=args.positive_fraction,
                                       size=(args.width, args.height), seed=args.seed, fmt=args.fmt or "svs",
                                       lookalikes_per_slide=(args.lookalikes, args.lookalikes),
                                       distractors_per_slide=(args.distractors, args.distractors), **options)
        print(f"wrote {len(specs)} slides and {pathlib.Path(args.out) / 'manifest.csv'}")
        return
    fmt = args.fmt or ("svs" if pathlib.Path(args.out).suffix.lower() == ".svs" else "tiff")
    spec = write_synthetic_slide(args.out, args.width, args.height, fmt=fmt, seed=args.seed,
                                 tissue=args.tissue, lesions=args.lesions, lookalikes=args.lookalikes,
                                 distractors=args.distractors, **options)
    print(f"wrote {spec.path} ({spec.width}x{spec.height} px, {spec.mpp} µm/px, {len(spec.lesions)} lesions)")


if __name__ == "__main__":
    main()
