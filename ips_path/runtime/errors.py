"""Exceptions that users can act on.

The CLI turns an :class:`IpspathError` into one line on stderr and its ``exit_code``
(2 for bad input, 1 for other failures); a traceback is shown only with ``--debug``.
"""

__all__ = ["BadInputError", "IpspathError", "RefusedError"]


class IpspathError(Exception):
    """A failure the user can understand from its message alone."""

    exit_code = 1


class BadInputError(IpspathError):
    """The input (file, option, manifest) is wrong; the message names it and the fix."""

    exit_code = 2


class RefusedError(BadInputError):
    """An output holds results of other inputs; the message says which and how to go on (``--overwrite``)."""
