"""Patch features made by other tools (TRIDENT, CLAM, STAMP) into tile stores, ready for ``train --features``.

A lab that already extracted foundation-model features keeps them: ``ipspath features import``
reads one feature h5 file per slide of a manifest (``<folder>/<slide_id>.h5``), converts its
coordinates to the tile store's frame (level-0 top-left px, rows sorted row-major) and writes the
features as ``features/<name>`` (float16), with their provenance (tool, encoder, source file
identity). A slide without a tile store gets one (coordinates, patch size at level 0, a tissue
mask detected on the slide); a slide with one gets the features added when the coordinates agree.

All files are read and checked against the slides and the existing stores before anything is
written: another grid, another slide or another resolution is one line naming the file, and
nothing is written. Feature values are streamed in blocks, so memory holds one block of one
slide, whatever the cohort.

The formats, as each tool writes them:

- TRIDENT (``features_<encoder>/<slide>.h5``): ``features`` float32 (N, D) with attrs ``encoder``,
  ``name``; ``coords`` int64 (N, 2) level-0 with attrs ``patch_size`` (px at the target),
  ``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``.
- CLAM (``h5_files/<slide>.h5``): ``features`` float32 (N, D), ``coords`` int32 (N, 2) level-0.
  ``extract_features_fp.py`` writes no attributes; the patch size comes from the coords attrs
  ``patch_size`` and ``patch_level`` (and ``downsample``) where present, else from CLAM's patch
  file ``patches/<slide>.h5`` (``--clam-patches``).
- STAMP (``<slide>.h5``): ``feats`` float16 (N, D), ``coords`` float (N, 2) top-left in µm, file
  attrs ``tile_size_um``, ``tile_size_px``, ``unit = "um"``, ``extractor``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ips_path.runtime.errors import BadInputError, listing
from ips_path.runtime.identity import content_identity, same_identity
from ips_path.runtime.jobs import SlideOutcome, Status, check_identity, run_job
from ips_path.runtime.limits import DOWNSAMPLE, MAGNIFICATION, PATCH_PX, PATCH_UM, Range
from ips_path.runtime.locks import output_lock
from ips_path.runtime.names import check_feature_name
from ips_path.stores.tile_store import TileStore, store_path
from ips_path.tiling.from_coords import tile_store_for_coords
from ips_path.tiling.grid import same_mpp

__all__ = ["FEATURE_FORMATS", "FeatureFile", "FeatureFormat", "SlideFrame", "import_features", "read_feature_file"]

log = logging.getLogger(__name__)

#: Relative tolerance when comparing the resolution of a feature file with a store's.
#: Source bytes read per block when copying features (the peak memory of an import).
BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class SlideFrame:
    """What a reader needs of a slide to place its patches.

    Attributes
    ----------
    level0_mpp : float
        Mean level-0 pixel size, µm/px.
    level_downsamples : tuple of float
        Downsample of each pyramid level.
    dimensions : (int, int)
        Level-0 width and height, px.
    """

    level0_mpp: float
    level_downsamples: tuple[float, ...]
    dimensions: tuple[int, int]


@dataclass(frozen=True)
class FeatureFile:
    """The coordinates and geometry of one feature file (the features stay on disk).

    Attributes
    ----------
    path : Path
        The h5 file.
    tool : str
        Its format (a key of :data:`FEATURE_FORMATS`).
    dataset : str
        Name of its feature dataset (``features`` or ``feats``).
    encoder : str or None
        The encoder that made the features, as the file names it.
    coords : np.ndarray
        int64 (N, 2) level-0 top-left (x, y), in file order.
    patch_size_level0 : int
        Patch side in level-0 px.
    target_mpp : float
        Resolution the patches were embedded at, µm/px.
    patch_size : int
        Patch side at ``target_mpp``, px.
    dim : int
        Feature dimension D (0 for a file without patches).
    """

    path: Path
    tool: str
    dataset: str
    encoder: str | None
    coords: np.ndarray
    patch_size_level0: int
    target_mpp: float
    patch_size: int
    dim: int

    @property
    def n_patches(self) -> int:
        return int(len(self.coords))


@dataclass(frozen=True)
class FeatureFormat:
    """One tool's feature file format: how to recognise it and how to read its geometry."""

    name: str
    detect: Callable[[Any], bool]
    read: Callable[[Any, Path, SlideFrame, Path | None], FeatureFile]


