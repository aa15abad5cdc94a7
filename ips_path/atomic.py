"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Temporary files and folders are hidden siblings named ``.<name>.partial-<pid>@<host>-<random>``:
unique, so writers of one file never share one, and tagged with their writer, so a later run
removes what a killed writer left (:func:`remove_dead_partials`) without touching what a live
writer, in this process or another, is still writing.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from ips_path.locks import writer_alive, writer_tag

__all__ = ["PARTIAL_MARK", "partial_path", "remove_dead_partials", "write_atomically"]

PARTIAL_MARK = ".partial-"
# .<name>.partial-<pid>@<host>-<32 hex>[-old]: the writer's tag is group 1
_TAGGED = re.compile(r"\.partial-(\d+@.+)-[0-9a-f]{32}(?:-old)?$")


def partial_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh temporary sibling of ``path``, tagged with this writer (``suffix`` appended)."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_MARK}{writer_tag()}-{uuid.uuid4().hex}{suffix}")


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Run ``write(temporary sibling)`` and rename the result to ``path``.

    The temporary name is unique, so processes that write the same file at once (a slide retried
    on another Dask worker) never share it; it is removed if ``write`` fails.
    """
    path = Path(path)
    partial = partial_path(path)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def remove_dead_partials(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files and folders in ``folder`` whose writer is gone (killed).

    Parameters
    ----------
    folder : path-like
        Where to look (not recursively).
    name : str, optional
        Only the temporaries of ``folder/name``; default: all.

    Returns
    -------
    list of Path
        What was removed. Temporaries of live writers, and of writers on other hosts (whose
        liveness cannot be seen from here), are left alone; untagged ones (written before writer
        tags) are removed.
    """
    folder = Path(folder)
    pattern = f".{name}{PARTIAL_MARK}*" if name is not None else f".*{PARTIAL_MARK}*"
    removed = []
    for leftover in folder.glob(pattern):
        tagged = _TAGGED.search(leftover.name)
        if tagged is not None and writer_alive(tagged.group(1)):
            continue  # untagged ones are from versions before the tag: their writers are long gone
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed
