"""Attention heatmaps from stored patch scores, without running the model again.

For one slide, :func:`render_slide_heatmaps` writes into its output folder:

``thumbnail.png``
    The slide, its long side ``thumbnail_size`` px (never enlarged).
``overlay.png``
    The same picture (same size) with the patches coloured by attention and a colour bar.
``patches.geojson``
    One QuPath tile object per patch (File > Import objects), in level-0 pixels.
``top_patches.png``
    The ``top_k`` most attended patches, as the model saw them, with rank and score.
``overlay.tiff``
    Optional: the overlay as a pyramidal TIFF at ``tiff_mpp`` µm/px that openslide, tiffslide
    and QuPath open, covering the same physical extent as the slide.

Colours show the percentile rank of each patch's attention logit within its slide (0 = least,
1 = most attended): logits are unbounded and their scale differs between slides and models,
ranks do not. Ranks spread nearly flat attention over the whole colour range, so the legend also
gives the spread of the slide's attention, and ``scale="weight"`` colours attention weights on one
fixed scale for every slide instead (:mod:`~ips_path.review.heatmap.spread`; ``attention.json`` records
both). They are drawn only over the patches (the tissue that was scored); the
background stays the plain thumbnail.

Memory does not grow with the number of patches beyond a few arrays of N numbers: the scores
are scattered into a small raster with one cell per grid position (``coords // stride``), and
every picture is composed block by block from that raster and pixels read at the needed
resolution (never level 0 of the whole slide).

The package by concern: :mod:`~ips_path.review.heatmap.grid` (scores on a grid), :mod:`~ips_path.review.heatmap.lowres`
(block-wise low-resolution slide reads), :mod:`~ips_path.review.heatmap.drawing` (colours, overlay, colour
bar, gallery), :mod:`~ips_path.review.heatmap.writers` (PNG, GeoJSON, pyramidal TIFF),
:mod:`~ips_path.review.heatmap.render` (the files of one slide) and :mod:`~ips_path.review.heatmap.jobs` (many
slides, on the contract of :mod:`ips_path.runtime.jobs`). Everything public is importable from here.
"""

from ips_path.review.heatmap.drawing import (
    COLORMAPS,
    Gallery,
    blend_overlay,
    colormap_lut,
    draw_colour_bar,
    overlay_picture,
    top_patch_gallery,
)
from ips_path.review.heatmap.grid import (
    ScoreGrid,
    percentile_ranks,
    pixel_centres,
    sample_grid,
    score_grid,
    smooth_grid,
)
from ips_path.review.heatmap.jobs import (
    TASK_SCORES_GROUP,
    HeatmapJob,
    jobs_from_predictions,
    jobs_from_tiles,
    load_scores,
    load_task_scores,
    render_heatmaps,
)
from ips_path.review.heatmap.lowres import read_downsampled, slide_thumbnail
from ips_path.review.heatmap.render import (
    HEATMAP_FILES,
    check_heatmap_options,
    check_scores,
    open_store_slide,
    render_slide_heatmaps,
)
from ips_path.review.heatmap.spread import (
    SCALES,
    AttentionSpread,
    attention_spread,
    read_spread,
    scale_legend,
    scale_values,
)
from ips_path.review.heatmap.writers import save_png, write_overlay_tiff, write_patches_geojson

__all__ = [
    "COLORMAPS",
    "SCALES",
    "AttentionSpread",
    "attention_spread",
    "read_spread",
    "scale_legend",
    "scale_values",
    "HEATMAP_FILES",
    "TASK_SCORES_GROUP",
    "Gallery",
    "HeatmapJob",
    "ScoreGrid",
    "blend_overlay",
    "check_heatmap_options",
    "check_scores",
    "colormap_lut",
    "draw_colour_bar",
    "jobs_from_predictions",
    "jobs_from_tiles",
    "load_scores",
    "load_task_scores",
    "open_store_slide",
    "overlay_picture",
    "percentile_ranks",
    "pixel_centres",
    "read_downsampled",
    "render_heatmaps",
    "render_slide_heatmaps",
    "sample_grid",
    "save_png",
    "score_grid",
    "slide_thumbnail",
    "smooth_grid",
    "top_patch_gallery",
    "write_overlay_tiff",
    "write_patches_geojson",
]

