"""Plausible ranges of the numbers users give: options, manifest cells, attributes of imported files.

A value outside its range is refused up front with one line naming where it came from and the
range, instead of an overflow, a division by zero or an allocation of terabytes deep inside the
work. The ranges are wide: they only rule out what no slide, model or cohort can mean (a pixel
of 1e-300 µm, a survival time of 1e308, an embedding of 10^12 dimensions).

One :class:`Range` per kind of number; :meth:`Range.check` is what every caller uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ips_path.runtime.errors import BadInputError

__all__ = [
    "DOWNSAMPLE", "EMBEDDING_DIM", "MAGNIFICATION", "PATCH_PX", "PATCH_UM", "PIXEL_SIZE_UM", "Range", "SMOOTHING_UM",
    "SURVIVAL_TIME", "TIFF_PIXEL_SIZE_UM",
]


@dataclass(frozen=True)
class Range:
    """Closed interval ``[low, high]`` of a number (``low`` excluded when ``low_open``).

    Attributes
    ----------
    low, high : float
        Bounds.
    unit : str
        Unit shown in messages ("µm/px").
    low_open : bool
        Whether ``low`` itself is refused (a size must be > 0).
    integer : bool
        Whether only whole numbers are allowed.
    """

    low: float
    high: float
    unit: str = ""
    low_open: bool = False
    integer: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not in the range (``"0 is not a number in (0.001, 1000] µm/px"``), or None."""
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            number = math.nan
        inside = (not isinstance(value, bool) and math.isfinite(number) and self.low <= number <= self.high
                  and not (self.low_open and number == self.low) and not (self.integer and not number.is_integer()))
        if inside:
            return None
        interval = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        return (f"{value!r} is not {'a whole number' if self.integer else 'a number'} in {interval}"
                f"{' ' + self.unit if self.unit else ''}")

    def check(self, value: Any, name: str, fix: str = "") -> Any:
        """``value`` as a float (an int when ``integer``); BadInputError ``"NAME: why; FIX"`` when outside.

        ``name`` says where the value came from: an option (``--slide-mpp``), a manifest cell
        (``m.csv: line 3: mpp``) or a file attribute; ``fix`` what to do about it.
        """
        problem = self.problem(value)
        if problem is not None:
            raise BadInputError(f"{name}: {problem}{'; ' + fix if fix else ''}")
        return int(float(value)) if self.integer else float(value)


#: Level-0 or patch pixel size of a slide, µm/px: from electron-microscope detail to a photo of a slide.
PIXEL_SIZE_UM = Range(1e-3, 1e3, "µm/px", low_open=True)
#: Pixel size of an exported overlay TIFF, µm/px (coarser than the slide, finer than the whole slide in one pixel).
TIFF_PIXEL_SIZE_UM = Range(1e-2, 1e4, "µm/px", low_open=True)
#: Standard deviation of heatmap smoothing, µm (up to 10 mm: wider than any slide blurs it to one colour).
SMOOTHING_UM = Range(0.0, 1e4, "µm")
#: Objective magnification (10 µm/px at 1x).
MAGNIFICATION = Range(1e-2, 1e4, "x", low_open=True)
#: Downsample of a pyramid level (1 at level 0).
DOWNSAMPLE = Range(0.5, 1e5)
#: Side of a patch in µm (STAMP's tile_size_um).
PATCH_UM = Range(1e-3, 1e6, "µm", low_open=True)
#: Side of a patch, px.
PATCH_PX = Range(1, 1 << 16, "px", integer=True)
#: Follow-up time of a survival manifest, in its own unit (1e12 s is 30,000 years).
SURVIVAL_TIME = Range(0.0, 1e12)
#: Embedding size of a model (65,536 x 65,536 float32 weights are already 16 GiB).
EMBEDDING_DIM = Range(1, 1 << 16, integer=True)
