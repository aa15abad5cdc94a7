"""One writer per output: lock files holding who writes there.

``train`` and ``predict`` take :func:`output_lock` on their output folder before any work, so two
runs never write into one folder at once; ``tile`` claims each slide's store with
:func:`file_lock` (``<out>/.<slide_id>.zarr.lock``), so runs on other slides share the folder and
a second run on the same slide leaves it to the first. The lock of a folder is the file
``<folder>/.ipspath.lock``, created with ``O_EXCL`` (two processes cannot both create it), holding
JSON: the holder's pid, host, boot id, process start time, when it took the lock, and its command
line. It is removed when the holder leaves the ``with`` block, normally or by an exception.

A holder killed with ``kill -9`` cannot remove its lock. The next run finds the lock *stale* and
takes it over with a warning when the holder ran on this host and is gone: its pid is not alive,
is a zombie, belongs to a process started at another time (the pid was reused), or the machine
was rebooted since. A lock held by a live process, or by any process on another host (whose
liveness cannot be seen from here), refuses with one line naming the holder and the fix.

Taking over a stale lock happens under an ``flock`` on the folder (released by the kernel when its
holder dies), so two runs that find one stale lock never both take it.

Creating the lock is also the run's first write into its folder: a read-only folder, a full disk
or a folder that cannot be made is reported there, before any work, as one line naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ips_path.runtime.errors import BadInputError

__all__ = ["LOCK_NAME", "LockHolder", "OutputLockedError", "file_lock", "output_lock", "probe_writable", "read_lock",
           "remove_stale_lock", "writer_alive", "writer_tag"]

log = logging.getLogger(__name__)

LOCK_NAME = ".ipspath.lock"
# A lock file whose content cannot be read is being written by its creator (between O_EXCL and
# write) unless it is older than this; then its creator died in that gap and it is stale.
_UNREADABLE_GRACE_S = 10.0

# Locks this process holds, by lock file path: re-entering one (predict tiling into its own
# output folder) counts instead of refusing itself.
_HELD: dict[Path, int] = {}


class OutputLockedError(BadInputError):
    """Another live run holds the output folder's lock."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, as recorded in the lock file.

    Attributes
    ----------
    pid : int
        Process id on ``host``.
    host : str
        Host name.
    boot_id : str
        ``/proc/sys/kernel/random/boot_id`` of the host when the lock was taken ("" off Linux).
    process_start : str
        Start time of the process in clock ticks after boot (``/proc/<pid>/stat``; "" off Linux),
        so a reused pid is not taken for the holder.
    started : str
        When the lock was taken (ISO 8601, UTC).
    command : str
        The holder's command line.
    token : str
        Random id of this lock, so a holder only ever removes its own lock file.
    """

    pid: int
    host: str
    boot_id: str
    process_start: str
    started: str
    command: str
    token: str

    def describe(self) -> str:
        """``pid 123 on host h since 2026-01-01T10:00:00+00:00 (ipspath tile ...)``."""
        return f"pid {self.pid} on host {self.host} since {self.started} ({self.command})"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks after boot), "" where /proc is absent, None when
    the process does not exist or is a zombie (killed, not yet reaped: it writes nothing more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else ""
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (command name)": state is field 3
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22 of proc(5): starttime


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _this_process(token: str) -> LockHolder:
    return LockHolder(
        pid=os.getpid(),
        host=socket.gethostname(),
        boot_id=_boot_id(),
        process_start=_process_start(os.getpid()) or "",
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
        token=token,
    )


def read_lock(folder: str | os.PathLike, name: str = LOCK_NAME) -> LockHolder | None:
    """The holder recorded in lock file ``folder/name``; None when there is none or it is unreadable."""
    try:
        data = json.loads((Path(folder) / name).read_text())
        return LockHolder(**{key: data[key] for key in LockHolder.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stale_reason(holder: LockHolder) -> str | None:
    """Why the holder is certainly gone, or None when it may be alive."""
    if holder.host != socket.gethostname():
        return None
    if holder.boot_id and holder.boot_id != _boot_id():
        return "the machine was restarted since"
    if not _pid_alive(holder.pid):
        return "that process is gone"
    start = _process_start(holder.pid)
    if start is None:
        return "that process is gone"
    if holder.process_start and start and start != holder.process_start:
        return "that pid now belongs to another process"
    return None


def _os_error_line(folder: Path, exc: OSError, option: str = "-o") -> BadInputError:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BadInputError(f"{folder}: cannot write in this output folder ({exc.strerror}); "
                             f"choose a writable folder with {option}")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BadInputError(f"{folder}: no space left on this device; free space or choose another folder with "
                             f"{option}")
    if exc.errno == errno.ENAMETOOLONG:
        return BadInputError(f"{folder}: path too long for this file system; choose a shorter {option}")
    return BadInputError(f"{folder}: cannot use as output folder ({exc.strerror or exc}); choose another with "
                         f"{option}")


def _create(lock: Path, holder: LockHolder) -> bool:
    """Create the lock file with ``holder``'s record; False when it already exists."""
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(holder.__dict__, indent=1).encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        lock.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


