"""Train IPS on Megapixel MNIST with the paper's settings and record accuracy, memory and time.

Paper run (needs a GPU: 150 epochs of 5000 images of 1500x1500 px; workers render the images):

    python bench/mnist_bench.py --device cuda --workers 4

CPU smoke run (about 4 minutes on 2 idle cores; on a busy shared machine passive OpenMP threads avoid
wasting CPU on spinning):

    OMP_WAIT_POLICY=PASSIVE python bench/mnist_bench.py --cpu-smoke

Settings of the paper (Bergner et al., ICLR 2023, Megapixel MNIST): patch 50, stride 50 (N = 900), M = 100,
I = 100, D = 128, 8 heads, ResNet-18 first two stages from scratch on 1 channel, 1-D positional encoding
of the patch index, AdamW lr 1e-3 and weight decay 0.1, 10 warm-up epochs then cosine decay, batch 16,
150 epochs, the four tasks as heads of one model. ``--cpu-smoke`` changes what :data:`PRESETS` lists.

Accuracy: multi-class tasks count the argmax; the multi-label task counts an image as right only when
all 10 presence labels are right at threshold 0.5 (exact match). Peak memory: the process's maximum RSS
on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. ``test_digits_selected``: the fraction of test
digits whose centre patch is among the M selected. Saves ``bench/results/mnist_<preset>.json``.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ips_path.model import IPSModel, build_encoder, train_step
from ips_path.synthetic.megapixel_mnist import (
    DIGIT_SIZE,
    MEGAPIXEL_MNIST_TASKS,
    MegapixelMNIST,
    digit_targets,
    patch_chunks,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

PAPER = {"n_train": 5000, "n_test": 1000, "canvas": 1500, "noise_strokes": 50, "patch_size": 50, "n_select": 100,
         "chunk_size": 100, "dim": 128, "n_heads": 8, "encoder": "resnet18", "encoder_kw": {"stages": 2},
         "pos_encoding": "1d", "drop_empty": False, "lr": 1e-3, "weight_decay": 0.1, "warmup_epochs": 10,
         "batch_size": 16, "epochs": 150}
# What the CPU smoke run changes, and why. Two CPU cores encode a few thousand small patches a second, so
# the images shrink to 300 px (N = 36 patches; noise strokes scaled to the paper's density), the encoder is
# a small CNN (~4.7 MFLOP a patch instead of ~105) and training gets 3000 steps. From scratch, in that
# budget, three more changes decide whether the model learns at all (majority accuracy after 4 epochs of
# 6000 images, seed 0, lr 2e-3, weight decay 0.01, against 32 % with M = 8 and average pooling; the
# paper's lr and weight decay, kept here, do as well):
# - empty patches are dropped (``drop_empty``, the analogue of tissue detection): without a positional
#   encoding identical blank patches tie and can fill the whole buffer;
# - no positional encoding: the 1-D sinusoid, added at full scale to a small encoder's embeddings, drowns
#   the content early on (bags of 5 digits at random offsets: 14 % with it, 62 % without, after 3 epochs);
#   the ``top`` task, which needs positions, suffers;
# - M = 12 of the about 15 non-empty patches, so most fragments of digits cut by the patch grid are kept
#   (61 %), and max pooling in the encoder, so a digit counts wherever it lands in its patch (48 %).
PRESETS = {
    "paper": {},
    "cpu_smoke": {"n_train": 6000, "n_test": 300, "canvas": 300, "noise_strokes": 2, "n_select": 12,
                  "chunk_size": 36, "encoder": "smallcnn", "encoder_kw": {"widths": [16, 32, 64, 64], "pool": "max"},
                  "pos_encoding": None, "drop_empty": True, "warmup_epochs": 1, "epochs": 8},
}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, maximum resident set size (ru_maxrss) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per optimizer step: linear warm-up, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def slide_streams(images: torch.Tensor, cfg: dict[str, Any], device: torch.device) -> list:
    """The patch-chunk stream of each image of a batch, cut on the model's device."""
    return [patch_chunks(image.to(device), cfg["patch_size"], cfg["patch_size"], cfg["chunk_size"],
                         drop_empty=cfg["drop_empty"]) for image in images]


