"""Identity of what produced a result: slide files, parameters, checkpoints, and keys naming them.

A per-slide result (a tile store, cached features, a prediction, a heatmap) records the identity
of its inputs, so a rerun can tell "same inputs, reuse it" from "other inputs, redo or refuse".
An identity is a plain JSON-able dict; :func:`identity_key` turns one into a short stable name
(for arrays inside a store, cache keys).

- :func:`slide_identity`: size, mtime (ns) and a cheap content fingerprint (SHA-256 over the
  size and three 64 KiB blocks: first, middle, last). A slide copied elsewhere keeps its
  fingerprint; a slide replaced under the same name almost always changes it, even when size and
  mtime were kept (``cp -p``, ``rsync -t``), without reading gigabytes. What it does not see: an
  edit in place that keeps the size and touches no byte of the three blocks (most of the pixel
  data of a large slide). ``verify="full"`` (``--verify full``) adds the SHA-256 of the whole file,
  read once per file and process (:func:`file_digest`), for users who need that certainty.
- :func:`content_identity`: size and fingerprint alone, for inputs identified by their bytes only.
- :func:`file_digest`: SHA-256 of a whole file (checkpoints, encoder weights), cached per process
  by (path, size, mtime_ns), so a file rewritten in place is digested afresh.
- :func:`canonical_json` / :func:`identity_key`: one spelling of a parameter set, whatever the
  order of its keys or the types (tuple/list, Path/str) it was built from.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ips_path.runtime.errors import BadInputError

__all__ = [
    "FINGERPRINT_BLOCK",
    "VERIFY_MODES",
    "canonical_json",
    "check_verify",
    "content_identity",
    "file_digest",
    "file_fingerprint",
    "identity_differences",
    "identity_key",
    "lacks_full_hash",
    "same_identity",
    "slide_identity",
]

#: Bytes read from each of the start, middle and end of a slide file for its fingerprint.
FINGERPRINT_BLOCK = 64 * 1024
#: How slide files are identified: ``fast`` (size and fingerprint), ``full`` (also the whole file's SHA-256).
VERIFY_MODES = ("fast", "full")

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap content fingerprint of a file: SHA-256 (hex) over its size and three 64 KiB blocks.

    Reads at most ``3 * FINGERPRINT_BLOCK`` bytes whatever the file's size.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest = hashlib.sha256(str(size).encode())
        for offset in sorted({0, max(0, size // 2 - FINGERPRINT_BLOCK // 2), max(0, size - FINGERPRINT_BLOCK)}):
            f.seek(offset)
            digest.update(f.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


def slide_identity(path: str | os.PathLike, verify: str = "fast") -> dict[str, Any]:
    """``{"size": bytes, "mtime_ns": int, "fingerprint": hex}`` of a slide file; with ``verify="full"``
    also ``"sha256"``, the digest of its whole content.

    The path itself is left out: the same file moved or mounted elsewhere is the same slide.
    """
    check_verify(verify)
    stat = os.stat(path)
    identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "fingerprint": file_fingerprint(path)}
    if verify == "full":
        identity["sha256"] = file_digest(path)
    return identity


def check_verify(verify: str) -> None:
    """BadInputError unless ``verify`` is one of :data:`VERIFY_MODES`."""
    if verify not in VERIFY_MODES:
        raise BadInputError(f"--verify {verify!r}: use one of {', '.join(VERIFY_MODES)}")


def lacks_full_hash(recorded_slide: Mapping[str, Any] | None, slide: Mapping[str, Any]) -> bool:
    """Whether a result recorded for slide identity ``recorded_slide`` was never checked against the
    whole file, while ``slide`` (this run's, ``verify="full"``) is: it must be made again to be verified."""
    return "sha256" in slide and "sha256" not in (recorded_slide or {})


def content_identity(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "fingerprint": hex}`` of a file: what its bytes are, not when they were written.

    For inputs whose copies must count as the same input (``cp -r``, ``touch``, a restore from a
    backup): imported feature files.
    """
    return {"size": os.stat(path).st_size, "fingerprint": file_fingerprint(path)}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a whole file, cached in this process by (resolved path, size, mtime_ns)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    cached = _DIGESTS.get(key)
    if cached is None:
        digest = hashlib.sha256()
        with open(resolved, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        cached = _DIGESTS[key] = digest.hexdigest()
    return cached


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, paths as strings, mapping keys as strings (one JSON spelling)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"an identity cannot hold {value!r}")
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return value


def canonical_json(value: Any) -> str:
    """One compact JSON spelling of ``value``: sorted keys, tuples as lists, paths as strings.

    Raises
    ------
    ValueError
        For NaN or infinity (no identity holds them) and values JSON cannot spell.
    """
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def identity_key(identity: Any, length: int = 16) -> str:
    """A short stable name (``length`` hex characters of SHA-256) of an identity's canonical JSON."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:length]


def same_identity(a: Any, b: Any) -> bool:
    """Whether two identities are equal once spelled canonically (a JSON round trip keeps them equal)."""
    return canonical_json(a) == canonical_json(b)


def identity_differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two identities (``["model.digest", ...]``).

    Used to say *why* a recorded result does not belong to this run.
    """
    recorded, current = _plain(recorded), _plain(current)
    if isinstance(recorded, dict) and isinstance(current, dict):
        names: list[str] = []
        for key in sorted(set(recorded) | set(current)):
            names += identity_differences(recorded.get(key), current.get(key), f"{prefix}{key}.")
        return names
    return [] if recorded == current else [prefix.rstrip(".") or "identity"]
