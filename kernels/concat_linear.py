"""A linear layer on a concatenation, ``F.linear(cat([x, e], -1), W, b)``, without the concatenation (Triton).

Recurrent-depth language models (Huginn) inject the prelude's embeddings e into every loop of
the recurrent core through an adapter on ``cat([state, e], -1)``: ``nn.Linear(Kx + Ke, N)``.
Composed, each loop writes and re-reads the [M, Kx + Ke] concatenation, and backward makes
[M, Kx + Ke] again for the weight gradient and slices the input gradient into two copies.

Forward here is one GEMM whose K loop runs over x's columns and then e's (two A pointers,
one fp32 accumulator against W's two column blocks, rounded once); the bias is added in
fp32 in the epilogue. Backward needs no concatenation either: dx = g @ W[:, :Kx] and
de = g @ W[:, Kx:] multiply by the weight's column slices, dW's two column blocks are
written into one [N, Kx + Ke] buffer (``torch.mm(..., out=view)``), db is g summed over the
rows in fp32: cuBLAS GEMMs (torch.mm on CPU), nothing left to fuse. Only x, e and W are kept.

On a GPU the first call of each signature times the fused GEMM against ``torch.cat`` +
``F.linear`` (cuBLAS) and runs the faster (:mod:`trm_kernels.tune`); fp32 on a GPU, and a
device that fits no tile, take the composition (see ``_triton.fits``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import tune
from ._triton import check_input, device_budget, fits, has_configs, interpreting, launch, needed_on, precision
from .channel_mlp import GROUP_M, _gemm, _tile_offsets


@triton.jit
def _concat_linear_fwd(
    X, E, W, BIAS, OUT, M, N, KX, KE,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """out = x @ W[:, :KX]^T + e @ W[:, KX:]^T (+ bias) for x [M, KX], e [M, KE], W [N, KX + KE]."""
    rm, rn = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = rm.to(tl.int64)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc = _gemm(X, W, rows, m_ok, rn, n_ok, KX, KX + KE, acc, True, BLOCK_K, PREC)
    acc = _gemm(E, W + KX, rows, m_ok, rn, n_ok, KE, KX + KE, acc, True, BLOCK_K, PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows[:, None] * N + rn[None, :], acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner tries on a GPU. Each
# compiles for every architecture in trm_kernels.arch with no spills and within its shared
# memory (trm_benchmarks.ptx; tests/test_ptx.py checks it). One accumulator, so wider than
# the SwiGLU epilogue's (which holds two); 128x64x64 at 4 warps needs 238-255 registers on
# mma.sync architectures, so it takes 8. The interpreter runs INTERPRETER_CONFIG (wide:
# its cost is per operation); FIXED_CONFIG, where set, runs everywhere (tests run each config).
CONFIGS = [(128, 128, 32, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3)]
INTERPRETER_CONFIG = (128, 128, 64, 4, 1)
# Shared memory each config takes per architecture, bf16 and fp16, as `python -m
# trm_benchmarks.ptx` reports with triton 3.9; the autotuner drops a config the device cannot
# launch. tests/test_ptx.py fails if a compiled kernel needs more than is written here.
SHARED_BYTES = {
    (128, 128, 32, 8, 3): {80: 32768, 86: 32768, 89: 32768, 90: 49152, 100: 49168, 120: 32768},
    (128, 64, 64, 8, 3): {80: 49152, 86: 49152, 89: 49152, 90: 73728, 100: 73744, 120: 49152},
    (64, 64, 64, 4, 3): {80: 32768, 86: 32768, 89: 32768, 90: 49152, 100: 49168, 120: 32768},
}
FIXED_CONFIG: tuple[int, int, int, int, int] | None = None


def config_name(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> str:
    return f"concat_linear {block_m}x{block_n}x{block_k} {warps} warps {stages} stages"


def launchable(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[tuple[int, int, int, int, int]]:
    """The configs this device can launch in this dtype (all where no limit applies; none in
    fp32 on a GPU, see _triton.fits)."""
    budget = device_budget(device)
    if budget is None:
        return CONFIGS
    return [c for c in CONFIGS if fits(budget, dtype, needed_on(SHARED_BYTES[c], budget[0]))]


def _prune(configs, named_args, **_):
    x = named_args["X"]
    tiles = launchable(x.device, x.dtype)
    return [c for c in configs if (*(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), c.num_warps,
                                   c.num_stages) in tiles]  # fmt: skip


def _autotuned(do_bench=None):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in CONFIGS]  # fmt: skip
    tuned = triton.autotune(configs, key=["M", "N", "KX", "KE"], do_bench=do_bench,
                            prune_configs_by={"early_config_prune": _prune})(_concat_linear_fwd)  # fmt: skip
    return tune.shared_autotuner(tuned)


_FWD = _concat_linear_fwd if interpreting() else _autotuned()


@torch.library.custom_op("trm::concat_linear", mutates_args=())
def concat_linear_fwd(
    x: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, Kx], e [M, Ke], weight [N, Kx + Ke], bias [N] or None -> [M, N]."""
    x, e, weight = x.contiguous(), e.contiguous(), weight.contiguous()
    (M, KX), KE, N = x.shape, e.shape[1], weight.shape[0]  # noqa: N806
    out = x.new_empty(M, N)
    has_bias = bias is not None
    args = (x, e, weight, bias.contiguous() if has_bias else weight, out, M, N, KX, KE)
    config = FIXED_CONFIG or (INTERPRETER_CONFIG if _FWD is _concat_linear_fwd else None)
    if config is not None:
        bm, bn, bk, warps, stages = config
        launch(_concat_linear_fwd, (triton.cdiv(M, bm) * triton.cdiv(N, bn),), *args, BLOCK_M=bm, BLOCK_N=bn,
               BLOCK_K=bk, GROUP_M=GROUP_M, HAS_BIAS=has_bias, PREC=precision(x), num_warps=warps,
               num_stages=stages)  # fmt: skip
    else:
        launch(_FWD, lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),), *args, GROUP_M=GROUP_M,
               HAS_BIAS=has_bias, PREC=precision(x))  # fmt: skip
    return out


