"""The contract of per-slide work (tile, features, predict, heatmap): one outcome, one rule for the run.

Every per-slide function returns a :class:`SlideOutcome` whose ``status`` is one of
:class:`Status`; :func:`run_job` runs the work of one slide, times it, and turns any exception into
one line a user can act on (:func:`error_line`), so one slide never stops the others and no
traceback reaches the user unless ``--debug``. :func:`run_exit_code` is the exit code of a whole run.

A slide's result is finished by a *done record* (JSON, written atomically and last, after every
output of the slide) that holds the identity of what produced it (:mod:`ips_path.runtime.identity`). On a
rerun :func:`check_done_record` compares it with the identity of this run: equal -> the slide is
reused; different -> the slide is redone, or refused with one line naming what differs and
``--overwrite``. Old and new results are never mixed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.errors import IpspathError, RefusedError
from ips_path.runtime.identity import identity_differences, same_identity

__all__ = [
    "Status",
    "SlideOutcome",
    "check_done_record",
    "check_identity",
    "error_line",
    "read_outcome",
    "run_exit_code",
    "run_job",
    "write_done_record",
]

log = logging.getLogger(__name__)


class Status(str, Enum):
    """What happened to one slide."""

    DONE = "done"  #: computed in this run
    REUSED = "reused"  #: an equal result (same identity) was already there
    FAILED = "failed"  #: an error; ``error`` says why
    REFUSED = "refused"  #: the output holds results of other inputs; ``error`` says what differs and the fix

    def __str__(self) -> str:
        return self.value


#: Statuses of a slide whose result is there and belongs to this run's inputs.
OK_STATUSES = frozenset({Status.DONE, Status.REUSED})


@dataclass
class SlideOutcome:
    """The outcome of one slide's work.

    Attributes
    ----------
    slide_id : str
    status : Status
    error : str
        One line for the user ("" unless failed or refused).
    exit_code : int
        0, or that of the error: 2 bad input (including refusals), 1 other failures.
    seconds : float
        Wall time of the slide's work.
    identity : dict
        What produced the result (see :mod:`ips_path.runtime.identity`); empty when nothing was produced.
    extra : dict
        What the step reports besides (probabilities, n_patches, ...), JSON-able.
    """

    slide_id: str
    status: Status
    error: str = ""
    exit_code: int = 0
    seconds: float = 0.0
    identity: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status = Status(self.status)

    @property
    def ok(self) -> bool:
        """Whether the slide's result is there (done now or reused)."""
        return self.status in OK_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``status`` as its string)."""
        values = asdict(self)
        values["status"] = self.status.value
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SlideOutcome:
        """The outcome of :meth:`to_dict`; keys it does not know go into ``extra``."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        extra = dict(known.pop("extra", None) or {})
        extra.update({k: v for k, v in values.items() if k not in names})
        known.setdefault("slide_id", "")
        known.setdefault("status", Status.FAILED)
        known["identity"] = dict(known.get("identity") or {})
        return cls(**known, extra=extra)


def run_exit_code(outcomes: Iterable[SlideOutcome]) -> int:
    """Exit code of a run: 0 when every slide is ok; 2 when every slide failed or was refused on bad
    input (exit code 2); 1 otherwise (some slides are done, or a failure was not the input's fault)."""
    outcomes = list(outcomes)
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return 0
    return 2 if len(failed) == len(outcomes) and all(o.exit_code == 2 for o in failed) else 1


_ENVIRONMENT_ERRORS = {
    errno.ENOSPC: "no space left on device; free space and rerun",
    errno.EDQUOT: "disk quota exceeded; free space or raise the quota and rerun",
    errno.EROFS: "read-only file system; choose a writable output folder",
    errno.EACCES: "permission denied; choose a folder you can write or fix its permissions",
    errno.EPERM: "operation not permitted; choose a folder you can write or fix its permissions",
    errno.ENAMETOOLONG: "file name too long; use shorter slide ids or a shorter output path",
}


def _environment_cause(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or its cause/context chain) whose errno is an environment failure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _ENVIRONMENT_ERRORS:
            return current
        current = current.__cause__ or current.__context__
    return None


def error_line(exc: BaseException, where: str | os.PathLike = "") -> tuple[str, int]:
    """One line for the user and the exit code of an exception raised by a slide's work.

    - :class:`~ips_path.runtime.errors.IpspathError`: its own text and exit code;
    - an environment failure (no space, read-only, permission, name too long; also when it is the
      cause of another exception): ``"PATH: no space left on device; free space and rerun"``, exit 2;
    - anything else: ``"WHERE: internal error: Type: message (rerun with --debug for the
      traceback)"``, exit 1, with the traceback logged at debug level.

    ``where`` names the slide (its file) when the exception does not name a path itself.
    """
    if isinstance(exc, IpspathError):
        return str(exc), exc.exit_code
    cause = _environment_cause(exc)
    if cause is None and "No space left on device" in str(exc):  # e.g. torch's writer wraps ENOSPC in text
        cause = OSError(errno.ENOSPC, "No space left on device")
    if cause is not None:
        path = cause.filename or where or "output"
        return f"{os.fspath(path)}: {_ENVIRONMENT_ERRORS[cause.errno]}", 2
    log.debug("%s: internal error", where, exc_info=exc)
    prefix = f"{os.fspath(where)}: " if where else ""
    return f"{prefix}internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1


