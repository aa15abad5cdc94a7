"""``ipspath pretrain``: an encoder learned without labels from the patches of a lab's own tile stores.

A run samples patches uniformly over all patches of the tile stores, afresh every epoch, draws two
augmented views of each (:mod:`ips_path.training.pretrain.augment`) and trains the encoder with a
self-supervised objective (:mod:`ips_path.training.pretrain.objectives`). It writes to its folder::

    encoder.pt   the encoder's weights, loadable unchanged by `features --encoder ARCH --pretrained
                 encoder.pt` and `train --encoder ARCH --pretrained encoder.pt`, with the run's identity
                 under "ipspath_pretrain": method, encoder, epoch, the stores it saw, configuration
    metrics.csv  one row per epoch: lr, train_loss, patches/s, seconds
    curves.png   the loss per epoch
    last.pt      the whole state after the last finished epoch (and at the start of a run)

Crash safety is that of ``ipspath train`` (:mod:`ips_path.training.run_folder`): one run at a time holds the
folder's lock, every file is written atomically, and ``last.pt`` is written last in each epoch, so a run
killed at any point (``kill -9`` included) resumes with ``--resume`` from the last finished epoch and
continues as an uninterrupted run would (on CPU, bit for bit): the patches of an epoch follow
``(seed, epoch, rank)``, the augmentation generator's state is saved with the others.

Under ``torchrun`` every process samples its own patches, the gradients are averaged by
DistributedDataParallel, and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ips_path import __version__
from ips_path.model.encoders import MEASUREMENT_ENCODERS, PixelEncoder, build_encoder
from ips_path.model.foundation import FoundationEncoder, require_preset_weights
from ips_path.runtime.atomic import write_atomically
from ips_path.runtime.errors import BadInputError, IpspathError
from ips_path.runtime.faults import fault_point
from ips_path.runtime.identity import identity_key
from ips_path.runtime.progress import progress_bar
from ips_path.stores.loader import PatchStreamer
from ips_path.stores.tile_store import TileStore, find_stores, slide_id_from_path
from ips_path.training.checkpoint import read_checkpoint_file
from ips_path.training.distributed import (
    Processes,
    init_processes,
    mean_over_processes,
    rng_state,
    seed_everything,
    set_rng_states,
)
from ips_path.training.pretrain.augment import ViewAugmentation, two_views
from ips_path.training.pretrain.objectives import METHODS, SelfSupervised
from ips_path.training.run_folder import main_process, run_folder_lock, write_epoch_records
from ips_path.training.train import lr_factor

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FORMAT", "WEIGHTS_FILE", "PretrainConfig", "PretrainResult", "encoder_weights", "pretrain",
           "read_pretrain_identity"]

CHECKPOINT_FORMAT = "ipspath.pretrain"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "encoder.pt"
IDENTITY_KEY = "ipspath_pretrain"  # where the weights file keeps the run's identity, next to "state_dict"
RUNTIME_FIELDS = ("device", "threads")  # may change when a run is resumed
_ROUND_BYTES = 1 << 27  # patches held in memory at once while an epoch is read (128 MiB of uint8 pixels)


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of a pretraining run (units: pixels of the tile stores, patches, epochs).

    Attributes
    ----------
    encoder : str
        Any pixel encoder :func:`~ips_path.model.encoders.build_encoder` knows (``smallcnn``, ``resnet18``,
        ..., ``timm:<name>``, a foundation-model preset, which needs ``pretrained`` as its starting point).
    method : {"simclr", "byol"}
    epochs, patches_per_epoch, batch_size : int
        Patches per epoch are drawn per process, uniformly over every patch of every store.
    lr, weight_decay, warmup_epochs : float
        AdamW; linear warm-up, then cosine decay to 0 (as ``train``).
    crop : int, optional
        Side of the crops (px at the store's resolution); default: 3/4 of the patch size.
    hed, brightness, blur : float
        Augmentation strengths (:class:`~ips_path.training.pretrain.augment.ViewAugmentation`).
    proj_dim, hidden : int
        Projector (and BYOL predictor) sizes.
    temperature : float
        SimCLR NT-Xent temperature.
    ema : float
        BYOL target momentum at the start.
    stain_norm : bool
        Normalise each slide's staining before augmentation (then also give ``features --stain-norm``).
    pretrained : str, optional
        Starting weights of the encoder (a local file).
    train_blocks : int, optional
        ViT presets: train only the last K blocks.
    seed : int
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    threads : int
        Reader threads.
    """

    encoder: str = "smallcnn"
    method: str = "byol"
    epochs: int = 10
    patches_per_epoch: int = 4096
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    crop: int | None = None
    hed: float = 0.2
    brightness: float = 0.1
    blur: float = 0.5
    proj_dim: int = 128
    hidden: int = 512
    temperature: float = 0.2
    ema: float = 0.99
    stain_norm: bool = False
    pretrained: str | None = None
    train_blocks: int | None = None
    seed: int = 0
    device: str = "auto"
    threads: int = 4

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Refuse impossible settings with one line naming the option (before any work)."""
        problems = [(self.method in METHODS, f"--method {self.method!r}: choose {' or '.join(METHODS)}"),
                    (self.epochs >= 1, f"--epochs {self.epochs}: must be at least 1"),
                    (self.batch_size >= 2, f"--batch-size {self.batch_size}: contrast needs at least 2 patches"),
                    (self.patches_per_epoch >= self.batch_size,
                     f"--patches-per-epoch {self.patches_per_epoch}: must be at least --batch-size "
                     f"({self.batch_size})"),
                    (self.lr > 0, f"--lr {self.lr}: must be positive"),
                    (self.crop is None or self.crop >= 8, f"--crop {self.crop}: must be at least 8 px"),
                    (0 <= self.hed < 1, f"--hed {self.hed}: must be in [0, 1)"),
                    (0 <= self.blur <= 1, f"--blur {self.blur}: a probability, in [0, 1]"),
                    (self.temperature > 0, f"--temperature {self.temperature}: must be positive"),
                    (0 <= self.ema < 1, f"--ema {self.ema}: must be in [0, 1)"),
                    (self.threads >= 1, f"--threads {self.threads}: must be at least 1"),
                    (self.encoder not in MEASUREMENT_ENCODERS and self.encoder != "features",
                     f"--encoder {self.encoder}: has no weights to learn; choose a pixel encoder such as smallcnn "
                     "or resnet18")]
        for ok, message in problems:
            if not ok:
                raise BadInputError(message)


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns: the run folder, the weights file, the epochs done and their rows."""

    run_dir: Path
    weights: Path
    epochs_completed: int
    history: list[dict[str, float]]


