"""The per-slide job contract and the identities results are tied to."""

from __future__ import annotations

import errno
import json
import os

import pytest

from ips_path.runtime.errors import BadInputError, IpspathError, RefusedError
from ips_path.runtime.identity import (
    FINGERPRINT_BLOCK,
    canonical_json,
    file_digest,
    identity_differences,
    identity_key,
    same_identity,
    slide_identity,
)
from ips_path.runtime.jobs import (
    SlideOutcome,
    Status,
    check_done_record,
    error_line,
    read_outcome,
    run_exit_code,
    run_job,
    write_done_record,
)


def test_slide_identity_changes_when_the_middle_of_a_file_is_replaced_with_size_and_mtime_kept(tmp_path):
    path = tmp_path / "slide.svs"
    data = bytearray(os.urandom(10 * FINGERPRINT_BLOCK))
    path.write_bytes(data)
    before = slide_identity(path)
    stat = path.stat()
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = slide_identity(path)
    assert after["size"] == before["size"] and after["mtime_ns"] == before["mtime_ns"]
    assert after["fingerprint"] != before["fingerprint"]


def test_slide_identity_is_the_same_for_a_copy_elsewhere(tmp_path):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    a.write_bytes(os.urandom(3 * FINGERPRINT_BLOCK + 17))
    b.write_bytes(a.read_bytes())
    assert slide_identity(a)["fingerprint"] == slide_identity(b)["fingerprint"]
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"x")
    assert slide_identity(tiny)["size"] == 1


def test_file_digest_follows_a_file_rewritten_in_place(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(b"one")
    first = file_digest(path)
    path.write_bytes(b"two")
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000_000))
    assert file_digest(path) != first
    assert file_digest(path) == file_digest(tmp_path / "." / "best.pt")


def test_canonical_json_ignores_key_order_tuple_list_and_path_str_and_refuses_nan(tmp_path):
    a = {"b": (1, 2), "a": {"p": tmp_path, "x": 0.5}}
    b = {"a": {"x": 0.5, "p": str(tmp_path)}, "b": [1, 2]}
    assert canonical_json(a) == canonical_json(b) and identity_key(a) == identity_key(b)
    assert same_identity(a, json.loads(json.dumps(b)))
    assert identity_key({"a": 1}) != identity_key({"a": 2}) and len(identity_key({})) == 16
    with pytest.raises(ValueError):
        canonical_json({"lr": float("nan")})


def test_identity_differences_name_the_nested_entries_that_differ():
    old = {"slide": {"size": 1, "fingerprint": "a"}, "model": {"digest": "x"}}
    new = {"slide": {"size": 1, "fingerprint": "b"}, "model": {"digest": "y"}, "tiling": 1}
    assert identity_differences(old, new) == ["model.digest", "slide.fingerprint", "tiling"]


def _outcome(status, code=0):
    return SlideOutcome("s", status, exit_code=code)


@pytest.mark.parametrize(("statuses", "expected"), [
    ([], 0),
    ([(Status.DONE, 0), (Status.REUSED, 0)], 0),
    ([(Status.FAILED, 2), (Status.REFUSED, 2)], 2),
    ([(Status.DONE, 0), (Status.FAILED, 2)], 1),
    ([(Status.FAILED, 2), (Status.FAILED, 1)], 1),
])
def test_run_exit_code_is_2_only_when_every_slide_failed_on_bad_input(statuses, expected):
    assert run_exit_code(_outcome(s, c) for s, c in statuses) == expected


@pytest.mark.parametrize(("code", "text"), [
    (errno.ENOSPC, "no space left on device; free space and rerun"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
    (errno.ENAMETOOLONG, "file name too long"),
])
def test_environment_failures_become_one_line_naming_the_path(code, text):
    exc = OSError(code, os.strerror(code), "/out/x.h5")
    line, exit_code = error_line(exc, "/slides/a.svs")
    assert line.startswith(f"/out/x.h5: {text}") and "\n" not in line and exit_code == 2
    wrapped = RuntimeError("writer failed")
    wrapped.__cause__ = exc
    assert error_line(wrapped)[0].startswith(f"/out/x.h5: {text}")


def test_a_full_disk_reported_only_in_text_still_says_no_space():
    line, code = error_line(RuntimeError("[enforce fail] write: No space left on device"), "/out/last.pt")
    assert line == "/out/last.pt: no space left on device; free space and rerun" and code == 2


def test_ipspath_errors_keep_their_text_and_other_errors_are_internal():
    assert error_line(BadInputError("a.svs: bad; fix it")) == ("a.svs: bad; fix it", 2)
    assert error_line(IpspathError("worker died")) == ("worker died", 1)
    line, code = error_line(KeyError("coords"), "/slides/a.svs")
    assert code == 1 and line.startswith("/slides/a.svs: internal error: KeyError") and "\n" not in line


def test_run_job_times_the_work_and_turns_a_refusal_into_a_refused_outcome():
    def refuse():
        raise RefusedError("out/status/a.json: holds other results; pass --overwrite")

    refused = run_job("a", "a.svs", refuse, extra={"label": "tumor"})
    assert refused.status is Status.REFUSED and refused.exit_code == 2 and refused.extra == {"label": "tumor"}
    done = run_job("a", "a.svs", lambda: SlideOutcome("a", Status.DONE))
    assert done.ok and done.seconds >= 0
    failed = run_job("a", "a.svs", lambda: 1 / 0)
    assert failed.status is Status.FAILED and "ZeroDivisionError" in failed.error


def test_done_record_round_trips_and_keeps_unknown_keys_as_extra(tmp_path):
    path = tmp_path / "a.json"
    outcome = SlideOutcome("a", Status.DONE, identity={"k": [1, 2]}, extra={"probabilities": [0.1, 0.9]})
    write_done_record(path, outcome)
    assert read_outcome(path) == outcome
    path.write_text(json.dumps({"slide_id": "a", "status": "done", "predicted": "x"}))
    assert read_outcome(path).extra == {"predicted": "x"}
    path.write_text("{half")
    assert read_outcome(path) is None


def test_a_done_record_of_other_inputs_is_refused_redone_or_overwritten_never_reused(tmp_path):
    path = tmp_path / "a.json"
    made = {"slide": {"fingerprint": "a"}, "model": {"digest": "1"}}
    write_done_record(path, SlideOutcome("a", Status.DONE, identity=made))
    assert check_done_record(path, json.loads(json.dumps(made))).status is Status.REUSED
    other = {"slide": {"fingerprint": "a"}, "model": {"digest": "2"}}
    with pytest.raises(RefusedError, match=r"differs in model\.digest.*--overwrite"):
        check_done_record(path, other, what="predictions")
    assert check_done_record(path, other, on_change="redo") is None
    assert check_done_record(path, made, overwrite=True) is None


def test_failed_and_identity_less_records_are_redone(tmp_path):
    path = tmp_path / "a.json"
    write_done_record(path, SlideOutcome("a", Status.FAILED, error="x"))
    assert check_done_record(path, {"a": 1}) is None
    path.write_text(json.dumps({"slide_id": "a", "status": "done"}))
    assert check_done_record(path, {"a": 1}) is None
    assert check_done_record(tmp_path / "missing.json", {"a": 1}) is None
