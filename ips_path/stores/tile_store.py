"""Tile stores: the tissue mask and patch coordinates of one slide, as a zarr v3 directory.

Layout of ``<out>/<slide_id>.zarr`` (see DESIGN.md)::

    attrs            format "ipspath.tiles", format_version, tiling parameters, slide identity,
                     n_patches, created, and ``complete: true`` written last
    coords           int64 (N, 2)  level-0 top-left (x, y), sorted row-major
    tissue_fraction  float32 (N,)
    mask             uint8 (h, w)  tissue mask; attrs mpp (µm/px) and downsample (level-0 px per pixel)
    scores/<run>     float32 (N,)  optional, written by predict
    features/<enc>   float16 (N, D) optional, cached embeddings

Every write is atomic: a store is built in a hidden temporary sibling and renamed into place;
an extra array is built in a hidden folder inside the store and renamed to its name. A
writer killed at any point leaves nothing that :meth:`TileStore.open` accepts as complete.

A store is verified where it is read (:meth:`TileStore.open`): it must be *whole* (every core
array with the shape and dtype its attrs promise and every chunk file present: zarr would read a
missing chunk back as zeros) and, when its slide file is at hand, *belong to that slide*: the
slide's size and content fingerprint (:func:`ips_path.runtime.identity.slide_identity`, recorded at
tiling as ``slide_identity``) must still match, and the slide id the store was made for must be
the one asked for. Every chunk is written, even one of zeros, and checksummed (zstd), so a
deleted or damaged chunk is found instead of read as zeros.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ips_path import __version__
from ips_path.runtime.atomic import partial_path, remove_dead_partials
from ips_path.runtime.errors import BadInputError
from ips_path.runtime.faults import fault_point
from ips_path.runtime.identity import slide_identity
from ips_path.runtime.locks import file_lock, remove_stale_lock
from ips_path.runtime.names import check_slide_id

__all__ = [
    "CORE_ARRAYS",
    "FORMAT",
    "FORMAT_VERSION",
    "GRID_ATTR",
    "StoreMismatchError",
    "TileStore",
    "find_stores",
    "remove_partial_stores",
    "slide_id_from_path",
    "store_claim",
    "store_path",
    "write_tile_store",
]

FORMAT = "ipspath.tiles"
#: 2: slide_identity (size, mtime_ns, content fingerprint) recorded; every chunk written and checksummed.
FORMAT_VERSION = 2
CORE_ARRAYS = ("coords", "tissue_fraction", "mask")
# dtype and number of dimensions of the core arrays; coords and tissue_fraction have n_patches rows.
_CORE_LAYOUT = {"coords": ("int64", 2), "tissue_fraction": ("float32", 1), "mask": ("uint8", 2)}
#: Attribute of every array written into a store: :attr:`TileStore.grid_sha256` of the grid it was made on.
GRID_ATTR = "grid_sha256"


class StoreMismatchError(BadInputError):
    """A whole tile store that was made from another slide, or from an older version of its slide file."""


def slide_id_from_path(path: str | os.PathLike) -> str:
    """The slide id of a slide file: its name without the last suffix (``a/b/S1.svs`` -> ``S1``)."""
    return Path(path).stem


def store_path(out_dir: str | os.PathLike, slide_id: str) -> Path:
    """Where the tile store of ``slide_id`` lives in ``out_dir``: ``<out_dir>/<slide_id>.zarr``.

    BadInputError when ``slide_id`` is not a safe file name: a store is never put outside ``out_dir``.
    """
    return Path(out_dir) / f"{check_slide_id(slide_id)}.zarr"


def find_stores(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The tile stores named by ``inputs``: ``.zarr`` folders, and folders of them (sorted).

    Raises
    ------
    BadInputError
        A folder without stores, or an input that is neither.
    """
    stores: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.suffix == ".zarr":
            stores.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.glob("*.zarr") if p.is_dir())
            if not found:
                raise BadInputError(f"{path}: no tile stores (*.zarr) in this folder; run `ipspath tile` first")
            stores.extend(found)
        else:
            raise BadInputError(f"{path}: not a tile store (.zarr) or a folder of them")
    return stores


