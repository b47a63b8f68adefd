"""Where the time of a step goes: one step under the PyTorch profiler, kernels by category.

On a GPU the figures are the kernels' own device times (CUPTI, which also reports the
kernels a CUDA graph replays; not yet checked here on a GPU), so ``busy`` (their sum over
the step's wall time) shows how much of the step the GPU idles on launches and the host.
On a CPU they are the ops' self times.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# First match wins. Names: cuBLAS/CUTLASS GEMMs, our Triton kernels (kernels/*.py), the
# CUDA extension (csrc/), SDPA/flash kernels, inductor's generated kernels, aten's.
CATEGORIES = [
    ("mlp_t sub-layer (fused)", r"token_mlp"),  # GEMMs + SwiGLU + add + RMSNorm in one kernel
    ("GEMM", r"gemm|nvjet|cutlass|xmma|wgmma|aten::(mm|bmm|addmm|matmul|linear)\b"),
    ("attention", r"attn|attention|flash|fmha|_efficient"),
    ("add+rmsnorm", r"rmsnorm|rms_norm"),
    ("swiglu", r"swiglu|silu"),
    ("cross-entropy", r"_ce_|cross_entropy|stablemax|log_softmax"),
    ("injection add", r"_inject"),
    ("optimizer", r"adam|foreach|multi_tensor|lerp|atan2"),
    ("inductor (torch.compile)", r"^triton_"),
    ("elementwise, copies", r"elementwise|vectorized|copy|memcpy|memset|fill|cat|index|where|aten::"),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return label
    return "other"


def profile_step(step: Callable[[], object], device: torch.device, step_ms: float, top: int = 8) -> dict:
    """Profile one call of `step` (already warmed up) whose median wall time is `step_ms`."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        if cuda and event.device_type != DeviceType.CUDA:
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            times[event.key] += us / 1e3
            counts[event.key] += event.count
    by_category: dict[str, float] = defaultdict(float)
    for name, ms in times.items():
        by_category[category(name)] += ms
    total = sum(times.values())
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return {
        "step_ms": step_ms,
        "kernel_ms": total,
        "busy": total / step_ms if step_ms else None,
        "categories": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top": [{"name": name[:100], "ms": ms, "count": counts[name]} for name, ms in ranked],
    }


def markdown(profiles: list[dict]) -> list[str]:
    """Lines of the results.md section: one table of categories, then the top kernels."""
    if not profiles:
        return []
    cats = list(dict.fromkeys(c for p in profiles for c in p["categories"]))
    lines = ["", "## where the time of a training step goes", "",
             "Kernel time per category (ms) in one profiled step; busy = kernel time / step wall time.", "",
             "| case | provider | step ms | busy | " + " | ".join(cats) + " |",
             "|---|---|---:|---:|" + "---:|" * len(cats)]  # fmt: skip
    for p in profiles:
        cells = [f"{p['categories'].get(c, 0):.2f}" for c in cats]
        busy = f"{100 * p['busy']:.0f}%" if p["busy"] is not None else ""
        lines.append(f"| {p['case']} | {p['provider']} | {p['step_ms']:.2f} | {busy} | " + " | ".join(cells) + " |")
    for p in profiles:
        lines += ["", f"Top kernels, {p['case']}, {p['provider']}:", ""]
        lines += [f"- {k['ms']:.2f} ms ({k['count']}x) `{k['name']}`" for k in p["top"]]
    return lines
