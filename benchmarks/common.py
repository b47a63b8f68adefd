"""Timing, hardware ceilings and result files shared by the benchmarks.

Times are medians over repeats after warm-up: CUDA events through
``triton.testing.do_bench`` on a GPU, a host clock elsewhere. Memory-bound figures are
GB/s from an explicit byte model (each input read once, each output written once) and
their fraction of a device-to-device copy measured in the same run; compute-bound
figures are TFLOP/s and their fraction of a large bf16 GEMM measured in the same run.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


def bench(fn: Callable[[], object], device: torch.device, reps: int = 50) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=max(reps, 100), return_mode="median"))
    fn()
    times = []
    for _ in range(max(3, reps // 10)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_ceiling(device: torch.device, nbytes: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / ms / 1e6


def gemm_ceiling(device: torch.device, size: int) -> float:
    """TFLOP/s of a large square matrix product (bf16 on GPU, fp32 on CPU), random data."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    ms = bench(lambda: a @ b, device)
    return 2 * size**3 / ms / 1e9


@dataclass
class Row:
    """One measurement: a case (op or model config) by a provider."""

    group: str
    case: str
    provider: str
    ms: float
    gbps: float | None = None
    tflops: float | None = None
    extra: dict = field(default_factory=dict)


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        info["sms"] = props.multi_processor_count
    return info


def speed(row: Row) -> float:
    """Work per millisecond: batches per ms for model rows (their batch is in extra), calls per ms otherwise."""
    return row.extra.get("batch", 1) / row.ms


def vs_eager(row: Row, rows: list[Row]) -> float | None:
    """Speed relative to the eager row of the same case (for a batch search, of the same group)."""
    eager = next((r for r in rows if r.group == row.group and r.case == row.case and r.provider == "eager"), None)
    return speed(row) / speed(eager) if eager else None


@dataclass
class Results:
    """One benchmark run (or several merged): what results.json holds."""

    environment: dict
    ceilings: dict
    rows: list[Row] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # cases not measured, with the reason
    profiles: list[dict] = field(default_factory=list)  # trm_benchmarks.breakdown of training steps


def read_results(path: Path) -> Results:
    """The Results of a results.json, or of the one in a directory."""
    path = path / "results.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
        data["rows"] = [Row(**r) for r in data["rows"]]
        return Results(**data)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a benchmark results file ({e})") from None


def merge(parts: list[Results]) -> Results:
    """Several runs on one device (the parts of one GPU run) as one: the first run's
    environment and ceilings, then every row, skip and profile in order."""
    devices = {part.environment["device"] for part in parts}
    if len(devices) != 1:
        raise ValueError(f"cannot merge runs from different devices: {sorted(devices)}")
    first = parts[0]
    return Results(first.environment, first.ceilings, [r for p in parts for r in p.rows],
                   [s for p in parts for s in p.skipped], [f for p in parts for f in p.profiles])  # fmt: skip
