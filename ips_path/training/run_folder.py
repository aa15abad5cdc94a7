"""The folder of a training run: who may write it, how a run starts or resumes there, and in what order.

One run at a time writes a run folder (:func:`run_folder_lock`, the per-output lock of
:mod:`ips_path.runtime.locks`); leftovers of a run killed while writing (hidden ``.partial-*`` files) are
removed when the next run takes the lock.

Order of the writes that end an epoch, each separated by a fault point (:mod:`ips_path.runtime.faults`)::

    metrics.csv  ->  curves.png  ->  best.pt (if the epoch is the best)  ->  last.pt

``last.pt`` marks the epoch done, so everything it refers to is written before it. A run killed
between two of these writes resumes (``--resume``) to what an uninterrupted run gives:

* before ``best.pt``: ``last.pt`` holds the previous epoch, which is redone; ``metrics.csv`` and
  ``curves.png`` are rewritten from the checkpoint's history.
* between ``best.pt`` and ``last.pt``: ``best.pt`` holds the whole state at the end of the epoch (a
  checkpoint is the same whichever name it is saved under), so the run continues from it and
  ``last.pt`` is rewritten as its copy.
* a run killed under the earlier order (``last.pt`` before ``best.pt``) may have a ``last.pt`` that
  names its own epoch the best while ``best.pt`` holds an older one: ``best.pt`` is rebuilt from it.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ips_path.config import RUNTIME_FIELDS, TrainConfig
from ips_path.evaluation.plots import plot_training_curves
from ips_path.runtime.atomic import write_atomically, write_csv
from ips_path.runtime.errors import BadInputError, listing
from ips_path.runtime.faults import fault_point
from ips_path.runtime.locks import output_lock
from ips_path.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

__all__ = ["RunStart", "check_same_run", "main_process", "repair_run_folder", "resumed_config", "run_folder_lock",
           "start_or_resume", "write_csv", "write_epoch_records"]

CHECKPOINTS = ("last.pt", "best.pt")


@dataclass
class RunStart:
    """Where a resumed run continues from.

    Attributes
    ----------
    checkpoint : dict
        The newest finished state of the run.
    source : {"last.pt", "best.pt"}
        The file it was read from (``best.pt`` when the run was killed after writing it but before
        the ``last.pt`` of the same epoch).
    best_epoch_on_disk : int or None
        Epoch of the ``best.pt`` found (None: none, or unreadable).
    """

    checkpoint: dict[str, Any]
    source: str
    best_epoch_on_disk: int | None


@contextlib.contextmanager
def run_folder_lock(out_dir: Path, *, main: bool) -> Iterator[None]:
    """Hold the run folder's lock (on the main process) and clear a dead run's partial files.

    The folder is made for the lock; if this run leaves it empty (refused before writing), it is
    removed again, so a refused run leaves nothing behind.

    Raises
    ------
    OutputLockedError
        Another live run writes into ``out_dir`` (the line names its pid and host).
    BadInputError
        The folder cannot be made or written (read-only, disk full).
    """
    if not main:
        yield
        return
    existed = out_dir.exists()
    try:
        with output_lock(out_dir):
            for leftover in out_dir.glob(".*.partial-*"):  # the lock is ours: no live writer owns them
                log.info("removing %s, left by a run killed while writing it", leftover)
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
            yield
    finally:
        if not existed:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when empty


def start_or_resume(out_dir: Path, config: TrainConfig, resume: bool) -> RunStart | None:
    """The state a run continues from (``resume``), or None for a fresh run in a free folder.

    Raises
    ------
    BadInputError
        Nothing to resume; or a fresh run into a folder that holds a run's checkpoints.
    """
    last = out_dir / "last.pt"
    if not resume:
        present = [name for name in CHECKPOINTS if (out_dir / name).exists()]
        if present == ["last.pt"] and _untrained(last):
            log.info("%s: last.pt holds no trained epoch (the run stopped in its first epoch); starting afresh",
                     out_dir)
            return None
        if present:
            raise BadInputError(f"{out_dir} already holds a run ({', '.join(present)}); continue it with --resume, "
                                "or give another output folder")
        return None
    if not last.is_file():
        raise BadInputError(f"{out_dir}: no last.pt to resume from; start the run without --resume")
    checkpoint = load_checkpoint(last)
    best = _read_best(out_dir / "best.pt", checkpoint)
    if best is not None and best["epoch"] > checkpoint["epoch"]:
        log.info("%s: best.pt holds epoch %d, finished after last.pt's epoch %d (the run stopped between the two "
                 "writes); continuing from it", out_dir, best["epoch"], checkpoint["epoch"])
        return RunStart(best, "best.pt", int(best["epoch"]))
    return RunStart(checkpoint, "last.pt", None if best is None else int(best["epoch"]))


def _untrained(path: Path) -> bool:
    """Whether a last.pt holds the state of a run before its first epoch finished (nothing to lose)."""
    try:
        checkpoint = load_checkpoint(path)
    except BadInputError:
        return False
    return checkpoint["epoch"] == 0 and not checkpoint["history"]


def _read_best(path: Path, last: Mapping[str, Any]) -> dict[str, Any] | None:
    """best.pt when it is readable and of the same run as ``last``, else None (with a warning)."""
    if not path.is_file():
        return None
    try:
        best = load_checkpoint(path)
    except BadInputError as exc:
        log.warning("%s; it is rebuilt when the run next improves", exc)
        return None
    if best["config"] != last["config"] or list(best["class_names"]) != list(last["class_names"]):
        log.warning("%s belongs to another run than last.pt (other configuration or classes); it is replaced "
                    "when this run next improves", path)
        return None
    return best


def repair_run_folder(out_dir: Path, start: RunStart, history: Sequence[Mapping[str, float]]) -> None:
    """Make the run folder say what the state ``start`` says, after a run was killed between two writes."""
    if start.source == "best.pt":
        write_atomically(out_dir / "last.pt", lambda partial: shutil.copyfile(out_dir / "best.pt", partial))
    best_epoch = start.checkpoint["early_stopping"]["best_epoch"]
    if (start.source == "last.pt" and best_epoch == start.checkpoint["epoch"]
            and start.best_epoch_on_disk != best_epoch):
        log.warning("%s: rebuilding best.pt for epoch %d from last.pt (the run stopped before writing it)", out_dir,
                    best_epoch)
        write_atomically(out_dir / "best.pt", lambda partial: shutil.copyfile(out_dir / "last.pt", partial))
    if history:
        write_epoch_records(out_dir, history)


def write_epoch_records(out_dir: Path, history: Sequence[Mapping[str, float]]) -> None:
    """Write ``metrics.csv`` and ``curves.png`` for ``history`` (before the checkpoint that marks the epoch done)."""
    write_csv(out_dir / "metrics.csv", history)
    fault_point("train.metrics_written")
    plot_training_curves(history, out_dir / "curves.png")
    fault_point("train.curves_written")


def resumed_config(checkpoint: Mapping[str, Any], config: TrainConfig) -> TrainConfig:
    """The saved configuration with this invocation's runtime settings; other changes are refused."""
    saved = TrainConfig.from_dict(checkpoint["config"], source="the checkpoint")
    given, stored = config.as_dict(), saved.as_dict()
    if given["feature_norm"] == "auto":  # chosen once, from the features, when the run started
        given["feature_norm"] = stored["feature_norm"]
    changed = [f"{k} ({stored[k]!r} -> {given[k]!r})" for k in stored
               if k not in RUNTIME_FIELDS and given[k] != stored[k]]
    if changed:
        raise BadInputError(f"--resume continues the saved run, but these settings differ from it: "
                            f"{', '.join(changed)}; drop them, or start a new run in another folder")
    return TrainConfig.from_dict({**stored, **{k: given[k] for k in RUNTIME_FIELDS}})


def check_same_run(checkpoint: Mapping[str, Any], classes: Sequence[str], splits: Mapping[str, str],
                   out_dir: Path) -> None:
    """Refuse to resume with a manifest whose classes or splits differ from the run's."""
    if list(checkpoint["class_names"]) != list(classes):
        raise BadInputError(f"the manifest's classes {list(classes)} differ from the run's "
                            f"{list(checkpoint['class_names'])}; resume with the manifest the run started with")
    saved_path = out_dir / "splits.csv"
    if saved_path.is_file():
        with saved_path.open(newline="", encoding="utf-8") as f:
            saved = {row["slide_id"]: row["split"] for row in csv.DictReader(f)}
        if saved != dict(splits):
            changed = sorted(set(saved.items()) ^ set(splits.items()))
            shown = listing(f"{slide_id}: {split}" for slide_id, split in changed)
            raise BadInputError(f"the manifest's slides or splits changed since the run started ({shown}); "
                                f"resume with the manifest the run started with ({saved_path})")


def main_process(env: Mapping[str, str] | None = None) -> bool:
    """Whether this is the process that writes the run folder (rank 0, or not under torchrun)."""
    return (os.environ if env is None else env).get("RANK", "0") in ("", "0")
