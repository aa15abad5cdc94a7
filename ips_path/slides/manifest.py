"""The cohort manifest: one CSV row per slide (format in ``data_manifests/README.md``).

Required columns: ``slide_id``, ``slide_path`` (absolute, or relative to the manifest's folder),
``label`` (or the columns a run names, ``--label-columns``). Optional: ``split`` (train/val/test),
``case_id`` (the patient: splits never cut a patient), ``mpp`` (level-0 µm/px, overrides the slide's
metadata); for survival tasks ``time`` (follow-up, any unit) and ``event`` (1 = event observed at
``time``, 0 = censored then).

Validation collects every problem before raising, so a user fixes the file in one pass.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ips_path.runtime.errors import MAX_LISTED, BadInputError, listing
from ips_path.runtime.limits import PIXEL_SIZE_UM, SURVIVAL_TIME
from ips_path.runtime.names import slide_id_problem

__all__ = [
    "LABEL_CASES", "MAX_LISTED", "MIN_VALIDATION_SLIDES", "OPTIONAL_COLUMNS", "REQUIRED_COLUMNS", "SPLITS", "TEST",
    "ManifestRow", "assign_folds", "assign_splits", "class_names", "read_manifest", "validation_split_problems",
]

MIN_VALIDATION_SLIDES = 10
"""Fewer validation slides than this make the validation metrics, and the best epoch chosen by them, noise."""

REQUIRED_COLUMNS = ("slide_id", "slide_path", "label")
OPTIONAL_COLUMNS = ("split", "case_id", "mpp", "time", "event")
SPLITS = ("train", "val", "test")
#: How labels that differ only in case ('Positive', 'positive') are taken: refused, or folded into one class.
LABEL_CASES = ("exact", "fold")
TEST = "test"


@dataclass(frozen=True)
class ManifestRow:
    """One slide of a cohort.

    Attributes
    ----------
    slide_id : str
        Unique name of the slide; names its tile store ``<slide_id>.zarr``.
    slide_path : Path
        Absolute path of the slide file.
    label : str or None
        Class name (the first label column's value; the ``label`` column unless others are named); None
        only when labels are not required (prediction) or, with several label columns, the cell is empty.
    split : str or None
        ``"train"``, ``"val"``, ``"test"`` or None when the manifest has no split.
    case_id : str
        Patient identifier; the slide id when the manifest has none.
    mpp : float or None
        Level-0 resolution override in µm/px.
    line : int
        Line number in the CSV file (the header is line 1), for messages.
    time : float or None
        Follow-up time (survival), in the manifest's unit; None when not given.
    event : int or None
        1 = the event was observed at ``time``, 0 = censored at ``time``; None when not given.
    labels : tuple of (str or None)
        The value of each label column asked for (``read_manifest(label_columns=...)``), None where
        empty; ``(label,)`` by default.
    """

    slide_id: str
    slide_path: Path
    label: str | None
    split: str | None
    case_id: str
    mpp: float | None
    line: int
    time: float | None = None
    event: int | None = None
    labels: tuple[str | None, ...] = ()


def read_manifest(path: str | Path, *, require_label: bool = True, check_files: bool = True,
                  require_survival: bool = False, label_columns: Sequence[str] = ("label",),
                  label_case: str = "exact") -> list[ManifestRow]:
    """Read and validate a manifest CSV.

    Parameters
    ----------
    path : str or Path
        The CSV file.
    require_label : bool
        Whether every row needs a non-empty ``label`` (training: yes; prediction: no).
    check_files : bool
        Whether every ``slide_path`` must exist.
    require_survival : bool
        Whether every row needs a ``time`` (a number >= 0) and an ``event`` (0 or 1), consistent
        across the slides of a patient (survival training). Without it, values given are still checked.
    label_columns : sequence of str
        The columns holding labels (one task each), ``label`` by default. With ``require_label`` they
        must all exist; one column must be filled in every row, several in at least one each (an
        empty cell leaves the slide out of that task only). Without it, absent columns read as empty.
    label_case : {"exact", "fold"}
        With ``require_label``: labels of one column that differ only in case ('Positive' and
        'positive') are refused (``"exact"``: they would be two classes), or folded into one class
        spelled as most rows spell it (``"fold"``).

    Returns
    -------
    list of ManifestRow
        In file order.

    Raises
    ------
    BadInputError
        Listing every bad row at once with its line number: missing columns or files, duplicate
        slide ids, empty labels, unknown splits, bad mpp values, a patient in two splits; for survival
        a missing or negative time, an event other than 0/1, a patient whose slides disagree on them;
        a column name used twice in the header; labels differing only in case (``label_case="exact"``).
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: manifest not found")
    header, records = _read_csv(path)
    columns = [c.strip() for c in header]
    _check_unique_columns(path, columns)
    label_columns = tuple(label_columns)
    required = [c for c in REQUIRED_COLUMNS if c != "label"] + (list(label_columns) if require_label else [])
    required += ["time", "event"] if require_survival else []
    missing = [c for c in required if c not in columns]
    if missing:
        has = f"; the file has {', '.join(columns)}" if label_columns != ("label",) else ""
        raise BadInputError(f"{path}: missing column(s) {', '.join(missing)}; required: {', '.join(required)}{has}")

    problems: list[str] = []
    raw = []
    for values, line in records:
        if len(values) != len(columns):
            problems.append(f"line {line}: {len(values)} value(s) but the header has {len(columns)} columns "
                            "(a missing or extra comma, or a comma inside an unquoted value?)")
            continue
        raw.append(({k: v.strip() for k, v in zip(columns, values, strict=True)}, line))

    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    duplicates: dict[str, list[int]] = defaultdict(list)
    for rec, line in raw:
        slide_id, slide_path = rec.get("slide_id", ""), rec.get("slide_path", "")
        labels = tuple(rec.get(c) or None for c in label_columns)
        split = (rec.get("split") or "").lower() or None
        bad = len(problems)
        unsafe = slide_id_problem(slide_id)
        if not slide_id:
            problems.append(f"line {line}: empty slide_id")
        elif unsafe is not None:
            problems.append(f"line {line}: slide_id {slide_id[:60]!r} is not a safe file name ({unsafe}); "
                            "use letters, digits, '-', '_' and '.'")
        elif slide_id in seen:
            if not duplicates[slide_id]:
                duplicates[slide_id].append(seen[slide_id])
            duplicates[slide_id].append(line)
            problems.append("")  # counted, listed below in one line
        else:
            seen[slide_id] = line
        resolved = Path(slide_path) if Path(slide_path).is_absolute() else (path.parent / slide_path)
        if not slide_path:
            problems.append(f"line {line}: empty slide_path")
        elif check_files and not resolved.exists():
            problems.append(f"line {line}: slide file not found: {resolved}")
        if require_label and len(labels) == 1 and labels[0] is None:
            problems.append(f"line {line}: empty {label_columns[0]} for slide {slide_id!r}")
        elif require_label and not any(labels):
            problems.append(f"line {line}: slide {slide_id!r} has no value in any label column "
                            f"({', '.join(label_columns)}); fill one in or remove the row")
        if split is not None and split not in SPLITS:
            problems.append(f"line {line}: unknown split {rec.get('split')!r}; use one of {', '.join(SPLITS)}")
        mpp = None
        if rec.get("mpp"):
            problem = PIXEL_SIZE_UM.problem(rec["mpp"])
            if problem is None:
                mpp = float(rec["mpp"])
            else:
                problems.append(f"line {line}: mpp {problem} (a level-0 pixel size)")
        time, event = _survival_values(rec, line, slide_id, require_survival, problems)
        if len(problems) == bad:
            rows.append(ManifestRow(slide_id, resolved.resolve() if slide_path else resolved, labels[0], split,
                                    rec.get("case_id") or slide_id, mpp, line, time, event, labels))

    splits_of_case: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.split:
            splits_of_case[row.case_id].add(row.split)
    for case_id, splits in sorted(splits_of_case.items()):
        if len(splits) > 1:
            problems.append(f"case_id {case_id!r} is in several splits ({', '.join(sorted(splits))}); "
                            "a patient must stay in one split")
    problems += _survival_disagreements(rows)
    if require_label and not problems:
        rows = _labels_by_case(path, rows, label_columns, label_case)
    problems = [p for p in problems if p] + _duplicates_line(duplicates)
    if not records:
        problems.append("no rows")
    if len(problems) == 1:
        raise BadInputError(f"{path}: {problems[0]}")
    if problems:
        shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"]
                                         if len(problems) > MAX_LISTED else [])
        listing = "\n  ".join(shown)
        raise BadInputError(f"{path}: {len(problems)} problem(s) in the manifest:\n  {listing}")
    return rows


