"""QuPath GeoJSON annotations as a tissue mask, honouring their classification.

QuPath (0.4 and later) exports objects as a GeoJSON ``FeatureCollection``; each ``Feature`` has a
``geometry`` (``Polygon`` or ``MultiPolygon`` in level-0 pixels, holes as further rings) and
``properties`` with ``objectType`` (``annotation``, ``detection``, ``cell``, ...) and, when classified,
``classification``: ``{"name": "Tumor", "color": [r, g, b]}``, ``{"names": ["Tumor", "Positive"], ...}``
for a derived class, or (QuPath 0.2/0.3) ``{"name": ..., "colorRGB": ...}``.

Which annotations are tissue (:class:`MaskClasses`):

- annotations of an exclusion class are holes: QuPath's ``Ignore*`` class (any class whose name
  starts with "Ignore") and the classes named in ``exclude``;
- with ``include`` given, only annotations of those classes are tissue (others are left out);
  without it every other annotation, classified or not, is tissue;
- when no annotation is tissue but some are exclusions, the whole slide is tissue less the
  exclusions: a file of ``Ignore*`` regions only removes pen marks or folds from tissue detection.

Detections, cells and tiles are not regions a person drew, and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ips_path.runtime.errors import BadInputError

__all__ = ["IGNORE_PREFIX", "MaskClasses", "annotation_class", "class_names", "rasterize_annotations",
           "rasterize_geojson"]

IGNORE_PREFIX = "ignore"
"""QuPath's built-in class for regions to leave out is ``Ignore*``; any class starting so is a hole."""

# objectType values of things QuPath detected, not regions drawn by a person.
_NOT_REGIONS = frozenset({"detection", "cell", "tile", "tmaCore"})


@dataclass(frozen=True)
class MaskClasses:
    """Which annotation classes of a GeoJSON mask are tissue and which are holes.

    Attributes
    ----------
    include : tuple of str, optional
        Only annotations of these classes are tissue (matched without regard to case; a derived
        class such as "Tumor: Positive" matches "Tumor"). None: every class not excluded.
    exclude : tuple of str
        Further classes whose annotations are holes, besides ``Ignore*``.
    """

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        clash = {c.lower() for c in self.include or ()} & {c.lower() for c in self.exclude}
        if clash:
            raise BadInputError(f"--mask-classes and --mask-exclude-classes both name {', '.join(sorted(clash))}: "
                                "a class is either tissue or a hole")

    def as_dict(self) -> dict[str, Any]:
        """The choice as recorded in a tile store."""
        return {"include": list(self.include) if self.include is not None else None, "exclude": list(self.exclude)}

    def role(self, name: str | None) -> str:
        """``"tissue"``, ``"hole"`` or ``"other"`` (left out) for an annotation of class ``name``."""
        names = set() if name is None else {name.lower(), name.split(":")[0].strip().lower()}
        if name is not None and (name.lower().startswith(IGNORE_PREFIX)
                                 or names & {c.lower() for c in self.exclude}):
            return "hole"
        if self.include is None or names & {c.lower() for c in self.include}:
            return "tissue"
        return "other"


def class_names(text: str | None, option: str) -> tuple[str, ...] | None:
    """Class names from a comma-separated option value; None when not given.

    Raises
    ------
    BadInputError
        The value names no class (``--mask-classes ,``).
    """
    if text is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise BadInputError(f"{option} {text!r}: name at least one QuPath class, e.g. {option} Tumor,Stroma")
    return names


def annotation_class(feature: dict[str, Any]) -> str | None:
    """The QuPath class name of a GeoJSON feature ("Tumor", "Tumor: Positive"), or None if unclassified."""
    value = (feature.get("properties") or {}).get("classification")
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        if isinstance(value.get("names"), list) and value["names"]:
            return ": ".join(map(str, value["names"]))
        if value.get("name"):
            return str(value["name"])
    return None