# -- readers ------------------------------------------------------------------------------------

def _text(value: Any) -> str | None:
    """An h5 attribute as text; None for absent values and the "None" TRIDENT writes for them."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = str(value)
    return None if value in ("", "None") else value


def _dataset(f: Any, name: str, path: Path) -> Any:
    import h5py

    node = f.get(name)
    if not isinstance(node, h5py.Dataset):
        raise BadInputError(f"{path}: no {name!r} dataset; is it a feature file of TRIDENT, CLAM or STAMP?")
    return node


_KINDS = {"b": "bool", "c": "complex", "S": "byte-string", "U": "string", "O": "object", "V": "compound",
          "M": "date", "m": "time-span"}


def _dim(features: Any, path: Path) -> int:
    """The feature dimension D of a dataset of real numbers (N, D); BadInputError for anything else."""
    kind = features.dtype.kind
    if kind not in "fiu":  # bool, complex or text would become "numbers" in float16 silently, or not at all
        raise BadInputError(f"{path}: the {features.name.lstrip('/')!r} dataset holds {_KINDS.get(kind, kind)} values "
                            f"({features.dtype}), not real numbers; re-extract the features")
    if features.ndim == 2:
        return int(features.shape[1])
    if features.ndim == 1 and features.shape[0] == 0:  # TRIDENT's file for a slide without patches
        return 0
    raise BadInputError(f"{path}: features of shape {features.shape}; expected (patches, dimension)")


def _attr(attrs: Mapping[str, Any], key: str, allowed: Range, path: Path, where: str = "coords") -> Any:
    """Attribute ``key`` as a number in ``allowed``; BadInputError naming the file and attribute otherwise."""
    value = attrs[key]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1 or isinstance(value, np.generic):
        value = value.item()  # a plain number in the message, not np.int64(0)
    return allowed.check(value, f"{path}: {where} attribute {key}",
                         fix="the file is damaged or was not written by the tool it claims; re-extract it")


def _coords(dataset: Any, path: Path, *, whole_pixels: bool) -> np.ndarray:
    """The file's coordinates as float64 (N, 2) rows of (x, y), checked for shape and finiteness.

    A (2, N) array is refused (N != 2): read as rows it would put every feature at a scrambled place.
    With ``whole_pixels`` (level-0 px formats) every value must be a whole pixel.
    """
    shape = tuple(dataset.shape)
    if dataset.dtype.kind not in "fiu":
        raise BadInputError(f"{path}: 'coords' holds {_KINDS.get(dataset.dtype.kind, dataset.dtype)} values, not "
                            "numbers; re-extract the features")
    if len(shape) == 2 and shape[0] == 2 and shape[1] != 2:
        raise BadInputError(f"{path}: 'coords' has shape {shape}, i.e. (2, N) columns of x and y; expected (N, 2) "
                            "rows of (x, y); write it transposed (coords.T)")
    if not (len(shape) == 2 and shape[1] == 2 or int(np.prod(shape)) == 0):
        raise BadInputError(f"{path}: 'coords' has shape {shape}; expected (N, 2) rows of (x, y)")
    coords = np.asarray(dataset[...], dtype=np.float64).reshape(-1, 2)
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise BadInputError(f"{path}: {int(bad.sum())} of {len(coords)} coordinates are NaN or infinite (rows "
                            f"{listing(np.flatnonzero(bad).tolist())}); the file is damaged; re-extract it")
    if whole_pixels:
        fractional = coords != np.rint(coords)
        if fractional.any():
            rows = np.flatnonzero(fractional.any(axis=1)).tolist()
            raise BadInputError(f"{path}: {len(rows)} of {len(coords)} coordinates are not whole level-0 pixels (rows "
                                f"{listing(rows)}, e.g. {tuple(coords[rows[0]].tolist())}): not on the slide's pixel "
                                "grid; is it another tool's file (--format)?")
    return coords


def _read_trident(f: Any, path: Path, frame: SlideFrame, clam_patches: Path | None) -> FeatureFile:
    features, coords = _dataset(f, "features", path), _dataset(f, "coords", path)
    attrs = coords.attrs
    missing = [k for k in ("patch_size", "target_magnification") if k not in attrs]
    if missing or ("patch_size_level0" not in attrs and "level0_magnification" not in attrs):
        raise BadInputError(f"{path}: TRIDENT coords lack {', '.join(missing) or 'patch_size_level0'}; "
                            "re-run TRIDENT's coords step, or give --format")
    patch_size = _attr(attrs, "patch_size", PATCH_PX, path)
    target_magnification = _attr(attrs, "target_magnification", MAGNIFICATION, path)
    if "patch_size_level0" in attrs:
        patch_size_level0 = _attr(attrs, "patch_size_level0", PATCH_PX, path)
    else:
        patch_size_level0 = int(patch_size * _attr(attrs, "level0_magnification", MAGNIFICATION, path)
                                // target_magnification)
    # the folder TRIDENT writes to is features_<encoder>
    encoder = _text(features.attrs.get("encoder")) or (path.parent.name.removeprefix("features_")
                                                       if path.parent.name.startswith("features_") else None)
    return FeatureFile(path, "trident", "features", encoder, _coords(coords, path, whole_pixels=True).astype(np.int64),
                       patch_size_level0, 10.0 / target_magnification, patch_size, _dim(features, path))


def _read_clam(f: Any, path: Path, frame: SlideFrame, clam_patches: Path | None) -> FeatureFile:
    import h5py

    features, coords = _dataset(f, "features", path), _dataset(f, "coords", path)
    attrs, source = dict(coords.attrs), path
    if "patch_size" not in attrs and clam_patches is not None:
        source = clam_patches / path.name
        try:
            with h5py.File(source, "r") as patches:
                attrs = dict(_dataset(patches, "coords", source).attrs)
        except OSError as exc:
            raise BadInputError(f"{source}: cannot read CLAM's patch file for {path.name} ({exc}); "
                                "give --clam-patches the patches/ folder of create_patches_fp.py") from None
    if "patch_size" not in attrs:
        raise BadInputError(f"{source}: no patch_size attribute on 'coords' (CLAM's extract_features_fp.py writes "
                            "none); give --clam-patches DIR, the patches/ folder of create_patches_fp.py")
    level = _attr(attrs, "patch_level", Range(0, 64, integer=True), source) if "patch_level" in attrs else 0
    if not 0 <= level < len(frame.level_downsamples):
        raise BadInputError(f"{source}: patch_level {level}, but the slide has {len(frame.level_downsamples)} "
                            "level(s): the features belong to another slide")
    downsample = (_attr({"downsample": np.mean(attrs["downsample"])}, "downsample", DOWNSAMPLE, source)
                  if "downsample" in attrs else frame.level_downsamples[level])
    patch_size = _attr(attrs, "patch_size", PATCH_PX, source)
    return FeatureFile(path, "clam", "features", None, _coords(coords, path, whole_pixels=True).astype(np.int64),
                       round(patch_size * downsample), frame.level0_mpp * downsample, patch_size,
                       _dim(features, path))


def _read_stamp(f: Any, path: Path, frame: SlideFrame, clam_patches: Path | None) -> FeatureFile:
    features, coords = _dataset(f, "feats", path), _dataset(f, "coords", path)
    attrs = f.attrs
    tile_size_um = attrs.get("tile_size_um")
    if tile_size_um is None and _text(attrs.get("unit")) == "um":
        tile_size_um = attrs.get("tile_size")  # STAMP 2.0
    tile_size_px = attrs.get("tile_size_px")
    if tile_size_um is None or tile_size_px is None:
        raise BadInputError(f"{path}: a STAMP feature file without tile_size_um and tile_size_px (written before "
                            "STAMP 2); re-extract the features with a current STAMP")
    sizes = {"tile_size_um": tile_size_um, "tile_size_px": tile_size_px}
    tile_size_um = _attr(sizes, "tile_size_um", PATCH_UM, path, where="file")
    tile_size_px = _attr(sizes, "tile_size_px", PATCH_PX, path, where="file")
    coords_um = _coords(coords, path, whole_pixels=False)  # µm: STAMP's grid need not fall on whole pixels
    return FeatureFile(path, "stamp", "feats", _text(attrs.get("extractor")),
                       np.rint(coords_um / frame.level0_mpp).astype(np.int64), round(tile_size_um / frame.level0_mpp),
                       tile_size_um / tile_size_px, tile_size_px, _dim(features, path))


def _coords_attrs(f: Any) -> Mapping[str, Any]:
    coords = f.get("coords")
    return coords.attrs if coords is not None and hasattr(coords, "attrs") else {}


#: The formats, in the order ``auto`` tries them.
FEATURE_FORMATS: dict[str, FeatureFormat] = {
    fmt.name: fmt for fmt in (
        FeatureFormat("stamp", lambda f: "feats" in f, _read_stamp),
        FeatureFormat("trident", lambda f: "features" in f and any(
            k in _coords_attrs(f) for k in ("patch_size_level0", "target_magnification")), _read_trident),
        FeatureFormat("clam", lambda f: "features" in f, _read_clam),
    )
}


def read_feature_file(path: str | os.PathLike, frame: SlideFrame, *, tool: str = "auto",
                      clam_patches: str | os.PathLike | None = None) -> FeatureFile:
    """Read the coordinates and geometry of a feature file and check them against its slide.

    Parameters
    ----------
    path : path-like
        The h5 file.
    frame : SlideFrame
        The slide the file is said to belong to.
    tool : str
        ``"auto"`` (recognise the format) or a key of :data:`FEATURE_FORMATS`.
    clam_patches : path-like, optional
        CLAM's ``patches/`` folder, for the patch size CLAM's feature files do not hold.

    Raises
    ------
    BadInputError
        Unreadable file, unknown format, missing datasets or attributes, as many coordinates as
        features not, repeated coordinates, or coordinates outside the slide (another slide).
    """
    import h5py

    path = Path(path)
    if tool != "auto" and tool not in FEATURE_FORMATS:
        raise BadInputError(f"unknown feature format {tool!r}; choose auto, {', '.join(FEATURE_FORMATS)}")
    try:
        with h5py.File(path, "r") as f:
            if tool == "auto":
                fmt = next((fmt for fmt in FEATURE_FORMATS.values() if fmt.detect(f)), None)
                if fmt is None:
                    raise BadInputError(f"{path}: neither a TRIDENT, a CLAM nor a STAMP feature file "
                                        "(no 'features' or 'feats' dataset)")
            else:
                fmt = FEATURE_FORMATS[tool]
            file = fmt.read(f, path, frame, None if clam_patches is None else Path(clam_patches))
            n_features = int(f[file.dataset].shape[0])
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read as HDF5 ({exc}); is the file complete?") from None
    _check_coords(file, n_features, frame)
    return file


def _check_coords(file: FeatureFile, n_features: int, frame: SlideFrame) -> None:
    coords, path = file.coords, file.path
    if n_features != len(coords):
        raise BadInputError(f"{path}: {n_features} feature rows but {len(coords)} coordinates; the file is damaged")
    if file.patch_size_level0 < 1 or file.patch_size < 1 or not file.target_mpp > 0:
        raise BadInputError(f"{path}: patch size {file.patch_size_level0} px at level 0, {file.patch_size} px at "
                            f"{file.target_mpp:g} µm/px: not a patch grid")
    if not len(coords):
        return
    width, height = frame.dimensions
    outside = int(np.count_nonzero((coords < 0).any(axis=1) | (coords[:, 0] >= width) | (coords[:, 1] >= height)))
    if outside:
        x, y = coords.max(axis=0)
        raise BadInputError(f"{path}: {outside} of {len(coords)} patches lie outside the slide ({width} x {height} "
                            f"px; the file reaches x {x}, y {y}): the features belong to another slide")
    if len(np.unique(coords, axis=0)) != len(coords):
        raise BadInputError(f"{path}: repeated coordinates; one patch grid per file is expected")


# -- import -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    """One slide's import, planned and checked before anything is written."""

    slide_id: str
    slide_path: Path
    slide_mpp: float | None
    file: FeatureFile
    store: Path
    existing: TileStore | None
    order: np.ndarray  # file row of each store row (stores keep patches sorted row-major)
    identity: dict[str, Any]  # of the features: moving the file keeps it, editing the file does not


