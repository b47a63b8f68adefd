"""Fused residual add + RMSNorm over any axis (Triton; the CUDA extension for the last axis).

y = (x + r) * rstd [* w], rstd = 1 / sqrt(mean((x + r)^2) + eps), in fp32, rounded once.
The tensor is seen as [outer, N, inner] with N the normalised axis. A program owns a tile
of BLOCK_C x BLOCK_N: BLOCK_C independent columns, N whole (the reduced axis is the tile's
last, which also gives the interpreter's numpy reductions their pairwise order). For the last axis (inner = 1)
columns are rows; for the sequence axis of ``mlp_t`` ([B, S, D], inner = D) columns are
hidden units, so there are no transpose copies.

x + r is taken in their promoted dtype: with equal dtypes it is rounded to that dtype before
the norm, as the reference's eager add rounds it; an fp32 residual stream with a bf16 branch
sums in fp32. The optional weight w (one per element of the normalised axis) multiplies in
fp32 before the one rounding; its gradient is summed per program in fp32 and the programs'
partial sums are added in a fixed order (deterministic). The pre-norm form also writes the
sum (the next residual stream) and takes its gradient in the backward.

The forward saves one fp32 rstd per column. Autograd keeps x and r alive, and the backward
recomputes h = x + r from them: dh = rstd * g - h * rstd^3 * mean(g * h), g = dy * w.
Using the rounded output y instead would cost the backward its precision where |y| is near
sqrt(N) (short axes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cuda_ext
from ._triton import FUSED_DTYPES, GRID_LIMITS, check_input, launch, next_pow2, split_at, takes

# The normalised axis is held whole in one tile: up to 16,384 elements (16 warps) it compiles
# without spills on every architecture; 32,768 spills 48-260 B in the backward.
MAX_N = 16384


@triton.jit
def _load_sum(X, R, offs, mask, HAS_R: tl.constexpr, ROUND: tl.constexpr):
    """x + r in fp32, rounded to x's dtype first when ROUND (equal dtypes: as an eager add would)."""
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_R:
        h = h + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        if ROUND:
            h = h.to(X.dtype.element_ty).to(tl.float32)
    return h


