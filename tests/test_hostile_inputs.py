"""Hostile manifests and options, as a user meets them on the command line: exit code 2, one line
naming the file or option and the fix, no traceback, nothing written; and no false refusals."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest

from ips_path.cli.main import main
from ips_path.stores.tile_store import TileStore

TRAIN = ["--epochs", "1", "--batch-size", "4", "--n-select", "4", "--chunk-size", "32", "--dim", "16", "--heads", "2",
         "--device", "cpu", "--threads", "1", "--warmup-epochs", "0", "--no-augment"]


def _cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as info:
        main(["-q", *argv])
    return int(info.value.code), capsys.readouterr().err.strip().splitlines()


def _refused(code: int, err: list[str], *words: str) -> str:
    """Exit 2 and one line 'ipspath: error: ...' holding ``words``, without a traceback or internal error."""
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("ipspath: error: "), err
    assert "internal error" not in err[0] and "Traceback" not in err[0], err
    for word in words:
        assert word in err[0], err
    return err[0]


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["slide_path"] = str((manifest.parent / row["slide_path"]).resolve())
    return rows


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# -- manifests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("column", ["label", "slide_path"])
def test_a_column_named_twice_in_the_header_is_refused(cohort, tmp_path, capsys, column):
    manifest, tiles = cohort
    rows = _rows(manifest)
    header = ["slide_id", "slide_path", "label", "case_id", column]
    other = {"label": lambda r: "negative", "slide_path": lambda r: r["slide_path"]}[column]
    path = _write(tmp_path / "m.csv", header, [[r["slide_id"], r["slide_path"], r["label"], r["case_id"], other(r)]
                                               for r in rows])
    code, err = _cli(["train", "--manifest", str(path), "--tiles", str(tiles), "-o", str(tmp_path / "run"), *TRAIN],
                     capsys)
    _refused(code, err, str(path), "line 1", repr(column), f"columns {header.index(column) + 1}, 5")
    assert not (tmp_path / "run").exists()


def test_a_pixel_size_of_1e_300_is_refused_for_the_manifest_and_the_option(cohort, tmp_path, capsys):
    manifest, _ = cohort
    rows = _rows(manifest)[:2]
    path = _write(tmp_path / "m.csv", ["slide_id", "slide_path", "mpp"],
                  [[r["slide_id"], r["slide_path"], "1e-300" if i == 0 else "1.0"] for i, r in enumerate(rows)])
    code, err = _cli(["tile", "--manifest", str(path), "-o", str(tmp_path / "tiles")], capsys)
    _refused(code, err, str(path), "line 2", "mpp", "1e-300")
    code, err = _cli(["tile", rows[0]["slide_path"], "-o", str(tmp_path / "tiles"), "--slide-mpp", "1e-300"], capsys)
    _refused(code, err, "--slide-mpp", "1e-300", "µm/px")
    assert not list((tmp_path / "tiles").glob("*.zarr")) if (tmp_path / "tiles").exists() else True


def test_an_infinite_manifest_mpp_is_refused_by_features_import(cohort, tmp_path, capsys):
    manifest, _ = cohort
    rows = _rows(manifest)[:2]
    path = _write(tmp_path / "m.csv", ["slide_id", "slide_path", "mpp"],
                  [[r["slide_id"], r["slide_path"], "inf" if i == 0 else "1.0"] for i, r in enumerate(rows)])
    (tmp_path / "feats").mkdir()
    for r in rows:
        (tmp_path / "feats" / f"{r['slide_id']}.h5").write_bytes(b"")
    code, err = _cli(["features", "import", str(tmp_path / "feats"), "--manifest", str(path), "-o",
                      str(tmp_path / "tiles")], capsys)
    _refused(code, err, str(path), "line 2", "mpp", "inf")


def test_a_survival_time_of_1e308_is_refused(cohort, tmp_path, capsys):
    manifest, tiles = cohort
    rows = _rows(manifest)
    path = _write(tmp_path / "m.csv", ["slide_id", "slide_path", "time", "event"],
                  [[r["slide_id"], r["slide_path"], "1e308" if i == 1 else str(5 + i), str(i % 2)]
                   for i, r in enumerate(rows)])
    code, err = _cli(["train", "--manifest", str(path), "--tiles", str(tiles), "-o", str(tmp_path / "run"),
                      "--task", "survival", *TRAIN], capsys)
    _refused(code, err, str(path), "line 3", "1e308")
    assert not (tmp_path / "run").exists()


def _case_clash(manifest: Path, out: Path) -> tuple[Path, str]:
    """The manifest with its first label capitalised ('Positive' beside 'positive')."""
    rows = _rows(manifest)
    rows[0]["label"] = rows[0]["label"].capitalize()
    return _write(out, list(rows[0]), [list(r.values()) for r in rows]), rows[0]["label"]


def test_labels_differing_only_in_case_are_refused(cohort, tmp_path, capsys):
    manifest, tiles = cohort
    path, label = _case_clash(manifest, tmp_path / "m.csv")
    code, err = _cli(["train", "--manifest", str(path), "--tiles", str(tiles), "-o", str(tmp_path / "run"), *TRAIN],
                     capsys)
    _refused(code, err, str(path), repr(label), repr(label.lower()), "--label-case fold")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_labels_differing_only_in_case_train_as_one_class_with_label_case_fold(cohort, tmp_path, capsys):
    manifest, tiles = cohort
    path, _ = _case_clash(manifest, tmp_path / "m.csv")
    code, err = _cli(["train", "--manifest", str(path), "--tiles", str(tiles), "-o", str(tmp_path / "run"), *TRAIN,
                      "--label-case", "fold"], capsys)
    assert code == 0, err
    with (tmp_path / "run" / "splits.csv").open(newline="") as f:
        assert {r["label"] for r in csv.DictReader(f)} == {"negative", "positive"}


def test_a_listing_of_20000_missing_stores_is_capped(cohort, tmp_path, capsys):
    manifest, tiles = cohort
    path = tmp_path / "big.csv"
    path.write_text("slide_id,slide_path,label\n" + "".join(f"s{i},s{i}.svs,{'ab'[i % 2]}\n" for i in range(20_000)))
    code, err = _cli(["train", "--manifest", str(path), "--tiles", str(tiles), "-o", str(tmp_path / "run"), *TRAIN],
                     capsys)
    assert code == 2
    text = "\n".join(err)
    assert len(text) < 2000 and "and 19990 more" in text, text[:3000]


# -- options --------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, words", [
    ("--dim", "1000000000000", ["--dim", "1000000000000"]),
    ("--device", "meta", ["--device meta", "cpu"]),
    ("--device", "mps", ["--device mps", "cpu"]),
    ("--features", "../x", ["--features", "'../x'"]),
])
def test_bad_training_options_are_one_line(cohort, tmp_path, capsys, option, value, words):
    manifest, tiles = cohort
    if option == "--device" and value == "mps":
        import torch

        if torch.backends.mps.is_available():
            pytest.skip("this machine has Apple's Metal device")
    code, err = _cli(["train", "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(tmp_path / "run"),
                      *TRAIN, option, value], capsys)
    _refused(code, err, *words)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_hidden_feature_name_is_refused_before_any_slide(cohort, capsys):
    _, tiles = cohort
    code, err = _cli(["features", str(tiles), "--encoder", "smallcnn", "--name", ".hidden", "--device", "cpu"], capsys)
    _refused(code, err, "--name", "'.hidden'")
    assert not list(tiles.glob("*.zarr/features/.hidden*"))


@pytest.mark.parametrize("option, value", [("--smooth-um", "1e30"), ("--tiff-mpp", "1e30")])
def test_absurd_heatmap_sizes_are_refused_up_front(cohort, tmp_path, capsys, option, value):
    _, tiles = cohort
    code, err = _cli(["heatmap", "--tiles", str(tiles), "--run", "r", "-o", str(tmp_path / "h"), option, value],
                     capsys)
    _refused(code, err, option, "1e+30")
    assert not (tmp_path / "h").exists()


def test_an_empty_output_folder_is_refused(cohort, tmp_path, capsys, monkeypatch):
    manifest, _ = cohort
    monkeypatch.chdir(tmp_path)
    code, err = _cli(["tile", str(_rows(manifest)[0]["slide_path"]), "-o", "", "--mpp", "2", "--patch-size", "32"],
                     capsys)
    _refused(code, err, "-o/--out", "empty")
    assert not list(tmp_path.iterdir())


# -- read-only outputs: found before the work ---------------------------------------------------

def test_read_only_tiles_are_found_before_features_are_computed(cohort, tmp_path, read_only_dir, capsys):
    _, tiles = cohort
    store = next(p for p in sorted(tiles.glob("*.zarr")) if TileStore.open(p).n_patches)
    subprocess.run(["mount", "-o", "remount,rw", str(read_only_dir)], check=True)
    shutil.copytree(store, read_only_dir / store.name)
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_dir)], check=True)
    code, err = _cli(["features", str(read_only_dir), "--encoder", "stain_density", "--device", "cpu"], capsys)
    _refused(code, err, str(read_only_dir / store.name), "cannot write")


def test_a_read_only_heatmap_folder_is_found_before_any_slide_is_drawn(predicted, read_only_dir, capsys):
    code, err = _cli(["heatmap", "--predictions", str(predicted), "-o", str(read_only_dir / "h")], capsys)
    _refused(code, err, str(read_only_dir / "h"), "cannot write")


def test_read_only_tiles_are_found_before_predict_scores_a_slide(cohort, trained_run, read_only_dir, tmp_path,
                                                                  capsys):
    manifest, _ = cohort
    code, err = _cli(["predict", "--model", str(trained_run), "--manifest", str(manifest), "--tiles",
                      str(read_only_dir), "-o", str(tmp_path / "pred"), "--device", "cpu", "--no-heatmaps"], capsys)
    _refused(code, err, str(read_only_dir), "--tiles")


@pytest.fixture(scope="module")
def predicted(cohort, trained_run, tmp_path_factory):
    """A prediction folder of two slides of the cohort (scores stored, no heatmaps drawn)."""
    manifest, tiles = cohort
    rows = _rows(manifest)
    root = tmp_path_factory.mktemp("predicted")
    two = _write(root / "two.csv", list(rows[0]), [list(r.values()) for r in rows[:2]])
    for r in rows[:2]:  # a copy: the session's stores stay without scores
        shutil.copytree(tiles / f"{r['slide_id']}.zarr", root / "tiles" / f"{r['slide_id']}.zarr")
    with pytest.raises(SystemExit) as info:
        main(["-q", "predict", "--model", str(trained_run), "--manifest", str(two), "--tiles", str(root / "tiles"),
              "-o", str(root / "pred"), "--device", "cpu", "--no-heatmaps"])
    assert info.value.code == 0
    return root / "pred"