def _check_unique_columns(path: Path, columns: Sequence[str]) -> None:
    """BadInputError naming the header's repeated column names: a dict of the row would keep the last one only."""
    positions: dict[str, list[int]] = defaultdict(list)
    for number, name in enumerate(columns, start=1):
        if name:  # empty names (trailing commas) hold nothing
            positions[name].append(number)
    repeated = [f"{name!r} (columns {', '.join(map(str, where))})" for name, where in positions.items()
                if len(where) > 1]
    if repeated:
        raise BadInputError(f"{path}: line 1: the header names {listing(repeated)} more than once; rename or "
                            "remove the extra column(s) so each name is one column")


def _labels_by_case(path: Path, rows: list[ManifestRow], label_columns: Sequence[str],
                    label_case: str) -> list[ManifestRow]:
    """``rows``, with labels that differ only in case refused (``"exact"``) or folded into their commonest spelling."""
    if label_case not in LABEL_CASES:
        raise BadInputError(f"--label-case must be one of {', '.join(LABEL_CASES)}, got {label_case!r}")
    spellings: dict[tuple[int, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        for task, value in enumerate(row.labels):
            if value is not None:
                spellings[task, value.casefold()][value] += 1
    clashes = {key: counts for key, counts in spellings.items() if len(counts) > 1}
    if not clashes:
        return rows
    if label_case == "exact":
        shown = [f"{label_columns[task]} {' / '.join(map(repr, sorted(counts)))}"
                 for (task, _), counts in clashes.items()]
        raise BadInputError(f"{path}: labels that differ only in case would be separate classes: {listing(shown)}; "
                            "spell each class one way, or pass --label-case fold to merge them")
    # the commonest spelling names the class (ties: the first in sorted order)
    chosen = {key: min(counts, key=lambda v: (-counts[v], v)) for key, counts in clashes.items()}
    folded = []
    for row in rows:
        labels = tuple(None if v is None else chosen.get((task, v.casefold()), v) for task, v in enumerate(row.labels))
        folded.append(dataclasses.replace(row, label=labels[0] if labels else row.label, labels=labels))
    return folded


def _duplicates_line(duplicates: Mapping[str, list[int]]) -> list[str]:
    """One line for every duplicated slide id, however many: a count and the first few."""
    if not duplicates:
        return []
    n_lines = sum(len(lines) - 1 for lines in duplicates.values())
    first = [f"{slide_id!r} (lines {', '.join(map(str, lines[:3]))}{', ...' if len(lines) > 3 else ''})"
             for slide_id, lines in list(duplicates.items())[:3]]
    more = f" and {len(duplicates) - 3} more" if len(duplicates) > 3 else ""
    return [f"{len(duplicates)} slide_id value(s) used more than once ({n_lines} repeated row(s)): "
            f"{', '.join(first)}{more}; every slide needs its own slide_id"]


def _read_csv(path: Path) -> tuple[list[str], list[tuple[list[str], int]]]:
    """The header and the rows (values, line number of the row's end) of a manifest CSV.

    Raises BadInputError naming the file, what it is instead, and the fix, for a spreadsheet
    workbook, UTF-16 or any other encoding than UTF-8 (a BOM is allowed), or NUL bytes.
    """
    data = path.read_bytes()
    fix = "save it as 'CSV UTF-8' (Excel: File > Save As > CSV UTF-8) and run again"
    if data.startswith(b"PK\x03\x04"):
        raise BadInputError(f"{path}: an Excel workbook (.xlsx, a zip file), not a CSV file; {fix}")
    if data.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        raise BadInputError(f"{path}: an Excel 97-2003 workbook (.xls), not a CSV file; {fix}")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or data[:200].count(b"\x00") > len(data[:200]) // 4:
        raise BadInputError(f"{path}: encoded as UTF-16, not UTF-8; {fix}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise BadInputError(
            f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} on line {line}; latin-1 or Windows-1252 "
            f"text?); {fix}") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise BadInputError(f"{path}: holds a NUL byte on line {line} (not a text file?); {fix}")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        records = [(values, reader.line_num) for values in reader if values and any(v.strip() for v in values)]
    except csv.Error as exc:
        raise BadInputError(f"{path}: line {reader.line_num}: not valid CSV ({exc}); {fix}") from None
    return header, records


def _survival_values(rec: dict[str, str], line: int, slide_id: str, required: bool, problems: list[str]
                     ) -> tuple[float | None, int | None]:
    """The row's time and event, appending what is wrong with them to ``problems``."""
    raw_time, raw_event = rec.get("time", ""), rec.get("event", "")
    time = event = None
    if raw_time:
        try:
            time = SURVIVAL_TIME.check(raw_time, "time")
        except BadInputError:
            problems.append(f"line {line}: time {raw_time!r} of slide {slide_id!r} is not a number >= 0 and <= "
                            f"{SURVIVAL_TIME.high:g}")
            time = None
    elif required:
        problems.append(f"line {line}: empty time for slide {slide_id!r}")
    if raw_event:
        if raw_event in ("0", "1", "0.0", "1.0"):
            event = int(float(raw_event))
        else:
            problems.append(f"line {line}: event {raw_event!r} of slide {slide_id!r} must be 1 (event observed) "
                            "or 0 (censored)")
    elif required:
        problems.append(f"line {line}: empty event for slide {slide_id!r}")
    return time, event


def _survival_disagreements(rows: Sequence[ManifestRow]) -> list[str]:
    """A patient's slides share one outcome: name the patients whose rows give different ones."""
    outcomes: dict[str, set[tuple[float | None, int | None]]] = defaultdict(set)
    for row in rows:
        if row.time is not None or row.event is not None:
            outcomes[row.case_id].add((row.time, row.event))
    problems = []
    for case_id, found in sorted(outcomes.items()):
        if len(found) > 1:
            listing = ", ".join(f"time {t if t is None else f'{t:g}'} event {e}" for t, e in sorted(found, key=str))
            problems.append(f"case_id {case_id!r} has slides with different outcomes ({listing}); "
                            "a patient has one time and event")
    return problems


def assign_splits(rows: Sequence[ManifestRow], *, val_fraction: float = 0.2, test_fraction: float = 0.0,
                  seed: int = 0, strata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Split slides into train/val/test by patient, stratified by label, reproducibly.

    Rows that already have a split keep it; the others are assigned. Patients are shuffled with
    ``seed`` within each label (the label of a patient's first slide), and the first
    ``val_fraction`` of each label's patients go to val (at least one when the label has three or
    more patients), the next ``test_fraction`` to test, the rest to train (never empty).
    ``strata`` (case_id -> stratum, e.g. :func:`ips_path.tasks.survival.survival_strata`) replaces the
    label as what the split keeps in proportion.

    Returns
    -------
    dict
        slide_id -> split.
    """
    fixed = {r.slide_id: r.split for r in rows if r.split}
    cases: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        if not r.split:
            cases[r.case_id].append(r)
    by_label: dict[str, list[str]] = defaultdict(list)
    for case_id, case_rows in cases.items():
        by_label[strata[case_id] if strata is not None else str(case_rows[0].label)].append(case_id)
    rng = random.Random(seed)
    out = dict(fixed)
    for label in sorted(by_label):
        case_ids = sorted(by_label[label])
        rng.shuffle(case_ids)
        n = len(case_ids)
        n_val = _share(n, val_fraction)
        n_test = max(0, min(n - n_val - 1, round(n * test_fraction)))
        for i, case_id in enumerate(case_ids):
            split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
            for r in cases[case_id]:
                out[r.slide_id] = split
    return out


def validation_split_problems(rows: Sequence[ManifestRow], splits: Mapping[str, str],
                              label_columns: Sequence[str] = ("label",)) -> list[str]:
    """What makes a validation split too weak to judge a model by, one line each (empty when none).

    Parameters
    ----------
    rows : sequence of ManifestRow
    splits : mapping
        slide_id -> split, as :func:`assign_splits` gives.
    label_columns : sequence of str
        The label columns (``rows[i].labels``) whose every class should have a validation slide;
        empty for survival, whose events are checked elsewhere.
    """
    val = [r for r in rows if splits.get(r.slide_id) == "val"]
    problems = []
    if len(val) < MIN_VALIDATION_SLIDES:
        problems.append(f"{'only ' if val else ''}{len(val) or 'no'} validation slide{'' if len(val) == 1 else 's'} "
                        f"(fewer than {MIN_VALIDATION_SLIDES}): validation metrics, and the best epoch chosen by "
                        "them, are mostly noise; give more slides the split val (--val-fraction, or the manifest's "
                        "split column), or cross-validate with --folds")
    for index, column in enumerate(label_columns):
        if not val:
            break
        known = {r.labels[index] for r in rows if index < len(r.labels) and r.labels[index] is not None}
        absent = sorted(known - {r.labels[index] for r in val if index < len(r.labels)})
        if absent:
            where = "" if list(label_columns) == ["label"] else f" in column {column!r}"
            problems.append(f"no validation slide of class {', '.join(absent)}{where}: the validation AUC and "
                            "balanced accuracy cannot judge it")
    return problems


def assign_folds(rows: Sequence[ManifestRow], k: int, seed: int = 0,
                 strata: Mapping[str, str] | None = None) -> dict[str, int | str]:
    """Patient-level folds stratified by label: slide_id -> fold index, or ``"test"``.

    Patients (``case_id``) are grouped by the label of their first slide, shuffled with ``seed`` within
    each label, and dealt out round-robin; the deal continues from label to label, so fold sizes differ
    by at most one patient. Slides with manifest split ``test`` get ``"test"``. ``strata`` (case_id ->
    stratum, e.g. :func:`~ips_path.tasks.survival.survival_strata`) replaces the label as what each fold
    keeps in proportion.

    Raises
    ------
    BadInputError
        Fewer than ``k`` patients outside the test split, or ``k < 2``.
    """
    if k < 2:
        raise BadInputError(f"--folds must be at least 2, got {k}")
    cases: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        if r.split != TEST:
            cases[r.case_id].append(r)
    if len(cases) < k:
        raise BadInputError(f"--folds {k} needs at least {k} patients outside the test split, found {len(cases)}")
    by_label: dict[str, list[str]] = defaultdict(list)
    for case_id, case_rows in cases.items():
        by_label[strata[case_id] if strata is not None else str(case_rows[0].label)].append(case_id)
    rng = random.Random(seed)
    fold_of_case: dict[str, int] = {}
    dealt = 0
    for label in sorted(by_label):
        case_ids = sorted(by_label[label])
        rng.shuffle(case_ids)
        for case_id in case_ids:
            fold_of_case[case_id] = dealt % k
            dealt += 1
    return {r.slide_id: TEST if r.split == TEST else fold_of_case[r.case_id] for r in rows}


def _share(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1 if n >= 3 else 0, round(n * fraction)))


def class_names(rows: Iterable[ManifestRow]) -> list[str]:
    """Sorted distinct labels: the class order of a model trained on this manifest."""
    return sorted({r.label for r in rows if r.label is not None})
