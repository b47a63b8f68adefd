"""Our ops beside the peers' at TRM's shapes, under a time budget (`trm_benchmarks.first`'s op
table): RMSNorm of a residual sum, SwiGLU, softmax cross-entropy and attention, each by eager
PyTorch, ``torch.compile`` (default, and max-autotune where the budget leaves a minute for its
compilation), Liger-Kernel, QuACK, SDPA's flash / cuDNN / memory-efficient backends and ours,
forward and forward + backward. Memory-bound ops in GB/s by the byte model of
``trm_benchmarks.ops`` (each input read once, each output written once), attention in TFLOP/s
(4 B H S^2 d forward, 3.5x that forward + backward). ``vs_best_peer``: the fastest peer's time
over the row's (above 1: faster than every peer). A peer that does not import is listed once
as not installed; one that raises on a case is listed with its error; nothing stops the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import trm_kernels as K
from trm_kernels import reference as R

from . import peers
from .common import bench
from .ops import _sdpa, fused_runs_on

OURS = ("trm triton", "trm cuda")
DIRECTIONS = ("forward", "forward+backward")


@dataclasses.dataclass
class Case:
    op: str
    case: str
    inputs: list[torch.Tensor]  # the differentiable ones first, then the rest
    grads: int  # how many leading inputs take a gradient
    providers: dict[str, Callable | str]  # name -> fn(*inputs), or why it cannot run here
    work: dict[str, float]  # direction -> bytes (memory-bound) or FLOPs (attention)
    unit: str  # "gbps" or "tflops"


def _peer(name: str, build: Callable[[str], Callable | None]) -> Callable | str:
    try:
        fn = build(name)
    except Exception as e:  # not installed, or not importable on this stack
        return f"not installed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
    return fn if fn is not None else "has no such op"


def _ours(op: str, device: torch.device) -> list[str]:
    """Our backends of `op` that run here (a GPU; the interpreter on a CPU)."""
    return [b for b in ("triton", "cuda") if b in K.available(op) and fused_runs_on(device)]


def _compiled(fn: Callable, compile_ok: bool) -> dict[str, Callable]:
    if not compile_ok:
        return {}
    return {"torch.compile": torch.compile(fn),
            "torch.compile max-autotune": torch.compile(fn, mode="max-autotune-no-cudagraphs")}  # fmt: skip


def _norm_case(rows: int, hidden: int, rand, device, compile_ok: bool) -> Case:
    x, r = rand(rows, hidden), rand(rows, hidden)
    w = torch.ones(hidden, device=device, dtype=x.dtype)  # the peers take a weight; TRM's norm has none

    def eager(a, b, _w):
        return R.add_rmsnorm(a, b)

    providers = {"eager": eager, **_compiled(eager, compile_ok), "Liger-Kernel": _peer("liger", peers.rmsnorm),
                 "QuACK": _peer("quack", peers.rmsnorm)}  # fmt: skip
    for b in _ours("add_rmsnorm", device):
        providers[f"trm {b}"] = lambda a, r_, _w, _b=b: K.add_rmsnorm(a, r_, backend=_b)
    n = x.numel() * x.element_size()
    return Case("rmsnorm(x + r)", f"{rows}x{hidden}", [x, r, w], 2, providers,
                {"forward": 3 * n, "forward+backward": 7 * n}, "gbps")  # fmt: skip


def _swiglu_case(rows: int, inter: int, rand, device, compile_ok: bool) -> Case:
    gu = rand(rows, 2 * inter)
    gate, up = (t.contiguous() for t in gu.chunk(2, -1))  # Liger takes them apart

    def eager(g, _a, _b):
        return R.swiglu(g)

    liger = _peer("liger", peers.swiglu)
    providers = {"eager": eager, **_compiled(eager, compile_ok),
                 "Liger-Kernel": (lambda _g, a, b: liger(a, b)) if callable(liger) else liger}  # fmt: skip
    for b in _ours("swiglu", device):
        providers[f"trm {b}"] = lambda g, _a, _b_, _b=b: K.swiglu(g, backend=_b)
    half = gate.numel() * gate.element_size()
    return Case("swiglu", f"{rows}x{2 * inter}", [gu, gate, up], 3, providers,
                {"forward": 3 * half, "forward+backward": 8 * half}, "gbps")  # fmt: skip


def _ce_case(tokens: int, vocab: int, rand, device, compile_ok: bool) -> Case:
    logits, labels = rand(tokens, vocab), torch.randint(0, vocab, (tokens,), device=device)
    providers = {"eager": R.softmax_cross_entropy, **_compiled(R.softmax_cross_entropy, compile_ok),
                 "Liger-Kernel": _peer("liger", peers.cross_entropy)}  # fmt: skip
    for b in _ours("softmax_cross_entropy", device):
        providers[f"trm {b}"] = lambda x, y, _b=b: K.softmax_cross_entropy(x, y, backend=_b)
    m = logits.numel() * logits.element_size()
    return Case("softmax cross-entropy", f"{tokens}x{vocab}", [logits, labels], 1, providers,
                {"forward": m + 12 * tokens, "forward+backward": 3 * m + 16 * tokens}, "gbps")  # fmt: skip


def _attention_case(batch: int, seq: int, hidden: int, heads: int, rand, device, compile_ok: bool) -> Case:
    d = hidden // heads
    qkv = rand(batch, seq, 3 * hidden)
    cos, sin = (t.to(device) for t in K.rope_cos_sin(seq, d))

    def eager(q):
        return R.rope_attention(q, cos, sin, heads)

    providers = {"eager": eager, **_compiled(eager, compile_ok)}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            sdpa = _sdpa(backend)  # on pre-split q, k, v: no RoPE
            providers[f"SDPA {backend.name.lower().removesuffix('_attention')} (no RoPE)"] = (
                lambda q, _f=sdpa: _f(q, cos, sin, heads))  # fmt: skip
    for b in _ours("rope_attention", device):
        providers[f"trm {b}"] = lambda q, _b=b: K.rope_attention(q, cos, sin, heads, _b)
    flops = 4 * batch * heads * seq * seq * d
    return Case("attention", f"B={batch} H={heads} S={seq} d={d}", [qkv], 1, providers,
                {"forward": flops, "forward+backward": 3.5 * flops}, "tflops")  # fmt: skip


def cases(device: torch.device, quick: bool, compile_ok: bool) -> list[Case]:
    """TRM's shapes in bf16 (sudoku at batch 768: 74,496 rows of 512, intermediate 1536, 8
    heads of 64 at S = 97, 62,208 answer tokens of 11 classes); tiny ones in fp32 on a CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    rows, hidden, inter, heads, seq, batch, tokens, vocab = (
        (74496, 512, 1536, 8, 97, 768, 768 * 81, 11) if not quick else (34, 64, 96, 2, 17, 2, 34, 11))  # fmt: skip
    return [
        _norm_case(rows, hidden, rand, device, compile_ok),
        _swiglu_case(rows, inter, rand, device, compile_ok),
        _ce_case(tokens, vocab, rand, device, compile_ok),
        _attention_case(batch, seq, hidden, heads, rand, device, compile_ok),
    ]