@triton.jit
def _tile(N, n_cols, stride_outer, stride_col, stride_n, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: element offsets and mask [BLOCK_C, BLOCK_N], the offset of each
    column's rstd (-1 past the last column), and the positions n along the normalised axis.
    Column blocks along grid axis x, the outer index along y (see _grid)."""
    cblock, outer = tl.program_id(0), tl.program_id(1)
    cols = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.arange(0, BLOCK_N)
    mask = (cols[:, None] < n_cols) & (n[None, :] < N)
    offs = outer.to(tl.int64) * stride_outer + cols[:, None].to(tl.int64) * stride_col + n[None, :] * stride_n
    stats = tl.where(cols < n_cols, outer.to(tl.int64) * n_cols + cols, -1)
    return offs, mask, stats, n


@triton.jit
def _add_rmsnorm_fwd(
    X, R, W, Y, SUM, RSTD, N, n_cols, stride_outer, stride_col, stride_n, eps,
    HAS_R: tl.constexpr, ROUND: tl.constexpr, HAS_W: tl.constexpr, PRENORM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    offs, mask, stats, n = _tile(N, n_cols, stride_outer, stride_col, stride_n, BLOCK_N, BLOCK_C)
    h = _load_sum(X, R, offs, mask, HAS_R, ROUND)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(h * h, axis=1) / N + eps))  # correctly rounded, unlike rsqrt
    y = h * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if PRENORM:
        tl.store(SUM + offs, h.to(SUM.dtype.element_ty), mask=mask)
    tl.store(RSTD + stats, rstd, mask=stats >= 0)


@triton.jit
def _add_rmsnorm_bwd(
    DY, DSUM, X, R, W, RSTD, DH, DW, N, n_cols, stride_outer, stride_col, stride_n,
    HAS_R: tl.constexpr, ROUND: tl.constexpr, HAS_W: tl.constexpr, PRENORM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    offs, mask, stats, n = _tile(N, n_cols, stride_outer, stride_col, stride_n, BLOCK_N, BLOCK_C)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + stats, mask=stats >= 0, other=0.0)
    h = _load_sum(X, R, offs, mask, HAS_R, ROUND)
    g = dy
    if HAS_W:
        g = dy * tl.load(W + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.store(DW + program.to(tl.int64) * N + n, tl.sum(dy * h * rstd[:, None], axis=0), mask=n < N)
    # rstd * (g - y * mean(g * y)) written with h, not y = h * rstd: one rounding fewer per
    # element in the projection term, which the subtraction can amplify
    c = tl.sum(g * h, axis=1) * (rstd * rstd * rstd) / N
    dh = g * rstd[:, None] - h * c[:, None]
    if PRENORM:
        dh += tl.load(DSUM + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DH + offs, dh.to(DH.dtype.element_ty), mask=mask)


def supports(x: torch.Tensor, residual, dim: int, eps: float, weight=None, prenorm: bool = False) -> bool:
    outer, n, inner = split_at(x.shape, dim)
    return (takes(x) and n <= MAX_N and (inner == 1 or outer <= GRID_LIMITS[1])
            and (residual is None or residual.dtype in FUSED_DTYPES))  # fmt: skip


def _grid(shape: torch.Size, dim: int) -> tuple[tuple[int, int], dict]:
    """The launch grid and the tile's sizes and strides for the tensor's shape: column blocks
    along axis x (the maze's 1.4M rows are 87,936 blocks of 16, over the 65,535 that axis y
    allows), the outer index along y (1 for the last axis; the batch for the sequence axis,
    which supports() keeps within axis y's limit)."""
    outer, n, inner = split_at(shape, dim)
    if n > MAX_N:
        raise ValueError(f"add_rmsnorm: the normalised axis has {n} elements; the triton kernel supports <= {MAX_N}")
    if inner == 1:  # last axis: columns are the rows, contiguous along n
        grid_outer, n_cols, s_outer, s_col, s_n = 1, outer, 0, n, 1
    else:  # an inner axis: columns are the trailing elements, contiguous along the columns
        grid_outer, n_cols, s_outer, s_col, s_n = outer, inner, n * inner, 1, inner
    block_n = next_pow2(n)
    # up to 8192 elements a tile along the last axis, 4096 along an inner one (strided along n:
    # 8192 spills a register on Hopper there); whole rows of up to MAX_N elements either way
    block_c = max(1, min(next_pow2(n_cols), (8192 if inner == 1 else 4096) // block_n))
    sizes = dict(N=n, n_cols=n_cols, stride_outer=s_outer, stride_col=s_col, stride_n=s_n, BLOCK_N=block_n,
                 BLOCK_C=block_c, num_warps=warps(block_n * block_c))  # fmt: skip
    return (triton.cdiv(n_cols, block_c), grid_outer), sizes


def warps(elements: int) -> int:
    """Warps for a tile of this many elements: 4 up to 4096, 8 at 8192, 16 at 16,384."""
    return 16 if elements > 8192 else 8 if elements >= 8192 else 4


def _stats_shape(shape: torch.Size, dim: int) -> tuple[int, int]:
    outer, _, inner = split_at(shape, dim)
    return (outer, inner)


def _extension(x: torch.Tensor, residual, weight, dim: int, prenorm: bool, impl: str, dy=None):
    """The CUDA extension where `impl` asks for it and it takes this call (last axis, no
    weight, post-norm, one dtype, rows of a length and alignment its kernels take: it says
    which, ``add_rmsnorm_takes``), else None: the Triton kernels take every other case."""
    if impl != "cuda" or dim != x.dim() - 1 or not x.is_cuda or weight is not None or prenorm:
        return None
    if residual is not None and residual.dtype != x.dtype:
        return None
    ext = cuda_ext.load(x.device)  # cached per architecture: built or loaded once
    if ext is None or not hasattr(ext, "add_rmsnorm_takes"):  # (a module built before it could say)
        return None
    return ext if ext.add_rmsnorm_takes([x, residual, dy]) else None


def _dtypes(x: torch.Tensor, residual: torch.Tensor | None, prenorm: bool) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the sum, dtype of the normalised output)."""
    summed = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return summed, (x.dtype if prenorm else summed)


@torch.library.custom_op("trm::add_rmsnorm", mutates_args=())
def add_rmsnorm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, dim: int, eps: float,
    prenorm: bool, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(normalised, the sum when prenorm else an empty tensor, rstd)."""
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    weight = weight.contiguous() if weight is not None else None
    ext = _extension(x, residual, weight, dim, prenorm, impl)
    if ext is not None:
        y, rstd = ext.add_rmsnorm_forward(x, residual, eps)
        return y, x.new_empty(0), rstd.view(_stats_shape(x.shape, dim))
    summed, out = _dtypes(x, residual, prenorm)
    y = torch.empty_like(x, dtype=out)
    total = torch.empty_like(x, dtype=summed) if prenorm else x.new_empty(0)
    rstd = torch.empty(_stats_shape(x.shape, dim), dtype=torch.float32, device=x.device)
    grid, sizes = _grid(x.shape, dim)
    launch(_add_rmsnorm_fwd, grid, x, residual if residual is not None else x, weight if weight is not None else x,
           y, total if prenorm else y, rstd, eps=eps, HAS_R=residual is not None,
           ROUND=residual is not None and residual.dtype == x.dtype, HAS_W=weight is not None, PRENORM=prenorm,
           **sizes)  # fmt: skip
    return y, total, rstd


@add_rmsnorm_fwd.register_fake
def _(x, residual, weight, dim, eps, prenorm, impl):
    summed, out = _dtypes(x, residual, prenorm)
    y = torch.empty_like(x, dtype=out, memory_format=torch.contiguous_format)
    total = torch.empty_like(x, dtype=summed, memory_format=torch.contiguous_format) if prenorm else x.new_empty(0)
    return y, total, x.new_empty(_stats_shape(x.shape, dim), dtype=torch.float32)


@torch.library.custom_op("trm::add_rmsnorm_backward", mutates_args=())
def add_rmsnorm_bwd(
    dy: torch.Tensor, dsum: torch.Tensor | None, x: torch.Tensor, residual: torch.Tensor | None,
    weight: torch.Tensor | None, rstd: torch.Tensor, dim: int, impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(the gradient of the sum, in x's dtype, or fp32 when x and residual differ; the weight's
    gradient in fp32, or an empty tensor)."""
    dy, x = dy.contiguous(), x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    weight = weight.contiguous() if weight is not None else None
    ext = _extension(x, residual, weight, dim, dsum is not None, impl, dy)
    if ext is not None:
        return ext.add_rmsnorm_backward(dy, x, residual, rstd), x.new_empty(0, dtype=torch.float32)
    mixed = residual is not None and residual.dtype != x.dtype
    dh = torch.empty_like(x, dtype=torch.float32 if mixed else x.dtype)
    grid, sizes = _grid(x.shape, dim)
    partial = (
        torch.empty(grid[0] * grid[1], sizes["N"], dtype=torch.float32, device=x.device) if weight is not None else dh
    )
    launch(_add_rmsnorm_bwd, grid, dy, dsum.contiguous() if dsum is not None else dy, x,
           residual if residual is not None else x, weight if weight is not None else x, rstd, dh, partial,
           HAS_R=residual is not None, ROUND=residual is not None and not mixed, HAS_W=weight is not None,
           PRENORM=dsum is not None, **sizes)  # fmt: skip
    dweight = partial.sum(0) if weight is not None else x.new_empty(0, dtype=torch.float32)
    return dh, dweight


@add_rmsnorm_bwd.register_fake
def _(dy, dsum, x, residual, weight, rstd, dim, impl):
    mixed = residual is not None and residual.dtype != x.dtype
    dh = torch.empty_like(x, dtype=torch.float32 if mixed else x.dtype, memory_format=torch.contiguous_format)
    return dh, (x.new_empty(weight.shape, dtype=torch.float32) if weight is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, residual, weight, dim, _, prenorm, impl = inputs
    ctx.save_for_backward(x, residual, weight, output[2])
    ctx.dim, ctx.prenorm, ctx.impl = dim, prenorm, impl
    ctx.set_materialize_grads(False)  # no zero-filled gradients for rstd (and the empty sum of a post-norm)
    ctx.outputs = [(o.shape, o.dtype) for o in output[:2]]


def _backward(ctx, dy, dsum, _drstd):
    if dy is None and (dsum is None or not ctx.prenorm):  # no output is used
        return None, None, None, None, None, None, None
    x, residual, weight, rstd = ctx.saved_tensors
    if dy is None or (ctx.prenorm and dsum is None):  # one of a pre-norm's two outputs is unused
        dy, dsum = (g if g is not None else torch.zeros(shape, dtype=dtype, device=x.device)
                    for g, (shape, dtype) in zip((dy, dsum), ctx.outputs, strict=True))  # fmt: skip
    dh, dweight = add_rmsnorm_bwd(dy, dsum if ctx.prenorm else None, x, residual, weight, rstd, ctx.dim, ctx.impl)
    dx = dh.to(x.dtype)
    dr = dh.to(residual.dtype) if residual is not None else None
    dw = dweight.to(weight.dtype) if weight is not None else None
    return dx, dr, dw, None, None, None, None


add_rmsnorm_fwd.register_autograd(_backward, setup_context=_setup)


def _call(x, residual, dim, eps, weight, prenorm, impl):
    check_input("x", x)
    y, total, _ = add_rmsnorm_fwd(x, residual, weight, dim % x.dim(), eps, prenorm, impl)
    return (total, y) if prenorm else y


def add_rmsnorm(x, residual=None, dim=-1, eps=1e-5, weight=None, prenorm=False):
    return _call(x, residual, dim, eps, weight, prenorm, "triton")


def add_rmsnorm_cuda(x, residual=None, dim=-1, eps=1e-5, weight=None, prenorm=False):
    """The CUDA extension's kernel for the last axis; Triton for everything it does not take."""
    return _call(x, residual, dim, eps, weight, prenorm, "cuda")
