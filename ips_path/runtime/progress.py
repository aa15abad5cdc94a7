"""Progress: a tqdm bar on a terminal, a periodic log line elsewhere (SLURM, nohup, a pipe).

Every long loop of ipspath (tile, features, predict, heatmap, training epochs) reports through
:func:`progress_bar`. On a terminal that is a tqdm bar on stderr. When stderr is not a terminal
a bar would be noise, and nothing at all leaves a batch job silent for minutes: the same calls then
write a line to the log (logger ``ips_path.runtime.progress``, level INFO) every
``IPSPATH_PROGRESS_S`` seconds (default 30) and when the loop ends, e.g.::

    INFO: features: 1,200/5,000 patches (24%), 2/8 slides, 41.3 patches/s, ETA 1m32s

Work done inside this process can be counted as it happens with :func:`advance` (the features
of one slide, chunk by chunk); :func:`ips_path.runtime.parallel.map_slides` counts the rest when a slide ends.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

__all__ = ["INTERVAL_ENV", "LogProgress", "advance", "progress_bar"]

log = logging.getLogger(__name__)

INTERVAL_ENV = "IPSPATH_PROGRESS_S"
"""Environment variable: seconds between progress lines in the log when stderr is not a terminal."""
_DEFAULT_INTERVAL_S = 30.0

# The bars open in this process, innermost last: advance() counts into the innermost.
_open: list[Any] = []


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True,
                 **kw: Any) -> tqdm | LogProgress:
    """A progress counter with tqdm's interface (``update``, ``set_postfix``, ``close``, ``with``).

    Parameters
    ----------
    total : int, optional
        Units of work in all.
    desc : str
        What is counted, first word of each line ("features", "epoch 2/10").
    unit : str
        Name of one unit of work ("patch", "slide").
    enabled : bool
        False: silent (``--quiet``).
    **kw
        Further tqdm arguments (used on a terminal only).

    Returns
    -------
    tqdm or LogProgress
        A tqdm bar on a terminal (disabled when not ``enabled``), otherwise a :class:`LogProgress`.
    """
    if not enabled:
        return tqdm(total=total, disable=True)
    if not sys.stderr.isatty():
        return LogProgress(total, desc, unit)
    return _TerminalBar(total=total, desc=desc, unit=unit, dynamic_ncols=True, **kw)


def advance(n: int) -> None:
    """Count ``n`` units of work done into the innermost progress counter open in this process
    (nothing when none is open, e.g. in a worker process)."""
    if _open and n:
        _open[-1].update(n)


def _forget(bar: Any) -> None:
    # by identity: tqdm bars compare equal by their screen position
    _open[:] = [b for b in _open if b is not bar]


class _TerminalBar(tqdm):
    """A tqdm bar that :func:`advance` counts into while it is open."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        _open.append(self)

    def close(self) -> None:
        _forget(self)
        super().close()


class LogProgress:
    """Progress as log lines: at most one per interval, and one when the loop ends.

    Parameters
    ----------
    total : int, optional
        Units of work in all.
    desc, unit : str
        As for :func:`progress_bar`.
    interval_s : float, optional
        Seconds between lines; default ``$IPSPATH_PROGRESS_S`` or 30.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", interval_s: float | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.interval_s = _interval_s() if interval_s is None else interval_s
        self.started = self._last = time.monotonic()
        self._closed = False
        _open.append(self)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; write a line when the interval has passed."""
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            log.info("%s", self.line(now))

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kw: Any) -> None:
        """Figures shown after the counts (tqdm's signature)."""
        self.postfix = {**(ordered_dict or {}), **kw}

    def close(self) -> None:
        """Write the last line (once)."""
        if self._closed:
            return
        self._closed = True
        _forget(self)
        log.info("%s", self.line(time.monotonic(), final=True))

    def line(self, now: float, final: bool = False) -> str:
        """``desc: n/total units (pct), postfix, rate, ETA`` (or the time taken, when ``final``)."""
        elapsed = max(now - self.started, 1e-9)
        units = self.unit if self.unit.endswith("s") else f"{self.unit}es" if self.unit.endswith("ch") \
            else f"{self.unit}s"
        counts = f"{self.n:,}" if self.total is None else f"{self.n:,}/{self.total:,} {units}"
        if self.total:
            counts += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"{self.desc}: {counts}", *(f"{k} {v}" for k, v in self.postfix.items()),
                 f"{_rate(self.n / elapsed)} {units}/s"]
        if final:
            parts.append(f"done in {_duration(elapsed)}")
        elif self.total and self.n:
            parts.append(f"ETA {_duration((self.total - self.n) * elapsed / self.n)}")
        return ", ".join(parts)


def _interval_s() -> float:
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(0.0, float(text)) if text else _DEFAULT_INTERVAL_S
    except ValueError:
        log.warning("%s=%r is not a number of seconds; writing progress every %g s", INTERVAL_ENV, text,
                    _DEFAULT_INTERVAL_S)
        return _DEFAULT_INTERVAL_S


def _rate(per_s: float) -> str:
    """``12,345``, ``210`` or ``3.42``: three significant figures without an exponent."""
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.3g}"


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
