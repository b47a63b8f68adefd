"""QK-norm for the attention ops (Triton): RMSNorm over each query and key head, before or after RoPE.

Models such as Qwen3 and Gemma 3 normalise every query and key head over its d
columns (a learnable weight [d] shared by the heads, or none) before RoPE; some normalise
after it. ``rope_attention`` and ``kv_cache_attention`` take this as ``qk_norm=``; this
module is their triton backend's part of it: one row-local pass that writes the packed qkv
the attention kernels read, with q and k normalised (and, after RoPE, rotated: the
attention kernels then run without rotation), v copied; and its backward, which turns the
attention's gradient w.r.t. that qkv into the gradient w.r.t. the projection and the two
weights.

Why a pass of its own and not inside the attention loops: the keys would be normalised
again by every query tile that reads them, and the norm's backward (row sums and the
weight's gradient, a sum over every row of every program) would sit in the dK and dQ
epilogues of kernels whose tiles are already the largest that compile without register
spills. The pass reads and writes qkv once each way; the attention kernels are unchanged.

Arithmetic, as the reference: y = round(x * rsqrt(mean(x^2) + eps) * w) with x in fp32 (after
RoPE: x is the rotated q or k, rounded to the storage dtype first, as the reference rounds
it); the weights' gradients are sums in fp32 of each program's rows, added by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import check_input, next_pow2
from .attention import _cols, _launch_by_batch, _load_pairs, _rotated, _rows, _store_pairs, _unrotate_store

MODES = ("before", "after")  # QK-norm before or after RoPE
ROWS = 32  # rows of one head per program
WARPS = 8


@triton.jit
def _weight_pairs(W, HAS_W: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, INTERLEAVED: tl.constexpr):
    """A norm weight [D] (any float dtype; ones without HAS_W) in fp32 as the two members of its
    columns' RoPE pairs, each [1, HALF_P]."""
    c = tl.arange(0, HALF_P)
    if HAS_W:
        ok = c < HALF
        if INTERLEAVED:
            w1, w2 = tl.load(W + 2 * c, mask=ok, other=0.0), tl.load(W + 2 * c + 1, mask=ok, other=0.0)
        else:
            w1, w2 = tl.load(W + c, mask=ok, other=0.0), tl.load(W + HALF + c, mask=ok, other=0.0)
        w1, w2 = w1.to(tl.float32), w2.to(tl.float32)
    else:
        w1 = tl.full([HALF_P], 1.0, tl.float32)
        w2 = tl.full([HALF_P], 1.0, tl.float32)
    return w1[None, :], w2[None, :]


@triton.jit
def _head_weight(
    QW, KW, is_k, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):  # fmt: skip
    """The weight pairs of a q head (k_weight's where `is_k`)."""
    if is_k:
        w1, w2 = _weight_pairs(KW, HAS_KW, HALF, HALF_P, INTERLEAVED)
    else:
        w1, w2 = _weight_pairs(QW, HAS_QW, HALF, HALF_P, INTERLEAVED)
    return w1, w2


