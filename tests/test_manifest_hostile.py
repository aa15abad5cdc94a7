"""Manifests and slide ids as a hostile user writes them: odd encodings, workbooks, ragged rows,
thousands of duplicates, ids that are paths. One line naming the file and the fix, never a write
outside the output folder."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ips_path.runtime.errors import BadInputError
from ips_path.runtime.names import MAX_SLIDE_ID_BYTES, check_slide_id
from ips_path.slides.manifest import read_manifest
from ips_path.stores.tile_store import store_path
from ips_path.tiling.run import collect_inputs

TEXT = "slide_id,slide_path,label\na,a.svs,tumor\nb,b.svs,normal\n"


@pytest.fixture
def folder(tmp_path) -> Path:
    for name in ("a.svs", "b.svs"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def _refusal(path: Path, **kwargs) -> str:
    with pytest.raises(BadInputError) as info:
        read_manifest(path, **kwargs)
    return str(info.value)


def test_utf8_with_or_without_a_bom_is_read(folder):
    for name, data in (("plain.csv", TEXT.encode()), ("bom.csv", b"\xef\xbb\xbf" + TEXT.encode()),
                       ("crlf.csv", TEXT.replace("\n", "\r\n").encode())):
        (folder / name).write_bytes(data)
        assert [r.slide_id for r in read_manifest(folder / name)] == ["a", "b"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_is_refused_naming_the_encoding_and_the_fix(folder, encoding):
    path = folder / "m.csv"
    path.write_bytes(TEXT.encode(encoding))
    message = _refusal(path)
    assert message == f"{path}: encoded as UTF-16, not UTF-8; save it as 'CSV UTF-8' (Excel: File > Save As > " \
                      "CSV UTF-8) and run again"


def test_latin1_bytes_are_refused_with_their_line(folder):
    path = folder / "m.csv"
    path.write_bytes("slide_id,slide_path,label\na,a.svs,tumor\nb,b.svs,Läsion\n".encode("latin-1"))
    message = _refusal(path)
    assert message.startswith(f"{path}: not UTF-8 (byte 0xe4 on line 3; latin-1 or Windows-1252 text?)")
    assert "\n" not in message


def test_excel_workbooks_given_as_csv_are_refused(folder):
    xlsx = folder / "cohort.csv"
    with zipfile.ZipFile(xlsx, "w") as z:  # the layout of an .xlsx file
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("xl/workbook.xml", "<workbook/>")
        z.writestr("xl/worksheets/sheet1.xml", "<worksheet/>")
    assert "an Excel workbook (.xlsx, a zip file), not a CSV file; save it as 'CSV UTF-8'" in _refusal(xlsx)
    xls = folder / "old.csv"
    xls.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504))  # OLE2 header of an .xls file
    assert "an Excel 97-2003 workbook (.xls), not a CSV file" in _refusal(xls)


def test_ragged_rows_are_named_by_line_all_at_once(folder):
    path = folder / "m.csv"
    path.write_text("slide_id,slide_path,label\na,a.svs,tumor,extra\n\nb,b.svs\nc,a.svs,x\n")
    message = _refusal(path)
    assert "line 2: 4 value(s) but the header has 3 columns" in message
    assert "line 4: 2 value(s) but the header has 3 columns" in message  # blank line 3 is skipped
    assert message.startswith(f"{path}: 2 problem(s)")


def test_ten_thousand_duplicate_ids_give_one_line_with_a_count(folder):
    path = folder / "m.csv"
    path.write_text("slide_id,slide_path,label\n" + "a,a.svs,x\n" * 10_001 + "b,b.svs,y\nb,b.svs,y\n")
    message = _refusal(path)
    assert message == (f"{path}: 2 slide_id value(s) used more than once (10001 repeated row(s)): "
                       "'a' (lines 2, 3, 4, ...), 'b' (lines 10003, 10004); every slide needs its own slide_id")


def test_many_bad_rows_are_counted_beyond_the_first_ten(folder):
    path = folder / "m.csv"
    path.write_text("slide_id,slide_path,label\n" + "".join(f"s{i},missing{i}.svs,x\n" for i in range(500)))
    message = _refusal(path)
    assert message.startswith(f"{path}: 500 problem(s)") and message.endswith("... and 490 more")
    assert len(message.splitlines()) == 12


HOSTILE_IDS = {
    "../../x": "path separator",
    "a/b": "path separator",
    "a\\b": "path separator",
    "..": "folder reference",
    "bell\x07": "control character",
    "tab\tid": "control character",
    "x" * 300: "300 bytes long",
    "é" * 81: "162 bytes long",
}


@pytest.mark.parametrize("slide_id", list(HOSTILE_IDS), ids=range(len(HOSTILE_IDS)))
def test_unsafe_slide_ids_are_refused_with_their_line(folder, slide_id):
    path = folder / "m.csv"
    quoted = '"' + slide_id.replace('"', '""') + '"'
    path.write_text(f"slide_id,slide_path,label\nok,a.svs,x\n{quoted},b.svs,y\n", encoding="utf-8")
    message = _refusal(path)
    assert "line 3: slide_id" in message and "is not a safe file name" in message
    assert HOSTILE_IDS[slide_id] in message
    with pytest.raises(BadInputError):
        store_path(folder / "out", slide_id)  # nothing below the manifest can build a path from it either


def test_a_newline_or_nul_inside_an_id_is_refused(folder):
    path = folder / "m.csv"
    path.write_text('slide_id,slide_path,label\n"two\nlines",a.svs,x\n')
    assert "line 3: slide_id 'two\\nlines' is not a safe file name (it holds the control character '\\n')" \
        in _refusal(path)
    path.write_bytes(b"slide_id,slide_path,label\nn\x00ul,a.svs,x\n")
    assert _refusal(path).startswith(f"{path}: holds a NUL byte on line 2")


def test_the_longest_allowed_id_is_a_file_name_everywhere(folder):
    longest = "é" * (MAX_SLIDE_ID_BYTES // 2)
    assert check_slide_id(longest) == longest
    # its longest derived name (a hidden temporary of a QC picture being replaced) fits in 255 bytes
    from ips_path.runtime.atomic import partial_path

    name = partial_path(folder / f"{longest}_attention_overlay.tiff", "-old").name
    assert len(name.encode()) <= 255
    (folder / name).write_bytes(b"")


def test_file_names_that_make_unsafe_ids_are_refused_naming_the_file(folder):
    bad = folder / ("x" * 200 + ".svs")
    bad.write_bytes(b"x")
    with pytest.raises(BadInputError, match=f"{bad}: slide id 'x{{39}}.*' is not a safe file name "
                                            r"\(it is 200 bytes long"):
        collect_inputs([folder])
    bell = folder / "ring\x07.svs"
    bell.write_bytes(b"x")
    with pytest.raises(BadInputError, match="2 slide file name"):
        collect_inputs([folder])


def test_tile_never_writes_outside_its_output_folder(folder):
    manifest = folder / "inner" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"slide_id,slide_path\n../../escaped,{folder / 'a.svs'}\n")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    done = subprocess.run([sys.executable, "-m", "ips_path.cli.main", "tile", "--manifest", str(manifest),
                           "-o", str(folder / "inner" / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert f"error: {manifest}: line 2: slide_id '../../escaped' is not a safe file name" in done.stderr
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing written anywhere


def test_predict_refuses_a_path_as_slide_id_before_writing(trained_run, cohort, tmp_path):
    from ips_path.inference.predict import predict

    manifest, _ = cohort
    hostile = tmp_path / "m.csv"
    hostile.write_text(f"slide_id,slide_path\n../../run,{manifest.parent / 'slide_000.svs'}\n")
    out = tmp_path / "a" / "b" / "pred"
    with pytest.raises(BadInputError, match="line 2: slide_id '../../run' is not a safe file name"):
        predict(trained_run, out, manifest=hostile, heatmaps=False, progress=False)
    assert not (tmp_path / "a").exists()