def evaluate(model: IPSModel, test_set: MegapixelMNIST, cfg: dict[str, Any], device: torch.device
             ) -> tuple[dict[str, float], float]:
    """Test accuracy per task (multi-label: exact match of all 10 labels), and the fraction of digits
    whose centre lies in a selected patch (how well selection finds the signal)."""
    correct = dict.fromkeys((t.name for t in model.tasks), 0)
    digits_found = n_digits = 0
    patch = cfg["patch_size"]
    for index in range(len(test_set)):
        image, layout = test_set.render(index)
        targets = digit_targets(layout.labels, layout.positions)
        prediction = model.predict_slide(slide_streams(torch.from_numpy(image)[None, None], cfg, device)[0])
        for task in model.tasks:
            p = prediction.probabilities[task.name].cpu()
            if task.kind == "multilabel":
                correct[task.name] += bool(((p > 0.5).float() == targets[task.name]).all())
            else:
                correct[task.name] += int(p.argmax()) == targets[task.name]
        centres = (layout.positions + DIGIT_SIZE // 2) // patch  # grid (row, col) of each digit's centre
        selected = {tuple(position) for position in prediction.selection.positions.tolist()}
        digits_found += sum(tuple(centre) in selected for centre in centres.tolist())
        n_digits += len(centres)
    return {name: count / len(test_set) for name, count in correct.items()}, digits_found / n_digits


def run(cfg: dict[str, Any], device: torch.device, data: Path, workers: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    train_set = MegapixelMNIST(data, "train", cfg["n_train"], canvas=cfg["canvas"], seed=seed,
                               n_noise_strokes=cfg["noise_strokes"])
    test_set = MegapixelMNIST(data, "test", cfg["n_test"], canvas=cfg["canvas"], seed=seed,
                              n_noise_strokes=cfg["noise_strokes"])
    train_loader = DataLoader(train_set, batch_size=cfg["batch_size"], shuffle=True, drop_last=True,
                              num_workers=workers, generator=torch.Generator().manual_seed(seed))
    encoder = build_encoder(cfg["encoder"], in_channels=1, **cfg["encoder_kw"])
    model = IPSModel(encoder, MEGAPIXEL_MNIST_TASKS, dim=cfg["dim"], n_heads=cfg["n_heads"],
                     n_select=cfg["n_select"], chunk_size=cfg["chunk_size"],
                     pos_encoding=cfg["pos_encoding"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg["warmup_epochs"] * steps_per_epoch, cfg["epochs"] * steps_per_epoch))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = []
    start = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        epoch_start = time.perf_counter()
        losses = []
        for images, targets in train_loader:
            targets = {name: value.to(device) for name, value in targets.items()}
            stats = train_step(model, slide_streams(images, cfg, device), targets, optimizer)
            scheduler.step()
            losses.append(stats["loss"])
        train_s = time.perf_counter() - epoch_start
        accuracy, digits_selected = evaluate(model, test_set, cfg, device)
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "test_accuracy": accuracy,
                        "test_digits_selected": round(digits_selected, 3),
                        "train_s": round(train_s, 1), "epoch_s": round(time.perf_counter() - epoch_start, 1)})
        print(f"epoch {epoch + 1}/{cfg['epochs']}: loss {history[-1]['train_loss']:.3f}, "
              + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()),
              f"digits selected {digits_selected:.3f} ({history[-1]['epoch_s']} s)",
              file=sys.stderr, flush=True)
    return {"final_test_accuracy": history[-1]["test_accuracy"], "wall_s": round(time.perf_counter() - start, 1),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "peak_memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "max_rss",
            "history": history}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="the reduced preset PRESETS['cpu_smoke']")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--n-train", type=int, help="override the preset's number of training images")
    parser.add_argument("--n-test", type=int, help="override the preset's number of test images")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes rendering images")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "mnist",
                        help="folder with the MNIST files (default: ../shared/data/mnist)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = "cpu_smoke" if args.cpu_smoke else "paper"
    overrides = {k: v for k, v in (("epochs", args.epochs), ("n_train", args.n_train), ("n_test", args.n_test))
                 if v is not None}
    cfg = {**PAPER, **PRESETS[preset], **overrides}
    device = torch.device(args.device)
    result = run(cfg, device, args.data, args.workers, args.seed)
    save_result(f"mnist_{preset}", {"benchmark": "megapixel_mnist", "preset": preset,
                                    "changed_from_paper": {**PRESETS[preset], **overrides}, "config": cfg,
                                    "device": str(device), "seed": args.seed, **result})


if __name__ == "__main__":
    main()
