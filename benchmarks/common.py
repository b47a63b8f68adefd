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

from .breakdown import markdown as breakdown_markdown


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
    profiles: list[dict] = field(default_factory=list)  # benchmarks.breakdown of training steps


def write_results(out: Path, results: Results) -> None:
    """results.json, results.md (tables), results.png (speed-ups) and ceiling.png (fraction of ceiling)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(asdict(results), indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(out, results.rows, results.ceilings)


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
    """Several runs on one device (the parts of a GPU session) as one: the first run's
    environment and ceilings, then every row, skip and profile in order."""
    devices = {part.environment["device"] for part in parts}
    if len(devices) != 1:
        raise ValueError(f"cannot merge runs from different devices: {sorted(devices)}")
    first = parts[0]
    return Results(first.environment, first.ceilings, [r for p in parts for r in p.rows],
                   [s for p in parts for s in p.skipped], [f for p in parts for f in p.profiles])  # fmt: skip


# Columns of the markdown tables: (title, cell of a row, or None where it has no such figure)
_COLUMNS = [
    ("ms", lambda r, c, rows: f"{r.ms:.4f}" if r.ms < 10 else f"{r.ms:.1f}"),
    ("batch", lambda r, c, rows: str(r.extra["batch"]) if "batch" in r.extra else None),
    ("tokens/s", lambda r, c, rows: f"{r.extra['tokens_per_s']:,.0f}" if "tokens_per_s" in r.extra else None),
    ("puzzles/s", lambda r, c, rows: f"{r.extra['puzzles_per_s']:,.0f}" if "puzzles_per_s" in r.extra else None),
    ("GB/s", lambda r, c, rows: f"{r.gbps:.0f}" if r.gbps else None),
    ("% copy", lambda r, c, rows: f"{100 * r.gbps / c['copy_gbps']:.0f}%" if r.gbps else None),
    ("TFLOP/s", lambda r, c, rows: f"{r.tflops:.1f}" if r.tflops else None),
    ("% GEMM", lambda r, c, rows: f"{100 * r.tflops / c['gemm_tflops']:.0f}%" if r.tflops else None),
    ("peak GiB", lambda r, c, rows: f"{r.extra['peak_gib']:.1f}" if r.extra.get("peak_gib") is not None else None),
    ("vs eager", lambda r, c, rows: f"{x:.2f}x" if (x := vs_eager(r, rows)) is not None else None),
]


def markdown(results: Results) -> str:
    from . import targets  # it reads Results: imported here, not at the top

    env, ceilings, rows = results.environment, results.ceilings, results.rows
    lines = [
        f"# Benchmarks on {env['device']}",
        "",
        f"{env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}. "
        f"Ceilings measured in the same run: copy {ceilings['copy_gbps']:.0f} GB/s, "
        f'GEMM {ceilings["gemm_tflops"]:.0f} TFLOP/s. "% GEMM" of a training step is its MFU.',
    ]
    if "cuda" not in env:
        lines += ["", "**A CPU smoke run, not performance**: small shapes, fused kernels in the Triton interpreter."]
    for group in dict.fromkeys(r.group for r in rows):
        sub = [r for r in rows if r.group == group]
        cells = [[cell(r, ceilings, sub) for _, cell in _COLUMNS] for r in sub]
        used = [i for i in range(len(_COLUMNS)) if any(c[i] is not None for c in cells)]
        lines += ["", f"## {group}", "", "| case | provider | " + " | ".join(_COLUMNS[i][0] for i in used) + " |",
                  "|---|---|" + "---:|" * len(used)]  # fmt: skip
        for r, c in zip(sub, cells, strict=True):
            lines.append(f"| {r.case} | {r.provider} | " + " | ".join(c[i] or "" for i in used) + " |")
    if results.skipped:
        lines += ["", "## not measured", ""]
        lines += [f"- {s['group']}, {s['case']}, {s['provider']}: {s['reason']}" for s in results.skipped]
    lines += targets.hrm_vs_trm(results)
    lines += targets.markdown(results)
    lines += breakdown_markdown(results.profiles)
    return "\n".join(lines) + "\n"


def _bars(ax, rows: list[Row], value: Callable[[Row], float | None], ylabel: str, title: str) -> None:
    cases = list(dict.fromkeys(r.case for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        values = []
        for c in cases:
            row = next((r for r in rows if r.case == c and r.provider == p), None)
            values.append((value(row) or 0) if row else 0)
        ax.bar([j + i * width for j in range(len(cases))], values, width, label=p)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(cases))], cases, rotation=15,
                  ha="right", fontsize=7)  # fmt: skip
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=7)


def _figure(out: Path, panels: list[tuple[list[Row], Callable, str, str, float | None]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
    for ax, (rows, value, ylabel, title, line) in zip(axes.flat, panels, strict=False):
        _bars(ax, rows, value, ylabel, title)
        if line is not None:
            ax.axhline(line, color="black", linewidth=0.8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def plot(out: Path, rows: list[Row], ceilings: dict) -> None:
    """results.png: speed-up over eager per provider and case, one panel per group.
    ceiling.png: the achieved fraction of the copy (memory-bound ops) or GEMM (attention,
    training steps: MFU) ceiling measured in the same run."""
    groups = list(dict.fromkeys(r.group for r in rows))
    by_group = {g: [r for r in rows if r.group == g] for g in groups}
    speedups = [(sub, lambda r, _s=sub: vs_eager(r, _s), "speed-up over eager", g, 1.0) for g, sub in by_group.items()]
    _figure(out / "results.png", speedups)

    def fraction(r: Row) -> float | None:
        if r.gbps:
            return 100 * r.gbps / ceilings["copy_gbps"]
        return 100 * r.tflops / ceilings["gemm_tflops"] if r.tflops else None

    panels = [(sub, fraction, "% of copy" if sub[0].gbps else "% of GEMM", g, None)
              for g, sub in by_group.items() if any(fraction(r) for r in sub)]  # fmt: skip
    if panels:
        _figure(out / "ceiling.png", panels)
