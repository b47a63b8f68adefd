"""Fused residual add + RMSNorm over any axis (Triton; the CUDA extension for the last axis).

y = (x + r) * rstd, rstd = 1 / sqrt(mean((x + r)^2) + eps), in fp32, stored in x's dtype.
The tensor is seen as [outer, N, inner] with N the normalised axis. A program owns a tile
of BLOCK_C x BLOCK_N: BLOCK_C independent columns, N whole (the reduced axis is the tile's
last, which also gives the interpreter's numpy reductions their pairwise order). For the last axis (inner = 1)
columns are rows; for the sequence axis of ``mlp_t`` ([B, S, D], inner = D) columns are
hidden units, so there are no transpose copies.

x + r is rounded to the storage dtype before the norm, as the reference's eager add
rounds it. The forward saves one fp32 rstd per column. Autograd keeps x and r alive, and
the backward recomputes h = x + r from them:
dh = rstd * dy - h * rstd^3 * mean(dy * h). Using the rounded output y instead would cost
the backward its precision where |y| is near sqrt(N) (short axes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cuda_ext
from ._triton import check_input, next_pow2, split_at, takes

MAX_N = 32768  # the normalised axis is held whole in one tile


@triton.jit
def _load_sum(X, R, offs, mask, HAS_R: tl.constexpr):
    """x + r rounded to x's dtype (as an eager add would), then widened to fp32."""
    h = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_R:
        h = (h.to(tl.float32) + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
    return h.to(tl.float32)


@triton.jit
def _tile(N, n_cols, stride_outer, stride_col, stride_n, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: element offsets and mask [BLOCK_C, BLOCK_N], and the offset of
    each column's rstd (-1 past the last column)."""
    outer, cblock = tl.program_id(0), tl.program_id(1)
    cols = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.arange(0, BLOCK_N)
    mask = (cols[:, None] < n_cols) & (n[None, :] < N)
    offs = outer.to(tl.int64) * stride_outer + cols[:, None].to(tl.int64) * stride_col + n[None, :] * stride_n
    stats = tl.where(cols < n_cols, outer.to(tl.int64) * n_cols + cols, -1)
    return offs, mask, stats


@triton.jit
def _add_rmsnorm_fwd(
    X, R, Y, RSTD, N, n_cols, stride_outer, stride_col, stride_n, eps,
    HAS_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    offs, mask, stats = _tile(N, n_cols, stride_outer, stride_col, stride_n, BLOCK_N, BLOCK_C)
    h = _load_sum(X, R, offs, mask, HAS_R)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(h * h, axis=1) / N + eps))  # correctly rounded, unlike rsqrt
    tl.store(Y + offs, (h * rstd[:, None]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + stats, rstd, mask=stats >= 0)


@triton.jit
def _add_rmsnorm_bwd(
    DY, X, R, RSTD, DH, N, n_cols, stride_outer, stride_col, stride_n,
    HAS_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    offs, mask, stats = _tile(N, n_cols, stride_outer, stride_col, stride_n, BLOCK_N, BLOCK_C)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + stats, mask=stats >= 0, other=0.0)
    h = _load_sum(X, R, offs, mask, HAS_R)
    # rstd * (dy - y * mean(dy * y)) written with h, not y = h * rstd: one rounding fewer per
    # element in the projection term, which the subtraction can amplify
    c = tl.sum(dy * h, axis=1) * (rstd * rstd * rstd) / N
    tl.store(DH + offs, (dy * rstd[:, None] - h * c[:, None]).to(DH.dtype.element_ty), mask=mask)


def supports(x: torch.Tensor, residual, dim: int, eps: float) -> bool:
    return takes(x) and x.shape[dim] <= MAX_N


def _launch(kernel, shape: torch.Size, dim: int, *args, **meta) -> None:
    outer, n, inner = split_at(shape, dim)
    if n > MAX_N:
        raise ValueError(f"add_rmsnorm: the normalised axis has {n} elements; the triton kernel supports <= {MAX_N}")
    if inner == 1:  # last axis: columns are the rows, contiguous along n
        grid_outer, n_cols, s_outer, s_col, s_n = 1, outer, 0, n, 1
    else:  # an inner axis: columns are the trailing elements, contiguous along the columns
        grid_outer, n_cols, s_outer, s_col, s_n = outer, inner, n * inner, 1, inner
    block_n = next_pow2(n)
    block_c = max(1, min(next_pow2(n_cols), 8192 // block_n))
    grid = (grid_outer, triton.cdiv(n_cols, block_c))
    kernel[grid](*args, n, n_cols, s_outer, s_col, s_n, **meta, BLOCK_N=block_n, BLOCK_C=block_c,
                 num_warps=8 if block_n * block_c >= 8192 else 4)  # fmt: skip


def _stats_shape(shape: torch.Size, dim: int) -> tuple[int, int]:
    outer, _, inner = split_at(shape, dim)
    return (outer, inner)


def _extension(x: torch.Tensor, dim: int, impl: str):
    """The CUDA extension where `impl` asks for it and it takes this call (last axis, row
    length within its limit), else None: the Triton kernels take every other case."""
    if impl != "cuda" or dim != x.dim() - 1 or not x.is_cuda:
        return None
    ext = cuda_ext.load()  # cached: built or loaded once
    return ext if ext is not None and x.shape[-1] <= ext.add_rmsnorm_max_hidden(x) else None


@torch.library.custom_op("trm::add_rmsnorm", mutates_args=())
def add_rmsnorm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, dim: int, eps: float, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    ext = _extension(x, dim, impl)
    if ext is not None:
        y, rstd = ext.add_rmsnorm_forward(x, residual, eps)
        return y, rstd.view(_stats_shape(x.shape, dim))
    y = torch.empty_like(x)
    rstd = torch.empty(_stats_shape(x.shape, dim), dtype=torch.float32, device=x.device)
    r = residual if residual is not None else x
    _launch(_add_rmsnorm_fwd, x.shape, dim, x, r, y, rstd, eps=eps, HAS_R=residual is not None)
    return y, rstd


@add_rmsnorm_fwd.register_fake
def _(x, residual, dim, eps, impl):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
        _stats_shape(x.shape, dim), dtype=torch.float32
    )


@torch.library.custom_op("trm::add_rmsnorm_backward", mutates_args=())
def add_rmsnorm_bwd(
    dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, rstd: torch.Tensor, dim: int, impl: str
) -> torch.Tensor:
    dy, x = dy.contiguous(), x.contiguous()
    ext = _extension(x, dim, impl)
    if ext is not None:
        return ext.add_rmsnorm_backward(dy, x, residual.contiguous() if residual is not None else None, rstd)
    r = residual.contiguous() if residual is not None else x
    dh = torch.empty_like(x)
    _launch(_add_rmsnorm_bwd, x.shape, dim, dy, x, r, rstd, dh, HAS_R=residual is not None)
    return dh


@add_rmsnorm_bwd.register_fake
def _(dy, x, residual, rstd, dim, impl):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    x, residual, dim, _, impl = inputs
    ctx.save_for_backward(x, residual, output[1])
    ctx.dim, ctx.impl = dim, impl


def _backward(ctx, dy, _drstd):
    x, residual, rstd = ctx.saved_tensors
    dh = add_rmsnorm_bwd(dy, x, residual, rstd, ctx.dim, ctx.impl)
    return dh, (dh if residual is not None else None), None, None, None


add_rmsnorm_fwd.register_autograd(_backward, setup_context=_setup)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None = None, dim: int = -1, eps: float = 1e-5):
    check_input("x", x)
    return add_rmsnorm_fwd(x, residual, dim % x.dim(), eps, "triton")[0]


def add_rmsnorm_cuda(x: torch.Tensor, residual: torch.Tensor | None = None, dim: int = -1, eps: float = 1e-5):
    """The CUDA extension's kernel for the last axis; Triton for other axes or very long rows."""
    check_input("x", x)
    return add_rmsnorm_fwd(x, residual, dim % x.dim(), eps, "cuda")[0]
