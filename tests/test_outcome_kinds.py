"""The outcome kinds' interface: one registry, no kind branches in the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ips_path
from ips_path.config import TrainConfig
from ips_path.runtime.errors import BadInputError
from ips_path.tasks import KINDS, Classification, Regression, Survival, kind_for
from ips_path.tasks.base import OutcomeKind, register_kind

PACKAGE = Path(ips_path.__file__).parent
# The stages' code that asks its kind instead of branching on it; the layout rules (the model and the kinds'
# imports) are in test_layout.py.
PIPELINE = ("training/train.py", "inference/predict.py", "training/cross_validation.py", "inference/predictions.py",
            "training/checkpoint.py", "review/report.py", "training/trained_runs.py")


def test_every_kind_is_registered_under_its_task_name():
    assert KINDS == {"classification": Classification, "regression": Regression, "survival": Survival}
    assert isinstance(kind_for(TrainConfig(task="survival")), Survival)


def test_a_new_kind_is_found_by_its_name_once_registered():
    @register_kind("toy")
    class Toy(OutcomeKind):
        pass
    try:
        assert KINDS["toy"] is Toy and Toy.name == "toy"
    finally:
        del KINDS["toy"]
    config = TrainConfig()
    object.__setattr__(config, "task", "toy")  # what config.py would refuse, once the kind is gone again
    with pytest.raises(BadInputError, match="--task 'toy' is not one of classification"):
        kind_for(config)


def test_the_pipeline_names_no_outcome_kind():
    """No string naming a kind (nor its checkpoint entries) outside docstrings: the pipeline asks its kind."""
    names = {*KINDS, "task_classes", "c_index", "risk", "several"}
    for name in PIPELINE:
        tree = ast.parse((PACKAGE / name).read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        found = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                 and isinstance(node.value, str) and id(node) not in docstrings and node.value in names}
        attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                      and node.attr in {"several", "label_tasks", "survival", "is_cox"}}
        assert not found and not attributes, f"{name}: {found | attributes}"
