"""The per-output lock: one live run per folder, stale locks of dead runs taken over, real processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ips_path.runtime.errors import BadInputError
from ips_path.runtime.locks import LOCK_NAME, OutputLockedError, output_lock, read_lock

# Takes the lock on argv[1], says so with argv[2].reached, holds it until argv[2] exists; exit 3
# when the lock is held by someone else.
HOLDER = """
import sys, time
from pathlib import Path
from ips_path.runtime.locks import OutputLockedError, output_lock
release = Path(sys.argv[2])
try:
    with output_lock(sys.argv[1]):
        Path(sys.argv[2] + ".reached").touch()
        while not release.exists():
            time.sleep(0.02)
except OutputLockedError as exc:
    print(exc, flush=True)
    sys.exit(3)
"""


def start_holder(folder: Path, release: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(release)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not Path(f"{release}.reached").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


def test_a_folder_held_by_a_live_process_is_refused_naming_the_holder(tmp_path):
    out, release = tmp_path / "out", tmp_path / "go"
    proc = start_holder(out, release)
    try:
        with pytest.raises(OutputLockedError) as info, output_lock(out):
            pass
        message = str(info.value)
        assert f"pid {proc.pid}" in message and socket.gethostname() in message
        assert "wait for it to finish or choose another output folder" in message
        assert "\n" not in message and info.value.exit_code == 2
        assert read_lock(out).pid == proc.pid  # the refusal left the holder's lock alone
    finally:
        release.touch()
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert not (out / LOCK_NAME).exists()  # released on exit
    with output_lock(out):
        assert read_lock(out).pid == os.getpid()


def test_the_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    out, release = tmp_path / "out", tmp_path / "go"
    proc = start_holder(out, release)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert read_lock(out).pid == proc.pid  # kill -9 left the lock behind
    with caplog.at_level(logging.WARNING), output_lock(out):
        assert read_lock(out).pid == os.getpid()
    assert f"pid {proc.pid}" in caplog.text and "dead run" in caplog.text
    assert not (out / LOCK_NAME).exists()


def test_a_killed_process_not_yet_reaped_counts_as_dead(tmp_path):
    out, release = tmp_path / "out", tmp_path / "go"
    proc = start_holder(out, release)
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        with output_lock(out):  # the zombie holds the pid, but it writes nothing any more
            assert read_lock(out).pid == os.getpid()
    finally:
        proc.communicate(timeout=60)


def write_lock(out: Path, **fields) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getppid(), "host": socket.gethostname(), "boot_id": "", "process_start": "",
              "started": "2026-01-01T00:00:00+00:00", "command": "ipspath tile x -o out", "token": "t"}
    (out / LOCK_NAME).write_text(json.dumps({**record, **fields}))


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path):
    write_lock(tmp_path, process_start="1")  # a live pid, but started at another moment
    with output_lock(tmp_path):
        assert read_lock(tmp_path).pid == os.getpid()


def test_a_lock_from_before_a_restart_is_stale(tmp_path):
    write_lock(tmp_path, boot_id="another-boot")
    with output_lock(tmp_path):
        assert read_lock(tmp_path).pid == os.getpid()


def test_a_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path):
    write_lock(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(OutputLockedError, match=f"pid 1 on host elsewhere .*delete {tmp_path / LOCK_NAME}"), \
            output_lock(tmp_path):
        pass
    assert read_lock(tmp_path).host == "elsewhere"


def test_an_unreadable_lock_is_refused_while_fresh_and_taken_over_when_old(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(OutputLockedError, match="is being written"), output_lock(tmp_path):
        pass
    old = time.time() - 60
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with output_lock(tmp_path):
        assert read_lock(tmp_path).pid == os.getpid()


def test_an_exception_in_the_block_releases_the_lock(tmp_path):
    with pytest.raises(RuntimeError), output_lock(tmp_path):
        raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with output_lock(tmp_path), output_lock(tmp_path):
        pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_four_processes_taking_over_one_stale_lock_give_it_to_exactly_one(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lock(tmp_path, pid=int(dead.stdout))
    release = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(release)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        deadline = time.monotonic() + 60
        while sum(p.poll() == 3 for p in procs) < 3:  # three refused while one holds
            assert time.monotonic() < deadline, [p.poll() for p in procs]
            time.sleep(0.05)
        assert Path(f"{release}.reached").exists()
    finally:
        release.touch()
        for proc in procs:
            proc.communicate(timeout=60)
    assert sorted(p.returncode for p in procs) == [0, 3, 3, 3]


def test_a_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BadInputError, match=f"{blocker / 'out'}: cannot use as output folder"), \
            output_lock(blocker / "out"):
        pass
    with pytest.raises(BadInputError, match="path too long"), output_lock(tmp_path / ("x" * 300)):
        pass


def test_a_read_only_folder_is_found_when_taking_the_lock(read_only_dir):
    with pytest.raises(BadInputError, match=f"{read_only_dir}: cannot write in this output folder"), \
            output_lock(read_only_dir):
        pass
