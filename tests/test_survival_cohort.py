"""Survival cohorts: manifest time/event columns, splits by event and follow-up, the survival task, synth outcomes."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ips_path.model import Task
from ips_path.runtime.errors import BadInputError
from ips_path.slides.manifest import read_manifest
from ips_path.synthetic.synth_survival import SurvivalOutcomes, draw_survival
from ips_path.tasks.survival import cox_partial_nll, discrete_time_nll
from ips_path.tasks.survival.cohort import check_events_in_splits, survival_splits


def _manifest(tmp_path: Path, body: str, header: str = "slide_id,slide_path,case_id,time,event") -> Path:
    for name in ("a.svs",):
        (tmp_path / name).write_bytes(b"x")
    path = tmp_path / "m.csv"
    path.write_text(f"{header}\n{body}", encoding="utf-8")
    return path


def test_manifest_reads_time_and_event_without_a_label(tmp_path):
    rows = read_manifest(_manifest(tmp_path, "s1,a.svs,p1,12.5,1\ns2,a.svs,p2,0,0\n"), require_label=False,
                         require_survival=True)
    assert [(r.time, r.event) for r in rows] == [(12.5, 1), (0.0, 0)]


def test_every_bad_survival_row_is_named_at_once(tmp_path):
    path = _manifest(tmp_path, "s1,a.svs,p1,,1\n"        # line 2: no time
                               "s2,a.svs,p2,-3,1\n"      # line 3: negative
                               "s3,a.svs,p3,nan,0\n"     # line 4: not a number >= 0
                               "s4,a.svs,p4,5,yes\n"     # line 5: event not 0/1
                               "s5,a.svs,p5,5,\n"        # line 6: no event
                               "s6,a.svs,p6,7,1\n"
                               "s7,a.svs,p6,8,1\n")      # patient p6 with two outcomes
    with pytest.raises(BadInputError) as error:
        read_manifest(path, require_label=False, require_survival=True)
    message = str(error.value)
    assert message.startswith(f"{path}: 6 problem(s)")
    for expected in ("line 2: empty time for slide 's1'", "line 3: time '-3'", "line 4: time 'nan'",
                     "line 5: event 'yes' of slide 's4' must be 1 (event observed) or 0 (censored)",
                     "line 6: empty event", "case_id 'p6' has slides with different outcomes"):
        assert expected in message


def test_survival_training_names_the_missing_columns(tmp_path):
    with pytest.raises(BadInputError, match="missing column\\(s\\) time, event; required: slide_id, slide_path, "
                                            "time, event"):
        read_manifest(_manifest(tmp_path, "s1,a.svs\n", header="slide_id,slide_path"), require_label=False,
                      require_survival=True)


def _cohort_rows(tmp_path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    lines = [f"s{i},a.svs,p{i // 2},{rng.exponential(30):.1f},{int(rng.random() < 0.6)}" for i in range(0, n, 2)]
    lines = [line for line in lines for _ in range(2)]  # two slides per patient, same outcome
    lines = [f"s{i}" + line[line.index(","):] for i, line in enumerate(lines)]
    return read_manifest(_manifest(tmp_path, "\n".join(lines) + "\n"), require_label=False, require_survival=True)


def test_survival_splits_keep_patients_whole_and_events_in_both_splits(tmp_path):
    rows = _cohort_rows(tmp_path, n=80)
    splits = survival_splits(rows, val_fraction=0.25, seed=3)
    for case in {r.case_id for r in rows}:
        assert len({splits[r.slide_id] for r in rows if r.case_id == case}) == 1
    for split in ("train", "val"):
        members = [r for r in rows if splits[r.slide_id] == split]
        assert sum(r.event for r in members) > 0 and any(r.event == 0 for r in members)
    assert splits == survival_splits(rows, val_fraction=0.25, seed=3)
    check_events_in_splits(rows, splits, "m.csv")


def test_a_split_without_events_is_refused_with_its_name(tmp_path):
    rows = _cohort_rows(tmp_path, n=8)
    splits = {r.slide_id: ("val" if r.event == 0 else "train") for r in rows}
    expected = r"no event \(event = 1\) in split\(s\) val \(\d+ slide\(s\), all censored\)"
    with pytest.raises(BadInputError, match=expected):
        check_events_in_splits(rows, splits, "m.csv")


def test_survival_task_dispatches_to_cox_or_discrete_time_and_gives_risks():
    target = torch.tensor([[3.0, 1, 0], [5.0, 0, 1], [1.0, 1, 0]])
    cox = Task("survival", 1, "survival")
    risk = torch.tensor([[0.2], [-0.1], [0.9]])
    assert cox.is_cox and cox.n_outputs == 1
    assert float(cox.loss(risk, target)) == pytest.approx(float(cox_partial_nll(risk[:, 0], target[:, 0],
                                                                                target[:, 1])))
    assert cox.risk(risk).tolist() == pytest.approx([0.2, -0.1, 0.9])
    nll = Task("survival", 4, "survival")
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert float(nll.loss(logits, target)) == pytest.approx(float(discrete_time_nll(logits, target[:, 2].long(),
                                                                                    target[:, 1])))
    curve = nll.probabilities(logits)
    assert curve.shape == (3, 4) and (curve[:, 1:] <= curve[:, :-1]).all()
    with pytest.raises(BadInputError, match="expected \\(3, 3\\): time, event, bin"):
        nll.loss(logits, target[:, :2])
    with pytest.raises(BadInputError, match="no risk score"):
        Task("label", 2, "binary").risk(torch.zeros(3))


class _Burden:
    def __init__(self, percent):
        self.percent = percent

    def lesion_area_fraction(self):
        return self.percent / 100


def test_generated_survival_is_shorter_with_more_lesion_and_censored_at_random():
    outcomes = SurvivalOutcomes()
    specs = [_Burden(0.0)] * 2000 + [_Burden(10.0)] * 2000
    time, event = draw_survival(specs, outcomes, np.random.default_rng(0))
    clean, burdened = time[:2000], time[2000:]
    assert np.median(burdened) < np.median(clean) / 3  # rate exp(0.2 * 10) = 7.4 times higher
    assert 0.05 < 1 - event.mean() < 0.95 and time.max() <= outcomes.follow_up and time.min() > 0
    again, _ = draw_survival(specs, outcomes, np.random.default_rng(0))
    assert (again == time).all()
