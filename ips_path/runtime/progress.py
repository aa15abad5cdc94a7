"""Progress bars: tqdm on stderr, shown only on a terminal and when not quiet."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar that is silent when ``enabled`` is false or stderr is not a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True, **kw)
