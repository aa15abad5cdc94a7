"""Training an IPS slide classifier (``ipspath train``), readable top to bottom.

A run reads a manifest and the tile stores of its slides and writes to its folder::

    config.yaml   the resolved configuration (rerun with --config config.yaml)
    splits.csv    slide_id, case_id, label, split (from the manifest, or a seeded patient-level split)
    metrics.csv   one row per epoch: lr (at the epoch's start), train loss, validation loss, AUC,
                  balanced accuracy, accuracy, recall per class, slides/s, patches/s, peak memory
                  (GPU memory in the epoch, or the process's peak RSS so far on CPU), seconds since
                  the run started
    curves.png    the curves of metrics.csv
    last.pt       the state at the end of the last finished epoch (and at the start of a run)
    best.pt       the state at the epoch with the best validation ``monitor``

What differs between outcome kinds (one label column or several, a time to event, a number) the run
asks its :class:`~ips_path.tasks.OutcomeKind` (``--task``): the manifest columns, the splits, each
slide's target, the heads and losses, the batches and class weights, the validation metrics of
``metrics.csv`` and what ``--monitor`` reads, the step after training (and the files it writes), and
what the checkpoints keep of it.

Choices, in the order the code meets them:

* Outcome: the kind of ``config.task`` (:mod:`ips_path.tasks`); classification by default: one softmax
  task per label column over its sorted class names (the binary AUC is that of the second class).
* Splits: the manifest's ``split`` column where given; other slides are split by patient, stratified
  as the outcome kind says (by label), with ``seed`` and ``val_fraction``. Test slides are not touched.
* Optimiser: AdamW (weight decay on weights of rank >= 2), learning rate per step: linear warm-up
  from 0, then cosine decay to 0 at the last step of the last epoch. Early stopping does not change
  the schedule. bf16 autocast on CUDA; gradient clipping; optional class weights.
* Several processes (``torchrun``; detected from ``WORLD_SIZE``): each epoch the training slides are
  shuffled alike on every process and dealt out round-robin, after dropping the last
  ``len % world_size`` of the shuffled order (a different few each epoch), so every process takes the
  same number of steps and every kept slide is seen exactly once per epoch. The gradient phase (the
  model's ``forward``) runs inside DistributedDataParallel, which all-reduces (averages) the gradients
  once in ``backward``; selection runs on the bare model under ``no_grad``, outside DDP, and
  communicates nothing. After each step the BatchNorm running statistics are averaged over the
  processes, so the whole model is identical everywhere. ``batch_size`` is per process. Validation
  slides are dealt out likewise and the predictions gathered, so metrics cover every validation slide.
  Only rank 0 writes files.
* Checkpoints (``torch.load(..., weights_only=True)``): weights, optimiser, schedule, early-stopping
  state, history, the RNG states of every process (python, numpy, torch, CUDA and the loader's
  augmentation generator), the resolved configuration, class names and tiling parameters. They are
  written at the start of a run and after every epoch, atomically. An interrupted epoch (Ctrl-C, a
  killed job) is not saved half-way: ``--resume`` restarts it from ``last.pt``, and then the run
  continues exactly as an uninterrupted one would (on CPU with a seed, bit for bit).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ips_path.config import TrainConfig, save_config
from ips_path.model import IPSModel, PatchChunk, train_step
from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.errors import BadInputError, IpspathError
from ips_path.runtime.faults import fault_point
from ips_path.runtime.progress import progress_bar
from ips_path.slides.manifest import ManifestRow
from ips_path.stores.lesion_truth import TrainedOnLesions
from ips_path.stores.loader import Augmentation, PatchStreamer
from ips_path.tasks import OutcomeKind, kind_for
from ips_path.training.checkpoint import RunState, build_model, load_checkpoint
from ips_path.training.distributed import (
    GradientPhaseDDP,
    Processes,
    average_buffers,
    init_processes,
    mean_over_processes,
    seed_everything,
    set_rng_states,
    shard_epoch,
    sum_over_processes,
)
from ips_path.training.run_folder import (
    RunStart,
    check_same_run,
    main_process,
    repair_run_folder,
    resumed_config,
    run_folder_lock,
    start_or_resume,
    write_csv,
    write_epoch_records,
)
from ips_path.training.train_slides import SlideItem, check_tile_stores, resolve_feature_norm, slide_chunks

log = logging.getLogger(__name__)

__all__ = ["EarlyStopping", "TrainResult", "lr_factor", "train"]



@dataclass
class TrainResult:
    """What :func:`train` returns (on every process).

    Attributes
    ----------
    run_dir : Path
    epochs_completed : int
    best_epoch : int or None
        1-based epoch of ``best.pt``; None without validation slides.
    best_metric : float or None
        Its validation ``monitor`` value.
    status : {"completed", "early_stopped"}
    history : list of dict
        The rows of ``metrics.csv``.
    model : IPSModel
        The model at the end of the run (the last epoch's weights, not necessarily the best).
    """

    run_dir: Path
    epochs_completed: int
    best_epoch: int | None
    best_metric: float | None
    status: str
    history: list[dict[str, float]]
    model: IPSModel


@dataclass
class EarlyStopping:
    """Tracks the best validation ``monitor`` value and the epochs since it improved.

    Equal values are told apart by the validation loss (lower is better), so that a metric that
    saturates (AUC 1.0 on a small validation set) still moves ``best.pt`` to better-calibrated epochs;
    a metric the validation set cannot define (AUC without both classes) leaves the choice to the loss.
    """

    monitor: str
    patience: int
    best: float | None = None
    best_loss: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0

    def update(self, value: float, loss: float, epoch: int) -> bool:
        """Record an epoch's monitor value and validation loss; True when it is the best so far."""
        improved = not math.isnan(loss) and (
            self.best_epoch is None or self._key(value, loss) < self._key(self.best, self.best_loss))
        if improved:
            self.best, self.best_loss, self.best_epoch, self.bad_epochs = value, loss, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    def _key(self, value: float, loss: float) -> tuple[float, float]:
        """Sort key, lower is better."""
        if math.isnan(value):
            return (0.0, loss)
        return (value if self.monitor == "loss" else -value, loss)

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_loss": self.best_loss, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_loss = state["best"], state["best_loss"]
        self.best_epoch, self.bad_epochs = state["best_epoch"], state["bad_epochs"]


# -- the run ---------------------------------------------------------------------------------------

def train(manifest: str | os.PathLike, tiles_dir: str | os.PathLike, out_dir: str | os.PathLike,
          config: TrainConfig = TrainConfig(), *, resume: bool = False, progress: bool = True,
          splits: Mapping[str, str] | None = None) -> TrainResult:
    """Train an IPS classifier on the slides of a manifest; see the module docstring for what it writes.

    Parameters
    ----------
    manifest : path-like
        CSV with slide_id, slide_path, label and optional split, case_id, mpp.
    tiles_dir : path-like
        Folder of the tile stores ``<slide_id>.zarr`` (``ipspath tile``).
    out_dir : path-like
        Run folder (created). It must not hold a run already, unless ``resume``.
    config : TrainConfig
        The run's settings. With ``resume`` it must equal the saved configuration except for
        ``device`` and ``threads``.
    resume : bool
        Continue the run in ``out_dir`` from ``last.pt``.
    progress : bool
        Show a progress bar (on a terminal, on rank 0).
    splits : mapping, optional
        slide_id -> train/val/test for every slide of the manifest (a cross-validation fold); default:
        the manifest's split column, else a seeded patient-level split.

    Raises
    ------
    BadInputError
        Bad manifest, missing or mismatching tile stores or features, a run folder in the way, a
        resume with another configuration.
    IpspathError
        The loss became NaN or infinite (``last.pt`` keeps the last good state).
    """
    out_dir = Path(out_dir)
    with run_folder_lock(out_dir, main=main_process()):
        start = start_or_resume(out_dir, config, resume)
        if start is not None:
            config = resumed_config(start.checkpoint, config)
        joined = dist.is_available() and dist.is_initialized()  # a caller's process group is left to the caller
        procs = init_processes(config.device)
        try:
            return _run(Path(manifest), Path(tiles_dir), out_dir, config, start, procs, progress, splits)
        finally:
            if procs.distributed and not joined:
                dist.destroy_process_group()


def _run(manifest: Path, tiles_dir: Path, out_dir: Path, config: TrainConfig, start: RunStart | None,
         procs: Processes, progress: bool, given_splits: Mapping[str, str] | None) -> TrainResult:
    checkpoint = None if start is None else start.checkpoint
    # 1. Determinism: one seed for model initialisation on every process; the data order follows
    #    (seed, epoch), augmentation the per-process generator saved in checkpoints. The CPU kernels
    #    used here are deterministic already; torch.use_deterministic_algorithms would cost seconds of
    #    imports (torch._dynamo) for nothing.
    seed_everything(config.seed, procs.rank)

    # 2. Slides: the outcome kind reads the manifest, splits it and gives each slide its target; tile stores
    #    (or cached features).
    kind = kind_for(config)
    rows = kind.read_manifest(manifest, training=True)
    kind.fit_manifest(rows, manifest)
    if given_splits is not None:
        splits = {r.slide_id: given_splits[r.slide_id] for r in rows}
    else:
        splits = kind.splits(rows, manifest)
    if checkpoint is not None:
        check_same_run(checkpoint, kind.class_names, splits, out_dir)
    if given_splits is None:  # cross-validation folds: judged together, over all folds
        for problem in kind.validation_split_problems(rows, splits):
            log.warning("%s: %s", manifest, problem)
    used = [r for r in rows if splits[r.slide_id] in ("train", "val")]
    items, tiling, features = check_tile_stores(used, tiles_dir, manifest, config, kind.class_names)
    config, in_features = resolve_feature_norm(config, features), None if features is None else features.dim
    kind.fit_training([r for r in used if splits[r.slide_id] == "train" and r.slide_id in items])
    items = {r.slide_id: replace(items[r.slide_id], target=kind.target(r)) for r in used if r.slide_id in items}
    train_items = [items[r.slide_id] for r in used if splits[r.slide_id] == "train" and r.slide_id in items]
    val_items = [items[r.slide_id] for r in used if splits[r.slide_id] == "val" and r.slide_id in items]
    if not train_items:
        raise BadInputError(f"{manifest}: no training slides (all are in val/test, or have no patches)")
    if len(train_items) < procs.world_size:
        raise BadInputError(f"{len(train_items)} training slides cannot keep {procs.world_size} processes busy")
    kind.check_training_slides([i.target for i in train_items])

    # 3. Model, optimiser, learning-rate schedule. The model (its weights file) is built before the run folder
    #    gets its first file, so a start that fails leaves nothing behind.
    model = build_model(config, kind.model_tasks(), in_features, load_pretrained=checkpoint is None).to(procs.device)
    if procs.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
        _write_splits(rows, splits, out_dir / "splits.csv", kind)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = math.ceil(len(train_items) // procs.world_size / config.batch_size)
    warmup_steps, total_steps = config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
    class_weights = kind.class_weights(model.tasks, [i.target for i in train_items], procs.device)
    autocast_dtype = torch.bfloat16 if procs.device.type == "cuda" else None

    augmentation = Augmentation() if config.augment and config.features is None else None
    train_streamer = PatchStreamer(chunk_size=config.chunk_size, threads=config.threads, device=procs.device,
                                   augmentation=augmentation, seed=config.seed + procs.rank,
                                   stain_norm=config.stain_norm)
    val_streamer = PatchStreamer(chunk_size=config.chunk_size, threads=config.threads, device=procs.device,
                                 stain_norm=config.stain_norm)

    # 4. Fresh start or resume.
    stopping = EarlyStopping(config.monitor, config.patience)
    history: list[dict[str, float]] = []
    start_epoch, status = 0, "running"
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        stopping.load_state_dict(checkpoint["early_stopping"])
        history = [dict(row) for row in checkpoint["history"]]
        start_epoch, status = int(checkpoint["epoch"]), checkpoint["status"]
        set_rng_states(checkpoint["rng"], procs, train_streamer)
        log.info("resuming %s after epoch %d of %d", out_dir, start_epoch, config.epochs)
    step_model: IPSModel | DistributedDataParallel = model
    if procs.distributed:
        step_model = GradientPhaseDDP(model)

    state = RunState(out_dir, config, kind, tiling, in_features, model, optimizer, scheduler, stopping,
                     history, train_streamer, procs)
    if start is None:
        state.save("last.pt", epoch=0, status=status)  # so that an interrupted first epoch can resume
        fault_point("train.started")
    elif procs.is_main:
        repair_run_folder(out_dir, start, history)

    # 5. Epochs.
    run_started = time.perf_counter() - (history[-1]["elapsed_seconds"] if history else 0.0)
    saved_epoch = start_epoch
    try:
        for epoch in range(start_epoch, config.epochs):
            if status != "running":
                break
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            row.update(_train_epoch(step_model, model, kind, train_items, train_streamer, optimizer, scheduler,
                                    config, epoch, procs, class_weights, autocast_dtype, progress))
            if val_items:
                row.update(_validate(model, kind, val_items, val_streamer, config, procs, autocast_dtype))
            row["elapsed_seconds"] = time.perf_counter() - run_started
            _refuse_non_finite(model, row, saved_epoch)
            history.append(row)
            improved = bool(val_items) and stopping.update(row[kind.monitor_key()], row["val_loss"], epoch + 1)
            if epoch + 1 == config.epochs:
                status = "completed"
            elif val_items and stopping.should_stop:
                status = "early_stopped"
            _log_epoch(row, kind, config, procs)
            # Everything last.pt refers to is written before it (see ips_path.training.run_folder).
            if procs.is_main:
                write_epoch_records(out_dir, history)
            if improved:
                state.save("best.pt", epoch=epoch + 1, status=status)
                fault_point("train.best_written")
            state.save("last.pt", epoch=epoch + 1, status=status)
            saved_epoch = epoch + 1
            fault_point("train.last_written")
        if kind.finishes:
            _finish(kind, model, train_items, val_items, val_streamer, config, procs, autocast_dtype, out_dir)
    except KeyboardInterrupt:
        if procs.is_main:
            log.warning("interrupted: %s holds the state after epoch %d; continue with --resume",
                        out_dir / "last.pt", saved_epoch)
        raise
    finally:
        train_streamer.close()
        val_streamer.close()
    if status == "early_stopped":
        log.info("early stop: no better validation %s for %d epochs (best %.4f at epoch %d)", config.monitor,
                 config.patience, stopping.best, stopping.best_epoch)
    return TrainResult(out_dir, len(history), stopping.best_epoch, stopping.best, status, history, model)


# -- one epoch --------------------------------------------------------------------------------------

def lr_factor(step: int, warmup_steps: float, total_steps: int) -> float:
    """Learning rate at optimiser step ``step`` (from 0) relative to the peak: linear warm-up, cosine decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _train_epoch(step_model: IPSModel | DistributedDataParallel, model: IPSModel, kind: OutcomeKind,
                 items: Sequence[SlideItem], streamer: PatchStreamer, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig, epoch: int, procs: Processes,
                 class_weights: dict[str, torch.Tensor] | None, autocast_dtype: torch.dtype | None,
                 progress: bool) -> dict[str, float]:
    shard = shard_epoch(len(items), epoch, config.seed, procs.rank, procs.world_size)
    order = [items[i] for i in shard]
    batches = [[order[i] for i in batch] for batch in
               kind.batches([item.target for item in order], config.batch_size, epoch, config.seed + procs.rank)]
    losses: list[float] = []
    per_task: dict[str, list[float]] = {t.name: [] for t in model.tasks} if len(model.tasks) > 1 else {}
    n_slides = n_patches = 0
    trained_on_lesions = TrainedOnLesions()
    _reset_peak_memory(procs.device)
    started = time.perf_counter()
    with progress_bar(sum(item.n_patches for item in order), f"epoch {epoch + 1}/{config.epochs}", unit="patch",
                      enabled=progress and procs.is_main) as bar:
        for step, batch in enumerate(batches):
            slides = [_counted(slide_chunks(streamer, item, config.features), bar) for item in batch]
            targets = kind.batch_targets(model.tasks, [item.target for item in batch])
            out = train_step(step_model, slides, targets, optimizer, autocast_dtype=autocast_dtype,
                             grad_clip=config.grad_clip or None, class_weights=class_weights,
                             explore=config.explore, explore_mode=config.explore_mode,
                             instance_loss=config.instance_loss,
                             instance_k=config.instance_k)
            loss = mean_over_processes(out["loss"], procs)
            if not math.isfinite(loss):
                raise IpspathError(f"the training loss is {loss} at epoch {epoch + 1}, step {step + 1}: training "
                                   f"diverged; {_after_divergence(epoch)}")
            scheduler.step()
            if procs.distributed:
                average_buffers(model, procs.world_size)
            losses.append(loss)
            for name, values in per_task.items():  # several tasks: each task's share of the loss
                values.append(mean_over_processes(out["losses"][name], procs))
            for item, selected in zip(batch, out["selected"], strict=True):
                trained_on_lesions.record(item.store, selected.numpy())
            n_slides += len(batch)
            n_patches += sum(item.n_patches for item in batch)
            bar.set_postfix(slides=f"{n_slides}/{len(order)}", loss=f"{loss:.3f}",
                            slides_per_s=f"{n_slides / (time.perf_counter() - started):.2f}")
    seconds = time.perf_counter() - started
    n_slides *= procs.world_size  # every process trains on as many slides
    return {"train_loss": float(np.mean(losses)), **{f"train_{n}_loss": float(np.mean(v)) for n, v in per_task.items()},
            "train_slides": n_slides, "train_seconds": seconds,
            "slides_per_s": n_slides / seconds, "patches_per_s": sum_over_processes(n_patches, procs) / seconds,
            "peak_memory_mb": _peak_memory_mb(procs.device),
            **trained_on_lesions.summary(lambda n: sum_over_processes(n, procs))}



def _after_divergence(saved_epoch: int) -> str:
    """What a user can do after a run diverged, given the last epoch saved in last.pt."""
    if saved_epoch == 0:
        return ("nothing was trained, so the run folder may be reused: rerun with a lower --lr (and --grad-clip), "
                "or check the slides")
    return (f"last.pt keeps the good state of epoch {saved_epoch} (best.pt the best so far); train again with a "
            "lower --lr (and --grad-clip) into another folder, or check the slides")


def _refuse_non_finite(model: IPSModel, row: Mapping[str, float], saved_epoch: int) -> None:
    """Stop before an epoch whose weights or validation loss are not finite is written to a checkpoint."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad or not math.isfinite(row.get("val_loss", 0.0)):
        what = f"weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else "validation loss"
        raise IpspathError(f"the {what} became NaN or infinite in epoch {int(row['epoch'])}: training diverged; "
                           f"{_after_divergence(saved_epoch)}")


def _counted(chunks: Iterable[PatchChunk], bar: Any) -> Iterator[PatchChunk]:
    for chunk in chunks:
        bar.update(len(chunk))
        yield chunk


# -- validation -------------------------------------------------------------------------------------

def _validate(model: IPSModel, kind: OutcomeKind, items: Sequence[SlideItem], streamer: PatchStreamer,
              config: TrainConfig, procs: Processes, autocast_dtype: torch.dtype | None) -> dict[str, float]:
    """Predict every validation slide (without augmentation), gather the predictions, compute the metrics."""
    logits = _predict_logits(model, items, streamer, config, procs, autocast_dtype)
    return kind.validation_metrics(model.tasks, logits, [item.target for item in items])


def _predict_logits(model: IPSModel, items: Sequence[SlideItem], streamer: PatchStreamer, config: TrainConfig,
                    procs: Processes, autocast_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Task name -> the logits of every slide of ``items`` (``(n, n_outputs)``, float32, CPU), each process
    predicting a share."""
    amp = (torch.autocast(procs.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    names = [task.name for task in model.tasks]
    mine = []
    for index in range(procs.rank, len(items), procs.world_size):
        with amp:
            prediction = model.predict_slide(slide_chunks(streamer, items[index], config.features))
        mine.append((index, [prediction.logits[name].float().cpu().tolist() for name in names]))
    gathered = [mine]
    if procs.distributed:
        gathered = [None] * procs.world_size
        dist.all_gather_object(gathered, mine)
    logits_by_index = dict(pair for part in gathered for pair in part)
    return {name: torch.tensor([logits_by_index[i][t] for i in range(len(items))], dtype=torch.float32)
            for t, name in enumerate(names)}


def _finish(kind: OutcomeKind, model: IPSModel, train_items: Sequence[SlideItem], val_items: Sequence[SlideItem],
            streamer: PatchStreamer, config: TrainConfig, procs: Processes, autocast_dtype: torch.dtype | None,
            out_dir: Path) -> None:
    """The kind's step after training, with the best weights' logits of the training and validation slides
    (e.g. risk-group cut points and the validation metrics files); what it learnt goes into
    ``best.pt`` (and ``last.pt``), which prediction reads."""
    best = out_dir / "best.pt"
    final_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best.is_file():
        model.load_state_dict(load_checkpoint(best)["model"])
    try:
        train_logits = _predict_logits(model, train_items, streamer, config, procs, autocast_dtype)
        val_logits = _predict_logits(model, val_items, streamer, config, procs, autocast_dtype) if val_items else None
    finally:
        model.load_state_dict(final_weights)
    if not procs.is_main:
        return
    kind.finish(model.tasks, train_logits, [i.target for i in train_items], val_logits,
                [i.target for i in val_items], out_dir)
    for name in ("best.pt", "last.pt"):
        if (out_dir / name).is_file():
            checkpoint = {**load_checkpoint(out_dir / name), **kind.state()}
            write_atomically(out_dir / name, lambda partial, c=checkpoint: torch.save(c, partial))


def _write_splits(rows: Sequence[ManifestRow], splits: Mapping[str, str], path: Path, kind: OutcomeKind) -> None:
    """splits.csv: every slide's outcome (as the kind reads it), split, and follow-up where the manifest gives it."""
    outcome = any(r.time is not None for r in rows)
    write_csv(path, [{"slide_id": r.slide_id, "case_id": r.case_id, **kind.splits_columns(r),
                      "split": splits[r.slide_id], **({"time": r.time, "event": r.event} if outcome else {})}
                     for r in rows])


def _log_epoch(row: Mapping[str, float], kind: OutcomeKind, config: TrainConfig, procs: Processes) -> None:
    if not procs.is_main:
        return
    text = f"epoch {int(row['epoch'])}/{config.epochs}  loss {row['train_loss']:.4f}" + kind.epoch_text(row)
    if "train_selected_in_lesion" in row:
        text += (f"  trained patches in lesions {100 * row['train_selected_in_lesion']:.1f} % "
                 f"(found on {100 * row['train_lesion_found']:.0f} % of lesion slides)")
    log.info("%s  (%.1f s, %.2f slides/s, %.0f patches/s)", text, row["train_seconds"], row["slides_per_s"],
             row["patches_per_s"])


# -- memory ---------------------------------------------------------------------------------------

def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated since the epoch started (CUDA), or the process's peak RSS (CPU), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
