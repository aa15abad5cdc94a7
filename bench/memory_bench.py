"""Peak memory of one IPS training step: flat in the number of patches N, and in M when checkpointed.

    python bench/memory_bench.py n [--device cuda]   # -> bench/results/memory_n.json (memory_n_cuda.json)
    python bench/memory_bench.py m [--device cuda]   # -> bench/results/memory_m.json (memory_m_cuda.json)

Every measurement is one :func:`ips_path.model.train_step` (selection of B slides, then one gradient
phase on the ``(B, M, ...)`` batch, backward, AdamW step) in a fresh subprocess, so that peaks do not
mix. The patches of each slide are generated chunk by chunk while the model consumes them and are never
held all at once, as the loader streams them from a slide file.

Peak memory: on CPU the child's maximum resident set size (``ru_maxrss``; the whole process: Python,
torch, weights, optimizer state and the step), with glibc's mmap threshold fixed (see :data:`CHILD_ENV`)
so that RSS follows live memory; on CUDA ``torch.cuda.max_memory_allocated`` during the step, and
``max_memory_reserved`` beside it (what the caching allocator held: what other processes could not use).
``step_increment_mb`` is the peak minus the memory held just before the step. On CUDA the step runs
under bf16 autocast, as ``ipspath train`` runs it; on CPU in float32.

A point that would not fit is skipped and recorded, never fatal: on CPU when the estimated activations
exceed the available memory, on CUDA when they exceed ``torch.cuda.mem_get_info``'s free memory or the
step runs out of memory. The result file is rewritten after every point (``"complete": false`` until
the last), so a run stopped midway keeps what it measured.

Settings (:data:`SETTINGS`):

``features``
    cached 2048-d float16 features, projector to D = 512, M = I = 5000, B = 16 (the paper's
    CAMELYON16 setting; the paper reports 5 GB at N up to 250k on a GPU). A feature chunk is a fixed
    random bank of I rows, rolled by a chunk-dependent shift, so no RNG dominates the run time.
``features_checkpointed``
    the same with the gradient phase in checkpointed pieces of 5000 patches (``grad_chunk_size``).
``pixels``
    uint8 RGB patches of 256 px, ResNet-18 (4 stages, projected to D = 128), M = 16, I = 64; random
    pixels from a fixed bank of I patches made once on the device and rolled per chunk (random pixels
    drawn afresh on the CPU took over an hour for the CUDA grid).

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


def feature_stream(n: int, chunk_size: int, dim: int, seed: int, device: str = "cpu") -> Iterator:
    """Chunks of ``(n_chunk, dim)`` float16 features on ``device``; one chunk exists at a time."""
    import torch

    bank = torch.randn(chunk_size, dim, generator=torch.Generator().manual_seed(seed)).half().to(device)
    return rolled_bank_stream(bank, n)


def pixel_stream(n: int, chunk_size: int, patch_size: int, seed: int, device: str = "cpu") -> Iterator:
    """Chunks of ``(n_chunk, 3, patch_size, patch_size)`` uint8 random pixels on ``device``."""
    import torch

    bank = torch.randint(0, 256, (chunk_size, 3, patch_size, patch_size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed)).to(device)
    return rolled_bank_stream(bank, n)


def rolled_bank_stream(bank, n: int) -> Iterator:
    """``n`` rows in chunks of ``len(bank)``: the bank rolled by a chunk-dependent shift, so chunks differ
    (a patch's score varies through the stream) while no random numbers are drawn per chunk."""
    from ips_path.model import PatchChunk

    for index, start in enumerate(range(0, n, len(bank))):
        rows = min(len(bank), n - start)
        yield PatchChunk(bank.roll(7919 * index, dims=0)[:rows])


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def estimated_need_mb(spec: dict[str, Any]) -> float:
    """Activations of the plain (not checkpointed) pixel gradient phase; 0 where they are small."""
    if spec["input"] != "pixels" or spec.get("checkpoint"):
        return 0.0
    return spec["n_select"] * spec["batch_size"] * ACTIVATION_MB_PER_PIXEL_PATCH


def measure_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model of ``spec`` and run one training step on B streamed slides; memory and time.

    On CUDA a step that would not fit in the free memory, or runs out of it, returns ``{"skipped": why}``.
    """
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    point = {"n": spec["n"], "m": spec["n_select"], "batch_size": spec["batch_size"],
             "checkpoint": spec.get("checkpoint", False)}
    if device.type == "cuda":
        free_mb = torch.cuda.mem_get_info(device)[0] / 2**20
        if estimated_need_mb(spec) > 0.9 * free_mb:
            return {**point, "skipped": f"needs ~{estimated_need_mb(spec) / 1024:.1f} GB of activations, "
                                        f"{free_mb / 1024:.1f} GB free on the GPU"}
        try:
            return _measure_step(spec, device, point)
        except torch.cuda.OutOfMemoryError as exc:
            return {**point, "skipped": "out of GPU memory: " + " ".join(str(exc).split())[:300]}
    return _measure_step(spec, device, point)


def _measure_step(spec: dict[str, Any], device, point: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ips_path.model import IPSModel, Task, build_encoder, train_step

    if spec["input"] == "features":
        encoder = build_encoder("features", in_features=spec["in_features"], out_dim=spec["dim"])
    else:
        encoder = build_encoder(spec["encoder"])
    model = IPSModel(encoder, [Task("tumor", 2, "binary")], dim=spec["dim"], n_heads=8,
                     n_select=spec["n_select"], chunk_size=spec["chunk_size"],
                     grad_chunk_size=spec.get("grad_chunk_size"), checkpoint=spec.get("checkpoint", False)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = spec["batch_size"]
    # Banks on the device, as the loader delivers chunks there.
    if spec["input"] == "features":
        slides = [feature_stream(spec["n"], spec["chunk_size"], spec["in_features"], seed, spec["device"])
                  for seed in range(b)]
    else:
        slides = [pixel_stream(spec["n"], spec["chunk_size"], spec["patch_size"], seed, spec["device"])
                  for seed in range(b)]
    targets = {"tumor": torch.arange(b, device=device) % 2}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = current_rss_mb()
    start = time.perf_counter()
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None  # what ipspath train uses
    stats = train_step(model, slides, targets, optimizer, autocast_dtype=autocast_dtype)
    extra = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        extra["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {**point, "grad_chunk_size": spec.get("grad_chunk_size"), "peak_mb": round(peak, 1), **extra,
            "before_step_mb": round(before, 1), "step_increment_mb": round(peak - before, 1),
            "step_s": round(time.perf_counter() - start, 2), "n_selected": stats["n_selected"][0],
            "precision": "bf16 autocast" if autocast_dtype is not None else "float32"}


def run_child(spec: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """:func:`measure_step` in a fresh Python process (peak RSS is per process and never goes down).

    A child that fails or outlives ``timeout_s`` gives ``{"skipped": why}`` instead of stopping the run.
    """
    point = {"n": spec["n"], "m": spec["n_select"], "batch_size": spec["batch_size"],
             "checkpoint": spec.get("checkpoint", False)}
    try:
        completed = subprocess.run([sys.executable, __file__, "child", json.dumps(spec)], capture_output=True,
                                   text=True, check=False, env={**os.environ, **CHILD_ENV}, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        result = {**point, "skipped": f"took over {timeout_s:.0f} s"}
    else:
        if completed.returncode != 0:
            result = {**point, "skipped": f"failed (exit {completed.returncode}): {completed.stderr[-1500:]}"}
        else:
            result = json.loads(completed.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def growth_pct(runs: list[dict[str, Any]], key: str) -> float | None:
    """Growth of ``key`` from the first to the last measured run, in percent (None with fewer than two)."""
    measured = [r for r in runs if key in r]
    if len(measured) < 2:
        return None
    return round(100 * (measured[-1][key] / measured[0][key] - 1), 2)


def available_memory_mb() -> float:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) / 1024


def measure(spec: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """One point: skipped up front on CPU when its activations would not fit in the available memory."""
    if not spec["device"].startswith("cuda") and estimated_need_mb(spec) > 0.6 * available_memory_mb():
        return {"n": spec["n"], "m": spec["n_select"], "batch_size": spec["batch_size"],
                "checkpoint": spec.get("checkpoint", False),
                "skipped": f"needs ~{estimated_need_mb(spec) / 1024:.1f} GB of activations, "
                           f"{available_memory_mb() / 1024:.1f} GB available on this machine"}
    return run_child(spec, timeout_s)


def summarise_n(setting: dict[str, Any], cut: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one setting with their growth in N (from the first N >= M too, where smaller N exist)."""
    summary = {"config": {**setting, "batch_size": cut["batch_size"]}, "runs": runs,
               "peak_growth_pct": growth_pct(runs, "peak_mb"),
               "step_increment_growth_pct": growth_pct(runs, "step_increment_mb")}
    if any("peak_reserved_mb" in r for r in runs):
        summary["peak_reserved_growth_pct"] = growth_pct(runs, "peak_reserved_mb")
    from_m = [r for r in runs if r["n"] >= setting["n_select"]]
    if len(from_m) != len(runs):  # below N = M every patch is kept, so the gradient phase is smaller
        summary["peak_growth_pct_from_first_n_at_least_m"] = growth_pct(from_m, "peak_mb")
        summary["step_increment_growth_pct_from_first_n_at_least_m"] = growth_pct(from_m, "step_increment_mb")
    if "reduced" in cut:
        summary["reduced_on_this_device"] = cut["reduced"]
    return summary


def bench_n(device: str, threads: int, settings: list[str], merge: bool, grid: dict[str, Any] | None = None,
            name: str = "memory_n", timeout_s: float | None = None) -> dict[str, Any]:
    """Flat in N; ``grid`` overrides :data:`GRIDS` per setting. Writes ``bench/results/<name>.json`` after
    every point."""
    grid = grid or GRIDS["cuda" if device.startswith("cuda") else "cpu"]
    result: dict[str, Any] = {"benchmark": "memory_flat_in_n", "device": device, "threads": threads,
                              "child_env": CHILD_ENV, "complete": False, "settings": {}}
    previous = RESULTS_DIR / f"{name}.json"
    if merge and previous.is_file():
        earlier = json.loads(previous.read_text())
        if earlier.get("device") == device:
            # Each kept setting remembers the machine state it was measured under.
            result["settings"] = {k: {"machine": earlier["machine"], **v} for k, v in earlier["settings"].items()
                                  if k not in settings}
    for setting_name in settings:
        setting, cut = SETTINGS[setting_name], grid[setting_name]
        runs: list[dict[str, Any]] = []
        for n in cut["n"]:
            runs.append(measure({**setting, "n": n, "batch_size": cut["batch_size"], "device": device,
                                 "threads": threads}, timeout_s))
            result["settings"][setting_name] = summarise_n(setting, cut, runs)
            save_result(name, result, quiet=True)
    result["complete"] = True
    return result


def bench_m(device: str, threads: int, grid: dict[str, Any] | None = None, name: str = "memory_m",
            timeout_s: float | None = None) -> dict[str, Any]:
    """Flat in M with checkpointing (and the plain step beside it); written after every point."""
    cut = grid or GRIDS["cuda" if device.startswith("cuda") else "cpu"]["m"]
    setting = SETTINGS["pixels"]
    result: dict[str, Any] = {"benchmark": "memory_flat_in_m", "device": device, "threads": threads,
                              "child_env": CHILD_ENV, "complete": False,
                              "config": {**setting, "batch_size": cut["batch_size"]}, "plain": [],
                              "checkpointed": [], "skipped": []}
    if "reduced" in cut:
        result["reduced_on_this_device"] = cut["reduced"]
    for m in cut["m"]:
        spec = {**setting, "n_select": m, "n": m + setting["chunk_size"], "batch_size": cut["batch_size"],
                "device": device, "threads": threads}
        for kind, point in (("checkpointed", {**spec, "grad_chunk_size": cut["grad_chunk_size"], "checkpoint": True}),
                            ("plain", spec)):
            measured = measure(point, timeout_s)
            if "skipped" in measured:
                result["skipped"].append(f"{kind} M = {m}: {measured['skipped']}")
            else:
                result[kind].append(measured)
            for k in ("plain", "checkpointed"):
                result[f"{k}_peak_growth_pct"] = growth_pct(result[k], "peak_mb")
                result[f"{k}_step_increment_growth_pct"] = growth_pct(result[k], "step_increment_mb")
            save_result(name, result, quiet=True)
    result["complete"] = True
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
    name = f"memory_{args.what}" + ("_cuda" if args.device.startswith("cuda") else "")
    if args.what == "n":
        result = bench_n(args.device, args.threads, args.settings, args.merge, name=name)
    else:
        result = bench_m(args.device, args.threads, name=name)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    save_result(name, result)


if __name__ == "__main__":
    main()