def pretrain(tiles: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
             config: PretrainConfig = PretrainConfig(), *, resume: bool = False,
             progress: bool = True) -> PretrainResult:
    """Train an encoder by self-supervision on the patches of tile stores; see the module docstring.

    Parameters
    ----------
    tiles : sequence of path-like
        Tile stores (``.zarr``) or folders of them, all made at one resolution and patch size.
    out_dir : path-like
        Run folder (made). It must not hold a run already, unless ``resume``.
    config : PretrainConfig
    resume : bool
        Continue the run in ``out_dir`` from its ``last.pt``; the settings must be the saved ones (except
        ``device`` and ``threads``) and the stores the same.
    progress : bool
        Progress bar (on a terminal, rank 0).

    Raises
    ------
    BadInputError
        Bad settings, no or mismatching stores, weights that do not fit, a run in the way, a resume that
        differs from its run. All before any epoch starts.
    IpspathError
        The loss became NaN or infinite.
    """
    config.check()
    stores = [TileStore.open(p) for p in find_stores(tiles)]
    tiling, seen = _check_stores(stores, config)
    out_dir = Path(out_dir)
    with run_folder_lock(out_dir, main=main_process()):
        checkpoint = _start(out_dir, config, resume, seen)
        if checkpoint is not None:
            config = PretrainConfig(**{**checkpoint["config"], **{k: getattr(config, k) for k in RUNTIME_FIELDS}})
        joined = dist.is_available() and dist.is_initialized()
        procs = init_processes(config.device)
        try:
            return _run(stores, tiling, seen, out_dir, config, checkpoint, procs, progress)
        finally:
            if procs.distributed and not joined:
                dist.destroy_process_group()


