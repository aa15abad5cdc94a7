"""Environment failures as users meet them: read-only or full disks, too long names, a hostile
slide header, --debug. One line naming the path, exit code 2, nothing half-written."""

from __future__ import annotations

import errno
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.jobs import error_line
from ips_path.synthetic.synth import write_synthetic_slide

IPSPATH = [sys.executable, "-m", "ips_path.cli.main"]


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*IPSPATH, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("env") / "S.svs"
    return write_synthetic_slide(path, 1024, 768, mpp=1.0, downsamples=(1,), seed=3).path


def _huge_tiff(path: Path, width: int, height: int) -> Path:
    """A 150-byte TIFF whose header declares ``width`` x ``height`` RGB px in one strip."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 2), (273, 4, 8),
               (277, 3, 3), (278, 4, height), (279, 4, 3), (284, 3, 1)]
    data = b"II*\x00" + struct.pack("<I", 11) + b"\x80\x80\x80" + struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        data += struct.pack("<HHIHH", tag, kind, 1, value, 0) if kind == 3 else struct.pack("<HHII", tag, kind, 1,
                                                                                                value)
    path.write_bytes(data + struct.pack("<I", 0))
    return path


def test_a_slide_declaring_2e9_by_2e9_px_is_refused_in_one_line(tmp_path):
    huge = _huge_tiff(tmp_path / "huge.tiff", 2_000_000_000, 2_000_000_000)
    for args in (["tile", huge, "-o", tmp_path / "out", "--slide-mpp", "0.5"], ["inspect", huge]):
        done = _run(*args)
        assert done.returncode == 2, done.stderr
        assert f"{huge}: declares 2,000,000,000 x 2,000,000,000 px, beyond any slide" in done.stderr
        assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr


def test_debug_keeps_exit_code_2_for_bad_input_and_adds_the_traceback(tmp_path):
    quiet, debug = _run("inspect", tmp_path / "nope.svs"), _run("--debug", "inspect", tmp_path / "nope.svs")
    assert quiet.returncode == debug.returncode == 2
    assert "Traceback" not in quiet.stderr and "Traceback" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1] == quiet.stderr.rstrip().splitlines()[-1]


def test_a_read_only_output_folder_is_found_before_any_work(slide, read_only_dir):
    done = _run("tile", slide, "-o", read_only_dir / "tiles")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"ipspath: error: {read_only_dir / 'tiles'}: cannot write in this output folder "
                                   "(Read-only file system); choose a writable folder with -o")


def test_a_too_long_output_name_is_one_line_naming_it(slide, tmp_path):
    out = tmp_path / ("o" * 300)
    done = _run("tile", slide, "-o", out)
    assert done.returncode == 2
    assert done.stderr.strip() == f"ipspath: error: {out}: path too long for this file system; choose a shorter -o"


def test_a_full_disk_while_tiling_is_one_line_and_no_half_store(slide, full_dir):
    done = _run("tile", slide, "-o", full_dir, "--mpp", "2", "--patch-size", "32", "--no-qc")
    assert done.returncode == 2, done.stderr
    assert "no space left on device; free space and rerun" in done.stderr and "Traceback" not in done.stderr
    assert str(full_dir) in done.stderr
    assert not (full_dir / "S.zarr").exists()
    assert not [p for p in full_dir.iterdir() if ".partial-" in p.name]


def test_torch_save_on_a_full_disk_names_the_file_not_inline_container(full_dir):
    import torch

    target = full_dir / "last.pt"
    with pytest.raises(OSError) as info:
        write_atomically(target, lambda partial: torch.save({"w": torch.zeros(1 << 18)}, partial))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert error_line(info.value) == (f"{target}: no space left on device; free space and rerun", 2)
    assert list(full_dir.iterdir()) == []


def test_numpy_save_on_a_full_disk_names_the_file(full_dir):
    target = full_dir / "scores.npy"
    with pytest.raises(OSError) as info:
        write_atomically(target, lambda partial: np.zeros(1 << 16).tofile(partial))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