def run_job(slide_id: str, where: str | os.PathLike, work: Callable[[], SlideOutcome],
            extra: Mapping[str, Any] | None = None) -> SlideOutcome:
    """Run one slide's ``work`` and return its outcome; never raises for an ``Exception``.

    Parameters
    ----------
    slide_id : str
    where : path-like
        The slide's file (or store): names the slide in messages of unexpected errors.
    work : callable
        Does the slide's work and returns its outcome (DONE or REUSED).
    extra : mapping, optional
        ``extra`` of the outcome when ``work`` raises (e.g. the slide's label).

    Returns
    -------
    SlideOutcome
        With ``seconds`` set; FAILED or REFUSED with the one-line error when ``work`` raised.
    """
    started = time.perf_counter()
    try:
        outcome = work()
    except Exception as exc:  # noqa: BLE001 - one slide must never stop the others
        line, code = error_line(exc, where)
        status = Status.REFUSED if isinstance(exc, RefusedError) else Status.FAILED
        outcome = SlideOutcome(slide_id, status, error=line, exit_code=code, extra=dict(extra or {}))
        log.error("%s", line)
    outcome.seconds = round(time.perf_counter() - started, 3)
    return outcome


def write_done_record(path: str | os.PathLike, outcome: SlideOutcome) -> Path:
    """Write ``outcome`` as the slide's record (JSON, atomically); call it after every other output."""
    text = json.dumps(outcome.to_dict(), indent=2, allow_nan=False) + "\n"
    return write_atomically(path, lambda partial: partial.write_text(text))


def read_outcome(path: str | os.PathLike) -> SlideOutcome | None:
    """The outcome recorded at ``path``; None when there is none or it cannot be read."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict):
        return None
    try:
        return SlideOutcome.from_dict(values)
    except (TypeError, ValueError):
        return None


def check_done_record(path: str | os.PathLike, identity: Mapping[str, Any], *, overwrite: bool = False,
                      on_change: Literal["refuse", "redo"] = "refuse", what: str = "results",
                      instead: str = "choose another output folder",
                      outputs: Iterable[str | os.PathLike] = ()) -> SlideOutcome | None:
    """Whether a slide is already done with this run's inputs.

    Parameters
    ----------
    path : path-like
        The slide's done record.
    identity : mapping
        The identity of this run's result for the slide.
    overwrite : bool
        Redo whatever is recorded (``--overwrite``).
    on_change : {"refuse", "redo"}
        What a record of another identity means: refuse (raise) or redo the slide.
    what : str
        Names the results in the refusal ("predictions", "features").
    instead : str
        The other way out the refusal offers besides ``--overwrite``.
    outputs : iterable of path-like
        What the record stands for (files, folders, arrays in a store): a record whose outputs are
        not all there any more (removed, or dropped by a re-tiling) is not reused.

    Returns
    -------
    SlideOutcome or None
        The recorded outcome with status REUSED when it is done with an equal identity and all its
        ``outputs`` exist; None when the slide must be (re)done: no record, a failed one, one without
        identity (older layout), ``overwrite``, another identity with ``on_change="redo"``, or an
        output gone.

    Raises
    ------
    RefusedError
        A done record of another identity and ``on_change="refuse"``: the message names the
        record, what differs, and ``--overwrite``.
    """
    recorded = None if overwrite else read_outcome(path)
    if recorded is None or not recorded.ok:
        return None
    if not check_identity(path, recorded.identity, identity, on_change=on_change, what=what, instead=instead):
        return None
    gone = [os.fspath(p) for p in outputs if not os.path.exists(p)]
    if gone:
        log.info("%s: done, but %s is gone; doing it again", path, gone[0])
        return None
    recorded.status = Status.REUSED
    return recorded


def check_identity(where: str | os.PathLike, recorded: Mapping[str, Any] | None, identity: Mapping[str, Any], *,
                   on_change: Literal["refuse", "redo"] = "refuse", what: str = "results",
                   instead: str = "choose another output folder") -> bool:
    """Whether a result recorded with identity ``recorded`` at ``where`` can be reused for ``identity``.

    True when they are equal; False (redo) when nothing is recorded (an older layout) or, with
    ``on_change="redo"``, when they differ.

    Raises
    ------
    RefusedError
        They differ and ``on_change="refuse"``: one line naming ``where``, what differs and ``--overwrite``.
    """
    if not recorded:
        return False
    if same_identity(recorded, identity):
        return True
    differs = ", ".join(identity_differences(recorded, identity))
    if on_change == "redo":
        log.info("%s: made from other inputs (%s); doing it again", where, differs)
        return False
    raise RefusedError(f"{where}: holds {what} made from other inputs (differs in {differs}); "
                       f"pass --overwrite to replace them, or {instead}")
