"""Every hint an error gives names options that the command it came from accepts.

Each case runs a command as typed that fails with advice, collects every line it shows (the error
line and the per-slide lines it logs) and checks each ``--option`` in them against the click command:
the one that raised it, or the one a quoted ``ipspath <command> ...`` in the hint names.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import click
import pytest

from ips_path.cli.main import cli, main
from ips_path.synthetic.synth import write_synthetic_slide

OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# "ipspath <command> [<subcommand>]" up to where that command line ends
QUOTED = re.compile(r"ipspath ([a-z]+)(?: ([a-z]+))?([^`;&)]*)")
TRAIN = ["--n-select", "8", "--chunk-size", "16", "--dim", "32", "--heads", "4", "--batch-size", "2",
         "--device", "cpu", "--epochs", "1", "--threads", "1"]


def _command(*names: str) -> click.Command:
    """The click command of ``ipspath NAME [SUBNAME]``; a second word that is no subcommand is an argument."""
    command: click.Command = cli
    for name in names:
        if not isinstance(command, click.Group) or command.get_command(click.Context(command), name) is None:
            break
        command = command.get_command(click.Context(command), name)
    if isinstance(command, click.Group) and command is not cli:  # `ipspath features TILES` runs `features extract`
        command = command.get_command(click.Context(command), "extract")
    return command


def _accepted(command: click.Command) -> set[str]:
    names = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
    return names | {opt for param in cli.params for opt in param.opts}  # --debug, --quiet


def _wrong_options(argv: list[str], lines: list[str]) -> list[str]:
    """``--options`` in ``lines`` that the command they are given for does not accept."""
    raised = _command(*[a for a in argv if not a.startswith("-")][:2])
    wrong = []
    for line in lines:
        quoted_spans = []
        for match in QUOTED.finditer(line):
            command = _command(*[n for n in match.groups()[:2] if n])
            quoted_spans.append(match.span())
            wrong += [f"ipspath {command.name}: {o}" for o in OPTION.findall(match.group(0))
                      if o not in _accepted(command)]
        rest = "".join(c for i, c in enumerate(line) if not any(a <= i < b for a, b in quoted_spans))
        wrong += [f"{raised.name}: {o}" for o in OPTION.findall(rest) if o not in _accepted(raised)]
    return wrong


def _shown(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and every line the command showed on stderr (its log records of WARNING and above too)."""
    with pytest.raises(SystemExit) as done:
        main(["-q", *argv])
    return int(done.value.code), capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def coarse_slide(tmp_path_factory) -> Path:
    """A slide scanned at 4 µm/px: coarser than the cohort's 2 µm/px tiles and the models trained on them."""
    path = tmp_path_factory.mktemp("coarse") / "coarse.svs"
    return write_synthetic_slide(path, 512, 384, mpp=4.0, downsamples=(1,), seed=3).path


def test_a_slide_coarser_than_the_model_gets_advice_predict_can_take_and_only_once(trained_run, coarse_slide,
                                                                                     tmp_path, capsys):
    assert _wrong_options(["predict"], ["x.svs: pass --mpp 4 or larger"]) == ["predict: --mpp"]  # the checker works
    assert _wrong_options(["predict"], ["x: `ipspath tile x -o t --mpp 2`, ipspath features t --mpp 2; then"]) == [
        "ipspath extract: --mpp"]
    argv = ["predict", "--model", str(trained_run), str(coarse_slide), "-o", str(tmp_path / "p"), "--device", "cpu"]
    code, lines = _shown(argv, capsys)
    assert code == 2, lines
    assert not _wrong_options(argv, lines), lines  # was "pass --mpp 4": predict has no --mpp
    about = [line for line in lines if "coarser than the model" in line]
    assert len(about) == 1, lines  # was logged by the tiling and the slide's job, then echoed again
    assert "this model cannot predict it" in about[0]


def test_a_slide_without_pixel_size_gets_advice_predict_can_take(trained_run, small_tiff_nompp, tmp_path,
                                                                 capsys):
    argv = ["predict", "--model", str(trained_run), str(small_tiff_nompp.path), "-o", str(tmp_path / "p"),
            "--device", "cpu"]
    code, lines = _shown(argv, capsys)
    assert code == 2 and any("pixel size is unknown" in line for line in lines), lines
    assert not _wrong_options(argv, lines), lines  # was "pass --slide-mpp": predict has none


@pytest.mark.parametrize("case", ["tile_coarse", "tile_nompp", "train_no_stores", "train_no_features",
                                  "features_import_nompp"])
def test_the_hints_of_other_commands_name_their_own_options(case, cohort, coarse_slide, small_tiff_nompp, tmp_path,
                                                            capsys):
    manifest, tiles = cohort
    if case == "tile_coarse":
        argv = ["tile", str(coarse_slide), "-o", str(tmp_path / "t"), "--mag", "20"]
    elif case == "tile_nompp":
        argv = ["tile", str(small_tiff_nompp.path), "-o", str(tmp_path / "t")]
    elif case == "train_no_stores":
        argv = ["train", "--manifest", str(manifest), "--tiles", str(tmp_path / "none"), "-o", str(tmp_path / "r"),
                *TRAIN]
    elif case == "train_no_features":
        argv = ["train", "--manifest", str(manifest), "--tiles", str(tiles), "--features", "uni", "-o",
                str(tmp_path / "r"), *TRAIN]
    else:
        folder = tmp_path / "features_uni_v1"
        folder.mkdir()
        shutil.copy(small_tiff_nompp.path, tmp_path / "s.tiff")
        (tmp_path / "m.csv").write_text("slide_id,slide_path\ns,s.tiff\n", encoding="utf-8")
        (folder / "s.h5").write_bytes(b"")
        argv = ["features", "import", str(folder), "--manifest", str(tmp_path / "m.csv"), "-o", str(tmp_path / "t")]
    code, lines = _shown(argv, capsys)
    assert code == 2 and any(OPTION.search(line) for line in lines), lines  # a hint with an option was given
    assert not _wrong_options(argv, lines), lines