def rasterize_annotations(geojson: Any, shape: tuple[int, int], downsample: float,
                          classes: MaskClasses = MaskClasses(), source: str = "GeoJSON") -> np.ndarray:
    """The tissue of QuPath annotations as a bool mask of ``shape``: tissue classes less holes.

    Parameters
    ----------
    geojson : dict or list
        FeatureCollection, list of Features, Feature, or a bare Polygon/MultiPolygon geometry.
    shape : tuple of int
        (h, w) of the mask, px.
    downsample : float
        Level-0 pixels per mask pixel.
    classes : MaskClasses
        Which classes are tissue and which are holes.
    source : str
        Names the file in errors.

    Raises
    ------
    BadInputError
        ``classes.include`` names classes of which the file has no annotation (the line lists the
        classes it has).
    ValueError
        Not GeoJSON.
    """
    tissue, holes, found = [], [], set()
    for name, polygon in _classified_polygons(geojson):
        found.add(name or "unclassified")
        role = classes.role(name)
        if role == "tissue":
            tissue.append(polygon)
        elif role == "hole":
            holes.append(polygon)
    if classes.include is not None and not tissue:
        raise BadInputError(f"{source}: no annotation of class {', '.join(classes.include)} "
                            f"(classes in the file: {', '.join(sorted(found)) or 'none'}); fix --mask-classes")
    mask = _fill(tissue, shape, downsample) if tissue or not holes else np.ones(shape, bool)
    if holes:
        mask &= ~_fill(holes, shape, downsample)
    return mask


def rasterize_geojson(geojson: Any, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Every polygon of ``geojson`` (level-0 px; holes respected) as a bool mask of ``shape``,
    whatever its class; see :func:`rasterize_annotations` to honour classes."""
    return _fill([polygon for _, polygon in _classified_polygons(geojson)], shape, downsample)


def _fill(polygons: list[list[Any]], shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Union of polygons (each a list of rings: outline, then holes), rasterised."""
    from skimage.draw import polygon as fill_polygon

    mask = np.zeros(shape, bool)
    for rings in polygons:
        if not rings:
            continue
        points = [np.asarray(ring, float).reshape(-1, 2) / downsample for ring in rings]
        # each polygon on its own: a hole of one polygon must not cut into another that overlaps it
        x0, y0 = np.floor(points[0].min(axis=0)).astype(int).clip(0)
        x1, y1 = np.ceil(points[0].max(axis=0)).astype(int) + 1
        x1, y1 = min(x1, shape[1]), min(y1, shape[0])
        if x1 <= x0 or y1 <= y0:
            continue
        local = np.zeros((y1 - y0, x1 - x0), bool)
        for index, ring in enumerate(points):
            rr, cc = fill_polygon(ring[:, 1] - y0, ring[:, 0] - x0, local.shape)
            local[rr, cc] = index == 0  # the first ring is the outline, the others are holes
        mask[y0:y1, x0:x1] |= local
    return mask


def _classified_polygons(node: Any, name: str | None = None) -> list[tuple[str | None, list[Any]]]:
    """(class name, rings) of every polygon of a GeoJSON node drawn as a region."""
    if isinstance(node, list):
        return [p for item in node for p in _classified_polygons(item, name)]
    if not isinstance(node, dict):
        raise ValueError(f"not a GeoJSON object: {str(node)[:60]}")
    kind = node.get("type")
    if kind == "FeatureCollection":
        return _classified_polygons(node["features"])
    if kind == "Feature":
        if (node.get("properties") or {}).get("objectType") in _NOT_REGIONS or not node.get("geometry"):
            return []
        return _classified_polygons(node["geometry"], annotation_class(node))
    if kind == "GeometryCollection":
        return _classified_polygons(node["geometries"], name)
    if kind == "Polygon":
        return [(name, node["coordinates"])]
    if kind == "MultiPolygon":
        return [(name, rings) for rings in node["coordinates"]]
    return []  # points and lines have no area
