"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Run ``write(temporary sibling)`` and rename the result to ``path``.

    The temporary name is unique, so processes that write the same file at once (a slide retried
    on another Dask worker) never share it; it is removed if ``write`` fails.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