def _check_stores(stores: Sequence[TileStore], config: PretrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stores' shared tiling and their identity; refuse mixed resolutions, empty stores, a crop too large."""
    first = stores[0]
    tiling = {"target_mpp": first.target_mpp, "patch_size": first.patch_size}
    for store in stores[1:]:
        if abs(store.target_mpp - first.target_mpp) > 0.02 * first.target_mpp or store.patch_size != first.patch_size:
            raise BadInputError(f"{store.path}: tiled at {store.target_mpp:g} µm/px, {store.patch_size} px, but "
                                f"{first.path} at {first.target_mpp:g} µm/px, {first.patch_size} px; pretrain on "
                                "stores of one resolution and patch size")
    if sum(s.n_patches for s in stores) < 2:
        raise BadInputError(f"{first.path.parent}: the tile stores hold {sum(s.n_patches for s in stores)} patch(es); "
                            "pretraining needs tissue (tile with a lower --min-tissue, or other slides)")
    crop = config.crop if config.crop is not None else max(8, first.patch_size * 3 // 4)
    if crop > first.patch_size:
        raise BadInputError(f"--crop {crop}: larger than the stores' {first.patch_size} px patches; give at most "
                            f"{first.patch_size}")
    tiling["crop"] = crop
    described = [{"slide_id": slide_id_from_path(s.path), "n_patches": s.n_patches,
                  "slide": s.attrs.get("slide_identity")} for s in stores]
    return tiling, {"stores": [d["slide_id"] for d in described], "n_patches": sum(s.n_patches for s in stores),
                    "stores_key": identity_key(described, length=64)}


def _start(out_dir: Path, config: PretrainConfig, resume: bool, seen: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint a resumed run continues from, or None for a fresh run in a free folder."""
    last = out_dir / "last.pt"
    if not resume:
        if last.exists():
            saved = _load_checkpoint(last)
            if saved["epoch"] == 0 and not saved["history"]:
                log.info("%s: last.pt holds no finished epoch; starting afresh", out_dir)
                return None
            raise BadInputError(f"{out_dir} already holds a pretraining run (last.pt, epoch {saved['epoch']}); "
                                "continue it with --resume, or give another output folder")
        return None
    if not last.is_file():
        raise BadInputError(f"{out_dir}: no last.pt to resume from; start the run without --resume")
    checkpoint = _load_checkpoint(last)
    given, stored = config.as_dict(), checkpoint["config"]
    changed = [f"{k} ({stored[k]!r} -> {given[k]!r})" for k in stored
               if k not in RUNTIME_FIELDS and given[k] != stored[k]]
    if changed:
        raise BadInputError(f"--resume continues the saved run, but these settings differ from it: "
                            f"{', '.join(changed)}; drop them, or start a new run in another folder")
    if checkpoint["seen"]["stores_key"] != seen["stores_key"]:
        raise BadInputError(f"--resume: the tile stores differ from the {len(checkpoint['seen']['stores'])} the run in "
                            f"{out_dir} started with; resume with the same stores")
    return checkpoint


def _load_checkpoint(path: Path) -> dict[str, Any]:
    return read_checkpoint_file(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "pretraining checkpoint",
                                "remove the folder or give another one")


def encoder_weights(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict that ``build_encoder(name, pretrained=FILE)`` loads into this encoder: a preset's
    (or timm model's) backbone, else the whole encoder."""
    module = encoder.backbone if isinstance(encoder, FoundationEncoder | PixelEncoder) else encoder
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def read_pretrain_identity(path: str | os.PathLike) -> dict[str, Any] | None:
    """The identity a weights file of :func:`pretrain` carries (method, encoder, epoch, stores, ...), or None."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get(IDENTITY_KEY) if isinstance(state, dict) else None


def _run(stores: Sequence[TileStore], tiling: Mapping[str, Any], seen: Mapping[str, Any], out_dir: Path,
         config: PretrainConfig, checkpoint: Mapping[str, Any] | None, procs: Processes,
         progress: bool) -> PretrainResult:
    seed_everything(config.seed, procs.rank)
    fresh = checkpoint is None
    if fresh:
        require_preset_weights(config.encoder, config.pretrained)
    blocks = {} if config.train_blocks is None else {"train_blocks": config.train_blocks}
    encoder = build_encoder(config.encoder, pretrained=config.pretrained if fresh else None, **blocks)
    model = SelfSupervised(encoder, config.method, proj_dim=config.proj_dim, hidden=config.hidden,
                           temperature=config.temperature, ema=config.ema).to(procs.device)
    trained = [p for p in model.parameters() if p.requires_grad]
    decay, no_decay = [p for p in trained if p.ndim >= 2], [p for p in trained if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = config.patches_per_epoch // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_epochs * steps_per_epoch, total_steps))
    streamer = PatchStreamer(chunk_size=256, threads=config.threads, device=procs.device, seed=config.seed + procs.rank,
                             stain_norm=config.stain_norm)
    augmentation = ViewAugmentation(tiling["crop"], config.hed, config.brightness, config.blur)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history = [dict(row) for row in checkpoint["history"]]
        start_epoch = int(checkpoint["epoch"])
        set_rng_states(checkpoint["rng"], procs, streamer)
        log.info("resuming %s after epoch %d of %d", out_dir, start_epoch, config.epochs)
    step_model: torch.nn.Module = DistributedDataParallel(model) if procs.distributed else model
    run = _Writer(out_dir, config, tiling, seen, model, optimizer, scheduler, history, streamer, procs)
    if fresh:
        run.save_checkpoint(0)  # so that a run killed in its first epoch can resume
        fault_point("pretrain.started")
    elif procs.is_main and history:  # a run killed between two writes: make the folder say what last.pt says
        write_epoch_records(out_dir, history)
        run.save_weights(start_epoch)
    autocast = procs.device.type == "cuda"
    run_started = time.perf_counter() - (history[-1]["elapsed_seconds"] if history else 0.0)
    try:
        for epoch in range(start_epoch, config.epochs):
            row: dict[str, float] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            started, losses = time.perf_counter(), []
            with progress_bar(steps_per_epoch, f"pretrain {epoch + 1}/{config.epochs}", unit="batch",
                              enabled=progress and procs.is_main) as bar:
                for step, batch in enumerate(_epoch_batches(stores, config, epoch, procs.rank, streamer)):
                    view_a, view_b = two_views(batch, augmentation, streamer.generator)
                    with torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=autocast):
                        loss = step_model(view_a, view_b)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    model.update_target((epoch * steps_per_epoch + step + 1) / total_steps)
                    value = mean_over_processes(float(loss.detach()), procs)
                    if not math.isfinite(value):
                        raise IpspathError(f"the pretraining loss is {value} at epoch {epoch + 1}, step {step + 1}: "
                                           f"training diverged; lower --lr (last.pt holds epoch {epoch})")
                    losses.append(value)
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.3f}")
            seconds = time.perf_counter() - started
            row.update({"train_loss": float(np.mean(losses)), "patches_per_s":
                        len(losses) * config.batch_size * procs.world_size / seconds, "train_seconds": seconds,
                        "elapsed_seconds": time.perf_counter() - run_started})
            history.append(row)
            if procs.is_main:
                log.info("pretrain epoch %d/%d: loss %.4f, %.0f patches/s, lr %.2e, %.0f s", epoch + 1, config.epochs,
                         row["train_loss"], row["patches_per_s"], row["lr"], seconds)
                # Everything last.pt refers to is written before it (as in ips_path.training.run_folder).
                write_epoch_records(out_dir, history)
                run.save_weights(epoch + 1)
                fault_point("pretrain.weights_written")
            run.save_checkpoint(epoch + 1)
            fault_point("pretrain.last_written")
    except KeyboardInterrupt:
        if procs.is_main:
            log.warning("interrupted: %s holds the state after epoch %d; continue with --resume", out_dir / "last.pt",
                        run.saved_epoch)
        raise
    finally:
        streamer.close()
    return PretrainResult(out_dir, out_dir / WEIGHTS_FILE, len(history), history)


def _epoch_batches(stores: Sequence[TileStore], config: PretrainConfig, epoch: int, rank: int,
                   streamer: PatchStreamer):
    """The uint8 batches of one epoch of one process: patches drawn uniformly over all patches with
    ``(seed, epoch, rank)``, read store by store in rounds that fit in memory, shuffled within a round."""
    sizes = np.array([s.n_patches for s in stores], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rng = np.random.default_rng([config.seed, epoch, rank])
    n = config.patches_per_epoch // config.batch_size * config.batch_size  # whole batches only (BatchNorm)
    drawn = rng.choice(int(offsets[-1]), size=n, replace=n > offsets[-1])
    read_size = stores[0].patch_size
    per_round = max(config.batch_size, _ROUND_BYTES // (3 * read_size * read_size) // config.batch_size
                    * config.batch_size)
    for start in range(0, n, per_round):
        part = drawn[start:start + per_round]
        which = np.searchsorted(offsets, part, side="right") - 1
        chunks = []
        for i in np.unique(which):
            local = np.sort(part[which == i] - offsets[i])
            chunks += [chunk.patches for chunk in streamer.stream(stores[i], indices=local)]
        patches = torch.cat(chunks)
        order = torch.from_numpy(rng.permutation(len(patches))).to(patches.device)
        patches = patches[order]
        for b in range(0, len(patches) - config.batch_size + 1, config.batch_size):
            yield patches[b:b + config.batch_size]


@dataclass
class _Writer:
    """Writes a run's checkpoint and weights file (rank 0; the others hand over their random states)."""

    out_dir: Path
    config: PretrainConfig
    tiling: Mapping[str, Any]
    seen: Mapping[str, Any]
    model: SelfSupervised
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    history: list[dict[str, float]]
    streamer: PatchStreamer
    procs: Processes
    saved_epoch: int = 0

    def save_checkpoint(self, epoch: int) -> None:
        rng = [rng_state(self.streamer, self.procs.device)]
        if self.procs.distributed:
            rng = [None] * self.procs.world_size
            dist.all_gather_object(rng, rng_state(self.streamer, self.procs.device))
        self.saved_epoch = epoch
        if not self.procs.is_main:
            return
        checkpoint = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                      "ipspath_version": __version__, "epoch": epoch, "config": self.config.as_dict(),
                      "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict(), "history": self.history, "rng": rng,
                      "tiling": dict(self.tiling), "seen": dict(self.seen)}
        write_atomically(self.out_dir / "last.pt", lambda partial: torch.save(checkpoint, partial))

    def save_weights(self, epoch: int) -> None:
        identity = {"format": "ipspath.pretrained_encoder", "ipspath_version": __version__,
                    "encoder": self.config.encoder, "method": self.config.method, "epoch": epoch,
                    "epochs": self.config.epochs, "train_loss": self.history[epoch - 1]["train_loss"],
                    "tiling": dict(self.tiling), **self.seen, "config": self.config.as_dict()}
        payload = {"state_dict": encoder_weights(self.model.encoder), IDENTITY_KEY: identity}
        write_atomically(self.out_dir / WEIGHTS_FILE, lambda partial: torch.save(payload, partial))
