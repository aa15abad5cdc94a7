"""Attention heatmaps: colours land on the right patches, files open where users open them."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import needs_test_data
from PIL import Image

import ips_path.review.heatmap as heatmap
from ips_path.cli.main import cli
from ips_path.review.heatmap import (
    colormap_lut,
    load_scores,
    percentile_ranks,
    render_slide_heatmaps,
    sample_grid,
    score_grid,
    slide_thumbnail,
    smooth_grid,
    top_patch_gallery,
)
from ips_path.runtime.errors import BadInputError
from ips_path.slides.slide import Slide
from ips_path.stores.tile_store import TileStore, write_tile_store
from ips_path.synthetic.synth import write_synthetic_slide

DATA = Path(os.environ.get("IPSPATH_TEST_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
PATCH = 128
MPP = 0.5


@pytest.fixture(scope="module")
def slide_store(tmp_path_factory) -> tuple[TileStore, np.ndarray]:
    """A 2048 x 1536 px slide, a store of its tissue patches, and scores: one block of patches
    far above the rest."""
    folder = tmp_path_factory.mktemp("heatmap")
    rows, cols = np.mgrid[-1:1:24j, -1:1:32j]
    tissue = rows**2 + cols**2 < 0.7  # an ellipse with background around it
    spec = write_synthetic_slide(folder / "slide.svs", 2048, 1536, mpp=MPP, downsamples=(1, 4), seed=4, tissue=tissue)
    xs, ys = np.arange(0, 2048 - PATCH + 1, PATCH), np.arange(0, 1536 - PATCH + 1, PATCH)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    keep = np.array([spec.tissue_fraction(x, y, PATCH, PATCH) >= 0.5 for x, y in grid])
    coords = grid[keep]
    store = write_tile_store(
        folder / "tiles" / "slide.zarr", coords, np.ones(len(coords), np.float32), spec.tissue_mask, spec.mask_mpp,
        {"slide_path": str(spec.path), "slide_id": "slide", "level0_mpp": [MPP, MPP], "target_mpp": MPP,
         "patch_size": PATCH, "patch_size_level0": PATCH, "stride_level0": PATCH, "read_level": 0,
         "read_size": PATCH, "slide_dimensions": [2048, 1536]})
    rng = np.random.default_rng(0)
    scores = rng.normal(size=store.n_patches).astype(np.float32)
    centre = store.coords[store.n_patches // 2]
    high = (np.abs(store.coords - centre) <= PATCH).all(axis=1)  # a 3 x 3 block of patches
    scores[high] = 10 + rng.random(int(high.sum()))
    assert 5 <= high.sum() <= 9 and store.n_patches >= 40
    return store, scores


def _expected_ranks(scores: np.ndarray) -> np.ndarray:
    """Percentile ranks of distinct scores: position in sorted order / (N - 1)."""
    return np.argsort(np.argsort(scores)) / (len(scores) - 1)


def _patch_index_image(coords: np.ndarray, shape: tuple[int, int], downsample: tuple[float, float]) -> np.ndarray:
    """For each picture pixel, the index of the patch under its centre, or -1."""
    cells = np.full((1536 // PATCH + 1, 2048 // PATCH + 1), -1)
    cells[coords[:, 1] // PATCH, coords[:, 0] // PATCH] = np.arange(len(coords))
    rows = ((np.arange(shape[0]) + 0.5) * downsample[1] // PATCH).astype(int)
    cols = ((np.arange(shape[1]) + 0.5) * downsample[0] // PATCH).astype(int)
    return cells[rows[:, None], cols[None, :]]


def test_percentile_ranks_span_zero_to_one_with_ties_averaged():
    np.testing.assert_allclose(percentile_ranks(np.array([3.0, -1.0, 2.0, 10.0])), [2 / 3, 0, 1 / 3, 1])
    np.testing.assert_allclose(percentile_ranks(np.array([1.0, 5.0, 5.0])), [0, 0.75, 0.75])
    assert percentile_ranks(np.array([7.0])).tolist() == [1.0]


def test_sample_grid_covers_overlapping_and_gapped_patches():
    overlapping = score_grid(np.array([[0, 0], [64, 0]]), np.array([0.2, 0.6]), stride_level0=64, patch_size_level0=128)
    values, footprint = sample_grid(overlapping, np.array([32.0, 96.0, 160.0, 200.0]), np.array([10.0]))
    np.testing.assert_allclose(values[0], [0.2, 0.4, 0.6, 0.0], atol=1e-6)  # the middle is under both
    assert footprint[0].tolist() == [True, True, True, False]
    gapped = score_grid(np.array([[0, 0], [100, 0]]), np.array([0.3, 0.9]), stride_level0=100, patch_size_level0=50)
    values, footprint = sample_grid(gapped, np.array([25.0, 75.0, 125.0]), np.array([25.0, 75.0]))
    assert footprint.tolist() == [[True, False, True], [False, False, False]]
    np.testing.assert_allclose(values[0], [0.3, 0.0, 0.9], atol=1e-6)


def test_smoothing_keeps_flat_values_flat_and_spreads_a_peak():
    coords = np.stack(np.meshgrid(np.arange(7) * 100, np.arange(7) * 100), -1).reshape(-1, 2)
    flat = smooth_grid(score_grid(coords, np.full(49, 0.7), 100, 100), sigma_level0=150)
    assert np.allclose(flat.values[flat.present], 0.7, atol=1e-5)  # edges are not pulled to 0
    peak = np.zeros(49)
    peak[24] = 1.0
    smoothed = smooth_grid(score_grid(coords, peak, 100, 100), sigma_level0=100)
    assert 0.1 < smoothed.values[3, 3] < 0.9 and smoothed.values[3, 4] > 0.01 and smoothed.values[0, 0] < 1e-3


def test_pngs_have_the_asked_size_and_are_never_enlarged(slide_store, tmp_path):
    store, scores = slide_store
    files = render_slide_heatmaps(store, scores, tmp_path / "a", thumbnail_size=512, top_k=0, geojson=False)
    sizes = {Image.open(files[kind]).size for kind in ("thumbnail", "overlay")}
    assert sizes == {(512, 384)}
    files = render_slide_heatmaps(store, scores, tmp_path / "b", thumbnail_size=5000, top_k=0, geojson=False)
    assert Image.open(files["overlay"]).size == Image.open(files["thumbnail"]).size == (2048, 1536)


def test_overlay_colours_each_patch_by_its_rank_and_leaves_background_alone(slide_store, tmp_path):
    store, scores = slide_store
    alpha = 0.5
    files = render_slide_heatmaps(store, scores, tmp_path, thumbnail_size=512, alpha=alpha, top_k=0, geojson=False)
    thumbnail = np.asarray(Image.open(files["thumbnail"])).astype(np.float32)
    overlay = np.asarray(Image.open(files["overlay"])).astype(np.float32)
    patch_at = _patch_index_image(store.coords, thumbnail.shape[:2], (4.0, 4.0))
    lut = colormap_lut("viridis").astype(np.float32)

    # outside the patches only the colour bar legend, in one corner, changes pixels
    changed = (overlay != thumbnail).any(axis=-1)
    rows, cols = np.nonzero(changed & (patch_at < 0))
    height, width = changed.shape
    assert (np.ptp(rows) + 1) * (np.ptp(cols) + 1) < 0.1 * changed.size
    assert rows.min() < 12 or rows.max() >= height - 12  # in a corner: near a horizontal edge
    assert cols.min() < 12 or cols.max() >= width - 12  # ... and a vertical one
    in_legend = np.zeros_like(changed)
    in_legend[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True

    # on the patches: thumbnail blended with the colour of the patch's rank
    ranks = _expected_ranks(scores)
    on_patch = (patch_at >= 0) & ~in_legend
    colour = lut[np.rint(ranks[patch_at[on_patch]] * 255).astype(int)]
    expected = thumbnail[on_patch] + alpha * (colour - thumbnail[on_patch])
    assert np.abs(overlay[on_patch] - expected).max() <= 1.0

    # the high block is drawn in the top colours, the lowest patch in the bottom ones
    high = patch_at == np.argmax(scores)
    top_colour = thumbnail[high] + alpha * (lut[-1] - thumbnail[high])
    assert np.abs(overlay[high] - top_colour).mean() < 4
    low = patch_at == np.argmin(scores)
    bottom_colour = thumbnail[low] + alpha * (lut[0] - thumbnail[low])
    assert np.abs(overlay[low] - bottom_colour).mean() < 1


def test_smoothed_overlay_stays_on_the_patches(slide_store, tmp_path):
    store, scores = slide_store
    files = render_slide_heatmaps(store, scores, tmp_path, thumbnail_size=512, smooth_sigma_um=100, top_k=0,
                                  geojson=False)
    thumbnail = np.asarray(Image.open(files["thumbnail"]))
    overlay = np.asarray(Image.open(files["overlay"]))
    patch_at = _patch_index_image(store.coords, thumbnail.shape[:2], (4.0, 4.0))
    changed = (overlay != thumbnail).any(axis=-1)
    outside = changed & (patch_at < 0)
    rows, cols = np.nonzero(outside)
    assert (np.ptp(rows) + 1) * (np.ptp(cols) + 1) < 0.1 * changed.size  # only the legend
    assert changed[patch_at >= 0].mean() > 0.95


def test_geojson_has_one_level0_square_per_patch_with_the_scores(slide_store, tmp_path, monkeypatch):
    store, scores = slide_store
    monkeypatch.setattr(heatmap.writers, "_GEOJSON_CHUNK", 7)  # several chunks: their joins must stay valid JSON
    path = heatmap.write_patches_geojson(tmp_path / "p.geojson", store.coords, PATCH, scores)
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == store.n_patches
    ranks = _expected_ranks(scores)
    for (x, y), score, rank, feature in zip(store.coords.tolist(), scores, ranks, features, strict=True):
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        assert feature["geometry"]["coordinates"] == [[[x, y], [x + PATCH, y], [x + PATCH, y + PATCH],
                                                       [x, y + PATCH], [x, y]]]
        properties = feature["properties"]
        assert properties["objectType"] == "tile" and properties["classification"]["name"] == "attention"
        assert np.float32(properties["measurements"]["attention"]) == score
        assert properties["measurements"]["attention_rank"] == pytest.approx(rank, abs=1e-6)


def test_pyramidal_tiff_opens_in_openslide_and_tiffslide_at_the_chosen_mpp(slide_store, tmp_path):
    store, scores = slide_store
    files = render_slide_heatmaps(store, scores, tmp_path, thumbnail_size=256, tiff_mpp=1.0, top_k=0, geojson=False)
    for backend in ("openslide", "tiffslide"):
        with Slide(files["tiff"], backend=backend) as tiff:
            assert tiff.level_dimensions == ((1024, 768), (512, 384), (256, 192))
            assert tiff.level0_mpp == pytest.approx((1.0, 1.0))
            # the same physical extent as the slide: 2048 px x 0.5 µm = 1024 px x 1 µm
            assert tiff.dimensions[0] * tiff.level0_mpp[0] == pytest.approx(2048 * MPP)
            for level, (width, height) in enumerate(tiff.level_dimensions):
                assert tiff.read_region((0, 0), level, (width, height)).shape == (height, width, 3)
    # colours: the most attended patch is drawn in the top colour (JPEG allows some noise)
    with Slide(files["tiff"], backend="tiffslide") as tiff, Slide(store.slide_path) as slide:
        x, y = (store.coords[np.argmax(scores)] // 2 + 16).tolist()  # inside the patch, in TIFF pixels
        drawn = tiff.read_region((x, y), 0, (32, 32)).astype(np.float32)
        under = np.asarray(Image.fromarray(slide.read_region((2 * x, 2 * y), 0, (64, 64))).reduce(2), np.float32)
        expected = under + 0.5 * (colormap_lut("viridis")[-1] - under)
        assert np.abs(drawn - expected).mean() < 8


def test_gallery_shows_the_top_k_patches_in_order(slide_store, tmp_path):
    store, scores = slide_store
    with Slide(store.slide_path) as slide:
        gallery = top_patch_gallery(slide, store.coords, scores, top_k=5, read_level=store.read_level,
                                    read_size=store.read_size, patch_size=store.patch_size)
        assert gallery.indices.tolist() == np.argsort(-scores)[:5].tolist()
        for index, (x0, y0, x1, y1) in zip(gallery.indices, gallery.boxes, strict=True):
            expected = slide.read_region(tuple(store.coords[index]), 0, (PATCH, PATCH))
            np.testing.assert_array_equal(gallery.image[y0:y1, x0:x1], expected)
        files = render_slide_heatmaps(store, scores, tmp_path, slide=slide, thumbnail_size=256, top_k=5,
                                      geojson=False)
    np.testing.assert_array_equal(np.asarray(Image.open(files["top_patches"])), gallery.image)


def test_cli_renders_from_tile_stores_and_from_a_prediction_folder(slide_store, tmp_path):
    store, scores = slide_store
    store.write_array("scores/run1", scores)
    runner = CliRunner()
    result = runner.invoke(cli, ["heatmap", "--tiles", str(store.path.parent), "--run", "run1", "-o",
                                 str(tmp_path / "out"), "--thumbnail-size", "256", "--top-k", "4"],
                           standalone_mode=False)
    assert result.exception is None, result.output
    written = sorted(p.name for p in (tmp_path / "out" / "slide").iterdir())
    assert written == ["attention.json", "overlay.png", "patches.geojson", "thumbnail.png", "top_patches.png"]

    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "run.json").write_text(json.dumps({"run": "run1", "tiles": str(store.path.parent)}))
    with open(pred / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "label", "predicted", "status"])
        writer.writerow(["slide", "", "positive", "done"])
    result = runner.invoke(cli, ["heatmap", "--predictions", str(pred), "--thumbnail-size", "128", "--top-k", "0",
                                 "--no-geojson"], standalone_mode=False)
    assert result.exception is None, result.output
    assert sorted(p.name for p in (pred / "heatmaps" / "slide").iterdir()) == ["attention.json", "overlay.png",
                                                                               "thumbnail.png"]


def test_missing_scores_name_the_store_and_the_predict_command(slide_store, tmp_path):
    store, _ = slide_store
    with pytest.raises(BadInputError, match="ipspath predict") as raised:
        load_scores(store, "never-run")
    assert str(store.path) in str(raised.value)
    result = CliRunner().invoke(cli, ["heatmap", "--tiles", str(store.path), "--run", "never-run", "-o",
                                      str(tmp_path)], standalone_mode=False)
    assert isinstance(result.exception, BadInputError)
    assert str(store.path) in str(result.exception) and "ipspath predict" in str(result.exception)
    assert not any(tmp_path.iterdir())  # checked before anything is written


@pytest.mark.skipif(not (DATA / "slides" / "CMU-1-Small-Region_multilevel.svs").exists(),
                    reason=needs_test_data("slides"))
def test_block_thumbnail_matches_the_slide_library_on_a_real_pyramid():
    with Slide(DATA / "slides" / "CMU-1-Small-Region_multilevel.svs") as slide:
        ours, downsample = slide_thumbnail(slide, 700)
        theirs = slide.get_thumbnail((700, 700))
    assert ours.shape[0] == 700 and abs(ours.shape[1] - theirs.shape[1]) <= 1
    assert downsample == pytest.approx((2220 / ours.shape[1], 2967 / 700))
    width = min(ours.shape[1], theirs.shape[1])
    difference = np.abs(ours[:, :width].astype(np.float32) - theirs[:700, :width].astype(np.float32))
    assert difference.mean() < 6


def test_a_store_without_patches_gives_a_plain_overlay_and_an_empty_collection(slide_store, tmp_path):
    store, _ = slide_store
    empty = write_tile_store(tmp_path / "empty.zarr", np.zeros((0, 2)), np.zeros(0), np.zeros((4, 4)), 256.0,
                             {**store.attrs, "slide_id": "empty"})
    files = render_slide_heatmaps(empty, np.zeros(0, np.float32), tmp_path / "out", thumbnail_size=256)
    thumbnail, overlay = (np.asarray(Image.open(files[k])) for k in ("thumbnail", "overlay"))
    rows, cols = np.nonzero((thumbnail != overlay).any(axis=-1))
    assert rows.min() > thumbnail.shape[0] / 2 and cols.min() > thumbnail.shape[1] / 2  # the legend only
    assert json.loads(files["geojson"].read_text())["features"] == []
