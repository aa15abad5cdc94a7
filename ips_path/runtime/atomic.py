"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Temporary files and folders are hidden siblings named ``.<name>.partial-<pid>@<host hash>-<random>``:
unique, so writers of one file never share one, and tagged with their writer, so a later run
removes what a killed writer left (:func:`remove_dead_partials`) without touching what a live
writer, in this process or another, is still writing.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ips_path.runtime.errors import BadInputError
from ips_path.runtime.locks import writer_alive, writer_tag

__all__ = ["PARTIAL_MARK", "partial_path", "read_json", "remove_dead_partials", "write_atomically", "write_csv",
           "write_json"]

PARTIAL_MARK = ".partial-"
_FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}
# A write that failed without saying why, with less than this free, failed for want of space.
_NEARLY_FULL_BYTES = 64 << 20
# .<name>.partial-<pid>@<host hash>-<16 hex>[-old]: the writer's tag is group 1
_TAGGED = re.compile(r"\.partial-(\d+@[0-9a-f]{8})-[0-9a-f]{16}(?:-old)?$")


def partial_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh temporary sibling of ``path``, tagged with this writer (``suffix`` appended)."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_MARK}{writer_tag()}-{uuid.uuid4().hex[:16]}{suffix}")


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Run ``write(temporary sibling)`` and rename the result to ``path``.

    The temporary name is unique, so processes that write the same file at once (a slide retried
    on another Dask worker) never share it; it is removed if ``write`` fails.

    Raises
    ------
    OSError
        Naming ``path`` (not the temporary) when the file system refuses the write: no space
        (also when a writer such as torch's ``inline_container.cc`` reports a failed write without
        its errno and the disk is nearly full), read-only, permission, name too long.
    """
    path = Path(path)
    partial = partial_path(path)
    try:
        try:
            write(partial)
            os.replace(partial, path)
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, OSError) and exc.errno in _FILE_SYSTEM_ERRORS:
                raise OSError(exc.errno, os.strerror(exc.errno), os.fspath(path)) from exc
            # torch.save ("inline_container.cc ... file write failed") and numpy ("N requested and M
            # written") report a failed write without its cause: a (nearly) full disk is the usual one
            if shutil.disk_usage(path.parent).free < _NEARLY_FULL_BYTES:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path)) from exc
            raise
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


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write dict rows as CSV atomically (columns: every key, in order of first appearance)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def write(partial: Path) -> None:
        with partial.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)


def write_json(path: Path, values: Mapping[str, Any]) -> None:
    """Write a JSON object atomically (indented, with a final newline)."""
    text = json.dumps(values, indent=2) + "\n"
    write_atomically(path, lambda partial: partial.write_text(text))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object written by ipspath; an empty dict when the file does not exist.

    Raises
    ------
    BadInputError
        The file is not readable JSON, or not an object.
    """
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not readable JSON ({exc}); run `ipspath predict` again") from None
    if not isinstance(values, dict):
        raise BadInputError(f"{path}: not a JSON object; run `ipspath predict` again")
    return values