def import_features(folder: str | os.PathLike, manifest: str | os.PathLike, tiles_dir: str | os.PathLike, *,
                    tool: str = "auto", name: str | None = None, clam_patches: str | os.PathLike | None = None,
                    overwrite: bool = False, progress: bool = True) -> list[SlideOutcome]:
    """Import the feature file of every manifest slide into its tile store.

    Parameters
    ----------
    folder : path-like
        Folder of feature files ``<slide_id>.h5`` (TRIDENT's ``features_<encoder>/``, CLAM's
        ``h5_files/``, STAMP's output folder).
    manifest : path-like
        Manifest CSV (``slide_id``, ``slide_path``; labels are not needed).
    tiles_dir : path-like
        Folder of the tile stores ``<slide_id>.zarr``: created where missing, completed where present.
    tool : str
        ``"auto"``, ``"trident"``, ``"clam"`` or ``"stamp"``.
    name : str, optional
        Name of the array ``features/<name>`` (what ``train --features`` takes); default: the
        encoder the files name (CLAM files name none: then ``name`` is needed).
    clam_patches : path-like, optional
        CLAM's ``patches/`` folder (patch size and level), for CLAM feature files without them.
    overwrite : bool
        Replace features of that name that were made from other inputs (another file, tool, encoder).
    progress : bool
        Show a progress bar over slides.

    Returns
    -------
    list of SlideOutcome
        One per manifest slide, in manifest order: ``done`` (``extra["store_created"]`` says whether
        the store is new), ``reused`` (the same features were there) or ``failed`` (a slide whose
        values cannot be read; the others go on). ``identity`` is that of the imported features.

    Raises
    ------
    BadInputError
        Before anything is written: a bad manifest, a missing or unreadable feature file, files of
        several encoders or dimensions, no usable name, a file whose coordinates do not agree with
        the slide's existing tile store (another grid, another slide, another resolution), features
        of that name made from other inputs (without ``overwrite``; a RefusedError), or another run
        writing into ``tiles_dir`` (:func:`~ips_path.runtime.locks.output_lock`).
    """
    from ips_path.runtime.progress import progress_bar
    from ips_path.slides.manifest import read_manifest

    folder, tiles_dir = Path(folder), Path(tiles_dir)
    if not folder.is_dir():
        raise BadInputError(f"{folder}: no such folder of feature files")
    rows = read_manifest(manifest, require_label=False)
    missing = [r.slide_id for r in rows if not (folder / f"{r.slide_id}.h5").is_file()]
    if missing:
        raise BadInputError(f"{folder}: no feature file for {len(missing)} slide(s) of {manifest}: "
                            f"{listing(missing)} (expected <slide_id>.h5)")
    with output_lock(tiles_dir):  # one writer of the tile stores at a time (tile, features import)
        jobs = [_plan(r.slide_id, r.slide_path, r.mpp, folder / f"{r.slide_id}.h5", tiles_dir, tool, clam_patches)
                for r in rows]
        name = _feature_name(jobs, name)
        for job in jobs:
            if job.existing is not None and job.existing.has_array(f"features/{name}") and not overwrite:
                # raises for features of that name made from other inputs: before anything is written
                check_identity(job.store / "features" / name, _recorded_identity(job.existing, name), job.identity,
                               what="features", instead="give these features another --name")
        results = []
        with progress_bar(len(jobs), "import", unit="slide", enabled=progress) as bar:
            for job in jobs:
                results.append(_import_one(job, name))
                bar.update()
    return results


