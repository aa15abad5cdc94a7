"""Foundation-model presets on a GPU: frozen features/s, and peak memory of an IPS step fine-tuning the last K blocks.

- ``features``: patches/s of the preset's encoder (no grad, its preferred dtype or ``--dtype`` under autocast) on
  uint8 ``--patch-size`` px patches already on the device (put through the preset's input pipeline on the
  device, as ``ipspath features`` does), batch ``--batch``; median of ``--repeats`` timed passes. On a CPU
  the pass runs in float32 with ``--threads`` threads.
- ``ips_step``: peak GPU memory (``max_memory_allocated``) and seconds of one IPS training step,
  B slides of ``--patches`` patches each, M selected, the encoder's last ``--train-blocks`` blocks
  trained under activation checkpointing, the gradient phase in checkpointed pieces of 16
  patches, bf16 autocast; for each M of ``--m``. Flat memory in M is the point.

The architecture is built without weights (random initialisation: speed and memory do not depend
on the values), so no weights file is needed. Needs the extra ``foundation`` (timm) for the ViT
presets; ``--preset resnet50_trunc --device cpu`` runs the feature part anywhere.

Usage::

    python -m bench.foundation_bench --preset uni_v1 --dtype bfloat16 [--batch 256] [--m 16 64 256] [--train-blocks 4]
    python -m bench.foundation_bench --preset uni_v1 --device cpu --patch-size 224 --batch 16 --repeats 3 --m
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import save_result
from ips_path.model import IPSModel, PatchChunk, Task, train_step
from ips_path.model.foundation import ENCODER_PRESETS, build_preset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def features_per_second(name: str, device: torch.device, batch: int, repeats: int, dtype_name: str | None,
                        patch_size: int = 256) -> dict:
    encoder = build_preset(name).to(device).eval()
    dtype = getattr(torch, dtype_name or ENCODER_PRESETS[name].dtype)
    patches = torch.randint(0, 256, (batch, 3, patch_size, patch_size), dtype=torch.uint8, device=device)
    amp = dict(device_type=device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        started = time.perf_counter()
        with torch.autocast(**amp):
            encoder(patches)
        _sync(device)
        if i:  # the first pass warms up (kernels, allocator)
            times.append(time.perf_counter() - started)
    return {"preset": name, "dtype": str(dtype).removeprefix("torch.") if device.type == "cuda" else "float32",
            "batch": batch, "patch_size": patch_size, "threads": torch.get_num_threads(),
            "patches_per_s": round(batch / statistics.median(times), 1), "seconds_per_batch": times}


def ips_step_memory(name: str, device: torch.device, m: int, slides: int, patches: int, train_blocks: int) -> dict:
    torch.manual_seed(0)
    encoder = build_preset(name, train_blocks=train_blocks)
    model = IPSModel(encoder, [Task("label", 2, "multiclass")], dim=128, n_heads=8, n_select=m, chunk_size=128,
                     grad_chunk_size=16, checkpoint=True).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    data = [torch.randint(0, 256, (patches, 3, 256, 256), dtype=torch.uint8, device=device) for _ in range(slides)]
    batch = [[PatchChunk(x[i:i + 128]) for i in range(0, patches, 128)] for x in data]
    targets = {"label": torch.arange(slides, device=device) % 2}
    amp = torch.bfloat16 if device.type == "cuda" else None
    train_step(model, batch, targets, optimizer, autocast_dtype=amp)  # warm-up: optimiser state, kernels
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    started = time.perf_counter()
    train_step(model, batch, targets, optimizer, autocast_dtype=amp)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"m": m, "b": slides, "n_per_slide": patches, "train_blocks": train_blocks,
            "seconds": round(time.perf_counter() - started, 3), "peak_gpu_mb": None if peak is None else round(peak)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="uni_v1", choices=sorted(ENCODER_PRESETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="Autocast dtype of the features pass (default: the preset's).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--patch-size", type=int, default=256, help="Side (px) of the uint8 patches fed.")
    parser.add_argument("--m", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--patches", type=int, default=512)
    parser.add_argument("--train-blocks", type=int, default=4)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = {"benchmark": "foundation_bench",
              "features": features_per_second(args.preset, device, args.batch, args.repeats, args.dtype,
                                              args.patch_size)}
    if ENCODER_PRESETS[args.preset].blocks and args.m:
        result["ips_step"] = [ips_step_memory(args.preset, device, m, args.slides, args.patches, args.train_blocks)
                              for m in args.m]
    save_result(f"foundation_bench_{args.preset}_{device.type}", result)


if __name__ == "__main__":
    main()
