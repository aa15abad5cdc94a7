"""What users install is what is tested: the wheel, installed outside the checkout, runs the commands.

The editable install the other tests use imports straight from the checkout, so a module or data file
the package configuration leaves out goes unseen there. Here the wheel is built from a copy of the
sources, installed into a fresh virtual environment in a temporary folder (its dependencies are the
test environment's, seen through a ``.pth`` line; the test environment's editable finder is not, as
a ``.pth`` file is only read in a site folder), and run from a folder outside the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Installed package name -> source folder, as setup.cfg's package_dir maps them.
ROOTS = {"ips_path": REPO / "ips_path", "ips_path/tiling": REPO / "tiling", "ips_path/cli": REPO / "cli"}
BUILD_FILES = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


def _source_files() -> set[str]:
    """Every file of the package folders, as the wheel names it: modules and the data the code opens."""
    names = set()
    for package, folder in ROOTS.items():
        for path in folder.rglob("*"):
            parts = path.relative_to(folder).parts
            if path.is_file() and "__pycache__" not in parts and path.suffix not in (".pyc", ".pyo"):
                names.add(f"{package}/{'/'.join(parts)}")
    return names


def _build_wheel(tmp: Path) -> Path:
    """The wheel built from a copy of the sources (a build in the checkout could pick up old build/ files)."""
    source = tmp / "source"
    source.mkdir()
    for name in BUILD_FILES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, source / name)
    for folder in ("ips_path", "tiling", "cli"):
        shutil.copytree(REPO / folder, source / folder, ignore=_IGNORE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist"), str(source)], check=True, capture_output=True, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("ipspath-*.whl")
    return wheel


def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    with zipfile.ZipFile(_build_wheel(tmp_path)) as wheel:
        names = set(wheel.namelist())
    missing = sorted(_source_files() - names)
    assert not missing, f"left out of the wheel: {missing}"
    # the packages regrouped elsewhere are found too: every folder with an __init__.py is in it
    assert {"ips_path/review/heatmap/__init__.py", "ips_path/review/view/static/viewer.js",
            "ips_path/review/report_template.html", "ips_path/tiling/grid.py", "ips_path/cli/main.py"} <= names
    assert not [n for n in names if n.startswith(("tiling/", "cli/", "tests/"))], "a folder installed at top level"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel installed into a fresh venv outside the checkout: its python, bin folder, env and a cwd."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies of the test environment, as a plain path: its .pth files (the editable finder) stay unread
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    work = tmp / "work"
    work.mkdir()
    return {"python": python, "bin": venv / "bin", "site": site, "env": env, "cwd": work}


def _run(installed: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_the_installed_package_imports_every_module_from_the_venv(installed):
    script = (
        "import importlib, pkgutil, ips_path\n"
        "print(ips_path.__file__)\n"
        "names = [m.name for m in pkgutil.walk_packages(ips_path.__path__, 'ips_path.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
        "import ips_path.review.heatmap, ips_path.review.view.server, ips_path.tiling.run, ips_path.cli.main\n"
        "from importlib import resources\n"
        "assert resources.files('ips_path.review.view').joinpath('static/viewer.js').is_file()\n"
        "assert resources.files('ips_path.review').joinpath('report_template.html').is_file()\n"
    )
    result = _run(installed, str(installed["python"]), "-c", script)
    assert result.returncode == 0, result.stderr
    location, count = result.stdout.split()
    # imported from the venv's site-packages, not from the checkout
    assert Path(location).is_relative_to(installed["site"]), location
    assert not Path(location).is_relative_to(REPO)
    modules = sum(1 for path in _source_files() if path.endswith(".py") and not path.endswith("__init__.py"))
    assert int(count) >= modules


@pytest.mark.slow
def test_the_installed_commands_run_the_chain(installed):
    """``ipspath --help``, ``demo``, ``heatmap`` and ``view`` (one request) from the installed package."""
    ipspath = str(installed["bin"] / "ipspath")
    assert Path(ipspath).is_file()
    result = _run(installed, ipspath, "--help")
    assert result.returncode == 0 and "heatmap" in result.stdout and "view" in result.stdout, result.stderr
    result = _run(installed, ipspath, "view", "--help")
    assert result.returncode == 0, result.stderr

    result = _run(installed, ipspath, "-q", "demo", "-o", "demo", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test AUC" in result.stdout
    pred = installed["cwd"] / "demo" / "predictions"
    assert (pred / "report.html").is_file() and (pred / "report_assets").is_dir()

    result = _run(installed, ipspath, "heatmap", "--predictions", str(pred), "-o", "heat", "--thumbnail-size", "256")
    assert result.returncode == 0, result.stderr
    overlays = list((installed["cwd"] / "heat").glob("*/overlay.png"))
    assert overlays, result.stderr

    server = subprocess.Popen([ipspath, "view", str(pred), "--port", "0"], cwd=installed["cwd"], env=installed["env"],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "http://" not in line and time.monotonic() < deadline:
            line = server.stderr.readline()
            assert line or server.poll() is None, "ipspath view ended before listening"
        url = re.search(r"http://\S+/", line).group(0)
        with urllib.request.urlopen(url, timeout=30) as answer:
            page = answer.read().decode()
        assert answer.status == 200 and "<html" in page.lower()
        with urllib.request.urlopen(url + "static/viewer.js", timeout=30) as answer:
            assert answer.status == 200 and answer.read()
    finally:
        server.terminate()
        server.wait(timeout=30)
