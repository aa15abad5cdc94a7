"""Outcome kinds: what a model predicts of a slide, and everything that differs between kinds.

:class:`~ips_path.tasks.base.OutcomeKind` is the interface; each kind is a module whose class is
registered under its ``--task`` name (``@register_kind``). Importing it below registers it: a new
kind is one module and one line here (see ``docs/outcome_kinds.md``).
"""

from ips_path.tasks.base import (
                                 KINDS,
                                 OutcomeKind,
                                 ReportSection,
                                 SlideScores,
                                 kind_for,
                                 kind_of_checkpoint,
                                 kind_of_run,
)
from ips_path.tasks.label import Classification  # --task classification: one label column or several
from ips_path.tasks.regression import Regression  # --task regression: one numeric column
from ips_path.tasks.survival.kind import Survival  # --task survival: time and event

__all__ = ["KINDS", "Classification", "OutcomeKind", "Regression", "ReportSection", "SlideScores", "Survival",
           "kind_for", "kind_of_checkpoint", "kind_of_run"]
