"""The project's performance targets, checked against a benchmark run, and
the HRM vs TRM comparison the paper's table needs.

Each target compares our best provider on a case with a bound: a fraction of the copy or
GEMM ceiling measured in the same run, or a speed-up over another provider of the same
case. A case missing from the run (not measured, out of memory) is reported as such,
never as met.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .common import Results, Row, speed

OURS_OPS = ("triton", "cuda")
OURS_MODEL = ("fused + CUDA graphs", "fused")
AUTO_MLP = "triton (auto: the faster, timed)"  # trm_benchmarks.ops's provider names for the SwiGLU MLP
TOKEN_COMPOSED, TOKEN_FUSED = "triton, composed ops", "triton, fused training kernels"  # and for mlp_t with grad
# the candidates of the norm-epilogue ops, as trm_benchmarks.ops names them ("triton " + the candidate)
SUBLAYER = (
    "triton fused",
    "triton one kernel",
    "triton SwiGLU epilogue + add_rmsnorm",
    "triton cuBLAS + swiglu + add_rmsnorm",
)
LINEAR_NORM = ("triton fused", "triton cuBLAS + add_rmsnorm")


@dataclass
class Check:
    target: str
    case: str
    measured: str
    met: bool | None  # None: not measured


def _best(rows: list[Row], group: str, case: str, providers: tuple[str, ...]) -> Row | None:
    mine = [r for r in rows if r.group == group and r.case == case and r.provider in providers]
    return max(mine, key=speed, default=None)


def _cases(rows: list[Row], group: str, contains: str = "") -> list[str]:
    return list(dict.fromkeys(r.case for r in rows if r.group == group and contains in r.case))


def _fraction(results: Results, group: str, bound: float, contains: str) -> Iterator[Check]:
    copy = results.ceilings["copy_gbps"]
    for case in _cases(results.rows, group, contains):
        best = _best(results.rows, group, case, OURS_OPS)
        if best is None:
            yield Check(f"{group} >= {bound:.0%} of copy", case, "", None)
            continue
        got = best.gbps / copy
        yield Check(f"{group} >= {bound:.0%} of copy", case, f"{got:.0%} ({best.provider})", got >= bound)


def _speedup(results: Results, group: str, case: str, over: str, bound: float) -> Check:
    target = f"{group}: ours >= {bound}x {over}"
    best = _best(results.rows, group, case, OURS_MODEL)
    other = next((r for r in results.rows if r.group == group and r.case == case and r.provider == over), None)
    if best is None or other is None:
        return Check(target, case, "", None)
    got = speed(best) / speed(other)
    return Check(target, case, f"{got:.2f}x ({best.provider})", got >= bound)


def check(results: Results) -> list[Check]:
    rows, out = results.rows, []
    # op level at TRM shapes (hidden 512, the last axis)
    out += _fraction(results, "add+rmsnorm forward", 0.80, "hidden")
    out += _fraction(results, "add+rmsnorm backward", 0.70, "hidden")
    out += _fraction(results, "swiglu forward", 0.80, "")
    out += _fraction(results, "swiglu backward", 0.80, "")
    group = "attention forward+backward"
    for case in _cases(rows, group):
        target = f"{group}: faster than the fastest SDPA"
        best = _best(rows, group, case, OURS_OPS)
        sdpa = [r for r in rows if r.group == group and r.case == case and r.provider.startswith("sdpa")]
        if best is None or not sdpa:
            out.append(Check(target, case, "", None))
            continue
        fastest = min(sdpa, key=lambda r: r.ms)
        out.append(Check(target, case, f"{best.ms:.3f} ms vs {fastest.ms:.3f} ms ({fastest.provider})",
                         best.ms < fastest.ms))  # fmt: skip
    # where a fused GEMM competes with cuBLAS, the timed choice runs the faster
    # (within 5%: the two are timed once on the first call, the table times them again)
    candidates = {"swiglu_mlp forward": ("cuBLAS + triton swiglu", "triton GEMM epilogues"),
                  "swiglu_mlp backward": ("cuBLAS + triton swiglu", "triton GEMM epilogues"),
                  "mlp_t sub-layer forward+backward": (TOKEN_COMPOSED, TOKEN_FUSED),
                  "swiglu_mlp_rmsnorm forward, no grad": SUBLAYER, "swiglu_mlp_rmsnorm forward+backward": SUBLAYER,
                  "linear_add_rmsnorm forward, no grad": LINEAR_NORM,
                  "linear_add_rmsnorm forward+backward": LINEAR_NORM}  # fmt: skip
    for group, names in candidates.items():
        for case in _cases(rows, group):
            times = {r.provider: r.ms for r in rows if r.group == group and r.case == case}
            chosen = times.get(AUTO_MLP)
            others = [times[p] for p in names if p in times]
            target = f"{group}: the timed choice within 5% of the faster candidate"
            if chosen is None or len(others) < 2:
                out.append(Check(target, case, "", None))
                continue
            out.append(Check(target, case, f"{chosen:.3f} ms vs {min(others):.3f} ms", chosen <= 1.05 * min(others)))
    # model level at batch 768 (where the run has a model part)
    for config in ("sudoku-mlp", "maze") if any(r.group == "training step" for r in rows) else ():
        case = f"{config} B=768"
        out.append(_speedup(results, "training step", case, "eager", 2.0))
        out.append(_speedup(results, "training step", case, "torch.compile reduce-overhead", 1.3))
    for case in _cases(rows, "training step", "B=768"):
        best = _best(rows, "training step", case, OURS_MODEL)
        mfu = best.tflops / results.ceilings["gemm_tflops"] if best and best.tflops else None
        out.append(Check("training step MFU >= 45%", case, f"{mfu:.0%} ({best.provider})" if mfu else "",
                         mfu >= 0.45 if mfu else None))  # fmt: skip
        eager = next((r for r in rows if r.group == "training step" and r.case == case and r.provider == "eager"), None)
        if best and eager and best.extra.get("peak_gib") and eager.extra.get("peak_gib"):
            mine, theirs = best.extra["peak_gib"], eager.extra["peak_gib"]
            measured = f"{mine:.1f} vs {theirs:.1f} GiB ({best.provider})"
            out.append(Check("training peak memory <= eager's", case, measured, mine <= theirs))
    for case in _cases(rows, "evaluation (full solve)"):
        if case.endswith(" B=1"):
            out.append(_speedup(results, "evaluation (full solve)", case, "eager", 5.0))
    return out


def markdown(results: Results) -> list[str]:
    checks = check(results)
    if not checks:
        return []
    mark = {True: "met", False: "**missed**", None: "not measured"}
    lines = ["", "## targets", "", "| target | case | measured | |", "|---|---|---|---|"]
    lines += [f"| {c.target} | {c.case} | {c.measured} | {mark[c.met]} |" for c in checks]
    return lines


def hrm_vs_trm(results: Results, batch: int = 768) -> list[str]:
    """Training-step time of HRM against both TRM variants at the Sudoku config, per provider."""
    cases = {"TRM mlp_t": f"sudoku-mlp B={batch}", "TRM attention": f"sudoku-att B={batch}",
             "HRM": f"hrm-sudoku B={batch}"}  # fmt: skip
    times = {(r.provider, r.case): r.ms for r in results.rows if r.group == "training step"}
    providers = [p for p in dict.fromkeys(p for p, _ in times) if (p, cases["HRM"]) in times]
    if not providers:
        return []
    lines = ["", f"## HRM vs TRM: training step at the Sudoku config, batch {batch}", "",
             "| provider | " + " | ".join(f"{k} ms" for k in cases) + " | HRM / TRM attention |",
             "|---|" + "---:|" * (len(cases) + 1)]  # fmt: skip
    for p in providers:
        ms = [times.get((p, c)) for c in cases.values()]
        ratio = f"{ms[2] / ms[1]:.2f}x" if ms[1] else ""
        lines.append(f"| {p} | " + " | ".join(f"{m:.1f}" if m else "" for m in ms) + f" | {ratio} |")
    return lines