def _plan(slide_id: str, slide_path: Path, slide_mpp: float | None, h5_path: Path, tiles_dir: Path, tool: str,
          clam_patches: str | os.PathLike | None) -> _Job:
    from ips_path.slides.slide import Slide

    with Slide(slide_path, slide_mpp=slide_mpp) as slide:
        frame = SlideFrame(float(np.mean(slide.require_mpp("give it in the `mpp` column of the --manifest"))),
                           tuple(slide.level_downsamples),
                           tuple(int(v) for v in slide.dimensions))
    file = read_feature_file(h5_path, frame, tool=tool, clam_patches=clam_patches)
    order = np.lexsort((file.coords[:, 0], file.coords[:, 1]))
    path = store_path(tiles_dir, slide_id)
    existing = None
    if path.exists():  # it must be whole and belong to this slide (StoreMismatchError otherwise)
        existing = TileStore.open(path, slide_id=slide_id, slide_path=slide_path)
        _check_fits(file, order, existing)
    # the source by its bytes: a copy (cp -r) or a touched file is the same input
    identity = {"tool": file.tool, "encoder": file.encoder, "dim": file.dim, "source": content_identity(file.path)}
    return _Job(slide_id, slide_path, slide_mpp, file, path, existing, order, identity)


def _check_fits(file: FeatureFile, order: np.ndarray, store: TileStore) -> None:
    """BadInputError (one line) unless ``file`` holds the patches of ``store``, at its resolution."""
    where = f"{file.path}: does not fit the tile store {store.path}"
    fix = "import into another --tiles folder, or delete that store to replace it"
    if (store.patch_size_level0 != file.patch_size_level0
            or not same_mpp(store.target_mpp, file.target_mpp)):
        raise BadInputError(f"{where}: another resolution (the file: {file.patch_size_level0} px at level 0, "
                            f"{file.target_mpp:g} µm/px; the store: {store.patch_size_level0} px, "
                            f"{store.target_mpp:g} µm/px); {fix}")
    if store.n_patches != file.n_patches or not np.array_equal(store.coords, file.coords[order]):
        shared = len(np.intersect1d(store.coords.view([("x", np.int64), ("y", np.int64)]).ravel(),
                                    np.ascontiguousarray(file.coords).view([("x", np.int64), ("y", np.int64)]).ravel()))
        raise BadInputError(f"{where}: another patch grid (the file: {file.n_patches} patches, the store: "
                            f"{store.n_patches}, {shared} in common); {fix}")