@triton.jit
def _rstd(x1, x2, eps, D: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of each row of a head held as its two halves (fp32)."""
    return 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)


@triton.jit
def _qk_norm_fwd(
    QKV, COS, SIN, LENS, QW, KW, OUT, S, H, KVH, eps,
    D: tl.constexpr, HALF_P: tl.constexpr, D_P: tl.constexpr, BLOCK_M: tl.constexpr, ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_LENS: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
):  # fmt: skip
    """Rows of head j (q heads, k heads, v heads in turn) of one sequence: q and k normalised
    (rotated first with ROPE, at positions rows, or lens[b] + rows with HAS_LENS) with their
    weight (QW, KW [D], any float dtype; HAS_QW / HAS_KW false: none), v copied."""
    m_block, bj = tl.program_id(0), tl.program_id(1)
    heads = H + 2 * KVH
    b, j = bj // heads, bj % heads
    HALF: tl.constexpr = D // 2
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < S
    row_stride = heads * D
    src = QKV + b.to(tl.int64) * S * row_stride + j * D
    dst = OUT + b.to(tl.int64) * S * row_stride + j * D
    if j < H + KVH:
        pos = rows
        if HAS_LENS:
            pos = tl.load(LENS + b).to(tl.int32) + rows
        x1, x2 = _rotated(src, rows, row_stride, pos, COS, SIN, ok, HALF, HALF_P, ROPE, INTERLEAVED)
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        rstd = _rstd(a1, a2, eps, D)[:, None]
        w1, w2 = _head_weight(QW, KW, j >= H, HAS_QW, HAS_KW, HALF, HALF_P, INTERLEAVED)
        dtype = OUT.dtype.element_ty
        out_rows = dst + rows[:, None].to(tl.int64) * row_stride
        _store_pairs(out_rows, ok, (a1 * rstd * w1).to(dtype), (a2 * rstd * w2).to(dtype), HALF, HALF_P,
                     INTERLEAVED)  # fmt: skip
    else:
        d = tl.arange(0, D_P)
        v = _rows(src, rows, row_stride, ok, D, D_P)
        tl.store(dst + rows[:, None].to(tl.int64) * row_stride + d[None, :], v, mask=_cols(ok, d, D, D_P))


@triton.jit
def _qk_norm_bwd(
    QKV, COS, SIN, QW, KW, G, DQKV, PART, S, H, KVH, eps,
    D: tl.constexpr, HALF_P: tl.constexpr, D_P: tl.constexpr, BLOCK_M: tl.constexpr, ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
):  # fmt: skip
    """The gradient w.r.t. qkv from G, the gradient w.r.t. the forward's output: through the
    norm (and the rotation's transpose, with ROPE) for q and k, G itself for v; and this
    program's rows' share of the weight's gradient, sum(G * x_hat), into PART [B, blocks,
    H + KVH, D] (fp32, the head's columns as stored)."""
    m_block, bj = tl.program_id(0), tl.program_id(1)
    heads = H + 2 * KVH
    b, j = bj // heads, bj % heads
    HALF: tl.constexpr = D // 2
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < S
    row_stride = heads * D
    offset = b.to(tl.int64) * S * row_stride + j * D
    if j < H + KVH:
        x1, x2 = _rotated(QKV + offset, rows, row_stride, rows, COS, SIN, ok, HALF, HALF_P, ROPE, INTERLEAVED)
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        rstd = _rstd(a1, a2, eps, D)[:, None]
        a1, a2 = a1 * rstd, a2 * rstd  # x_hat
        g1, g2 = _load_pairs(G + offset + rows[:, None].to(tl.int64) * row_stride, ok, HALF, HALF_P, INTERLEAVED)
        g1, g2 = g1.to(tl.float32), g2.to(tl.float32)
        w1, w2 = _head_weight(QW, KW, j >= H, HAS_QW, HAS_KW, HALF, HALF_P, INTERLEAVED)
        part_row = PART + ((b.to(tl.int64) * tl.num_programs(0) + m_block) * (H + KVH) + j) * D + tl.arange(0, 1)
        one = tl.full([1], 1, tl.int1)
        _store_pairs(part_row[:, None], one, tl.sum(g1 * a1, axis=0)[None, :], tl.sum(g2 * a2, axis=0)[None, :],
                     HALF, HALF_P, INTERLEAVED)  # fmt: skip
        g1, g2 = g1 * w1, g2 * w2
        mean = ((tl.sum(g1 * a1, axis=1) + tl.sum(g2 * a2, axis=1)) / D)[:, None]
        _unrotate_store(DQKV + offset, rows, row_stride, COS, SIN, ok, rstd * (g1 - a1 * mean),
                        rstd * (g2 - a2 * mean), HALF, HALF_P, ROPE, INTERLEAVED)  # fmt: skip
    else:
        d = tl.arange(0, D_P)
        g = _rows(G + offset, rows, row_stride, ok, D, D_P)
        tl.store(DQKV + offset + rows[:, None].to(tl.int64) * row_stride + d[None, :], g, mask=_cols(ok, d, D, D_P))


def _meta(d: int, rope: bool, interleaved: bool) -> dict:
    half_p = next_pow2(d // 2)
    return dict(D=d, HALF_P=half_p, D_P=2 * half_p, BLOCK_M=ROWS, ROPE=rope, INTERLEAVED=rope and interleaved)


def _weights(q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, like: torch.Tensor) -> tuple:
    """The kernels' weight arguments: (QW, KW, HAS_QW, HAS_KW); qkv stands in for a missing one."""
    return (q_weight.contiguous() if q_weight is not None else like, k_weight.contiguous() if k_weight is not None
            else like), dict(HAS_QW=q_weight is not None, HAS_KW=k_weight is not None)  # fmt: skip


def _tables(qkv: torch.Tensor, cos, sin):
    if cos is None:
        return qkv, qkv
    return cos.float().contiguous(), sin.float().contiguous()


@torch.library.custom_op("trm::qk_norm", mutates_args=())
def qk_norm_fwd(
    qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, cos: torch.Tensor | None,
    sin: torch.Tensor | None, cache_len: torch.Tensor | None, num_heads: int, num_kv_heads: int, interleaved: bool,
    eps: float,
) -> torch.Tensor:  # fmt: skip
    qkv = qkv.contiguous()
    batch, seq, width = qkv.shape
    heads = num_heads + 2 * num_kv_heads
    d = width // heads
    out = torch.empty_like(qkv)
    lens = cache_len.contiguous() if cache_len is not None else qkv
    weights, has = _weights(q_weight, k_weight, qkv)
    args = (qkv, *_tables(qkv, cos, sin), lens, *weights, out, seq, num_heads, num_kv_heads, eps)
    batched = (0, 3, 6) if cache_len is not None else (0, 6)
    _launch_by_batch(_qk_norm_fwd, triton.cdiv(seq, ROWS), heads, batch, args, batched,
                     **_meta(d, cos is not None, interleaved), HAS_LENS=cache_len is not None, **has,
                     num_warps=WARPS)  # fmt: skip
    return out


@qk_norm_fwd.register_fake
def _(qkv, q_weight, k_weight, cos, sin, cache_len, num_heads, num_kv_heads, interleaved, eps):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


@torch.library.custom_op("trm::qk_norm_backward", mutates_args=())
def qk_norm_bwd(
    grad: torch.Tensor, qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
    cos: torch.Tensor | None, sin: torch.Tensor | None, num_heads: int, num_kv_heads: int, interleaved: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dqkv, the weights' gradients [2, d] fp32: q's, k's)."""
    grad, qkv = grad.contiguous(), qkv.contiguous()
    batch, seq, width = qkv.shape
    heads = num_heads + 2 * num_kv_heads
    d = width // heads
    blocks = triton.cdiv(seq, ROWS)
    dqkv = torch.empty_like(qkv)
    part = torch.empty(batch, blocks, num_heads + num_kv_heads, d, dtype=torch.float32, device=qkv.device)
    weights, has = _weights(q_weight, k_weight, qkv)
    args = (qkv, *_tables(qkv, cos, sin), *weights, grad, dqkv, part, seq, num_heads, num_kv_heads, eps)
    _launch_by_batch(_qk_norm_bwd, blocks, heads, batch, args, (0, 5, 6, 7), **_meta(d, cos is not None, interleaved),
                     **has, num_warps=WARPS)  # fmt: skip
    per_head = part.sum((0, 1))
    return dqkv, torch.stack((per_head[:num_heads].sum(0), per_head[num_heads:].sum(0)))


@qk_norm_bwd.register_fake
def _(grad, qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, interleaved, eps):
    d = qkv.shape[-1] // (num_heads + 2 * num_kv_heads)
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), qkv.new_empty(2, d, dtype=torch.float32)


def _setup(ctx, inputs, output):
    qkv, q_weight, k_weight, cos, sin, _cache_len, num_heads, num_kv_heads, interleaved, eps = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin)
    ctx.num_heads, ctx.num_kv_heads, ctx.interleaved, ctx.eps = num_heads, num_kv_heads, interleaved, eps


def _backward(ctx, grad):
    qkv, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dqkv, dw = qk_norm_bwd(grad, qkv, q_weight, k_weight, cos, sin, ctx.num_heads, ctx.num_kv_heads, ctx.interleaved,
                           ctx.eps)  # fmt: skip
    dq_w = dw[0].to(q_weight.dtype) if q_weight is not None and ctx.needs_input_grad[1] else None
    dk_w = dw[1].to(k_weight.dtype) if k_weight is not None and ctx.needs_input_grad[2] else None
    return dqkv, dq_w, dk_w, None, None, None, None, None, None, None


qk_norm_fwd.register_autograd(_backward, setup_context=_setup)


def qk_norm(
    qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, mode: str,
    cos: torch.Tensor | None, sin: torch.Tensor | None, num_heads: int, num_kv_heads: int, interleaved: bool,
    eps: float, cache_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """qkv with q and k normalised for the attention kernels, and the tables they still
    apply: (qkv', cos, sin) before RoPE (the kernels rotate qkv'), (qkv', None, None) after
    (qkv' is rotated already, at positions 0.. or cache_len[b] + 0..)."""
    check_input("qkv", qkv)
    after = mode == "after" and cos is not None
    normed = qk_norm_fwd(qkv, q_weight, k_weight, cos if after else None, sin if after else None, cache_len,
                         num_heads, num_kv_heads, interleaved, float(eps))  # fmt: skip
    return (normed, None, None) if after else (normed, cos, sin)
