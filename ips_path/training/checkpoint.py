"""Checkpoints of a training run: the model they describe, how they are written, read and identified.

A checkpoint (``last.pt``, ``best.pt``) is one ``torch.save`` dict, read with ``weights_only=True``
(no code runs): weights, optimiser, schedule, early-stopping state, history, the RNG states of every
process, the resolved configuration, class names and tiling parameters. Prediction needs this module
only, never the training code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ips_path import __version__
from ips_path.config import TrainConfig
from ips_path.model import IPSModel, Task, build_encoder
from ips_path.model.foundation import ENCODER_PRESETS, require_preset_weights
from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.errors import BadInputError, IpspathError
from ips_path.runtime.identity import file_digest, identity_key
from ips_path.stores.loader import PatchStreamer
from ips_path.tasks import OutcomeKind, kind_of_checkpoint
from ips_path.training.distributed import Processes, rng_state

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "TASK_NAME", "CheckpointIdentity", "RunState", "build_model",
           "checkpoint_identity", "load_checkpoint", "load_model", "models_identity", "read_checkpoint_file"]

TASK_NAME = "label"  # the task of the default label column
CHECKPOINT_FORMAT = "ipspath.checkpoint"
CHECKPOINT_VERSION = 1


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...


def build_model(config: TrainConfig, heads: int | Sequence[int] | Sequence[Task], in_features: int | None = None, *,
                load_pretrained: bool = True) -> IPSModel:
    """The IPS model a configuration describes, with the heads of its outcome kind.

    Parameters
    ----------
    config : TrainConfig
    heads : sequence of Task, or int or sequence of int
        The model's tasks (:meth:`~ips_path.tasks.OutcomeKind.model_tasks`), or the classes of the one
        label column, or of each of ``config.label_column_names`` in order (one multiclass task each).
    in_features : int, optional
        Dimension of the cached features (``config.features`` runs).
    load_pretrained : bool
        Load ``config.pretrained`` into the encoder (not when the weights come from a checkpoint).
    """
    if config.features is not None:
        if config.feature_norm == "auto":
            raise BadInputError("feature_norm 'auto' is chosen from the cached features when training starts "
                                "(ips_path.training.train_slides.resolve_feature_norm); give 'layer' or 'none' here")
        encoder = build_encoder("features", in_features=in_features, out_dim=config.dim,
                                layer_norm=config.feature_norm == "layer")
    else:
        if config.train_blocks is not None and config.encoder not in ENCODER_PRESETS:
            raise BadInputError(f"--train-blocks needs a ViT preset encoder ({', '.join(ENCODER_PRESETS)}), "
                                f"not {config.encoder!r}")
        if load_pretrained:
            require_preset_weights(config.encoder, config.pretrained)
        blocks = {} if config.train_blocks is None else {"train_blocks": config.train_blocks}
        encoder = build_encoder(config.encoder, pretrained=config.pretrained if load_pretrained else None, **blocks)
    if isinstance(heads, int) or not all(isinstance(h, Task) for h in heads):
        counts, names = [heads] if isinstance(heads, int) else list(heads), config.label_column_names
        if len(counts) != len(names):
            raise BadInputError(f"{len(counts)} class count(s) for the {len(names)} label column(s) {', '.join(names)}")
        tasks = [Task(name, n, "multiclass") for name, n in zip(names, counts, strict=True)]
    else:
        tasks = list(heads)
    return IPSModel(encoder, tasks, dim=config.dim, n_heads=config.heads,
                    n_select=config.n_select, chunk_size=config.chunk_size, score=config.score,
                    pos_encoding=None if config.pos_encoding == "none" else config.pos_encoding,
                    grad_chunk_size=config.grad_chunk_size, checkpoint=config.checkpoint_grads)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (``weights_only=True``, onto the CPU).

    Keys: ``model``, ``optimizer``, ``scheduler``, ``epoch``, ``status``, ``config`` (dict),
    ``class_names``, ``tiling`` (``target_mpp``, ``patch_size``), ``in_features``, ``early_stopping``,
    ``history``, ``rng``, ``format``, ``format_version``, ``ipspath_version``, and what the run's
    outcome kind keeps (:meth:`~ips_path.tasks.OutcomeKind.state`; one entry per kind, e.g. ``task_classes``).

    Raises
    ------
    BadInputError
        Missing, unreadable, or not an ipspath checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: checkpoint not found")
    return read_checkpoint_file(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "training checkpoint",
                                "give a best.pt or last.pt that `ipspath train` wrote")


def read_checkpoint_file(path: Path, fmt: str, version: int, what: str, fix: str) -> dict[str, Any]:
    """A checkpoint of format ``fmt`` (at most ``version``) read with ``weights_only=True`` onto the CPU.

    ``what`` names the kind of checkpoint and ``fix`` what to do, in the one-line refusals (BadInputError)
    of a damaged or foreign file or one written by a newer ipspath.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged or foreign file
        # torch's own explanation runs over many lines and suggests weights_only=False, which would run
        # whatever code the file holds: name the error only
        raise BadInputError(f"{path}: not a readable checkpoint ({type(exc).__name__}); {fix}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != fmt:
        raise BadInputError(f"{path}: not an ipspath {what}; {fix}")
    if int(checkpoint.get("format_version", 0)) > version:
        raise BadInputError(f"{path}: {what} format {checkpoint['format_version']} is newer than this "
                            f"ipspath ({__version__}) reads; upgrade ipspath")
    return checkpoint


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[IPSModel, dict[str, Any]]:
    """The model of a checkpoint, in eval mode on ``device``, and the checkpoint (for class names, tiling).

    Needs no file but the checkpoint (``pretrained`` weights are not read again).
    """
    checkpoint = load_checkpoint(path)
    config = TrainConfig.from_dict(checkpoint["config"], source=str(path))
    kind = kind_of_checkpoint(checkpoint, source=str(path))
    model = build_model(config, kind.model_tasks(), checkpoint["in_features"], load_pretrained=False)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


@dataclass
class RunState:
    """What a checkpoint holds, and where it is written."""

    out_dir: Path
    config: TrainConfig
    kind: OutcomeKind
    tiling: dict[str, Any]
    in_features: int | None
    model: IPSModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stopping: _Stateful
    history: list[dict[str, float]]
    streamer: PatchStreamer
    procs: Processes

    def save(self, name: str, *, epoch: int, status: str) -> None:
        """Write ``<out_dir>/<name>`` atomically (rank 0; the others only hand over their RNG states)."""
        rng = [rng_state(self.streamer, self.procs.device)]
        if self.procs.distributed:
            rng = [None] * self.procs.world_size
            dist.all_gather_object(rng, rng_state(self.streamer, self.procs.device))
        if not self.procs.is_main:
            return
        checkpoint = {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "ipspath_version": __version__,
            "epoch": epoch, "status": status,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "early_stopping": self.stopping.state_dict(),
            "history": self.history, "rng": rng,
            "config": self.config.as_dict(), "class_names": list(self.kind.class_names),
            "task": self.model.tasks[0].name,
            "tiling": self.tiling, "in_features": self.in_features, **self.kind.state(),
        }
        write_atomically(self.out_dir / name, lambda partial: torch.save(checkpoint, partial))


@dataclass(frozen=True)
class CheckpointIdentity:
    """What a checkpoint file is, so that outputs and caches can be keyed by it rather than by its path.

    Attributes
    ----------
    path : Path
        The checkpoint file (resolved).
    sha256 : str
        Hex digest of the file's bytes.
    config : dict
        Its resolved training configuration.
    class_names : tuple of str
        As the outcome kind names them (e.g. the flat ``<task>=<class>`` names of several label columns).
    tiling : dict
        ``target_mpp`` (µm/px) and ``patch_size`` (px) of the tile stores it was trained on.
    """

    path: Path
    sha256: str
    config: dict[str, Any] = field(compare=False, hash=False)
    class_names: tuple[str, ...]
    tiling: dict[str, Any] = field(compare=False, hash=False)

    @property
    def key(self) -> str:
        """Hex SHA-256 of the file digest, configuration, class names and tiling (64 characters)."""
        return identity_key({"sha256": self.sha256, "config": self.config, "class_names": self.class_names,
                             "tiling": self.tiling}, length=64)

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe description (for records such as ``run.json``)."""
        return {"path": str(self.path), "sha256": self.sha256, "key": self.key, "config": self.config,
                "class_names": list(self.class_names), "tiling": self.tiling}


_identities: dict[tuple[str, int, int], CheckpointIdentity] = {}


def checkpoint_identity(path: str | os.PathLike) -> CheckpointIdentity:
    """The identity of a checkpoint file: its digest, configuration, class names and tiling.

    Computed once per (path, size, mtime_ns) in a process: a checkpoint rewritten in place (a
    training run moving ``best.pt``) gets a new identity, an unchanged one costs a ``stat``.

    Raises
    ------
    BadInputError
        As :func:`load_checkpoint`.
    """
    path = Path(path).resolve()
    for _ in range(3):  # a checkpoint renamed into place while it is read is read again
        try:
            before = path.stat()
        except OSError:
            raise BadInputError(f"{path}: checkpoint not found") from None
        cache_key = (str(path), before.st_size, before.st_mtime_ns)
        identity = _identities.get(cache_key)
        if identity is not None:
            return identity
        checkpoint = load_checkpoint(path)
        identity = CheckpointIdentity(path, file_digest(path), dict(checkpoint["config"]),
                                      tuple(checkpoint["class_names"]), dict(checkpoint["tiling"]))
        after = path.stat()
        if (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns):
            _identities[cache_key] = identity
            return identity
    raise IpspathError(f"{path}: the checkpoint kept changing while it was read; wait for training to finish")


def models_identity(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The identity of the model that predicts: one checkpoint, or the ensemble of a cross-validation's folds.

    One checkpoint: ``sha256``, ``config``, ``class_names``, ``tiling`` (as :func:`checkpoint_identity`).
    Several (the folds, in order): ``folds`` (``fold_<i>`` -> its ``sha256`` and ``config``) with the
    shared ``class_names`` and ``tiling``, so that changing any one fold model changes the identity.

    Raises
    ------
    BadInputError
        A checkpoint cannot be read, or the folds disagree on class names or tiling.
    """
    found = [checkpoint_identity(p) for p in paths]
    first = found[0]
    if len(found) == 1:
        return {"sha256": first.sha256, "config": first.config, "class_names": list(first.class_names),
                "tiling": first.tiling}
    for other in found[1:]:
        if other.class_names != first.class_names or other.tiling != first.tiling:
            raise BadInputError(f"{other.path}: its classes or tiling differ from {first.path}'s; the folds of one "
                                "cross-validation must be trained on the same manifest and tiles")
    return {"folds": {f"fold_{i}": {"sha256": f.sha256, "config": f.config} for i, f in enumerate(found)},
            "class_names": list(first.class_names), "tiling": first.tiling}