def _feature_name(jobs: Sequence[_Job], name: str | None) -> str:
    encoders = sorted({job.file.encoder for job in jobs if job.file.encoder})
    dims = sorted({job.file.dim for job in jobs if job.file.n_patches})
    if len(dims) > 1:
        raise BadInputError(f"the feature files have {len(dims)} dimensions ({', '.join(map(str, dims))}): they come "
                            "from several encoders; import each encoder's folder on its own with its own --name")
    if name is None:
        if len(encoders) != 1:
            named = f"several encoders ({', '.join(encoders)})" if encoders else "no encoder"
            raise BadInputError(f"the feature files name {named}; give --name NAME for features/NAME")
        name = encoders[0]
    return check_feature_name(name)


def _import_one(job: _Job, name: str) -> SlideOutcome:
    file, identity = job.file, job.identity
    extra = {"store": str(job.store), "n_patches": file.n_patches}

    def work() -> SlideOutcome:
        from ips_path.slides.slide import Slide

        array = f"features/{name}"
        store = job.existing
        if store is not None and (not file.n_patches or store.has_array(array) and
                                  same_identity(_recorded_identity(store, name), identity)):
            return SlideOutcome(job.slide_id, Status.REUSED, identity=identity, extra=extra)
        created = store is None
        if created:
            with Slide(job.slide_path, slide_mpp=job.slide_mpp) as slide:
                store = tile_store_for_coords(slide, file.coords, file.patch_size_level0, job.store,
                                              target_mpp=file.target_mpp, patch_size=file.patch_size,
                                              slide_id=job.slide_id,
                                              attrs={"imported_from": str(file.path.resolve()),
                                                     "imported_tool": file.tool})
        if file.n_patches:
            attrs = {**{k: v for k, v in identity.items() if k != "source"}, "identity": identity,
                     "source_file": str(file.path.resolve())}
            _copy_features(file, job.order, store, array, attrs)
        return SlideOutcome(job.slide_id, Status.DONE, identity=identity, extra={**extra, "store_created": created})

    # unexpected failures of the work are the output's (a full disk); reading the file names the file itself
    return run_job(job.slide_id, job.store, work, extra)


