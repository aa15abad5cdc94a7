"""Exceptions that users can act on.

The CLI turns an :class:`IpspathError` into one line on stderr and its ``exit_code``
(2 for bad input, 1 for other failures); a traceback is shown only with ``--debug``.
"""

from collections.abc import Iterable

__all__ = ["MAX_LISTED", "BadInputError", "IpspathError", "RefusedError", "listing"]


class IpspathError(Exception):
    """A failure the user can understand from its message alone."""

    exit_code = 1


class BadInputError(IpspathError):
    """The input (file, option, manifest) is wrong; the message names it and the fix."""

    exit_code = 2


class RefusedError(BadInputError):
    """An output holds results of other inputs; the message says which and how to go on (``--overwrite``)."""


#: Items an error message lists at most; the rest are counted ("... and 90 more").
MAX_LISTED = 10


def listing(items: Iterable[object], limit: int = MAX_LISTED, sep: str = ", ") -> str:
    """The first ``limit`` items joined by ``sep``, then how many more there are.

    Every error that names items (slides, rows, files) lists them through this, so a cohort of
    100,000 bad slides gives a readable line, not a megabyte.

    >>> listing(["a", "b", "c"], limit=2)
    'a, b and 1 more'
    """
    items = [str(item) for item in items]
    shown = sep.join(items[:limit])
    return f"{shown} and {len(items) - limit} more" if len(items) > limit else shown
