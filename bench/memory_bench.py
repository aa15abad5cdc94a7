"""Peak memory of one IPS training step: flat in the number of patches N, and in M when checkpointed.

    python bench/memory_bench.py n [--device cuda]   # -> bench/results/memory_n.json
    python bench/memory_bench.py m [--device cuda]   # -> bench/results/memory_m.json

Every measurement is one :func:`ips_path.model.train_step` (selection of B slides, then one gradient
phase on the ``(B, M, ...)`` batch, backward, AdamW step) in a fresh subprocess, so that peaks do not
mix. The patches of each slide are generated chunk by chunk while the model consumes them and are never
held all at once, as the loader streams them from a slide file.

Peak memory: on CPU the child's maximum resident set size (``ru_maxrss``; the whole process: Python,
torch, weights, optimizer state and the step), with glibc's mmap threshold fixed (see :data:`CHILD_ENV`)
so that RSS follows live memory; on CUDA ``torch.cuda.max_memory_allocated`` during the step.
``step_increment_mb`` is the peak minus the memory held just before the step.

Settings (:data:`SETTINGS`):

``features``
    cached 2048-d float16 features, projector to D = 512, M = I = 5000, B = 16 (the paper's
    CAMELYON16 setting; the paper reports 5 GB at N up to 250k on a GPU). A feature chunk is a fixed
    random bank of I rows, rolled by a chunk-dependent shift, so no RNG dominates the run time.
``features_checkpointed``
    the same with the gradient phase in checkpointed pieces of 5000 patches (``grad_chunk_size``).
``pixels``
    uint8 RGB patches of 256 px, ResNet-18 (4 stages, projected to D = 128), M = 16, I = 64, random pixels.

The CPU grids (:data:`GRIDS`) are cut down where 2 CPU cores cannot encode the patches in reasonable
time (ResNet-18 runs at tens of 256 px patches a second there); the cut is written into the result.
``--device cuda`` runs the full grid of the design: N = 1k, 10k, 100k, 250k at B = 16 in every setting.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, save_result  # noqa: E402

SETTINGS = {
    "features": {"input": "features", "in_features": 2048, "dim": 512, "n_select": 5000, "chunk_size": 5000},
    "pixels": {"input": "pixels", "encoder": "resnet18", "patch_size": 256, "dim": 128, "n_select": 16,
               "chunk_size": 64},
}
# The features setting with the gradient phase checkpointed in pieces of 5000 patches: the projector's
# float32 LayerNorm activations of all B * M = 80k features then never exist at once.
SETTINGS["features_checkpointed"] = {**SETTINGS["features"], "grad_chunk_size": 5000, "checkpoint": True}
GRIDS = {
    "cpu": {
        "features": {"n": [1_000, 10_000, 100_000, 250_000], "batch_size": 16},
        "features_checkpointed": {"n": [10_000, 100_000], "batch_size": 16,
                                  "reduced": "N = 10k and 100k only, to save CPU time"},
        "pixels": {"n": [128, 512, 2_048], "batch_size": 1,
                   "reduced": "B = 1 and N <= 2048 instead of B = 16 and N <= 250k: ResNet-18 at 256 px "
                              "encodes tens of patches a second on 2 CPU cores"},
        "m": {"m": [16, 64, 256], "batch_size": 1, "grad_chunk_size": 16,
              "reduced": "B = 1 instead of 16, N = M + I"},
    },
    "cuda": {
        "features": {"n": [1_000, 10_000, 100_000, 250_000], "batch_size": 16},
        "features_checkpointed": {"n": [1_000, 10_000, 100_000, 250_000], "batch_size": 16},
        "pixels": {"n": [1_000, 10_000, 100_000, 250_000], "batch_size": 16},
        "m": {"m": [16, 64, 256], "batch_size": 16, "grad_chunk_size": 16},
    },
}
# Child environment. glibc's malloc raises its mmap threshold as large blocks are freed, after which
# freed memory stays in the heap and RSS depends on the allocation history (+-4 % between identical
# runs); a fixed threshold returns every block >= 64 KiB to the OS when freed, so RSS follows the live
# memory and identical runs agree to 0.1 MB. Passive OpenMP threads sleep instead of spinning, which
# keeps a shared machine usable (it changes time, not memory).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_WAIT_POLICY": "PASSIVE"}
# Plain (not checkpointed) gradient phases whose activations would not fit next to other users of the
# machine are skipped rather than risking the OOM killer: ~35 MB of saved activations per 256 px patch.
ACTIVATION_MB_PER_PIXEL_PATCH = 35


def feature_stream(n: int, chunk_size: int, dim: int, seed: int) -> Iterator:
    """Chunks of ``(n_chunk, dim)`` float16 features; one chunk exists at a time."""
    import torch

    from ips_path.model import PatchChunk

    bank = torch.randn(chunk_size, dim, generator=torch.Generator().manual_seed(seed)).half()
    for index, start in enumerate(range(0, n, chunk_size)):
        rows = min(chunk_size, n - start)
        yield PatchChunk(bank.roll(7919 * index, dims=0)[:rows])


def pixel_stream(n: int, chunk_size: int, patch_size: int, seed: int) -> Iterator:
    """Chunks of ``(n_chunk, 3, patch_size, patch_size)`` uint8 random pixels; one chunk exists at a time."""
    import torch

    from ips_path.model import PatchChunk

    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, chunk_size):
        rows = min(chunk_size, n - start)
        yield PatchChunk(torch.randint(0, 256, (rows, 3, patch_size, patch_size), dtype=torch.uint8,
                                       generator=generator))


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model of ``spec`` and run one training step on B streamed slides; memory and time."""
    import torch

    from ips_path.model import IPSModel, Task, build_encoder, train_step

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    if spec["input"] == "features":
        encoder = build_encoder("features", in_features=spec["in_features"], out_dim=spec["dim"])
    else:
        encoder = build_encoder(spec["encoder"])
    model = IPSModel(encoder, [Task("tumor", 2, "binary")], dim=spec["dim"], n_heads=8,
                     n_select=spec["n_select"], chunk_size=spec["chunk_size"],
                     grad_chunk_size=spec.get("grad_chunk_size"), checkpoint=spec.get("checkpoint", False)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = spec["batch_size"]
    if spec["input"] == "features":
        slides = [feature_stream(spec["n"], spec["chunk_size"], spec["in_features"], seed) for seed in range(b)]
    else:
        slides = [pixel_stream(spec["n"], spec["chunk_size"], spec["patch_size"], seed) for seed in range(b)]
    targets = {"tumor": torch.arange(b, device=device) % 2}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = current_rss_mb()
    start = time.perf_counter()
    stats = train_step(model, slides, targets, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"n": spec["n"], "m": spec["n_select"], "batch_size": b, "checkpoint": spec.get("checkpoint", False),
            "grad_chunk_size": spec.get("grad_chunk_size"), "peak_mb": round(peak, 1),
            "before_step_mb": round(before, 1), "step_increment_mb": round(peak - before, 1),
            "step_s": round(time.perf_counter() - start, 2), "n_selected": stats["n_selected"][0]}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure_step` in a fresh Python process (peak RSS is per process and never goes down)."""
    completed = subprocess.run([sys.executable, __file__, "child", json.dumps(spec)], capture_output=True,
                               text=True, check=False, env={**os.environ, **CHILD_ENV})
    if completed.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def growth_pct(runs: list[dict[str, Any]], key: str) -> float:
    """Growth of ``key`` from the first to the last run, in percent."""
    return round(100 * (runs[-1][key] / runs[0][key] - 1), 2)


def available_memory_mb() -> float:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) / 1024


def bench_n(device: str, threads: int, settings: list[str], merge: bool) -> dict[str, Any]:
    grid = GRIDS["cuda" if device.startswith("cuda") else "cpu"]
    result: dict[str, Any] = {"benchmark": "memory_flat_in_n", "device": device, "threads": threads,
                              "child_env": CHILD_ENV, "settings": {}}
    previous = RESULTS_DIR / "memory_n.json"
    if merge and previous.is_file():
        earlier = json.loads(previous.read_text())
        if earlier.get("device") == device:
            # Each kept setting remembers the machine state it was measured under.
            result["settings"] = {k: {"machine": earlier["machine"], **v} for k, v in earlier["settings"].items()
                                  if k not in settings}
    for name in settings:
        setting, cut = SETTINGS[name], grid[name]
        runs = [run_child({**setting, "n": n, "batch_size": cut["batch_size"], "device": device,
                           "threads": threads}) for n in cut["n"]]
        from_m = [r for r in runs if r["n"] >= setting["n_select"]]
        summary = {"config": {**setting, "batch_size": cut["batch_size"]}, "runs": runs,
                   "peak_growth_pct": growth_pct(runs, "peak_mb"),
                   "step_increment_growth_pct": growth_pct(runs, "step_increment_mb")}
        if len(from_m) != len(runs):  # below N = M every patch is kept, so the gradient phase is smaller
            summary["peak_growth_pct_from_first_n_at_least_m"] = growth_pct(from_m, "peak_mb")
            summary["step_increment_growth_pct_from_first_n_at_least_m"] = growth_pct(from_m, "step_increment_mb")
        if "reduced" in cut:
            summary["reduced_on_this_device"] = cut["reduced"]
        result["settings"][name] = summary
    return result


def bench_m(device: str, threads: int) -> dict[str, Any]:
    cut = GRIDS["cuda" if device.startswith("cuda") else "cpu"]["m"]
    setting = SETTINGS["pixels"]
    result: dict[str, Any] = {"benchmark": "memory_flat_in_m", "device": device, "threads": threads,
                              "child_env": CHILD_ENV,
                              "config": {**setting, "batch_size": cut["batch_size"]}, "plain": [],
                              "checkpointed": [], "skipped": []}
    for m in cut["m"]:
        spec = {**setting, "n_select": m, "n": m + setting["chunk_size"], "batch_size": cut["batch_size"],
                "device": device, "threads": threads}
        result["checkpointed"].append(run_child({**spec, "grad_chunk_size": cut["grad_chunk_size"],
                                                 "checkpoint": True}))
        needed = m * cut["batch_size"] * ACTIVATION_MB_PER_PIXEL_PATCH
        if device == "cpu" and needed > 0.6 * available_memory_mb():
            result["skipped"].append(f"plain M = {m}: needs ~{needed / 1024:.1f} GB of activations, "
                                     f"{available_memory_mb() / 1024:.1f} GB available on this shared machine")
            continue
        result["plain"].append(run_child(spec))
    for kind in ("plain", "checkpointed"):
        if len(result[kind]) > 1:
            result[f"{kind}_peak_growth_pct"] = growth_pct(result[kind], "peak_mb")
            result[f"{kind}_step_increment_growth_pct"] = growth_pct(result[kind], "step_increment_mb")
    if "reduced" in cut:
        result["reduced_on_this_device"] = cut["reduced"]
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        print(json.dumps(measure_step(json.loads(argv[1]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["n", "m"], help="flat in N (memory_n.json) or in M (memory_m.json)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per measurement (default: 2)")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS),
                        help="settings of the flat-in-N benchmark (default: all)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other settings of an existing memory_n.json measured on the same device")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.what == "n":
        result = bench_n(args.device, args.threads, args.settings, args.merge)
    else:
        result = bench_m(args.device, args.threads)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    save_result(f"memory_{args.what}", result)


if __name__ == "__main__":
    main()
