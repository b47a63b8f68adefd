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
from dataclasses import asdict, dataclass, field
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


def write_results(out: Path, env: dict, ceilings: dict, rows: list[Row]) -> None:
    """results.json, results.md (tables) and results.png (speed-ups)."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"environment": env, "ceilings": ceilings, "rows": [asdict(r) for r in rows]}
    (out / "results.json").write_text(json.dumps(data, indent=2))
    (out / "results.md").write_text(markdown(env, ceilings, rows))
    plot(out, rows)


def markdown(env: dict, ceilings: dict, rows: list[Row]) -> str:
    lines = [
        f"# Benchmarks on {env['device']}",
        "",
        f"{env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}. "
        f"Ceilings measured in the same run: copy {ceilings['copy_gbps']:.0f} GB/s, "
        f"GEMM {ceilings['gemm_tflops']:.0f} TFLOP/s.",
    ]
    if "cuda" not in env:
        lines += ["", "**A CPU smoke run, not performance**: small shapes, fused kernels in the Triton interpreter."]
    for group in dict.fromkeys(r.group for r in rows):
        sub = [r for r in rows if r.group == group]
        lines += ["", f"## {group}", "", "| case | provider | ms | GB/s | % copy | TFLOP/s | % GEMM | vs eager |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in sub:
            eager = next((e.ms for e in sub if e.case == r.case and e.provider == "eager"), None)
            cells = [
                r.case, r.provider, f"{r.ms:.4f}",
                f"{r.gbps:.0f}" if r.gbps else "", f"{100 * r.gbps / ceilings['copy_gbps']:.0f}%" if r.gbps else "",
                f"{r.tflops:.1f}" if r.tflops else "",
                f"{100 * r.tflops / ceilings['gemm_tflops']:.0f}%" if r.tflops else "",
                f"{eager / r.ms:.2f}x" if eager else "",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(out: Path, rows: list[Row]) -> None:
    """results.png: one panel per group, speed-up over eager for every provider and case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r.group for r in rows))
    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
    for ax, group in zip(axes.flat, groups, strict=False):
        sub = [r for r in rows if r.group == group]
        cases = list(dict.fromkeys(r.case for r in sub))
        providers = list(dict.fromkeys(r.provider for r in sub))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            speedups = []
            for c in cases:
                eager = next((r.ms for r in sub if r.case == c and r.provider == "eager"), None)
                mine = next((r.ms for r in sub if r.case == c and r.provider == p), None)
                speedups.append(eager / mine if eager and mine else 0)
            ax.bar([j + i * width for j in range(len(cases))], speedups, width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(cases))], cases, rotation=15,
                      ha="right", fontsize=7)  # fmt: skip
        ax.set(ylabel="speed-up over eager", title=group)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=90)
    plt.close(fig)
