"""Survival (time-to-event) outcomes: losses, batches, metrics and Kaplan-Meier risk groups.

The losses and batching need only torch and numpy; the metrics and Kaplan-Meier curves use
scikit-survival (the ``survival`` extra).
"""

from .groups import (
    GROUP_NAMES,
    KaplanMeier,
    assign_groups,
    kaplan_meier,
    logrank_p_value,
    plot_kaplan_meier,
    risk_cutoffs,
)
from .losses import TimeBins, cox_partial_nll, discrete_risk, discrete_survival, discrete_time_nll
from .metrics import (
    bootstrap_interval,
    default_times,
    harrell_c_index,
    integrated_brier_score,
    survival_metrics,
    time_dependent_auc,
    uno_c_index,
)
from .sampling import event_batches, survival_strata

__all__ = [
    "GROUP_NAMES", "KaplanMeier", "TimeBins", "assign_groups", "bootstrap_interval", "cox_partial_nll",
    "default_times", "discrete_risk", "discrete_survival", "discrete_time_nll", "event_batches",
    "harrell_c_index", "integrated_brier_score", "kaplan_meier", "logrank_p_value", "plot_kaplan_meier",
    "risk_cutoffs", "survival_metrics", "survival_strata", "time_dependent_auc", "uno_c_index",
]