def _recorded_identity(store: TileStore, name: str) -> dict[str, Any] | None:
    """The identity features/<name> were imported with; without the source's mtime that older imports recorded."""
    recorded = store.array_attrs(f"features/{name}").get("identity")
    if isinstance(recorded, dict) and isinstance(recorded.get("source"), dict):
        recorded = {**recorded, "source": {k: v for k, v in recorded["source"].items() if k != "mtime_ns"}}
    return recorded


def _copy_features(file: FeatureFile, order: np.ndarray, store: TileStore, array: str,
                   attrs: dict[str, Any]) -> None:
    """Stream the file's features into ``array`` of ``store`` in store order, as float16, block by block."""
    import h5py

    in_order = bool(np.all(order[1:] > order[:-1]))  # the file already lists patches row-major

    def read(source: Any, wanted: np.ndarray) -> np.ndarray:
        try:
            if in_order:
                return source[int(wanted[0]):int(wanted[-1]) + 1]
            ascending = np.sort(wanted)  # h5py reads increasing indices; put them back in store order after
            return source[ascending][np.searchsorted(ascending, wanted)]
        except OSError as exc:
            raise BadInputError(f"{file.path}: cannot read its features ({exc}); is the file complete?") from None

    def fill(target: Any) -> None:
        try:
            f = h5py.File(file.path, "r")
        except OSError as exc:
            raise BadInputError(f"{file.path}: cannot read its features ({exc}); is the file complete?") from None
        with f:
            source = f[file.dataset]
            rows = max(1, BLOCK_BYTES // max(1, file.dim * source.dtype.itemsize))
            rows = max(target.chunks[0], rows // target.chunks[0] * target.chunks[0])  # whole zarr chunks
            for start in range(0, file.n_patches, rows):
                wanted = order[start:start + rows]
                block = np.asarray(read(source, wanted), dtype=np.float16)
                if not np.isfinite(block).all():
                    raise BadInputError(f"{file.path}: features that are NaN or beyond the float16 range "
                                        f"(rows {start}-{start + len(wanted) - 1} in store order); re-extract them")
                target[start:start + len(block)] = block  # a write error (full disk) names the store: run_job

    store.write_array_in_blocks(array, (file.n_patches, file.dim), np.float16, fill, attrs=attrs)
