"""``ipspath tile --tissue-mask`` with GeoJSON as QuPath 0.5 exports it: classes, holes, detection inside."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ips_path.cli.main import cli
from ips_path.stores.tile_store import TileStore

PATCH = 256

# Level-0 rectangles (x0, y0, x1, y1) on the shared generated slide (4000 x 3000 px): tissue lies in
# an upper-left piece (about x 500-1500, y 500-1300) and a lower band (x 950-3600, y 1050-2300).
# Their sides lie on the patch grid, so each patch is wholly inside a rectangle or wholly outside.
TUMOUR = (256, 256, 1792, 1536)  # the upper-left piece with glass around it
TUMOUR_2 = (2304, 1024, 3840, 2560)  # the right of the band, with a hole:
HOLE = (2816, 1536, 3328, 2048)
IGNORE = (256, 256, 1024, 1536)  # the left of the upper piece: an "Ignore*" annotation
STROMA = (1024, 1536, 2048, 2560)


def _ring(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _annotation(name, color, geometry, object_type="annotation"):
    """A feature as QuPath 0.5 writes it (File > Export objects as GeoJSON, FeatureCollection)."""
    return {"type": "Feature", "id": "9f1c2a7e-0000-4000-8000-000000000000", "geometry": geometry,
            "properties": {"objectType": object_type, "classification": {"name": name, "color": color}}}


@pytest.fixture(scope="module")
def qupath_geojson(tmp_path_factory) -> Path:
    features = [
        _annotation("Tumor", [200, 0, 0], {"type": "MultiPolygon", "coordinates": [
            [_ring(*TUMOUR)], [_ring(*TUMOUR_2), _ring(*HOLE)]]}),
        _annotation("Ignore*", [180, 180, 180], {"type": "Polygon", "coordinates": [_ring(*IGNORE)]}),
        _annotation("Stroma", [150, 200, 150], {"type": "Polygon", "coordinates": [_ring(*STROMA)]}),
        # detections are not drawn regions: a cell over the whole slide must not make it tissue
        _annotation("Tumor", [200, 0, 0], {"type": "Polygon", "coordinates": [_ring(0, 0, 4000, 3000)]}, "detection"),
    ]
    path = tmp_path_factory.mktemp("qupath") / "small.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}, indent=2))
    return path


def _tile(*args):
    return CliRunner().invoke(cli, ["tile", *map(str, args)])


def _coords(out: Path) -> set[tuple[int, int]]:
    return {tuple(map(int, xy)) for xy in TileStore.open(out / "small.zarr").coords}


def _inside(xy, box) -> float:
    """Fraction of the patch at ``xy`` inside ``box``."""
    x, y = xy
    w = max(0, min(x + PATCH, box[2]) - max(x, box[0]))
    h = max(0, min(y + PATCH, box[3]) - max(y, box[1]))
    return w * h / PATCH**2


@pytest.fixture(scope="module")
def detected(small_svs, tmp_path_factory) -> set[tuple[int, int]]:
    out = tmp_path_factory.mktemp("detected")
    assert _tile(small_svs.path, "-o", out, "--no-qc").exit_code == 0
    return _coords(out)


def test_ignore_annotations_are_holes_and_glass_inside_a_region_is_not_tiled(small_svs, qupath_geojson, detected,
                                                                               tmp_path):
    result = _tile(small_svs.path, "-o", tmp_path, "--tissue-mask", qupath_geojson)
    assert result.exit_code == 0, result.output
    coords = _coords(tmp_path)
    assert coords and coords <= detected  # tissue detection still decides inside the drawn regions
    for xy in coords:
        assert _inside(xy, IGNORE) < 0.5 and _inside(xy, HOLE) < 0.5, xy
        assert max(_inside(xy, box) for box in (TUMOUR, TUMOUR_2, STROMA)) > 0
    assert any(_inside(xy, STROMA) >= 0.5 for xy in coords) and any(_inside(xy, TUMOUR) >= 0.5 for xy in coords)
    store = TileStore.open(tmp_path / "small.zarr")
    assert store.attrs["tissue_method"] == "file+colour"
    assert store.attrs["tissue_params"]["mask"]["exclude"] == []


def test_mask_only_tiles_the_drawn_regions_glass_and_all(small_svs, qupath_geojson, detected, tmp_path):
    result = _tile(small_svs.path, "-o", tmp_path, "--tissue-mask", qupath_geojson, "--mask-only", "--no-qc")
    assert result.exit_code == 0, result.output
    coords = _coords(tmp_path)
    glass = coords - detected
    assert glass, "the glass inside the drawn regions is tiled with --mask-only"
    assert all(_inside(xy, IGNORE) < 0.5 and _inside(xy, HOLE) < 0.5 for xy in coords)
    assert TileStore.open(tmp_path / "small.zarr").attrs["tissue_method"] == "file"


def test_mask_classes_choose_which_annotations_count(small_svs, qupath_geojson, tmp_path):
    result = _tile(small_svs.path, "-o", tmp_path / "stroma", "--tissue-mask", qupath_geojson,
                   "--mask-classes", "stroma", "--no-qc")
    assert result.exit_code == 0, result.output
    coords = _coords(tmp_path / "stroma")
    assert coords and all(_inside(xy, STROMA) > 0 for xy in coords)
    # a named exclusion class is a hole like Ignore*
    result = _tile(small_svs.path, "-o", tmp_path / "no-stroma", "--tissue-mask", qupath_geojson,
                   "--mask-exclude-classes", "Stroma", "--no-qc")
    assert result.exit_code == 0, result.output
    assert all(_inside(xy, STROMA) < 0.5 for xy in _coords(tmp_path / "no-stroma"))


def test_a_class_the_file_lacks_is_one_line_naming_the_classes_it_has(small_svs, qupath_geojson, tmp_path):
    result = _tile(small_svs.path, "-o", tmp_path, "--tissue-mask", qupath_geojson, "--mask-classes", "Necrosis")
    assert result.exit_code == 2
    with (tmp_path / "tiling_summary.csv").open(newline="") as f:
        error = next(csv.DictReader(f))["error"]
    assert "small.geojson: no annotation of class Necrosis (classes in the file: Ignore*, Stroma, Tumor)" in error
    assert not (tmp_path / "small.zarr").exists()


def test_mask_options_without_a_mask_are_refused_before_any_work(small_svs, tmp_path):
    result = CliRunner().invoke(cli, ["tile", str(small_svs.path), "-o", str(tmp_path / "out"), "--mask-only"],
                                standalone_mode=False)
    assert isinstance(result.exception, Exception) and "need --tissue-mask" in str(result.exception)
    assert not (tmp_path / "out").exists()
