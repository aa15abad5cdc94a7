"""The configuration of a training run: one dataclass, read from and written to YAML.

Precedence: built-in defaults < YAML file (``--config``) < command-line options. The resolved
configuration is saved as ``<run>/config.yaml`` and inside every checkpoint, so a run can be
repeated with ``ipspath train --config <run>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.errors import BadInputError
from ips_path.runtime.limits import EMBEDDING_DIM
from ips_path.runtime.names import check_feature_name
from ips_path.slides.manifest import LABEL_CASES, OPTIONAL_COLUMNS, REQUIRED_COLUMNS

__all__ = ["MONITORS", "RUNTIME_FIELDS", "TrainConfig", "load_config", "resolve_config", "save_config"]

MONITORS = ("auc", "balanced_accuracy", "loss", "c_index", "pearson")
TASKS = ("classification", "survival", "regression")
#: What the default monitor ``auc`` means for a task without classes; the monitors each task allows.
TASK_MONITORS = {"classification": ("auc", "balanced_accuracy", "loss"), "survival": ("c_index", "loss"),
                 "regression": ("pearson", "loss")}
SURVIVAL_LOSSES = ("cox", "nll")
REGRESSION_LOSSES = ("mse", "huber")
SCORES = ("logit", "paper")
EXPLORE_MODES = ("uniform", "atypical")
FEATURE_NORMS = ("auto", "layer", "none")
POS_ENCODINGS = ("none", "1d", "2d")
# Settings that change where and how fast a run computes, not its result: a resumed run may change them.
RUNTIME_FIELDS = ("device", "threads")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (defaults: a CPU demo that is also sane on a GPU).

    Attributes
    ----------
    encoder : str
        Patch encoder: ``resnet18``, ``resnet34``, ``resnet50``, ``smallcnn`` or ``timm:<name>``.
        Ignored with ``features``.
    pretrained : str or None
        Local weights file of the encoder, loaded when the run starts. Nothing is downloaded.
    train_blocks : int or None
        With a ViT preset encoder (``uni_v1``, ...): fine-tune only its last K transformer blocks,
        each under activation checkpointing; the others stay frozen. None: train the whole encoder.
    features : str or None
        Train on the cached embeddings ``features/<name>`` of the tile stores (``ipspath features``)
        instead of pixels; the encoder is then a small projector over them.
    feature_norm : {"auto", "layer", "none"}
        With ``features``: whether the projector starts with a LayerNorm over each patch's features
        (see :class:`~ips_path.model.encoders.FeatureProjector`). ``"none"`` keeps how large each
        feature is, which a LayerNorm erases: needed for a few handcrafted features per patch.
        ``"auto"``: ``"none"`` for features of a measurement encoder (``stain_density``), ``"layer"``
        for learned embeddings; a run saves what it chose.
    n_select : int
        M, patches per slide kept for the gradient step.
    chunk_size : int
        I, patches encoded at a time while selecting (memory grows with M + I, never with the slide).
    dim, heads : int
        Embedding size D of the aggregator and its attention heads.
    score : {"logit", "paper"}
        Selection score, see :class:`~ips_path.model.IPSModel`.
    pos_encoding : {"none", "1d", "2d"}
        Positional encoding of the patches: none, stream index (the paper) or grid position.
    epochs : int
        Epochs at most (early stopping may end the run sooner).
    batch_size : int
        Slides per optimiser step (per process under torchrun).
    lr, weight_decay : float
        AdamW peak learning rate and decoupled weight decay (on weights of rank >= 2 only).
    warmup_epochs : float
        Linear warm-up of the learning rate from 0, then cosine decay to 0 at the last step; per step.
    grad_clip : float
        Largest gradient norm (clipped before each step); 0: no clipping.
    class_weights : bool
        Weight the loss of each class by ``n_slides / (n_classes * n_slides_of_class)`` (training slides).
    patience : int
        Stop after this many epochs without a better validation ``monitor``; 0: never stop early.
    monitor : {"auc", "balanced_accuracy", "loss", "c_index"}
        Validation metric of ``best.pt`` and early stopping (loss: lower is better). Survival tasks
        have no AUC: there the default ``auc`` means ``c_index`` (Harrell's), and ``balanced_accuracy``
        is refused.
    augment : bool
        Random flips, 90° rotations and colour jitter of training patches.
    stain_norm : bool
        Bring each slide's staining to one reference before the encoder (:mod:`ips_path.slides.stain`), in
        training and, from the saved configuration, in prediction. For cohorts whose staining varies
        between slides (labs, stainers, days).
    threads : int
        Threads reading patches from the slide files.
    device : str
        ``auto`` (cuda when available), ``cpu``, ``cuda``, ``cuda:1``.
    seed : int
        Seeds initialisation, shuffling, augmentation and dropout; CPU runs repeat exactly.
    val_fraction : float
        Share of patients per label put in validation when the manifest has no ``split``.
    checkpoint_grads : bool
        Activation checkpointing of the gradient phase (needs ``grad_chunk_size``): memory flat in M.
    grad_chunk_size : int or None
        Re-encode the selected patches with gradients in pieces of at most this many.
    mpp, patch_size : float or int or None
        Patch resolution (µm/px) and size (px) the run asks of the tile stores; None: the stores'
        (they must agree).
    task : {"classification", "survival", "regression"}
        Classify the manifest's ``label`` (or ``label_columns``), learn a risk score from its ``time``
        and ``event``, or a number from the one column ``label_columns`` names (the outcome kinds of
        :mod:`ips_path.tasks`).
    label_columns : str
        Comma-separated manifest columns to classify, each one task (its own query token and head, a
        softmax over the column's sorted values); default the one ``label`` column. With several
        columns the loss is the sum of the tasks' losses, a slide whose cell is empty for a task counts
        for nothing in that task's loss, and ``best.pt`` follows the mean of the tasks' validation
        ``monitor`` (see :mod:`ips_path.tasks.label_columns`).
    survival_loss : {"cox", "nll"}
        Survival only: Cox partial likelihood over each batch (one risk output; batches always hold an
        event), or the discrete-time negative log-likelihood over ``time_bins`` bins (a survival curve).
    regression_loss : {"mse", "huber"}
        Regression only: mean squared error, or the Huber loss (delta 1 standard deviation of the
        training targets), of the standardised target.
    time_bins : int
        Survival ``nll`` only: bins cut at quantiles of the training event times.
    time_unit : str
        Survival only: the unit of the manifest's ``time`` column, as shown on plots and reports.
    risk_groups : int
        Survival only: Kaplan-Meier risk groups, cut at the median (2) or tertiles (3) of the
        training slides' risks.
    explore : float
        Share of M drawn at random from the rest of each training slide instead of by score, so that
        patches the model overlooks still reach the gradient phase (0: the paper's greedy top-M).
        Validation and prediction always select greedily. The default 0.5 is what found micro-lesions
        where greedy selection locked onto other patches (README, small lesions).
    explore_mode : {"uniform", "atypical"}
        How that share is drawn: uniformly at random, or the patches farthest from their slide's mean
        embedding (standardised per dimension), i.e. the rarest patches of the slide, where a
        micro-lesion is (see the README's small-lesion section).
    instance_loss : float
        Weight of a CLAM-style instance loss on the selection scores (0: off): the ``instance_k``
        best-scored trained patches of a positive slide count as positive, its ``instance_k`` worst and
        the best of a negative slide as negative. Two classes only; the second sorted class name is
        the positive one.
    instance_k : int
        Patches per slide at each end of that ranking.
    label_case : {"exact", "fold"}
        Labels of a column that differ only in case ('Positive', 'positive'): refused (``exact``), or
        merged into one class spelled as most slides spell it (``fold``).
    """

    encoder: str = "smallcnn"
    pretrained: str | None = None
    train_blocks: int | None = None
    features: str | None = None
    feature_norm: str = "auto"
    n_select: int = 32
    chunk_size: int = 128
    dim: int = 128
    heads: int = 8
    score: str = "logit"
    pos_encoding: str = "none"
    epochs: int = 30
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup_epochs: float = 2.0
    grad_clip: float = 1.0
    class_weights: bool = False
    patience: int = 10
    monitor: str = "auc"
    augment: bool = True
    stain_norm: bool = False
    threads: int = 4
    device: str = "auto"
    seed: int = 0
    val_fraction: float = 0.2
    checkpoint_grads: bool = False
    grad_chunk_size: int | None = None
    mpp: float | None = None
    patch_size: int | None = None
    task: str = "classification"
    label_columns: str = "label"
    survival_loss: str = "cox"
    regression_loss: str = "mse"
    time_bins: int = 4
    time_unit: str = "months"
    risk_groups: int = 2
    explore: float = 0.5
    explore_mode: str = "uniform"
    instance_loss: float = 0.0
    instance_k: int = 2
    label_case: str = "exact"

    def __post_init__(self) -> None:
        if self.task in TASK_MONITORS and self.monitor == "auc":
            object.__setattr__(self, "monitor", TASK_MONITORS[self.task][0])  # the default monitor, in the task's terms
        problems = []
        for name in ("lr", "weight_decay", "warmup_epochs", "grad_clip", "val_fraction", "mpp", "explore",
                     "instance_loss"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                problems.append(f"{_option(name)} must be a finite number, got {value}")
        finite = not problems
        for name in ("n_select", "chunk_size", "dim", "heads", "epochs", "batch_size", "threads", "instance_k"):
            if getattr(self, name) < 1:
                problems.append(f"{_option(name)} must be >= 1, got {getattr(self, name)}")
        if self.dim >= 1 and EMBEDDING_DIM.problem(self.dim):
            problems.append(f"--dim {EMBEDDING_DIM.problem(self.dim)}")
        for name in ("grad_chunk_size", "patch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{_option(name)} must be >= 1 (or unset), got {value}")
        if finite and not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "warmup_epochs", "grad_clip", "patience"):
            if finite and getattr(self, name) < 0:
                problems.append(f"{_option(name)} must be >= 0, got {getattr(self, name)}")
        if finite and self.mpp is not None and not self.mpp > 0:
            problems.append(f"--mpp must be a positive µm/px, got {self.mpp}")
        if finite and not 0 <= self.explore <= 1:
            problems.append(f"--explore must be a share of M in [0, 1], got {self.explore}")
        if finite and not self.instance_loss >= 0:
            problems.append(f"--instance-loss must be >= 0, got {self.instance_loss}")
        if self.instance_loss > 0 and self.task != "classification":
            problems.append(f"--instance-loss is for classification with two classes; set it to 0 for {self.task}")
        if finite and not 0 <= self.val_fraction < 1:
            problems.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.seed < 2**63:
            problems.append(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.dim >= 1 and self.heads >= 1 and self.dim % self.heads:
            problems.append(f"--heads ({self.heads}) must divide --dim ({self.dim})")
        if self.pos_encoding == "2d" and self.dim % 4:
            problems.append(f"--pos-encoding 2d needs --dim divisible by 4, got {self.dim}")
        for name, allowed in (("score", SCORES), ("pos_encoding", POS_ENCODINGS), ("monitor", MONITORS),
                              ("task", TASKS), ("survival_loss", SURVIVAL_LOSSES),
                              ("regression_loss", REGRESSION_LOSSES),
                              ("explore_mode", EXPLORE_MODES), ("feature_norm", FEATURE_NORMS),
                              ("label_case", LABEL_CASES)):
            if getattr(self, name) not in allowed:
                problems.append(f"{_option(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.features is not None:
            try:
                check_feature_name(self.features, "--features")
            except BadInputError as exc:
                problems.append(str(exc))
        if self.feature_norm == "none" and self.features is None:
            problems.append("--feature-norm is for cached features (--features); pixels have no feature LayerNorm")
        if self.train_blocks is not None and (self.train_blocks < 0 or self.features is not None):
            problems.append(f"--train-blocks must be >= 0 and needs pixels (no features), got {self.train_blocks}")
        allowed_monitors = TASK_MONITORS.get(self.task, MONITORS)
        if self.monitor in MONITORS and self.monitor not in allowed_monitors:
            problems.append(f"monitor {self.monitor} does not exist for {self.task}; use "
                            f"{', '.join(allowed_monitors[:-1])} or {allowed_monitors[-1]}")
        if self.task != "classification" and self.class_weights:
            problems.append(f"class_weights is for classification; {self.task} tasks have no classes")
        if self.time_bins < 2:
            problems.append(f"--time-bins must be >= 2, got {self.time_bins}")
        if self.risk_groups not in (2, 3):
            problems.append(f"--risk-groups must be 2 (median split) or 3 (tertiles), got {self.risk_groups}")
        problems += _label_column_problems(self)
        if self.checkpoint_grads and self.grad_chunk_size is None:
            problems.append("--checkpoint-grads needs --grad-chunk-size (patches per checkpointed piece)")
        if problems:
            raise BadInputError("bad training configuration: " + "; ".join(problems))

    @property
    def label_column_names(self) -> tuple[str, ...]:
        """The manifest columns a classification run learns, one task each (``label_columns`` split at commas)."""
        return tuple(name.strip() for name in self.label_columns.split(","))

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (YAML- and checkpoint-safe: str, int, float, bool, None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "configuration") -> TrainConfig:
        """Build from a mapping of field names (``-`` or ``_``); unknown keys and bad types are refused.

        Raises
        ------
        BadInputError
            Naming ``source``, every unknown key and every value of the wrong type.
        """
        known = {f.name: f for f in fields(cls)}
        problems, clean = [], {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                problems.append(_unknown_key(raw_key, known))
                continue
            kind, optional = _field_type(known[key])
            if key == "label_columns" and isinstance(value, list) and all(isinstance(v, str) for v in value):
                value = ",".join(value)  # a YAML list of columns
            try:
                clean[key] = _coerce(value, kind, optional)
            except TypeError:
                problems.append(f"{raw_key}: {value!r} is not a{'n' if kind is int else ''} {kind.__name__}"
                                f"{' or null' if optional else ''}")
        if problems:
            raise BadInputError(f"{source}: {'; '.join(problems)}")
        return cls(**clean)


def _label_column_problems(config: TrainConfig) -> list[str]:
    """What is wrong with ``label_columns`` on its own (whether the manifest has them is checked on reading it)."""
    names = config.label_column_names
    reserved = [n for n in names if n in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) and n != "label"]
    problems = []
    if not all(names):
        problems.append(f"--label-columns {config.label_columns!r} has an empty name; give column names separated "
                        "by commas, e.g. grade,her2")
    elif len(set(names)) < len(names):
        problems.append(f"--label-columns {config.label_columns!r} names a column twice")
    elif reserved:
        problems.append(f"--label-columns cannot learn the manifest's {', '.join(reserved)} column(s)")
    elif any(c in n for n in names for c in ".=/\\"):
        problems.append(f"--label-columns {config.label_columns!r}: a column name with '.', '=', '/' or '\\' cannot "
                        "name a task; rename the column")
    if names != ("label",) and config.task == "survival":
        problems.append("--label-columns is for classification and regression; survival learns the time and event "
                        "columns")
    if len(names) > 1 and config.task == "regression":
        problems.append("--label-columns: a regression learns one column; give one")
    if len(names) > 1 and config.instance_loss > 0:
        problems.append("--instance-loss needs one label column with two classes; set it to 0 with several columns")
    return problems


def _unknown_key(raw_key: Any, known: Mapping[str, Any]) -> str:
    """The problem line of a key no setting has, with the closest setting's name when one is close."""
    close = difflib.get_close_matches(str(raw_key).replace("-", "_"), list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else " (a run's config.yaml lists every setting)"
    return f"unknown key {raw_key!r}{hint}"


def _option(name: str) -> str:
    """The command-line spelling of a setting (``warmup_epochs`` -> ``--warmup-epochs``)."""
    return "--" + name.replace("_", "-")


def _field_type(field: dataclasses.Field) -> tuple[type, bool]:
    """The value type of a field and whether it may be None (annotations are strings here)."""
    name = str(field.type)
    return {"str": str, "int": int, "float": float, "bool": bool}[name.removesuffix(" | None")], "None" in name


# A number as people write it, which YAML 1.1 (PyYAML) leaves a string: 3e-4, 1E5, +2, 1_000.
_NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, kind: type, optional: bool) -> Any:
    if isinstance(value, str) and kind in (int, float) and _NUMBER.fullmatch(value.strip()):
        number = float(value.strip().replace("_", ""))
        if kind is float:
            return number
        if number.is_integer():  # an integer written as 1e3
            return int(number)
        raise TypeError(value)
    if value is None:
        if optional:
            return None
        raise TypeError(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(value)
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise TypeError(value)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a YAML file as a dict (validated later by :func:`resolve_config`).

    Raises
    ------
    BadInputError
        The file is missing, not YAML, or not a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BadInputError(f"{path}: not valid YAML ({exc})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise BadInputError(f"{path}: a config file must be a mapping of settings (key: value)")
    return values


def resolve_config(config_file: str | os.PathLike | None = None,
                   overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (values None are ignored: option not given)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update({str(k).replace("-", "_"): v for k, v in load_config(config_file).items()})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig.from_dict(values, source=str(config_file) if config_file else "options")


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the configuration as YAML, atomically."""
    import yaml

    text = yaml.safe_dump(config.as_dict(), sort_keys=False)
    write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))
