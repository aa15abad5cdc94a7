"""Slide ids are file names: what makes one safe.

Names of cached features (``features/<name>`` inside a store) are checked here too: one visible
file name, never a path.

A slide id names the files of its slide in every output folder (``<slide_id>.zarr``,
``qc/<slide_id>.png``, the prediction files, hidden temporaries beside them). So it must be one
file name on every common file system, and never a path: no ``/`` or ``\\``, not ``.`` or ``..``,
no NUL or other control characters, no leading or trailing space, and short enough that the
longest name built from it stays under the 255-byte limit of a file name.
"""

from __future__ import annotations

import re
import unicodedata

from ips_path.runtime.errors import BadInputError

__all__ = ["MAX_SLIDE_ID_BYTES", "check_feature_name", "check_slide_id", "slide_id_problem"]

#: A name of cached features (``features/<name>`` in a store): one visible path part, no traversal.
_FEATURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

#: Longest slide id in bytes (UTF-8). The longest name built from an id is a hidden temporary of
#: an output file (``.<id><suffix>.partial-<pid>@<host>-<random>-old``, ~70 bytes more).
MAX_SLIDE_ID_BYTES = 160


def slide_id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` is not a safe file name, or None when it is."""
    if not slide_id:
        return "it is empty"
    if slide_id in (".", ".."):
        return "it is a folder reference"
    if "/" in slide_id or "\\" in slide_id:
        return "it holds a path separator (/ or \\)"
    control = next((c for c in slide_id if unicodedata.category(c) in ("Cc", "Cs")), None)
    if control is not None:
        return f"it holds the control character {control!r}"
    if slide_id != slide_id.strip():
        return "it starts or ends with a space"
    size = len(slide_id.encode("utf-8", "surrogatepass"))
    if size > MAX_SLIDE_ID_BYTES:
        return f"it is {size} bytes long (at most {MAX_SLIDE_ID_BYTES} in UTF-8)"
    return None


def check_slide_id(slide_id: str, where: str = "") -> str:
    """``slide_id`` itself; BadInputError naming ``where`` (a file, a manifest line) when unsafe."""
    problem = slide_id_problem(slide_id)
    if problem is not None:
        prefix = f"{where}: " if where else ""
        raise BadInputError(f"{prefix}slide id {_shown(slide_id)} is not a safe file name ({problem}); "
                            "give the slide a short id of letters, digits, '-', '_' and '.'")
    return slide_id


def _shown(slide_id: str) -> str:
    """The id as a one-line, bounded literal for messages."""
    text = repr(slide_id)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-12:]} ({len(slide_id)} characters)"


def check_feature_name(name: str, option: str = "--name") -> str:
    """``name`` itself when it can name ``features/<name>``; BadInputError naming ``option`` otherwise.

    Letters, digits, '.', '_' and '-', starting with a letter or digit (no hidden names, no ``..``),
    at most 100 characters.
    """
    if not isinstance(name, str) or not _FEATURE_NAME.fullmatch(name):
        raise BadInputError(f"{option} {_shown(str(name))}: cannot name features/<name>; use letters, digits, '.', "
                            "'_' and '-', starting with a letter or digit (e.g. uni_v1)")
    return name