def _timed(case: Case, fn: Callable, device: torch.device, timer) -> dict[str, float]:
    """Milliseconds forward, and forward + backward (the gradient of every differentiable input)."""
    leaves = [t.detach().requires_grad_(i < case.grads and t.is_floating_point()) for i, t in enumerate(case.inputs)]
    out = fn(*leaves)
    grad = torch.randn_like(out)
    wanted = [t for t in leaves if t.requires_grad]

    def both():
        torch.autograd.grad(fn(*leaves), wanted, grad, allow_unused=True)

    with torch.no_grad():
        forward = timer(lambda: fn(*case.inputs), device)
    return {"forward": forward, "forward+backward": timer(both, device)}


def run(device: torch.device, budget, quick: bool = False, compile_ok: bool = True,
        timer: Callable = bench) -> tuple[list[dict], list[str]]:  # fmt: skip
    """(rows, what was skipped and why) of every case, providers in order until the budget is spent."""
    rows, skipped, reported = [], [], set()
    for case in cases(device, quick, compile_ok):
        measured = []
        for name, fn in case.providers.items():
            label = f"{case.op} {case.case} {name}"
            if isinstance(fn, str):
                if name not in reported:  # a peer not installed is said once
                    skipped.append(f"{name}: {fn}")
                    reported.add(name)
                continue
            if budget.left() <= (60 if "max-autotune" in name else 0):
                skipped.append(f"{label}: over the section's budget")
                continue
            try:
                times = _timed(case, fn, device, timer)
            except Exception as e:  # a peer or backend that does not take this shape or dtype
                skipped.append(f"{label}: raised {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
                continue
            for direction, ms in times.items():
                rate = case.work[direction] / ms / (1e6 if case.unit == "gbps" else 1e9)
                measured.append({"op": f"{case.op} {direction}", "case": case.case, "provider": name, "ms": ms,
                                 case.unit: rate})  # fmt: skip
        for direction in DIRECTIONS:
            group = [r for r in measured if r["op"] == f"{case.op} {direction}"]
            best_peer = min((r["ms"] for r in group if r["provider"] not in OURS), default=None)
            for r in group:
                r["vs_best_peer"] = best_peer / r["ms"] if best_peer else None
            rows += group
    return rows, skipped
