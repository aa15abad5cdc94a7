"""Feature h5 files written the way TRIDENT, CLAM and STAMP write them (their writers, restated).

- TRIDENT ``trident/IO.py::save_h5`` (datasets chunked one row at a time, resizable; dict attrs as
  JSON, None as "None"), with the coords attrs of ``coords_to_h5`` and the features attrs of
  ``WSI.extract_patch_features``.
- CLAM ``utils/file_utils.py::save_hdf5`` as ``extract_features_fp.py`` calls it: batches appended
  to resizable datasets chunked 32 rows, float32 features, int32 coords, no attributes; the patch
  file of ``create_patches_fp.py`` holds ``coords`` with patch_size, patch_level, downsample, ...
- STAMP ``stamp/preprocessing/__init__.py``: ``coords`` float µm and ``feats`` float16 as plain
  datasets, file attrs stamp_version, extractor, unit, tile_size_um, tile_size_px, code_hash, feat_type.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np


def _trident_save_h5(path: Path, assets: dict, attributes: dict) -> None:
    with h5py.File(path, "w") as f:
        for key, val in assets.items():
            dset = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                    chunks=(1,) + val.shape[1:], dtype=val.dtype)
            dset[:] = val
            for attr_key, attr_val in attributes.get(key, {}).items():
                if isinstance(attr_val, dict):
                    attr_val = json.dumps(attr_val)
                elif attr_val is None:
                    attr_val = "None"
                dset.attrs[attr_key] = attr_val


def write_trident(folder: Path, slide_id: str, coords: np.ndarray, features: np.ndarray, *, patch_size: int,
                  level0_magnification: int, target_magnification: int, dimensions: tuple[int, int],
                  encoder: str | None = "uni_v1") -> Path:
    """``<folder>/<slide_id>.h5`` as TRIDENT's feature step writes it (folder: ``features_<encoder>``)."""
    folder.mkdir(parents=True, exist_ok=True)
    coords_attrs = {
        "patch_size": patch_size,
        "patch_size_level0": patch_size * level0_magnification // target_magnification,
        "level0_magnification": level0_magnification,
        "target_magnification": target_magnification,
        "overlap": 0,
        "name": slide_id,
        "savetodir": str(folder.parent),
        "level0_width": dimensions[0],
        "level0_height": dimensions[1],
    }
    path = folder / f"{slide_id}.h5"
    _trident_save_h5(path, {"features": np.asarray(features, np.float32), "coords": np.asarray(coords, np.int64)},
                     {"features": {"name": slide_id, "savetodir": str(folder), "encoder": encoder},
                      "coords": coords_attrs})
    return path


def _clam_save_hdf5(path: Path, asset_dict: dict, attr_dict: dict | None = None, mode: str = "a",
                    chunk_size: int = 32) -> None:
    with h5py.File(path, mode) as f:
        for key, val in asset_dict.items():
            if key not in f:
                dset = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                        chunks=(chunk_size,) + val.shape[1:], dtype=val.dtype)
                dset[:] = val
                for attr_key, attr_val in (attr_dict or {}).get(key, {}).items():
                    dset.attrs[attr_key] = attr_val
            else:
                dset = f[key]
                dset.resize(len(dset) + val.shape[0], axis=0)
                dset[-val.shape[0]:] = val


def write_clam(feat_dir: Path, patches_dir: Path, slide_id: str, coords: np.ndarray, features: np.ndarray, *,
               patch_size: int, patch_level: int, level_downsample: float, level_dim: tuple[int, int],
               batch_size: int = 7) -> Path:
    """CLAM's ``patches/<slide>.h5`` and ``h5_files/<slide>.h5`` (features appended batch by batch)."""
    patches_dir.mkdir(parents=True, exist_ok=True)
    (feat_dir / "h5_files").mkdir(parents=True, exist_ok=True)
    attrs = {"patch_size": patch_size, "patch_level": patch_level,
             "downsample": (level_downsample, level_downsample), "downsampled_level_dim": level_dim,
             "level_dim": level_dim, "name": slide_id, "save_path": str(patches_dir)}
    _clam_save_hdf5(patches_dir / f"{slide_id}.h5", {"coords": np.asarray(coords, np.int64)}, {"coords": attrs},
                    mode="w")
    path = feat_dir / "h5_files" / f"{slide_id}.h5"
    mode = "w"
    for start in range(0, len(coords), batch_size):
        _clam_save_hdf5(path, {"features": np.asarray(features[start:start + batch_size], np.float32),
                               "coords": np.asarray(coords[start:start + batch_size]).astype(np.int32)},
                        attr_dict=None, mode=mode)
        mode = "a"
    return path


def write_stamp(folder: Path, slide_id: str, coords_um: np.ndarray, features: np.ndarray, *, tile_size_um: float,
                tile_size_px: int, extractor: str = "uni") -> Path:
    """``<folder>/<slide_id>.h5`` as STAMP's preprocessing writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slide_id}.h5"
    with h5py.File(path, "w") as f:
        f["coords"] = np.asarray(coords_um, np.float32)
        f["feats"] = np.asarray(features, np.float16)
        f.attrs["stamp_version"] = "2.3.0"
        f.attrs["extractor"] = extractor
        f.attrs["unit"] = "um"
        f.attrs["tile_size_um"] = tile_size_um
        f.attrs["tile_size_px"] = tile_size_px
        f.attrs["code_hash"] = "0" * 40
        f.attrs["feat_type"] = "tile"
    return path