@contextmanager
def _guard(lock: Path) -> Iterator[None]:
    """Serialise stale-lock take-overs in one folder: an ``flock`` on the folder itself (the kernel
    drops it when its holder dies; it leaves no file). Take-overs only happen for holders on this
    host, so where a file system cannot flock a folder, a host-local guard file serves."""
    fd = os.open(lock.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            guards = Path(tempfile.gettempdir()) / "ipspath-lock-guards"
            guards.mkdir(exist_ok=True)
            fd = os.open(guards / hashlib.sha256(str(lock).encode()).hexdigest()[:16], os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _acquire(lock: Path, holder: LockHolder, what: str, wait_s: float) -> None:
    """Create ``lock`` for ``holder``, taking over a stale one; OutputLockedError naming ``what``
    when a live holder keeps it longer than ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        if _create(lock, holder):
            return
        with _guard(lock):
            other = read_lock(lock.parent, lock.name)
            if other is None:
                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if age >= _UNREADABLE_GRACE_S:
                    log.warning("%s: taking over an unreadable lock file left by a dead run", lock)
                    lock.unlink(missing_ok=True)
                    continue
                problem = f"another ipspath run is starting ({lock} is being written)"
            else:
                reason = _stale_reason(other)
                if reason is not None:
                    log.warning("%s: taking over the lock of a dead run (%s: %s)", what, other.describe(), reason)
                    lock.unlink(missing_ok=True)
                    continue
                problem = f"in use by another ipspath run, {other.describe()}"
        if time.monotonic() < deadline:
            time.sleep(0.05)
            continue
        if other is not None and other.host != holder.host:
            fix = f"wait for it to finish, or if that run is dead, delete {lock}"
        else:
            fix = "wait for it to finish or choose another output folder"
        raise OutputLockedError(f"{what}: {problem}; {fix}")


def _host_hash(host: str) -> str:
    return hashlib.sha256(host.encode()).hexdigest()[:8]


def writer_tag() -> str:
    """``<pid>@<host hash>``: put in the names of temporary files, so a later run can tell the
    leftovers of a dead writer (:func:`writer_alive` false) from the files a live one is still
    writing. The host is hashed to 8 hex digits to keep names short."""
    return f"{os.getpid()}@{_host_hash(socket.gethostname())}"


def writer_alive(tag: str) -> bool:
    """Whether the writer of :func:`writer_tag` ``tag`` may still be writing: False only when it
    ran on this host and its process is gone (or a zombie)."""
    pid, _, host = tag.partition("@")
    if host != _host_hash(socket.gethostname()) or not pid.isdigit():
        return True
    return _pid_alive(int(pid)) and _process_start(int(pid)) is not None


def remove_stale_lock(lock: str | os.PathLike) -> bool:
    """Remove the lock file ``lock`` when its holder is certainly gone (see the module docstring);
    True when it was removed. A live holder's lock, or an unreadable one, is left alone."""
    lock = Path(lock)
    if not lock.is_file():
        return False
    with _guard(lock):
        holder = read_lock(lock.parent, lock.name)
        if holder is None or _stale_reason(holder) is None:
            return False
        lock.unlink(missing_ok=True)
    return True


@contextmanager
def file_lock(lock: str | os.PathLike, what: str, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold the lock file ``lock`` for the ``with`` block (its folder must exist).

    Parameters
    ----------
    lock : path-like
        The lock file.
    what : str
        What the lock protects, for messages (a folder, a store).
    wait_s : float
        Seconds to wait for a live holder to release it before refusing.

    Raises
    ------
    OutputLockedError
        Another live run holds it (the message names its pid, host, start and command).
    OSError
        When the lock file cannot be created (read-only folder, full disk, name too long).

    Notes
    -----
    Re-entrant within one process: a nested lock of a file this process already holds returns at
    once, and the lock is released when the outermost block ends.
    """
    lock = Path(lock).parent.resolve() / Path(lock).name
    holder = None if lock in _HELD else _this_process(uuid.uuid4().hex)
    if holder is not None:
        _acquire(lock, holder, what, wait_s)
    _HELD[lock] = _HELD.get(lock, 0) + 1
    try:
        yield lock
    finally:
        _HELD[lock] -= 1
        if holder is not None:
            del _HELD[lock]
            current = read_lock(lock.parent, lock.name)
            if current is not None and current.token == holder.token:
                lock.unlink(missing_ok=True)


def probe_writable(folder: str | os.PathLike, option: str = "-o") -> Path:
    """Make ``folder`` and write and remove a small file in it, before any work.

    ``option`` is the option that named the folder, for the fix the message gives.

    Raises
    ------
    BadInputError
        Naming the folder and the fix, when it cannot be made or written (read-only, disk full,
        name too long, a file in the way).
    """
    folder = Path(folder)
    probe = folder / f".ipspath-probe-{writer_tag()}-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"ipspath write probe\n" * 64)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise _os_error_line(folder, exc, option) from exc
    return folder


@contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder``'s lock for the ``with`` block (the folder is created if needed).

    Parameters
    ----------
    folder : path-like
        The output folder of the run.

    Yields
    ------
    Path
        The folder.

    Raises
    ------
    OutputLockedError
        Another live run holds the lock (the message names its pid, host, start and command).
    BadInputError
        The folder cannot be created or written (read-only, disk full, name too long).

    Notes
    -----
    Re-entrant within one process: a nested ``output_lock`` on a folder this process already
    holds returns at once, and the lock is released when the outermost block ends.
    """
    folder = Path(folder)
    stack = contextlib.ExitStack()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stack.enter_context(file_lock(folder / LOCK_NAME, str(folder)))
    except OSError as exc:
        raise _os_error_line(folder, exc) from exc
    with stack:
        yield folder
