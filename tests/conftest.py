"""Shared fixtures: the real test slides in ../shared/data and small generated slides.

``test_data`` is the folder named by ``IPSPATH_TEST_DATA`` (default ``../shared/data`` next to the
repository); tests that need it skip when it is absent, so a fresh clone passes on its own
generated slides, and the run's summary says how many tests that left out, which folders they
need and how to point ``IPSPATH_TEST_DATA`` at them.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from ips_path.synthetic.synth import SlideSpec, write_synthetic_slide

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


TEST_DATA = pathlib.Path(os.environ.get("IPSPATH_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
"""The shared test-data folder: slides/, bad/, patches/, mnist/ (real files, not in the repository)."""
NEEDS_TEST_DATA = "needs test data:"
"""How the reason of every skip for missing test data starts; the run's summary counts them by folder."""
# what each folder holds, for the summary
_DATA_FOLDERS = {"slides": "real slide files (Aperio SVS, generic TIFF, DICOM)",
                 "bad": "broken slide files that must fail in one line",
                 "patches": "real stained patch images", "mnist": "MNIST digits for megapixel MNIST"}


def needs_test_data(sub: str = "") -> str:
    """The skip reason for a test that needs ``TEST_DATA / sub``."""
    return f"{NEEDS_TEST_DATA} {TEST_DATA / sub if sub else TEST_DATA} not found"


def _data_folder(sub: str = "") -> pathlib.Path:
    folder = TEST_DATA / sub if sub else TEST_DATA
    if not folder.is_dir():
        pytest.skip(needs_test_data(sub))
    return folder


@pytest.fixture(scope="session")
def test_data() -> pathlib.Path:
    """The shared test-data folder (slides/, bad/, patches/, mnist/)."""
    return _data_folder()


@pytest.fixture(scope="session")
def slides_dir() -> pathlib.Path:
    """Real slides that must open, tile and read."""
    return _data_folder("slides")


@pytest.fixture(scope="session")
def bad_dir() -> pathlib.Path:
    """Broken files that must fail with one clear line naming the file."""
    return _data_folder("bad")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which tests were skipped for want of the test data, which folders they need, and how to
    point ``IPSPATH_TEST_DATA`` at them: a fresh clone must not lose them silently."""
    missing: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if NEEDS_TEST_DATA in reason:
            path = reason.split(NEEDS_TEST_DATA, 1)[1].removesuffix(" not found").strip()
            missing[path] = missing.get(path, 0) + 1
    if not missing:
        return
    terminalreporter.section("tests skipped for want of test data", yellow=True)
    terminalreporter.line(f"{sum(missing.values())} tests did not run: they read real files that are not in the "
                          "repository.")
    for path, count in sorted(missing.items()):
        what = _DATA_FOLDERS.get(pathlib.Path(path).name, "the test-data folder (slides/, bad/, patches/, mnist/)")
        terminalreporter.line(f"  {count:4d} need {path}: {what}")
    terminalreporter.line("Put the folder at ../shared/data beside the repository, or name it: "
                          "IPSPATH_TEST_DATA=/path/to/data python -m pytest ...")


@pytest.fixture(scope="session")
def small_svs(tmp_path_factory: pytest.TempPathFactory) -> SlideSpec:
    """A generated 4000 x 3000 Aperio SVS, 0.5 µm/px, levels 1/4/16, two lesions (``.path``)."""
    path = tmp_path_factory.mktemp("generated") / "small.svs"
    return write_synthetic_slide(path, 4000, 3000, mpp=0.5, downsamples=(1, 4, 16), lesions=2, seed=0)


@pytest.fixture(scope="session")
def small_tiff_nompp(tmp_path_factory: pytest.TempPathFactory) -> SlideSpec:
    """A generated 2000 x 1500 generic pyramidal TIFF (levels 1/4) with no pixel size at all."""
    path = tmp_path_factory.mktemp("generated") / "small_nompp.tiff"
    return write_synthetic_slide(path, 2000, 1500, mpp=0.5, fmt="tiff", resolution_tags=False,
                                 downsamples=(1, 4), seed=1)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """8 generated slides (1024 x 768 px at 1 µm/px, half with lesions) tiled at 2 µm/px, 32 px: (manifest, tiles)."""
    from ips_path.synthetic.synth import write_synthetic_cohort
    from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides

    root = tmp_path_factory.mktemp("cohort")
    write_synthetic_cohort(root / "slides", 8, size=(1024, 768), mpp=1.0, downsamples=(1,), seed=5, workers=2,
                           lesion_diameter_um=(150.0, 300.0))
    manifest = root / "slides" / "manifest.csv"
    results = tile_slides(collect_inputs([], manifest), root / "tiles",
                          TilingParams(target_mpp=2.0, patch_size=32, qc=False), progress=False)
    assert all(r.status == "tiled" and r.n_patches > 0 for r in results)
    return manifest, root / "tiles"


@pytest.fixture(scope="session")
def trained_run(cohort: tuple[pathlib.Path, pathlib.Path], tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A training run folder (one epoch of a small model on ``cohort``), for prediction tests."""
    from ips_path.config import TrainConfig
    from ips_path.training.train import train

    manifest, tiles = cohort
    out = tmp_path_factory.mktemp("trained") / "run"
    config = TrainConfig(epochs=1, batch_size=4, n_select=8, chunk_size=32, dim=32, heads=2, threads=2,
                         device="cpu", augment=False, warmup_epochs=0)
    train(manifest, tiles, out, config, progress=False)
    return out


def _tmpfs(folder: pathlib.Path, options: str):
    """Mount a tmpfs with ``options`` on ``folder`` for the test (root only), or skip."""
    import subprocess

    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("needs permission to mount a small file system")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)]).returncode != 0:  # busy: detach it now, freed when closed
            subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def read_only_dir(tmp_path: pathlib.Path):
    """A folder nobody can write in: permissions 0o555 for a normal user; for root (whom
    permissions do not stop) a read-only tmpfs mounted there, skipped where mounting is not allowed."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    yield from _tmpfs(folder, "ro,size=64k")


@pytest.fixture
def full_dir(tmp_path: pathlib.Path):
    """A folder on a 16 KiB file system: a few small files fit, anything real fills it (root only)."""
    folder = tmp_path / "full"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small file system")
    yield from _tmpfs(folder, "size=16k")
