"""The report of a benchmark run: results.json, results.md (tables, targets, profiles), results.png
and ceiling.png."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from . import targets
from .breakdown import markdown as breakdown_markdown
from .common import Results, Row, vs_eager


def write_results(out: Path, results: Results) -> None:
    """results.json, results.md (tables), results.png (speed-ups) and ceiling.png (fraction of ceiling)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(asdict(results), indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(out, results.rows, results.ceilings)


# Columns of the markdown tables: (title, cell of a row, or None where it has no such figure)
_COLUMNS = [
    ("ms", lambda r, c, rows: f"{r.ms:.4f}" if r.ms < 10 else f"{r.ms:.1f}"),
    ("batch", lambda r, c, rows: str(r.extra["batch"]) if "batch" in r.extra else None),
    ("tokens/s", lambda r, c, rows: f"{r.extra['tokens_per_s']:,.0f}" if "tokens_per_s" in r.extra else None),
    ("puzzles/s", lambda r, c, rows: f"{r.extra['puzzles_per_s']:,.0f}" if "puzzles_per_s" in r.extra else None),
    ("exact", lambda r, c, rows: f"{100 * r.extra['exact_accuracy']:.1f}%" if "exact_accuracy" in r.extra else None),
    ("steps", lambda r, c, rows: f"{r.extra['steps_mean']:.2f}" if "steps_mean" in r.extra else None),
    ("GB/s", lambda r, c, rows: f"{r.gbps:.0f}" if r.gbps else None),
    ("% copy", lambda r, c, rows: f"{100 * r.gbps / c['copy_gbps']:.0f}%" if r.gbps else None),
    ("TFLOP/s", lambda r, c, rows: f"{r.tflops:.1f}" if r.tflops else None),
    ("% GEMM", lambda r, c, rows: f"{100 * r.tflops / c['gemm_tflops']:.0f}%" if r.tflops else None),
    ("peak GiB", lambda r, c, rows: f"{r.extra['peak_gib']:.1f}" if r.extra.get("peak_gib") is not None else None),
    ("vs eager", lambda r, c, rows: f"{x:.2f}x" if (x := vs_eager(r, rows)) is not None else None),
]


def markdown(results: Results) -> str:
    env, ceilings, rows = results.environment, results.ceilings, results.rows
    lines = [
        f"# Benchmarks on {env['device']}",
        "",
        f"{env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}. "
        f"Ceilings measured in the same run: copy {ceilings['copy_gbps']:.0f} GB/s, "
        f'GEMM {ceilings["gemm_tflops"]:.0f} TFLOP/s. "% GEMM" of a training step is its MFU.',
    ]
    if "cuda" not in env:
        backends = sorted({r.extra["backend"] for r in rows if r.extra.get("backend")})
        ran = f" (the fused rows ran: {', '.join(backends)})" if backends else ""
        lines += ["", f"**A CPU smoke run, not performance**: small shapes{ran}."]
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
