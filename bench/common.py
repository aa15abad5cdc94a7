"""Helpers shared by the benchmarks: machine description and result files.

Every benchmark prints its result as JSON and saves it to ``bench/results/<name>.json``
together with :func:`machine_info`, so figures can be compared across machines.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# IPSPATH_BENCH_RESULTS redirects the result files (tests run benchmarks without touching bench/results).
RESULTS_DIR = Path(os.environ.get("IPSPATH_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")

_PACKAGES = ("torch", "numpy", "ipspath", "openslide-python", "openslide-bin", "tiffslide", "zarr", "timm",
             "transformers")


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, total memory, GPU (if any) and versions of the relevant packages."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    # Other jobs on the machine slow a benchmark down; the load average says how busy it was.
    info["load_avg_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # not available on every OS
        info["memory_gb"] = None
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    info["versions"] = versions
    if "torch" in sys.modules:  # only describe the GPU when the benchmark already uses torch
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    return info


def save_result(name: str, result: dict[str, Any], quiet: bool = False) -> Path:
    """Add :func:`machine_info` as ``"machine"``, print the JSON (unless ``quiet``), write
    ``bench/results/<name>.json`` (atomically: a benchmark stopped while writing keeps the last file)."""
    payload = {**result, "machine": machine_info()}
    text = json.dumps(payload, indent=2, default=str)
    if not quiet:
        print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text + "\n")
    os.replace(partial, path)
    return path
