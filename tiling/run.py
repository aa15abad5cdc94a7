"""Tiling of one slide and of many: slide -> tissue mask -> patch grid -> tile store (+ QC, h5).

:func:`tile_slides` is what ``ipspath tile`` runs. One bad slide never stops the others: each
slide ends as a :class:`TileResult` with a status, and the run writes
``<out>/tiling_summary.csv``. Outputs per slide::

    <out>/<slide_id>.zarr     tile store (ips_path.stores.tile_store)
    <out>/qc/<slide_id>.png   QC picture (unless qc=False)
    <out>/h5/<slide_id>.h5    CLAM/TRIDENT coordinates (with h5=True)

A slide whose whole store was made with the same parameters from the same file (size and
content fingerprint, :func:`ips_path.runtime.identity.slide_identity`) is skipped, so an interrupted run
resumes where it stopped; a store made from another file (the slide replaced, or the store copied
under another slide's id) is tiled again. ``verify="full"`` (``--verify full``) also compares the
SHA-256 of the whole slide file, which the fast fingerprint's three sampled blocks cannot replace.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ips_path.runtime.errors import BadInputError, IpspathError, listing
from ips_path.runtime.faults import fault_point
from ips_path.runtime.identity import check_verify, slide_identity
from ips_path.runtime.jobs import SlideOutcome, Status, error_line, run_exit_code
from ips_path.runtime.limits import PIXEL_SIZE_UM
from ips_path.runtime.locks import file_lock, probe_writable
from ips_path.runtime.names import slide_id_problem
from ips_path.stores.exchange import export_h5
from ips_path.stores.tile_store import (
    StoreMismatchError,
    TileStore,
    remove_partial_stores,
    slide_id_from_path,
    store_claim,
    store_path,
    write_tile_store,
)
from ips_path.tiling.annotations import MaskClasses
from ips_path.tiling.grid import (
    MPP_TOLERANCE,
    PatchGeometry,
    patch_geometry,
    read_level_for_mpp,
    select_patches,
)
from ips_path.tiling.tissue import (
    MASK_FILE_SUFFIXES,
    TissueMask,
    TissueParams,
    intersect_masks,
    load_tissue_mask,
    read_low_resolution,
    tissue_mask_for_slide,
)

__all__ = [
    "STATUSES", "SUMMARY_NAME", "SlideInput", "TileResult", "TilingParams", "collect_inputs", "exit_code",
    "tile_attrs", "tile_slide", "tile_slides",
]

log = logging.getLogger(__name__)

STATUSES = ("tiled", "skipped", "no-tissue", "failed")
SUMMARY_NAME = "tiling_summary.csv"
# Patches read back at the read level after tiling, to find a damaged full-resolution level
# now rather than in the middle of training: first, middle and last kept patch.
_PROBE_PATCHES = 3
# Largest pyramid level (pixels) read only to make a sharper QC picture of a small slide.
_QC_READ_PX = 16_000_000


@dataclass(frozen=True)
class TilingParams:
    """Everything that decides a tiling result.

    Attributes
    ----------
    target_mpp : float
        Patch resolution, µm/px.
    patch_size : int
        Patch side at ``target_mpp``, px.
    stride : int or None
        Step between patches at ``target_mpp``, px; None = ``patch_size`` (no overlap).
    min_tissue : float
        Smallest tissue fraction of a kept patch (0-1).
    tissue : TissueParams
        Tissue detection.
    tissue_mask : Path or None
        User masks: one file (for one slide) or a folder with ``<slide_id>.png``/``.npy``/``.geojson``;
        see :func:`~ips_path.tiling.tissue.load_tissue_mask`. Tissue is what is detected inside the
        mask, unless ``mask_only``.
    mask_classes : MaskClasses
        GeoJSON masks: which annotation classes are tissue and which are holes.
    mask_only : bool
        Take a user mask as it is, without tissue detection inside it.
    backend : str
        Slide backend: "auto", "openslide" or "tiffslide".
    slide_mpp : float or None
        Level-0 µm/px for every slide, overriding the file (a manifest ``mpp`` wins over it).
    qc : bool
        Write QC pictures.
    h5 : bool
        Also export CLAM/TRIDENT h5 coordinates.
    verify : {"fast", "full"}
        How an existing store is checked to belong to its slide file before it is skipped: ``fast``
        (size and content fingerprint, :func:`~ips_path.runtime.identity.slide_identity`) or ``full`` (also the
        SHA-256 of the whole file, recorded in the store; a store without it is tiled again).
    for_model : bool
        Tiling at a trained model's resolution (``ipspath predict``): a refusal says what the model
        cannot take instead of naming ``ipspath tile``'s options.
    """

    target_mpp: float = 0.5
    patch_size: int = 256
    stride: int | None = None
    min_tissue: float = 0.5
    tissue: TissueParams = field(default_factory=TissueParams)
    tissue_mask: Path | None = None
    mask_classes: MaskClasses = field(default_factory=MaskClasses)
    mask_only: bool = False
    backend: str = "auto"
    slide_mpp: float | None = None
    qc: bool = True
    h5: bool = False
    verify: str = "fast"
    for_model: bool = False

    def __post_init__(self) -> None:
        check_verify(self.verify)
        PIXEL_SIZE_UM.check(self.target_mpp, "--mpp")
        if self.slide_mpp is not None:
            PIXEL_SIZE_UM.check(self.slide_mpp, "--slide-mpp")
        if self.patch_size < 1:
            raise BadInputError(f"--patch-size must be at least 1 px, got {self.patch_size}")
        if self.stride is not None and self.stride < 1:
            raise BadInputError(f"--stride must be at least 1 px (--overlap below --patch-size), got {self.stride}")
        if not 0 <= self.min_tissue <= 1:
            raise BadInputError(f"--min-tissue must be a fraction between 0 and 1, got {self.min_tissue}")
        if self.tissue_mask is None and (self.mask_only or self.mask_classes != MaskClasses()):
            raise BadInputError("--mask-only, --mask-classes and --mask-exclude-classes need --tissue-mask")

    def fingerprint(self, slide_mpp: float | None) -> dict[str, Any]:
        """What must match for an existing store to be reused (QC, h5 and backend do not change it)."""
        fingerprint = {
            "target_mpp": self.target_mpp,
            "patch_size": self.patch_size,
            "stride": self.stride or self.patch_size,
            "min_tissue": self.min_tissue,
            "tissue": self.tissue.as_dict() if self.tissue_mask is None or not self.mask_only else None,
            "tissue_mask": str(self.tissue_mask.resolve()) if self.tissue_mask else None,
            "slide_mpp": slide_mpp,
        }
        if self.tissue_mask is not None:
            fingerprint["mask"] = {**self.mask_classes.as_dict(), "mask_only": self.mask_only}
        return fingerprint


@dataclass(frozen=True)
class SlideInput:
    """One slide to tile: its id (names the store), file, and optional level-0 µm/px override."""

    slide_id: str
    path: Path
    mpp: float | None = None


@dataclass
class TileResult:
    """What happened to one slide; ``exit_code`` is 0, or that of its error (2 bad input, 1 other)."""

    slide_id: str
    path: str
    status: str
    n_patches: int = 0
    level0_mpp: float | None = None
    mpp_source: str | None = None
    target_mpp: float | None = None
    seconds: float = 0.0
    error: str = ""
    exit_code: int = 0
    # A failed slide's whole store that this run left as it was: what the summary records for it.
    kept: TileResult | None = field(default=None, repr=False)

    def as_outcome(self) -> SlideOutcome:
        """The slide's outcome in the per-slide job contract (:mod:`ips_path.runtime.jobs`): tiled and
        no-tissue are done, skipped is reused; ``extra`` holds the tiling figures."""
        status = {"tiled": Status.DONE, "no-tissue": Status.DONE, "skipped": Status.REUSED}.get(self.status,
                                                                                               Status.FAILED)
        extra = {k: v for k, v in self.as_row().items() if k not in ("slide_id", "status", "error", "exit_code",
                                                                      "seconds", "kept")}
        return SlideOutcome(self.slide_id, status, error=self.error, exit_code=self.exit_code,
                            seconds=round(self.seconds, 3), extra={**extra, "tile_status": self.status})

    def as_row(self) -> dict[str, Any]:
        """The row of ``tiling_summary.csv``."""
        row = {k: v for k, v in asdict(self).items() if k != "kept"}
        row["seconds"] = round(self.seconds, 3)
        row["level0_mpp"] = None if self.level0_mpp is None else round(self.level0_mpp, 5)
        return row


def collect_inputs(inputs: Sequence[str | os.PathLike], manifest: str | os.PathLike | None = None) -> list[SlideInput]:
    """The slides named by files, folders (searched recursively), glob patterns and a manifest.

    Parameters
    ----------
    inputs : sequence of str or path
        A file is taken as it is (whatever its suffix; a missing one fails later as that slide's
        error). A folder is searched recursively for files with a suffix in
        :data:`ips_path.slides.slide.WSI_EXTENSIONS`; several ``.dcm`` files in one folder are one DICOM
        slide, named after the folder. A pattern with ``*``, ``?`` or ``[`` is expanded (``**``
        crosses folders).
    manifest : path, optional
        CSV with ``slide_id``, ``slide_path`` (relative to the manifest's folder) and optional
        ``mpp``; other columns are ignored.

    Raises
    ------
    BadInputError
        When nothing is found, two different files would get the same slide id, or a slide id
        is not a safe file name (:mod:`ips_path.runtime.names`).
    """
    from ips_path.slides.slide import WSI_EXTENSIONS

    found: list[SlideInput] = []
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            slides = _slides_in_folder(path, WSI_EXTENSIONS)
            if not slides:
                log.warning("%s: no slide files found in this folder", path)
            found.extend(slides)
        elif not path.exists() and any(c in text for c in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                log.warning("%s: no file matches this pattern", text)
            for match in map(Path, matches):
                found.extend(_slides_in_folder(match, WSI_EXTENSIONS) if match.is_dir()
                             else [SlideInput(slide_id_from_path(match), match)])
        else:
            found.append(SlideInput(slide_id_from_path(path), path))
    if manifest is not None:
        from ips_path.slides.manifest import read_manifest

        found.extend(SlideInput(row.slide_id, row.slide_path, row.mpp)
                     for row in read_manifest(manifest, require_label=False, check_files=False))

    unsafe = [f"{item.path}: slide id {item.slide_id[:60]!r} is not a safe file name ({problem})"
              for item in found if (problem := slide_id_problem(item.slide_id)) is not None]
    if unsafe:
        raise BadInputError(f"{len(unsafe)} slide file name(s) cannot name output files: " + listing(unsafe, sep="; ")
                            + "; rename the files or give safe slide_id values with --manifest")
    unique: dict[str, SlideInput] = {}
    clashes = []
    for item in found:
        known = unique.get(item.slide_id)
        if known is None:
            unique[item.slide_id] = item
        elif known.path.resolve() != item.path.resolve():
            clashes.append(f"{item.slide_id!r}: {known.path} and {item.path}")
    if clashes:
        raise BadInputError(
            "two slides would share one tile store (same file name): " + "; ".join(clashes)
            + "; rename them or give distinct slide_id values with --manifest"
        )
    if not unique:
        shown = ", ".join(map(os.fspath, inputs)) or str(manifest)
        raise BadInputError(f"no slide files found in: {shown}")
    return list(unique.values())


def _slides_in_folder(folder: Path, extensions: frozenset[str]) -> list[SlideInput]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file())
    dicom_files_per_folder = Counter(p.parent for p in files if p.suffix.lower() == ".dcm")
    dicom_series_taken: set[Path] = set()
    slides = []
    for path in files:
        if path.suffix.lower() == ".dcm" and dicom_files_per_folder[path.parent] > 1:
            # one DICOM slide is a series of files, one per level: open any one of them
            if path.parent not in dicom_series_taken:
                dicom_series_taken.add(path.parent)
                slides.append(SlideInput(path.parent.name, path))
            continue
        slides.append(SlideInput(slide_id_from_path(path), path))
    return slides


def _mask_file(tissue_mask: Path, slide_id: str) -> Path:
    """The user mask for ``slide_id``: the file itself, or ``<slide_id>.<suffix>`` in the folder."""
    if not tissue_mask.is_dir():
        if not tissue_mask.is_file():
            raise BadInputError(f"{tissue_mask}: tissue mask not found")
        return tissue_mask
    for suffix in MASK_FILE_SUFFIXES:
        candidate = tissue_mask / f"{slide_id}{suffix}"
        if candidate.is_file():
            return candidate
    raise BadInputError(
        f"{tissue_mask}: no tissue mask for slide {slide_id!r} (looked for {slide_id}"
        f"{{{','.join(MASK_FILE_SUFFIXES)}}})"
    )


def _existing_store(path: Path, fingerprint: dict[str, Any], item: SlideInput, verify: str) -> TileStore | None:
    """The store at ``path`` if it can be reused; None if there is none or it must be redone.

    A store made for another slide id or from another file than the slide is now, or in an older
    format, is redone (with a warning). Raises BadInputError when it was made with other
    parameters or is damaged or not a tile store: the user says with ``--overwrite`` whether to
    replace it.
    """
    if not path.exists():
        return None
    try:
        store = TileStore.open(path, slide_id=item.slide_id, slide_path=item.path, verify=verify)
    except StoreMismatchError as exc:
        log.warning("%s; tiling it again", str(exc).split("; ")[0])
        return None
    except BadInputError as exc:
        raise BadInputError(f"{exc}; pass --overwrite to replace it") from exc
    if store.attrs.get("tiling_params") != fingerprint:
        theirs = store.attrs.get("tiling_params") or {}
        differ = ", ".join(f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in fingerprint.items() if theirs.get(k) != v)
        raise BadInputError(
            f"{path}: exists with other tiling parameters ({differ}); pass --overwrite to replace it "
            "or choose another output folder"
        )
    return store


def tile_attrs(
    slide: Any, slide_id: str, geometry: PatchGeometry, tissue_method: str, tissue_params: dict[str, Any] | None,
    verify: str = "fast",
) -> dict[str, Any]:
    """The attributes a tile store records about its slide and grid (see DESIGN.md); with ``verify="full"``
    the slide's identity holds the SHA-256 of the whole file."""
    return {
        **geometry.as_dict(),
        "slide_id": slide_id,
        "slide_path": str(slide.path.resolve()),
        "slide_identity": slide_identity(slide.path, verify),
        "slide_dimensions": list(slide.dimensions),
        "read_level_dimensions": list(slide.level_dimensions[geometry.read_level]),
        "backend": slide.backend,
        "level0_mpp": list(slide.require_mpp()),
        "mpp_source": slide.mpp_source,
        "tissue_method": tissue_method,
        "tissue_params": tissue_params,
    }


def _probe_reads(slide: Any, coords: np.ndarray, geometry: PatchGeometry) -> None:
    """Read a few kept patches at the read level; BadInputError naming the coordinates if one fails."""
    if len(coords) == 0:
        return
    picks = np.unique(np.linspace(0, len(coords) - 1, _PROBE_PATCHES).round().astype(int))
    for x, y in coords[picks]:
        try:
            slide.read_region((int(x), int(y)), geometry.read_level, (geometry.read_size, geometry.read_size))
        except IpspathError as exc:
            raise BadInputError(f"{exc}; the file is damaged: re-export or re-scan it") from exc


def tile_slide(
    item: SlideInput, out_dir: str | os.PathLike, params: TilingParams, overwrite: bool = False,
    log_error: bool = True,
) -> TileResult:
    """Tile one slide into ``<out_dir>/<slide_id>.zarr``; never raises for problems of the slide.

    A failure is logged unless ``log_error`` is False (a caller that reports it itself).

    Returns
    -------
    TileResult
        ``status`` "tiled", "no-tissue" (store written with zero patches), "skipped" (an equal
        store exists) or "failed" (``error`` says why, ``exit_code`` 2 for bad input, else 1).
    """
    start = time.perf_counter()
    result = TileResult(item.slide_id, str(item.path), "failed", target_mpp=params.target_mpp)
    out_dir = Path(out_dir)
    target = store_path(out_dir, item.slide_id)
    before = _store_stamp(target)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # one writer per store: a second run leaves this slide alone instead of removing its work
        with store_claim(target, wait_s=0):
            remove_partial_stores(out_dir, item.slide_id)
            fault_point(f"tile.started:{item.slide_id}")
            _tile_slide(item, out_dir, params, overwrite, result)
    except Exception as exc:  # noqa: BLE001 - one slide must not stop the others
        result.status = "failed"
        result.error, result.exit_code = error_line(exc, item.path)
        if log_error:
            log.error("%s", result.error)
        if before is not None and _store_stamp(target) == before:
            result.kept = _describe_store(target, item)
    result.seconds = time.perf_counter() - start
    return result


def _store_stamp(path: Path) -> tuple[int, int] | None:
    """Inode and change time of a store folder (a store replaced by a rename has other ones); None: none there."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_ctime_ns


def _describe_store(path: Path, item: SlideInput) -> TileResult | None:
    """The summary record of the whole store of ``item`` at ``path``, from what it holds; None if it is not one."""
    try:
        store = TileStore.open(path, slide_id=item.slide_id, slide_path=item.path)
    except IpspathError:
        return None
    return TileResult(item.slide_id, str(item.path), "tiled" if store.n_patches else "no-tissue", store.n_patches,
                      float(np.mean(store.level0_mpp)), store.attrs.get("mpp_source"), store.target_mpp)


def _tile_slide(item: SlideInput, out_dir: Path, params: TilingParams, overwrite: bool, result: TileResult) -> None:
    from ips_path.slides.slide import Slide

    target = store_path(out_dir, item.slide_id)
    slide_mpp = item.mpp if item.mpp is not None else params.slide_mpp
    fingerprint = params.fingerprint(slide_mpp)
    qc_path = out_dir / "qc" / f"{item.slide_id}.png"
    h5_path = out_dir / "h5" / f"{item.slide_id}.h5"
    existing = None if overwrite or not item.path.is_file() else _existing_store(target, fingerprint, item,
                                                                                 params.verify)
    if existing is not None and (qc_path.is_file() or not params.qc):
        if params.h5 and not h5_path.is_file():
            export_h5(existing, h5_path)
        result.status, result.n_patches = "skipped", existing.n_patches
        result.level0_mpp = float(np.mean(existing.level0_mpp))
        result.mpp_source = existing.attrs.get("mpp_source")
        return

    with Slide(item.path, backend=params.backend, slide_mpp=slide_mpp) as slide:
        level0_mpp = float(np.mean(slide.require_mpp(
            "give it in the `mpp` column of the --manifest" if params.for_model else None)))
        result.level0_mpp, result.mpp_source = level0_mpp, slide.mpp_source
        if params.target_mpp * (1 + MPP_TOLERANCE) < level0_mpp:
            wanted, fix = ((f"the model's {params.target_mpp:g} µm/px",
                            f"this model cannot predict it; one trained at {level0_mpp:.3g} µm/px or coarser can")
                           if params.for_model else
                           (f"the requested {params.target_mpp:g} µm/px", f"pass --mpp {level0_mpp:.3g} or larger"))
            raise BadInputError(f"{item.path}: scanned at {level0_mpp:.4g} µm/px, coarser than {wanted}; {fix} "
                                "(upsampling would invent detail)")
        geometry = patch_geometry(level0_mpp, slide.level_downsamples, params.target_mpp, params.patch_size,
                                  params.stride)
        preview = _qc_preview(slide, params.tissue.mask_mpp) if params.qc else None
        user_mask = None
        if params.tissue_mask is not None:  # read first: a bad mask fails before any detection
            mask_file = _mask_file(params.tissue_mask, item.slide_id)
            user_mask = load_tissue_mask(mask_file, slide.dimensions, level0_mpp, params.tissue.mask_mpp,
                                         params.mask_classes)
            mask_params = {"path": str(mask_file.resolve()), **params.mask_classes.as_dict()}
        if user_mask is not None and params.mask_only:
            tissue, method, tissue_params = user_mask, "file", mask_params
        else:
            tissue, image = tissue_mask_for_slide(slide, params.tissue, preview)
            method, tissue_params = params.tissue.method, params.tissue.as_dict()
            if preview is None:
                preview = image, tissue.downsample
            if user_mask is not None:  # what is detected inside the drawn regions
                tissue = intersect_masks(tissue, user_mask)
                method, tissue_params = f"file+{method}", {**tissue_params, "mask": mask_params}
        coords, fractions = select_patches(tissue.mask, tissue.downsample, slide.dimensions, geometry,
                                           params.min_tissue)
        _probe_reads(slide, coords, geometry)
        if len(coords) == 0:
            log.warning("%s: no patch of %d px at %g µm/px has %.0f%% tissue; its store has zero patches",
                        item.path, params.patch_size, params.target_mpp, 100 * params.min_tissue)
        attrs = {**tile_attrs(slide, item.slide_id, geometry, method, tissue_params, params.verify),
                 "min_tissue": params.min_tissue, "tiling_params": fingerprint}
        store = write_tile_store(target, coords, fractions, tissue.mask, tissue.mpp, attrs,
                                 mask_downsample=tissue.downsample)
        if params.qc:
            _write_qc(slide, qc_path, preview, tissue, coords, geometry, params.tissue.mask_mpp)
    if params.h5:
        export_h5(store, h5_path)
    result.status = "tiled" if len(coords) else "no-tissue"
    result.n_patches = len(coords)


def _qc_preview(slide: Any, mask_mpp: float) -> tuple[np.ndarray, float] | None:
    """A picture of a small slide sharper than the detection image, for QC (tissue is then
    detected on it, shrunk): the whole slide at about QC_LONG_SIDE px. None when that would
    not be sharper than ``mask_mpp`` or its pyramid level is too large to read cheaply."""
    from ips_path.tiling.qc import QC_LONG_SIDE

    level0_mpp = float(np.mean(slide.require_mpp()))
    wanted_mpp = max(1.0, max(slide.dimensions) / QC_LONG_SIDE) * level0_mpp
    level = read_level_for_mpp(level0_mpp, slide.level_downsamples, wanted_mpp)
    level_width, level_height = slide.level_dimensions[level]
    if wanted_mpp > mask_mpp / 1.5 or level_width * level_height > _QC_READ_PX:
        return None
    return read_low_resolution(slide, wanted_mpp)


def _write_qc(slide: Any, path: Path, preview: tuple[np.ndarray, float] | None, tissue: TissueMask,
              coords: np.ndarray, geometry: PatchGeometry, mask_mpp: float) -> None:
    from ips_path.tiling.qc import qc_picture, write_qc_png

    image, image_downsample = preview if preview is not None else read_low_resolution(slide, mask_mpp)
    write_qc_png(path, qc_picture(image, image_downsample, tissue.mask, coords, geometry.patch_size_level0))


def tile_slides(
    inputs: Sequence[SlideInput],
    out_dir: str | os.PathLike,
    params: TilingParams = TilingParams(),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    scheduler: str | None = None,
) -> list[TileResult]:
    """Tile many slides, ``workers`` processes at a time, and write ``<out_dir>/tiling_summary.csv``.

    Parameters
    ----------
    inputs : sequence of SlideInput
        From :func:`collect_inputs`.
    out_dir : path
        Output folder (created).
    params : TilingParams
        Tiling parameters.
    workers : int
        Slides tiled in parallel (local processes); 1 = in this process.
    overwrite : bool
        Redo slides whose store exists (otherwise equal stores are skipped and stores made
        with other parameters are refused).
    progress : bool
        Show a progress bar (only on a terminal).
    scheduler : str, optional
        Dask scheduler address, or ``"local:N"``, to tile on a cluster instead
        (see :func:`ips_path.runtime.parallel.map_slides`); slides and ``out_dir`` must be on storage
        every worker sees.

    Returns
    -------
    list of TileResult
        In input order.
    """
    from ips_path.runtime.parallel import map_slides

    out_dir = Path(out_dir)
    probe_writable(out_dir)
    remove_partial_stores(out_dir)  # what killed runs left, whichever slides they were tiling
    shared = [out_dir, *(item.path for item in inputs if item.path.exists())]
    results = map_slides(tile_slide, inputs, out_dir, params, overwrite, workers=workers, scheduler=scheduler,
                         shared_paths=shared, progress=progress, desc="tiling", on_lost=_lost)
    _update_summary(out_dir / SUMMARY_NAME, results)
    return results


def _update_summary(path: Path, results: Sequence[TileResult]) -> None:
    """Write this run's rows into the folder's summary, keeping the rows of other slides (tiled by
    earlier runs, or by runs on other slides at the same time) and of slides this run refused or
    failed whose whole stores it left as they were."""
    from ips_path.tiling.qc import write_summary_csv

    with file_lock(path.with_name(f".{path.name}.lock"), str(path), wait_s=60):
        rows: dict[str, dict[str, Any]] = {}
        try:
            with path.open(newline="", encoding="utf-8") as f:
                rows = {row["slide_id"]: row for row in csv.DictReader(f) if row.get("slide_id")}
        except (OSError, ValueError, KeyError, csv.Error):
            pass  # no summary yet, or not one of ours: it is rewritten
        for r in results:
            if r.kept is None:
                rows[r.slide_id] = r.as_row()
            elif rows.get(r.slide_id, {}).get("status") in (None, "failed"):
                # A refused slide whose store is untouched: the record of what is on disk stays, or is made.
                rows[r.slide_id] = r.kept.as_row()
        write_summary_csv(rows.values(), path)


def _lost(item: SlideInput, exc: BaseException) -> TileResult:
    """The record of a slide whose worker process died (killed, out of memory)."""
    error = f"{item.path}: the worker tiling it died ({type(exc).__name__}: {exc})"
    log.error("%s", error)
    return TileResult(item.slide_id, str(item.path), "failed", error=error, exit_code=1)


def exit_code(results: Sequence[TileResult]) -> int:
    """The run's exit code by the one rule of :func:`ips_path.runtime.jobs.run_exit_code`: 0 when no slide
    failed; 2 when every slide failed on bad input; 1 otherwise."""
    return run_exit_code(r.as_outcome() for r in results)