@concat_linear_fwd.register_fake
def _(x, e, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup(ctx, inputs, output):
    x, e, weight, bias = inputs
    ctx.save_for_backward(x, e, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, g):
    """cuBLAS on the weight's column blocks: dx = g W[:, :Kx], de = g W[:, Kx:]; dW's blocks
    g^T x and g^T e written into one [N, Kx + Ke] buffer; db = sum of g's rows in fp32."""
    x, e, weight = ctx.saved_tensors
    kx = x.shape[1]
    dx = torch.mm(g, weight[:, :kx]) if ctx.needs_input_grad[0] else None
    de = torch.mm(g, weight[:, kx:]) if ctx.needs_input_grad[1] else None
    dw = None
    if ctx.needs_input_grad[2]:
        dw = weight.new_empty(weight.shape)
        torch.mm(g.t(), x, out=dw[:, :kx])
        torch.mm(g.t(), e, out=dw[:, kx:])
    db = g.sum(0, dtype=torch.float32).to(g.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return dx, de, dw, db


concat_linear_fwd.register_autograd(_backward, setup_context=_setup)


def fused(x: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The concatenation-free GEMM on x [..., Kx], e [..., Ke]."""
    out = concat_linear_fwd(x.reshape(-1, x.shape[-1]), e.reshape(-1, e.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def composed(x: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch.cat, then cuBLAS's GEMM (the adapter as Huginn writes it)."""
    return F.linear(torch.cat([x, e], -1), weight, bias)


CANDIDATES = {"fused": fused, "torch.cat + F.linear": composed}

_HAS_TILES: dict[tuple[torch.device, torch.dtype], bool] = {}


def _has_tiles(t: torch.Tensor) -> bool:
    return has_configs(_HAS_TILES, launchable, t)


def concat_linear(x: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The faster of the fused GEMM and torch.cat + F.linear on this signature, as measured on
    its first call (trm_kernels.tune); the composition where the device fits no config."""
    for name, t in (("x", x), ("e", e), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_input(name, t)
    if not _has_tiles(x):
        return composed(x, e, weight, bias)
    return CANDIDATES[tune.choose("concat_linear", CANDIDATES, (x, e, weight, bias))](x, e, weight, bias)
