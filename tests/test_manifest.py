import csv
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ips_path.runtime.errors import BadInputError
from ips_path.slides.manifest import assign_splits, class_names, read_manifest


def _write(tmp_path: Path, text: str, files=("a.svs", "b.svs", "c.svs")) -> Path:
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    p = tmp_path / "m.csv"
    p.write_text(text)
    return p


def test_reads_rows_with_relative_and_absolute_paths(tmp_path):
    absolute = tmp_path / "c.svs"
    p = _write(tmp_path, f"slide_id,slide_path,label,split,case_id,mpp\n"
                         f"a,a.svs,tumor,train,p1,0.25\nb,b.svs,normal,val,p2,\nc,{absolute},tumor,,p3,\n")
    rows = read_manifest(p)
    assert [r.slide_id for r in rows] == ["a", "b", "c"]
    assert rows[0].slide_path == (tmp_path / "a.svs").resolve()
    assert rows[0].mpp == 0.25 and rows[1].mpp is None
    assert rows[2].split is None and rows[2].case_id == "p3"
    assert class_names(rows) == ["normal", "tumor"]


def test_every_problem_is_listed_with_its_line(tmp_path):
    p = _write(tmp_path, "slide_id,slide_path,label,split,case_id,mpp\n"
                         "a,a.svs,tumor,train,p1,\n"          # line 2 ok
                         "a,b.svs,tumor,train,p9,\n"          # line 3 duplicate id
                         "d,missing.svs,tumor,train,p4,\n"    # line 4 missing file
                         "e,b.svs,,train,p5,\n"               # line 5 empty label
                         "f,b.svs,tumor,holdout,p6,\n"        # line 6 unknown split
                         "g,b.svs,tumor,train,p7,-1\n"        # line 7 bad mpp
                         "h,c.svs,normal,val,p1,\n")          # patient p1 in train and val
    with pytest.raises(BadInputError) as e:
        read_manifest(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: 6 problem(s)")
    for expected in ("slide_id value(s) used more than once (1 repeated row(s)): 'a' (lines 2, 3)",
                     "line 4: slide file not found",
                     "line 5: empty label", "line 6: unknown split 'holdout'", "line 7: mpp '-1'",
                     "case_id 'p1' is in several splits"):
        assert expected in msg


def test_missing_column_and_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="missing column"):
        read_manifest(_write(tmp_path, "slide_id,path,label\na,a.svs,x\n"))
    with pytest.raises(BadInputError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")


def test_label_optional_for_prediction(tmp_path):
    rows = read_manifest(_write(tmp_path, "slide_id,slide_path\na,a.svs\n"), require_label=False)
    assert rows[0].label is None


def test_assign_splits_keeps_patients_together_and_is_seeded(tmp_path):
    lines = ["slide_id,slide_path,label,case_id"]
    for i in range(40):  # patients p0..p9 have two slides each, the rest one
        case = i // 2 if i < 20 else i
        lines.append(f"s{i},a.svs,{'pos' if case % 2 else 'neg'},p{case}")
    rows = read_manifest(_write(tmp_path, "\n".join(lines) + "\n"))
    splits = assign_splits(rows, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert splits == assign_splits(rows, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert splits != assign_splits(rows, val_fraction=0.25, test_fraction=0.25, seed=4)
    by_case: dict[str, set[str]] = {}
    for r in rows:
        by_case.setdefault(r.case_id, set()).add(splits[r.slide_id])
    assert all(len(s) == 1 for s in by_case.values())
    for split in ("train", "val", "test"):
        labels = {r.label for r in rows if splits[r.slide_id] == split}
        assert labels == {"pos", "neg"}, split
    n_val = sum(1 for v in splits.values() if v == "val")
    assert 6 <= n_val <= 14


def test_assign_splits_keeps_given_splits(tmp_path):
    rows = read_manifest(_write(tmp_path, "slide_id,slide_path,label,split\na,a.svs,x,test\nb,b.svs,x,\n"
                                          "c,c.svs,x,\n"))
    splits = assign_splits(rows, val_fraction=0.5)
    assert splits["a"] == "test"
    assert sorted(splits[s] for s in "bc") == ["train", "val"]


def test_example_manifest_works_from_a_clone_as_its_readme_says(tmp_path):
    """The commands of data_manifests/README.md, run as written in a copy of the folder: no test data needed."""
    source = Path(__file__).parents[1] / "data_manifests"
    shutil.copytree(source, tmp_path / "data_manifests", ignore=shutil.ignore_patterns("example_slides"))
    commands = [line.strip() for line in (source / "README.md").read_text().splitlines()
                if line.strip().startswith("ipspath ")]
    assert [c.split()[1] for c in commands] == ["synth", "tile"]
    for command in commands:
        done = subprocess.run([sys.executable, "-m", "ips_path.cli.main", *shlex.split(command)[1:]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr)
    rows = read_manifest(tmp_path / "data_manifests" / "example.csv")
    assert len(rows) == 4 and rows[3].mpp == 0.5 and [r.split for r in rows] == ["train", "train", "val", None]
    with open(tmp_path / "data_manifests" / "example_slides" / "manifest.csv", newline="") as f:
        truth = {row["slide_id"]: row["label"] for row in csv.DictReader(f)}
    assert {r.slide_id: r.label for r in rows} == truth  # the example's labels are the generated slides' own
    with open(tmp_path / "tiles" / "tiling_summary.csv", newline="") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["tiled"] * 4