def promised_patches(path: str | os.PathLike) -> int:
    """The number of patches a store's attributes promise, unchecked (0 when unreadable): a cheap
    count of the work ahead, for progress. Open it with :meth:`TileStore.open` to trust it."""
    try:
        return int(json.loads((Path(path) / "zarr.json").read_text()).get("attributes", {}).get("n_patches", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def store_claim(path: str | os.PathLike, wait_s: float = 120.0) -> Any:
    """A context manager holding the store's writer claim, ``.<name>.zarr.lock`` beside it: one
    process writes a store at a time (tile replacing it, features or scores added to it). Waits up
    to ``wait_s`` seconds for another writer; re-entrant within a process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return file_lock(path.parent / f".{path.name}.lock", str(path), wait_s=wait_s)


def _node_type(path: Path) -> str | None:
    """``"array"``/``"group"`` for a zarr v3 node folder, None when it is not one."""
    try:
        return json.loads((path / "zarr.json").read_text()).get("node_type")
    except (OSError, ValueError):
        return None


def _check_array_name(name: str) -> None:
    parts = name.split("/")
    if not name or any(not p or p.startswith(".") or p == ".." for p in parts):
        raise ValueError(f"bad array name {name!r}: use 'group/name' without empty or hidden parts")


def _replace_dir(new: Path, target: Path) -> None:
    """Move folder ``new`` to ``target``, replacing it. Readers see the old or the new folder,
    except for the moment between two renames, when ``target`` is missing."""
    if target.exists():
        trash = partial_path(target, "-old")
        os.rename(target, trash)
        fault_point("store.old_moved_aside")
        os.rename(new, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(new, target)


class TileStore:
    """An open, complete tile store (read with :meth:`open`, written with :func:`write_tile_store`).

    Attributes
    ----------
    path : Path
        The ``.zarr`` folder.
    attrs : dict
        All attributes (tiling parameters, slide identity, ...).
    coords : np.ndarray
        int64 (N, 2) level-0 top-left (x, y) of the patches, sorted row-major.
    tissue_fraction : np.ndarray
        float32 (N,) tissue fraction of each patch.
    n_patches : int
        N.
    slide_path : Path
        The slide file the store was made from (absolute).
    level0_mpp : tuple of float
        Level-0 resolution (x, y), µm/px, as used for tiling.
    target_mpp : float
        Requested patch resolution, µm/px.
    patch_size : int
        Patch side at ``target_mpp``, px.
    patch_size_level0 : int
        Patch side in level-0 px.
    read_level : int
        Pyramid level to read patches from (then resize ``read_size`` -> ``patch_size``).
    read_size : int
        Patch side at ``read_level``, px.
    stride_level0 : int
        Distance between neighbouring grid positions, level-0 px.
    """

    def __init__(self, path: Path, attrs: dict[str, Any], coords: np.ndarray, tissue_fraction: np.ndarray):
        self.path = path
        self.attrs = attrs
        self.coords = coords
        self.tissue_fraction = tissue_fraction
        self.n_patches = int(len(coords))
        self.slide_path = Path(attrs["slide_path"])
        self.level0_mpp = (float(attrs["level0_mpp"][0]), float(attrs["level0_mpp"][1]))
        self.target_mpp = float(attrs["target_mpp"])
        self.patch_size = int(attrs["patch_size"])
        self.patch_size_level0 = int(attrs["patch_size_level0"])
        self.read_level = int(attrs["read_level"])
        self.read_size = int(attrs["read_size"])
        self.stride_level0 = int(attrs.get("stride_level0", self.patch_size_level0))

    @classmethod
    def open(cls, path: str | os.PathLike, *, slide_id: str | None = None,
             slide_path: str | os.PathLike | None = None, verify: str = "fast") -> TileStore:
        """Open a tile store, verified: whole, and made from its slide as it is now.

        Parameters
        ----------
        path : path-like
            The ``.zarr`` folder.
        slide_id : str, optional
            The slide the caller wants (a manifest row): the store must have been made for it.
        slide_path : path-like, optional
            The caller's file of that slide: when it exists, the store must have been made from
            it (same size and content fingerprint). The file the store was tiled from is checked
            the same way whenever it still exists, with or without this argument.
        verify : {"fast", "full"}
            ``full``: the slide file must also have the whole-content SHA-256 recorded at tiling
            (``ipspath tile --verify full``), which finds any edit; ``fast`` finds a replaced file, not an
            edit in place that keeps the size and misses the fingerprint's three blocks.

        Raises
        ------
        BadInputError
            When ``path`` is missing, not an ipspath tile store, incomplete (its writer was
            stopped), damaged (an array or chunk file missing, wrong shape or dtype, a chunk that
            does not decode), from an older ipspath without the slide's identity, or from a newer
            ipspath.
        StoreMismatchError
            When the store was made for another slide id, or from another file than its slide
            now is (copied under another id, or the slide replaced after tiling).
        """
        path = Path(path)
        if not path.is_dir():
            raise BadInputError(f"{path}: no tile store there; run `ipspath tile` first")
        if _node_type(path) != "group":
            raise BadInputError(f"{path}: not a tile store (no zarr v3 group)")
        attrs = dict(json.loads((path / "zarr.json").read_text()).get("attributes", {}))
        if attrs.get("format") != FORMAT:
            raise BadInputError(f"{path}: not an ipspath tile store (format {attrs.get('format')!r})")
        if attrs.get("complete") is not True:
            raise BadInputError(f"{path}: incomplete tile store (its writer was stopped); run `ipspath tile` again")
        version = int(attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise BadInputError(
                f"{path}: tile store format {attrs['format_version']} is newer than this ipspath "
                f"({__version__}) reads ({FORMAT_VERSION}); upgrade ipspath"
            )
        if version < FORMAT_VERSION:
            raise StoreMismatchError(
                f"{path}: tile store format {version} records no identity of its slide file and cannot be "
                "checked; tile the slide again (`ipspath tile` redoes such stores)")
        _check_whole(path, attrs)
        coords = _read_core(path, "coords").astype(np.int64, copy=False).reshape(-1, 2)
        tissue_fraction = _read_core(path, "tissue_fraction").astype(np.float32, copy=False)
        store = cls(path, attrs, coords, tissue_fraction)
        store.check_slide(slide_id, slide_path, verify=verify)
        return store

    def check_slide(self, slide_id: str | None = None, slide_path: str | os.PathLike | None = None, *,
                    verify: str = "fast") -> None:
        """StoreMismatchError unless the store was made for ``slide_id`` from the file ``slide_path``
        as it is now (size and content fingerprint, with ``verify="full"`` also the whole file's SHA-256;
        the modification time alone may differ, as after a copy). The recorded slide file is checked too
        when it exists; missing files are not checked."""
        made_for = self.attrs.get("slide_id")
        if slide_id is not None and made_for != slide_id:
            raise StoreMismatchError(
                f"{self.path}: made for slide {made_for!r}, not {slide_id!r} (copied or renamed?); tile "
                f"slide {slide_id!r} again with `ipspath tile ... --overwrite`")
        recorded = self.attrs.get("slide_identity") or {}
        candidates = [Path(slide_path)] if slide_path is not None else []
        if not candidates or candidates[0].resolve() != self.slide_path:
            candidates.append(self.slide_path)
        for candidate in candidates:
            if not candidate.is_file():
                continue
            now = slide_identity(candidate, verify)
            if (now["size"], now["fingerprint"]) != (recorded.get("size"), recorded.get("fingerprint")):
                change = ("the slide file was replaced or changed after tiling" if candidate == self.slide_path
                          else "the store belongs to another slide file")
                raise StoreMismatchError(
                    f"{self.path}: made from another file than {candidate} ({change}: size or content "
                    f"fingerprint differ); tile it again with `ipspath tile {candidate} ... --overwrite`")
            if "sha256" in now and recorded.get("sha256") != now["sha256"]:
                why = ("the file was edited after tiling" if "sha256" in recorded
                       else "tiled without --verify full, it records none to compare")
                raise StoreMismatchError(
                    f"{self.path}: the whole-content SHA-256 of {candidate} does not match ({why}); tile it again "
                    f"with `ipspath tile {candidate} ... --verify full --overwrite`")

    def mask(self) -> tuple[np.ndarray, float]:
        """The tissue mask as bool (h, w) and its resolution in µm/px."""
        import zarr

        array = zarr.open_array(self.path / "mask", mode="r")
        return _read_core(self.path, "mask") != 0, float(array.attrs["mpp"])

    def mask_downsample(self) -> float:
        """Level-0 pixels per mask pixel."""
        import zarr

        return float(zarr.open_array(self.path / "mask", mode="r").attrs["downsample"])

    def write_array(self, name: str, data: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
        """Add or replace an array, atomically (a reader sees the old array, the new one, or none).

        Parameters
        ----------
        name : str
            ``"<group>/<name>"``, e.g. ``"scores/<run>"`` (float32 (N,)) or
            ``"features/<encoder>"`` (float16 (N, D)). The core arrays cannot be replaced.
        data : np.ndarray
            Stored with its dtype and shape.
        attrs : dict, optional
            JSON-able attributes of the array.
        """
        data = np.asarray(data)

        def fill(array: Any) -> None:
            array[...] = data

        self.write_array_in_blocks(name, data.shape, data.dtype, fill, attrs)

    def write_array_in_blocks(self, name: str, shape: tuple[int, ...], dtype: Any, fill: Callable[[Any], None],
                              attrs: dict[str, Any] | None = None) -> None:
        """Add or replace an array filled piece by piece by ``fill``, atomically like :meth:`write_array`.

        ``fill`` receives the new, empty ``zarr.Array`` of ``shape`` and ``dtype`` (chunks of about
        4 MiB along the first axis) and writes it by slices, so an array larger than memory can be
        written; if ``fill`` raises, nothing is left behind and the old array stays. Holds the
        store's writer claim (:func:`store_claim`) meanwhile.

        The array records the patch grid it was computed on (``attrs[GRID_ATTR]``, this object's
        :attr:`grid_sha256`), and is refused (StoreMismatchError, nothing written) when the store on disk
        no longer has that grid: the slide was tiled again while the array was being computed.
        """
        _check_array_name(name)
        if name in CORE_ARRAYS:
            raise ValueError(f"{name!r} is written by `ipspath tile` only")
        with store_claim(self.path):
            if _grid_digest(_read_core(self.path, "coords")) != self.grid_sha256:
                raise StoreMismatchError(
                    f"{self.path}: the slide was tiled again while {name!r} was computed for its old patch grid; "
                    "nothing was written: run the command again")
            self._write_array_claimed(name, shape, dtype, fill, {**(attrs or {}), GRID_ATTR: self.grid_sha256})

    def _write_array_claimed(self, name: str, shape: tuple[int, ...], dtype: Any, fill: Callable[[Any], None],
                             attrs: dict[str, Any] | None) -> None:
        import zarr

        target = self.path / name
        remove_dead_partials(self.path)  # what killed writers of other arrays left
        if target.parent.is_dir():
            remove_dead_partials(target.parent)
        partial = partial_path(self.path / name.replace("/", "."))
        try:
            chunks = _chunks(np.empty((0, *shape[1:]), dtype=dtype), rows=shape[0]) if shape else ()
            array = _create_array(partial, None, shape=shape, dtype=dtype, chunks=chunks)
            fill(array)
            if attrs:
                array.attrs.update(attrs)
            parent = name.rsplit("/", 1)[0] if "/" in name else ""
            if parent:
                zarr.open_group(self.path, mode="r+").require_group(parent)
            _replace_dir(partial, self.path / name)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def has_array(self, name: str) -> bool:
        """Whether an array ``name`` (e.g. ``"features/resnet18"``) exists."""
        _check_array_name(name)
        return _node_type(self.path / name) == "array"

    def read_array(self, name: str) -> np.ndarray:
        """The whole array ``name``; KeyError when it does not exist, BadInputError when damaged."""
        return np.asarray(self.open_array(name)[...])

    def open_array(self, name: str) -> Any:
        """Array ``name`` as a read-only ``zarr.Array``, read lazily by slicing; KeyError when absent.

        BadInputError when a chunk file of it is missing or empty (it would read back as zeros).
        """
        import zarr

        if not self.has_array(name):
            raise KeyError(f"{self.path}: no array {name!r}")
        meta = json.loads((self.path / name / "zarr.json").read_text())
        missing, expected = _missing_chunks(self.path / name, meta)
        if missing:
            raise BadInputError(
                f"{self.path}: damaged array {name!r} ({len(missing)} of {expected} chunk file(s) missing or "
                f"empty, first: {name}/c/{missing[0]}); write it again (`ipspath features ... --overwrite` for "
                "features, `ipspath predict ... --overwrite` for scores)")
        return zarr.open_array(self.path / name, mode="r")

    def array_attrs(self, name: str) -> dict[str, Any]:
        """The attributes of array ``name``; KeyError when it does not exist."""
        if not self.has_array(name):
            raise KeyError(f"{self.path}: no array {name!r}")
        return dict(json.loads((self.path / name / "zarr.json").read_text()).get("attributes", {}))

    def array_names(self, group: str) -> list[str]:
        """Names (without the group prefix) of the arrays in ``group``, sorted; e.g.
        ``array_names("scores") == ["run1"]`` for ``scores/run1``. Empty when the group is absent."""
        _check_array_name(group)
        folder = self.path / group
        if not folder.is_dir():
            return []
        return sorted(
            child.name
            for child in folder.iterdir()
            if not child.name.startswith(".") and _node_type(child) == "array"
        )

    @cached_property
    def grid_sha256(self) -> str:
        """SHA-256 (hex) of the patch coordinates: names the patch grid that per-patch arrays line up with."""
        return _grid_digest(self.coords)

    def __repr__(self) -> str:
        return f"TileStore({str(self.path)!r}, n_patches={self.n_patches})"


def _create_array(where: Any, name: str | None, *, chunks: tuple[int, ...], data: np.ndarray | None = None,
                  shape: tuple[int, ...] | None = None, dtype: Any = None) -> Any:
    """A zarr array (``data``, or empty of ``shape`` and ``dtype``) whose every chunk is a checksummed
    file, zeros included (by default zarr skips chunks equal to the fill value, and a deleted chunk
    would read back as zeros)."""
    import zarr
    from zarr.codecs import ZstdCodec

    options = {"chunks": chunks, "compressors": ZstdCodec(level=0, checksum=True),
               "config": {"write_empty_chunks": True}}
    options.update({"data": data} if data is not None else {"shape": shape, "dtype": dtype})
    if name is None:
        return zarr.create_array(where, zarr_format=3, **options)
    return where.create_array(name, **options)


def _missing_chunks(array_dir: Path, meta: dict[str, Any]) -> tuple[list[str], int]:
    """Chunk files of a zarr v3 array that are absent or empty, and how many there should be."""
    shape = meta["shape"]
    chunk_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    separator = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
    grid = [-(-size // chunk) for size, chunk in zip(shape, chunk_shape, strict=True)]
    present = {}
    chunk_root = array_dir / "c"
    if chunk_root.is_dir():
        for folder, _, files in os.walk(chunk_root):
            for file in files:
                key = os.path.relpath(os.path.join(folder, file), chunk_root).replace(os.sep, separator)
                present[key] = os.path.getsize(os.path.join(folder, file))
    expected = [separator.join(map(str, index)) for index in np.ndindex(*grid)] if all(grid) else []
    missing = [key for key in expected if present.get(key, 0) == 0]
    return missing, len(expected)


def _check_whole(path: Path, attrs: dict[str, Any]) -> None:
    """BadInputError unless every core array is there with the promised shape, dtype and chunks."""
    n_patches = attrs.get("n_patches")
    problems = []
    for name, (dtype, ndim) in _CORE_LAYOUT.items():
        try:
            meta = json.loads((path / name / "zarr.json").read_text())
        except (OSError, ValueError):
            problems.append(f"array {name!r} is missing")
            continue
        shape = meta.get("shape", [])
        rows_ok = name == "mask" or (shape and shape[0] == n_patches)
        if meta.get("data_type") != dtype or len(shape) != ndim or not rows_ok or (name == "coords" and shape[1] != 2):
            problems.append(f"array {name!r} is {meta.get('data_type')} {shape}, not the {dtype} with "
                            f"{'its mask' if name == 'mask' else f'{n_patches} rows'} the store's attrs promise")
            continue
        missing, expected = _missing_chunks(path / name, meta)
        if missing:
            problems.append(f"{len(missing)} of {expected} chunk file(s) of {name!r} are missing or empty "
                            f"(first: {name}/c/{missing[0]})")
    if problems:
        raise BadInputError(f"{path}: damaged tile store ({'; '.join(problems)}); it would read back as zeros: "
                            "tile the slide again with `ipspath tile ... --overwrite`")


def _read_core(path: Path, name: str) -> np.ndarray:
    """A core array, whole; a chunk that does not decode (corrupted, truncated) is BadInputError."""
    import zarr

    try:
        return np.asarray(zarr.open_array(path / name, mode="r")[...])
    except (ValueError, RuntimeError, OSError) as exc:
        raise BadInputError(f"{path}: damaged tile store (array {name!r} does not decode: {exc}); "
                            "tile the slide again with `ipspath tile ... --overwrite`") from exc


def _grid_digest(coords: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(coords, dtype=np.int64).reshape(-1, 2).tobytes()).hexdigest()


def _chunks(data: np.ndarray, rows: int | None = None) -> tuple[int, ...]:
    """Chunks of about 4 MiB along the first axis, whole along the others (``rows``: the first
    axis's length when ``data`` only stands for the dtype and trailing shape)."""
    if data.ndim == 0:
        return ()
    n_rows = data.shape[0] if rows is None else rows
    row_bytes = max(1, data.itemsize * int(np.prod(data.shape[1:], dtype=np.int64)))
    chunk_rows = max(1, min(max(1, n_rows), (4 << 20) // row_bytes))
    return (chunk_rows, *(max(1, s) for s in data.shape[1:]))


def write_tile_store(
    path: str | os.PathLike,
    coords: np.ndarray,
    tissue_fraction: np.ndarray,
    mask: np.ndarray,
    mask_mpp: float,
    attrs: dict[str, Any],
    *,
    mask_downsample: float | None = None,
) -> TileStore:
    """Write a complete tile store atomically, replacing any store at ``path``.

    Parameters
    ----------
    path : path-like
        The ``.zarr`` folder to create (its parent is created if needed).
    coords : np.ndarray
        int (N, 2) level-0 top-left (x, y); stored sorted row-major (with ``tissue_fraction``
        in the same order).
    tissue_fraction : np.ndarray
        float (N,).
    mask : np.ndarray
        bool or uint8 (h, w) tissue mask.
    mask_mpp : float
        Mask resolution, µm/px.
    attrs : dict
        JSON-able attributes; must hold ``slide_path``, ``level0_mpp``, ``target_mpp``,
        ``patch_size``, ``patch_size_level0``, ``read_level`` and ``read_size``. ``format``,
        ``format_version``, ``ipspath_version``, ``n_patches``, ``created`` and ``complete`` are
        set here. ``slide_id`` defaults to the store's name without ``.zarr``, ``slide_identity``
        to :func:`ips_path.runtime.identity.slide_identity` of ``slide_path`` (which must then exist).
    mask_downsample : float, optional
        Level-0 pixels per mask pixel; default: mask_mpp / mean level-0 mpp.

    Returns
    -------
    TileStore
        The store, open.
    """

    path = Path(path)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    tissue_fraction = np.asarray(tissue_fraction, dtype=np.float32).reshape(-1)
    if len(coords) != len(tissue_fraction):
        raise ValueError(f"{len(coords)} coords but {len(tissue_fraction)} tissue fractions")
    missing = [k for k in ("slide_path", "level0_mpp", "target_mpp", "patch_size", "patch_size_level0",
                           "read_level", "read_size") if k not in attrs]
    if missing:
        raise ValueError(f"tile store attrs lack {', '.join(missing)}")
    attrs = {"slide_id": path.name.removesuffix(".zarr"), **attrs}
    if "slide_identity" not in attrs:
        attrs["slide_identity"] = slide_identity(attrs["slide_path"])
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    coords, tissue_fraction = coords[order], tissue_fraction[order]
    if mask_downsample is None:
        mask_downsample = mask_mpp / float(np.mean(attrs["level0_mpp"]))
    full_attrs = {
        **attrs,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ipspath_version": __version__,
        "n_patches": int(len(coords)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    full_attrs.pop("complete", None)

    with store_claim(path):
        _write_store_claimed(path, coords, tissue_fraction, mask, mask_mpp, mask_downsample, full_attrs)
    return TileStore(path, {**full_attrs, "complete": True}, coords, tissue_fraction)


def _write_store_claimed(path: Path, coords: np.ndarray, tissue_fraction: np.ndarray, mask: np.ndarray,
                         mask_mpp: float, mask_downsample: float, full_attrs: dict[str, Any]) -> None:
    import zarr

    partial = partial_path(path)
    try:
        group = zarr.open_group(partial, mode="w", zarr_format=3)
        _create_array(group, "coords", data=coords, chunks=_chunks(coords))
        _create_array(group, "tissue_fraction", data=tissue_fraction, chunks=_chunks(tissue_fraction))
        mask_array = _create_array(group, "mask", data=np.asarray(mask).astype(np.uint8), chunks=(1024, 1024))
        mask_array.attrs.update({"mpp": float(mask_mpp), "downsample": float(mask_downsample)})
        fault_point("store.arrays_written")
        group.attrs.update(full_attrs)
        group.attrs["complete"] = True  # last: before this, the folder never opens as a store
        _replace_dir(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def remove_partial_stores(out_dir: str | os.PathLike, slide_id: str | None = None) -> list[Path]:
    """Delete what killed writers of ``slide_id``'s store (default: of every store) left in
    ``out_dir``: hidden temporary folders, and the ``-old`` copy of a store being replaced. What
    live writers are writing is left alone (see :func:`ips_path.runtime.atomic.remove_dead_partials`), and
    so are the claims of live writers; claims of dead ones are removed."""
    name = "*" if slide_id is None else slide_id
    stale_claims = [claim for claim in Path(out_dir).glob(f".{name}.zarr.lock") if remove_stale_lock(claim)]
    return remove_dead_partials(out_dir, None if slide_id is None else f"{slide_id}.zarr") + stale_claims
