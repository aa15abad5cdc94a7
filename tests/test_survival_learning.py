"""A survival model learns to rank patients on a generated cohort where lesion burden sets the risk."""

import pytest

pytest.importorskip("sksurv", reason="survival metrics need the survival extra (scikit-survival)")


@pytest.mark.slow
def test_cox_model_ranks_held_out_patients_by_their_lesion_burden(tmp_path):
    """bench/survival_bench.py, smaller: 40 patients to train and validate on, 24 held out, 4 epochs."""
    from bench.survival_bench import run

    result = run(tmp_path, patients=40, test_patients=24, epochs=4)
    test = result["test"]
    assert result["oracle_c_index"]["test"] > 0.7  # the cohort can be learned: the true rates rank it
    assert test["c_index"] >= 0.65, result  # chance is 0.5
    assert test["c_index_low"] > 0.5, result
