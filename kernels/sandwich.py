"""The sandwich norm of recurrent-depth language models as one op (Triton): a block's closing
norm and the next sub-layer's opening one in one pass over each row.

Huginn-style blocks normalise twice where a sub-layer ends: ``x = norm_2(x + attn(norm_1(x)))``,
then ``norm_3(x)`` is the MLP's input. Composed, that is two add + RMSNorm launches with the
stream written and read back between them. Here a program reads x and the residual once and
writes both results of its rows:

    stream = rmsnorm(x + residual) * weight     (rounded to the sum's dtype)
    next   = rmsnorm(stream) * next_weight      (from the rounded stream, in its dtype)

statistics in fp32, each weight applied in fp32 before its one rounding: what
``add_rmsnorm(x, residual, weight=weight)`` then ``add_rmsnorm(stream, weight=next_weight)``
compute, bit for bit but for the reductions' order. x + residual is taken as add_rmsnorm takes
it (equal dtypes: rounded to the dtype first; a bf16 branch on an fp32 stream: in fp32).

The forward saves one fp32 rstd per row for each norm. The backward recomputes the sum and the
stream from x, residual, weight and the first rstd (the same fp32 operations, so the same bits)
and takes both norms' backward in one pass, the stream's gradient kept in fp32 between them:

    g2 = dnext * next_weight,  ds = dstream + rstd2 * g2 - s * rstd2^3 * mean(g2 * s)
    g1 = ds * weight,          dh = rstd1 * g1 - h * rstd1^3 * mean(g1 * h)

The weights' gradients are summed per program in fp32 and the programs' partial sums added in a
fixed order (deterministic), then rounded once to each weight's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import FUSED_DTYPES, check_input, launch, next_pow2, split_at, takes
from .rmsnorm import _load_sum, _tile

# Rows of up to 8192 elements (a language model's hidden 2048-8192); whole rows, TILE elements a
# program where rows are shorter, 16 elements of each tensor a thread (4 to 16 warps):
# trm_benchmarks.ptx compiles both kernels at hidden 512, 4096 and 8192 with no spills on any
# architecture. Tiles of 4096 at 4 warps (32 elements a thread) spilled 8-16 B in fp16 on sm_90 /
# sm_120; a row of 16,384 spills 624 B in the backward (h, the stream, dnext and dstream alone
# fill the register file), so `auto` runs the reference beyond 8192.
MAX_N = 8192
TILE = 2048


@triton.jit
def _sandwich_fwd(
    X, R, W, W2, S, Y, RSTD, RSTD2, N, n_cols, stride_outer, stride_col, stride_n, eps,
    ROUND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    offs, mask, stats, n = _tile(N, n_cols, stride_outer, stride_col, stride_n, BLOCK_N, BLOCK_C)
    h = _load_sum(X, R, offs, mask, True, ROUND)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(h * h, axis=1) / N + eps))  # as trm::add_rmsnorm
    w = tl.load(W + n, mask=n < N, other=0.0).to(tl.float32)
    s = (h * rstd[:, None] * w[None, :]).to(S.dtype.element_ty)
    tl.store(S + offs, s, mask=mask)
    sf = s.to(tl.float32)
    rstd2 = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(sf * sf, axis=1) / N + eps))
    w2 = tl.load(W2 + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(Y + offs, (sf * rstd2[:, None] * w2[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + stats, rstd, mask=stats >= 0)
    tl.store(RSTD2 + stats, rstd2, mask=stats >= 0)


@triton.jit
def _sandwich_bwd(
    DS, DY, X, R, W, W2, RSTD, RSTD2, DH, DW, DW2, N, n_cols, stride_outer, stride_col, stride_n,
    ROUND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    offs, mask, stats, n = _tile(N, n_cols, stride_outer, stride_col, stride_n, BLOCK_N, BLOCK_C)
    rstd = tl.load(RSTD + stats, mask=stats >= 0, other=0.0)
    rstd2 = tl.load(RSTD2 + stats, mask=stats >= 0, other=0.0)
    h = _load_sum(X, R, offs, mask, True, ROUND)
    w = tl.load(W + n, mask=n < N, other=0.0).to(tl.float32)
    w2 = tl.load(W2 + n, mask=n < N, other=0.0).to(tl.float32)
    s = (h * rstd[:, None] * w[None, :]).to(DS.dtype.element_ty).to(tl.float32)  # the stream, as stored
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g2 = dy * w2[None, :]
    c2 = tl.sum(g2 * s, axis=1) * (rstd2 * rstd2 * rstd2) / N
    ds = tl.load(DS + offs, mask=mask, other=0.0).to(tl.float32) + g2 * rstd2[:, None] - s * c2[:, None]
    g1 = ds * w[None, :]
    c1 = tl.sum(g1 * h, axis=1) * (rstd * rstd * rstd) / N
    tl.store(DH + offs, (g1 * rstd[:, None] - h * c1[:, None]).to(DH.dtype.element_ty), mask=mask)
    program = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)).to(tl.int64)
    tl.store(DW + program * N + n, tl.sum(ds * h * rstd[:, None], axis=0), mask=n < N)
    tl.store(DW2 + program * N + n, tl.sum(dy * s * rstd2[:, None], axis=0), mask=n < N)


def supports(x: torch.Tensor, residual: torch.Tensor, weight, next_weight, eps: float) -> bool:
    return takes(x) and residual.dtype in FUSED_DTYPES and x.shape[-1] <= MAX_N


def _grid(shape: torch.Size) -> tuple[tuple[int, int], dict]:
    """Rows along grid axis x, BLOCK_C whole rows of BLOCK_N a program (TILE elements at most)."""
    rows, n, _ = split_at(shape, len(shape) - 1)
    if n > MAX_N:
        raise ValueError(f"sandwich_rmsnorm: rows of {n} elements; the triton kernel supports <= {MAX_N}")
    block_n = next_pow2(n)
    block_c = max(1, min(next_pow2(rows), TILE // block_n))
    sizes = dict(N=n, n_cols=rows, stride_outer=0, stride_col=n, stride_n=1, BLOCK_N=block_n, BLOCK_C=block_c,
                 num_warps=min(16, max(4, block_n * block_c // 512)))  # fmt: skip
    return (triton.cdiv(rows, block_c), 1), sizes


def _rows(x: torch.Tensor) -> int:
    return split_at(x.shape, x.dim() - 1)[0]


Quad = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("trm::sandwich_rmsnorm", mutates_args=())
def sandwich_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, next_weight: torch.Tensor,
                 eps: float) -> Quad:  # fmt: skip
    """(stream, next input, rstd of the first norm, rstd of the second): one fp32 rstd per row each."""
    x, residual = x.contiguous(), residual.contiguous()
    summed = torch.promote_types(x.dtype, residual.dtype)
    stream, following = torch.empty_like(x, dtype=summed), torch.empty_like(x, dtype=summed)
    rstd, rstd2 = (torch.empty(_rows(x), dtype=torch.float32, device=x.device) for _ in range(2))
    grid, sizes = _grid(x.shape)
    launch(_sandwich_fwd, grid, x, residual, weight.contiguous(), next_weight.contiguous(), stream, following, rstd,
           rstd2, eps=eps, ROUND=residual.dtype == x.dtype, **sizes)  # fmt: skip
    return stream, following, rstd, rstd2


@sandwich_fwd.register_fake
def _(x, residual, weight, next_weight, eps):
    summed = torch.promote_types(x.dtype, residual.dtype)
    stream = torch.empty_like(x, dtype=summed, memory_format=torch.contiguous_format)
    rstd = x.new_empty(_rows(x), dtype=torch.float32)
    return stream, torch.empty_like(stream), rstd, torch.empty_like(rstd)


@torch.library.custom_op("trm::sandwich_rmsnorm_backward", mutates_args=())
def sandwich_bwd(dstream: torch.Tensor, dnext: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                 weight: torch.Tensor, next_weight: torch.Tensor, rstd: torch.Tensor,
                 rstd2: torch.Tensor) -> Triple:  # fmt: skip
    """(the gradient of x + residual, in x's dtype, or fp32 where x and residual differ; the two
    weights' gradients in fp32)."""
    x, residual = x.contiguous(), residual.contiguous()
    mixed = residual.dtype != x.dtype
    dh = torch.empty_like(x, dtype=torch.float32 if mixed else x.dtype)
    grid, sizes = _grid(x.shape)
    partial, partial2 = (torch.empty(grid[0], sizes["N"], dtype=torch.float32, device=x.device) for _ in range(2))
    launch(_sandwich_bwd, grid, dstream.contiguous(), dnext.contiguous(), x, residual, weight.contiguous(),
           next_weight.contiguous(), rstd, rstd2, dh, partial, partial2, ROUND=not mixed, **sizes)  # fmt: skip
    return dh, partial.sum(0), partial2.sum(0)


@sandwich_bwd.register_fake
def _(dstream, dnext, x, residual, weight, next_weight, rstd, rstd2):
    mixed = residual.dtype != x.dtype
    dh = torch.empty_like(x, dtype=torch.float32 if mixed else x.dtype, memory_format=torch.contiguous_format)
    return dh, x.new_empty(weight.shape, dtype=torch.float32), x.new_empty(next_weight.shape, dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, residual, weight, next_weight, _ = inputs
    stream, _, rstd, rstd2 = output
    ctx.save_for_backward(x, residual, weight, next_weight, rstd, rstd2)
    ctx.mark_non_differentiable(rstd, rstd2)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the rstds
    ctx.stream = (stream.shape, stream.dtype)


def _backward(ctx, dstream, dnext, _drstd, _drstd2):
    if dstream is None and dnext is None:  # neither output is used
        return None, None, None, None, None
    x, residual, weight, next_weight, rstd, rstd2 = ctx.saved_tensors
    shape, dtype = ctx.stream
    dstream, dnext = (g if g is not None else torch.zeros(shape, dtype=dtype, device=x.device)
                      for g in (dstream, dnext))  # fmt: skip
    dh, dw, dw2 = sandwich_bwd(dstream.to(dtype), dnext, x, residual, weight, next_weight, rstd, rstd2)
    grads = (dh.to(x.dtype), dh.to(residual.dtype), dw.to(weight.dtype), dw2.to(next_weight.dtype))
    return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad, strict=False)), None)


sandwich_fwd.register_autograd(_backward, setup_context=_setup)


def sandwich_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, next_weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stream, next_input) over the last axis, one kernel forward and one backward."""
    check_input("x", x)
    check_input("residual", residual)
    stream, following, _, _ = sandwich_fwd(x, residual, weight, next_weight, eps)
    return stream, following
