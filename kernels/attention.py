"""Non-causal multi-head attention with RoPE applied inside the kernel (Triton), fwd + bwd.

Flash-attention style: online softmax over key blocks, fp32 accumulation, the log-sum-exp
saved per query row for the backward. The kernels read q, k and v straight out of the
packed projection ``qkv`` [B, S, 3*H*d] and write the gradient straight into a packed
``dqkv``, so there are no split, transpose or concatenation copies.

RoPE (rotate-half) acts on the two halves of a head: r1 = x1 cos - x2 sin,
r2 = x2 cos + x1 sin. It is applied in fp32 at load, and the rotated q and k are rounded
to the input dtype (as the reference rounds them) before the matrix products. Scores are
q.k = r1(q).r1(k) + r2(q).r2(k): two half-width dots, no concatenation. The backward
un-rotates dq and dk (the transpose of the rotation) before storing them. Any sequence
length works (masked tails). head_dim is 32, 64 or 128.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton import check_input, takes

HEAD_DIMS = (32, 64, 128)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp2 instead of exp in the softmax


@triton.jit
def _head(QKV, bh, S, H, D: tl.constexpr):
    """Batch b and head h of program axis `bh`, where head h's q starts in batch b's first row
    (its k and v follow at +H*D and +2*H*D), and the stride between rows of qkv."""
    b, h = bh // H, bh % H
    row_stride = 3 * H * D
    return b, h, QKV + b.to(tl.int64) * S * row_stride + h * D, row_stride


@triton.jit
def _rows(base, rows, row_stride, valid, D: tl.constexpr):
    """Rows of one head as stored, [rows, D]."""
    d = tl.arange(0, D)
    return tl.load(base + rows[:, None].to(tl.int64) * row_stride + d[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _rotated(base, rows, row_stride, COS, SIN, valid, HALF: tl.constexpr):
    """Rows of one head rotated by RoPE in fp32, then rounded to the storage dtype as the
    reference rounds q and k: (r1, r2), each [rows, HALF]."""
    c = tl.arange(0, HALF)
    ptr = base + rows[:, None].to(tl.int64) * row_stride + c[None, :]
    x1 = tl.load(ptr, mask=valid[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=valid[:, None], other=0.0).to(tl.float32)
    trig = rows[:, None] * (2 * HALF) + c[None, :]
    cos = tl.load(COS + trig, mask=valid[:, None], other=0.0)
    sin = tl.load(SIN + trig, mask=valid[:, None], other=0.0)
    dtype = base.dtype.element_ty
    return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit
def _unrotate_store(base, rows, row_stride, COS, SIN, valid, d1, d2, HALF: tl.constexpr):
    """Store the gradient w.r.t. the unrotated input: the rotation's transpose applied to (d1, d2)."""
    c = tl.arange(0, HALF)
    trig = rows[:, None] * (2 * HALF) + c[None, :]
    cos = tl.load(COS + trig, mask=valid[:, None], other=0.0)
    sin = tl.load(SIN + trig, mask=valid[:, None], other=0.0)
    ptr = base + rows[:, None].to(tl.int64) * row_stride + c[None, :]
    tl.store(ptr, (d1 * cos + d2 * sin).to(base.dtype.element_ty), mask=valid[:, None])
    tl.store(ptr + HALF, (d2 * cos - d1 * sin).to(base.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _attn_fwd(
    QKV, COS, SIN, OUT, LSE, S, H, scale,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    m_block, bh = tl.program_id(0), tl.program_id(1)
    D: tl.constexpr = 2 * HALF
    dtype = OUT.dtype.element_ty
    b, h, q_base, row_stride = _head(QKV, bh, S, H, D)
    k_base = q_base + H * D
    v_base = q_base + 2 * H * D
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = rows < S
    q1, q2 = _rotated(q_base, rows, row_stride, COS, SIN, q_ok, HALF)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    d = tl.arange(0, D)
    qk_scale = scale * LOG2E
    for start in range(0, S, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_ok = cols < S
        k1, k2 = _rotated(k_base, cols, row_stride, COS, SIN, k_ok, HALF)
        qk = tl.dot(q1, tl.trans(k1), input_precision=PREC) + tl.dot(q2, tl.trans(k2), input_precision=PREC)
        qk = tl.where(k_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _rows(v_base, cols, row_stride, k_ok, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptr = OUT + (b.to(tl.int64) * S + rows[:, None]) * (H * D) + h * D + d[None, :]
    tl.store(o_ptr, out.to(dtype), mask=q_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * S + rows, m_i + tl.log2(l_i), mask=q_ok)  # log2 domain


@triton.jit
def _attn_bwd_delta(OUT, DOUT, DELTA, S, H, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) per (b, h, query)."""
    m_block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    ok = rows < S
    offs = (b.to(tl.int64) * S + rows[:, None]) * (H * D) + h * D + d[None, :]
    o = tl.load(OUT + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DOUT + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * S + rows, tl.sum(o * do, axis=1), mask=ok)


@triton.jit
def _probabilities(q1, q2, k1, k2, lse, q_ok, k_ok, qk_scale, PREC: tl.constexpr):
    """P[q, k] recomputed from the saved log2-sum-exp; exactly 0 outside the valid tile."""
    qk = tl.dot(q1, tl.trans(k1), input_precision=PREC) + tl.dot(q2, tl.trans(k2), input_precision=PREC)
    p = tl.exp2(qk * qk_scale - lse[:, None])
    return tl.where(q_ok[:, None] & k_ok[None, :], p, 0.0)


@triton.jit
def _score_grad(p, do, v, delta, scale, dtype, PREC: tl.constexpr):
    """dS = P * (dO V^T - delta) * scale, in the input dtype for the next products."""
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return (p * (dp - delta[:, None]) * scale).to(dtype)


@triton.jit
def _query_tile(QKV_BASE, DOUT, LSE, DELTA, COS, SIN, b, h, bh, rows, row_stride, S, H, HALF: tl.constexpr):
    """The backward's view of query rows: validity, rotated q halves, lse, delta and dO."""
    D: tl.constexpr = 2 * HALF
    q_ok = rows < S
    q1, q2 = _rotated(QKV_BASE, rows, row_stride, COS, SIN, q_ok, HALF)
    lse = tl.load(LSE + bh.to(tl.int64) * S + rows, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * S + rows, mask=q_ok, other=0.0)
    do = _rows(DOUT + b.to(tl.int64) * S * (H * D) + h * D, rows, H * D, q_ok, D)
    return q_ok, q1, q2, lse, delta, do


@triton.jit
def _key_tile(QKV_BASE, COS, SIN, cols, row_stride, S, H, HALF: tl.constexpr):
    """The backward's view of key rows: validity, rotated k halves and v."""
    D: tl.constexpr = 2 * HALF
    k_ok = cols < S
    k1, k2 = _rotated(QKV_BASE + H * D, cols, row_stride, COS, SIN, k_ok, HALF)
    v = _rows(QKV_BASE + 2 * H * D, cols, row_stride, k_ok, D)
    return k_ok, k1, k2, v


@triton.jit
def _attn_bwd_dkdv(
    QKV, COS, SIN, DOUT, LSE, DELTA, DQKV, S, H, scale,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    n_block, bh = tl.program_id(0), tl.program_id(1)
    D: tl.constexpr = 2 * HALF
    dtype = DQKV.dtype.element_ty
    b, h, q_base, row_stride = _head(QKV, bh, S, H, D)
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    k_ok, k1, k2, v = _key_tile(q_base, COS, SIN, cols, row_stride, S, H, HALF)
    dk1 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    qk_scale = scale * LOG2E
    for start in range(0, S, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q_ok, q1, q2, lse, delta, do = _query_tile(q_base, DOUT, LSE, DELTA, COS, SIN, b, h, bh, rows, row_stride,
                                                   S, H, HALF)  # fmt: skip
        p = _probabilities(q1, q2, k1, k2, lse, q_ok, k_ok, qk_scale, PREC)
        dv += tl.dot(tl.trans(p.to(dtype)), do, input_precision=PREC)
        ds = _score_grad(p, do, v, delta, scale, dtype, PREC)
        dk1 += tl.dot(tl.trans(ds), q1, input_precision=PREC)
        dk2 += tl.dot(tl.trans(ds), q2, input_precision=PREC)
    g_base = DQKV + b.to(tl.int64) * S * row_stride + h * D
    _unrotate_store(g_base + H * D, cols, row_stride, COS, SIN, k_ok, dk1, dk2, HALF)
    dv_ptr = g_base + 2 * H * D + cols[:, None].to(tl.int64) * row_stride + d[None, :]
    tl.store(dv_ptr, dv.to(dtype), mask=k_ok[:, None])


@triton.jit
def _attn_bwd_dq(
    QKV, COS, SIN, DOUT, LSE, DELTA, DQKV, S, H, scale,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    m_block, bh = tl.program_id(0), tl.program_id(1)
    D: tl.constexpr = 2 * HALF
    dtype = DQKV.dtype.element_ty
    b, h, q_base, row_stride = _head(QKV, bh, S, H, D)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok, q1, q2, lse, delta, do = _query_tile(q_base, DOUT, LSE, DELTA, COS, SIN, b, h, bh, rows, row_stride,
                                               S, H, HALF)  # fmt: skip
    dq1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    qk_scale = scale * LOG2E
    for start in range(0, S, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_ok, k1, k2, v = _key_tile(q_base, COS, SIN, cols, row_stride, S, H, HALF)
        p = _probabilities(q1, q2, k1, k2, lse, q_ok, k_ok, qk_scale, PREC)
        ds = _score_grad(p, do, v, delta, scale, dtype, PREC)
        dq1 += tl.dot(ds, k1, input_precision=PREC)
        dq2 += tl.dot(ds, k2, input_precision=PREC)
    g_base = DQKV + b.to(tl.int64) * S * row_stride + h * D
    _unrotate_store(g_base, rows, row_stride, COS, SIN, q_ok, dq1, dq2, HALF)


BLOCK_M, BLOCK_N = 64, 64
# Warps of the dK/dV backward kernel. With 4 it uses all 255 registers per thread (ptxas
# spills 36 bytes under triton 3.6), with 8 about 233 and no spills, at the same 8 warps per
# SM. The op benchmark times both ("triton, dK/dV 8 warps"); the faster becomes the default.
DKDV_WARPS = 4


def _precision(t: torch.Tensor) -> str:
    """fp32 inputs get IEEE products, as PyTorch's fp32 attention does (Triton would use tf32)."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def supports(qkv: torch.Tensor, cos, sin, num_heads: int) -> bool:
    return takes(qkv) and qkv.shape[-1] // (3 * num_heads) in HEAD_DIMS


def _head_dim(qkv: torch.Tensor, num_heads: int) -> int:
    d = qkv.shape[-1] // (3 * num_heads)
    if d not in HEAD_DIMS:
        raise ValueError(f"rope_attention: head_dim {d} is not supported by the triton backend ({HEAD_DIMS})")
    return d


@torch.library.custom_op("trm::rope_attention", mutates_args=())
def attention_fwd(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    qkv, cos, sin = qkv.contiguous(), cos.float().contiguous(), sin.float().contiguous()
    batch, seq, _ = qkv.shape
    d = _head_dim(qkv, num_heads)
    out = qkv.new_empty(batch, seq, num_heads * d)
    lse = torch.empty(batch, num_heads, seq, dtype=torch.float32, device=qkv.device)
    grid = (triton.cdiv(seq, BLOCK_M), batch * num_heads)
    _attn_fwd[grid](qkv, cos, sin, out, lse, seq, num_heads, 1 / math.sqrt(d),
                    HALF=d // 2, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PREC=_precision(qkv), num_warps=4,
                    num_stages=2)  # fmt: skip
    return out, lse


@attention_fwd.register_fake
def _(qkv, cos, sin, num_heads):
    batch, seq, width = qkv.shape
    return qkv.new_empty(batch, seq, width // 3), qkv.new_empty(batch, num_heads, seq, dtype=torch.float32)


@torch.library.custom_op("trm::rope_attention_backward", mutates_args=())
def attention_bwd(
    dout: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, num_heads: int,
) -> torch.Tensor:  # fmt: skip
    dout, qkv, cos, sin = dout.contiguous(), qkv.contiguous(), cos.float().contiguous(), sin.float().contiguous()
    batch, seq, _ = qkv.shape
    d = _head_dim(qkv, num_heads)
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(seq, BLOCK_M), batch * num_heads)](out, dout, delta, seq, num_heads, D=d,
                                                                    BLOCK_M=BLOCK_M)  # fmt: skip
    dqkv = torch.empty_like(qkv)
    args = (qkv, cos, sin, dout, lse, delta, dqkv, seq, num_heads, 1 / math.sqrt(d))
    meta = dict(HALF=d // 2, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PREC=_precision(qkv), num_stages=1)
    _attn_bwd_dkdv[(triton.cdiv(seq, BLOCK_N), batch * num_heads)](*args, **meta, num_warps=DKDV_WARPS)
    _attn_bwd_dq[(triton.cdiv(seq, BLOCK_M), batch * num_heads)](*args, **meta, num_warps=4)
    return dqkv


@attention_bwd.register_fake
def _(dout, qkv, cos, sin, out, lse, num_heads):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    qkv, cos, sin, num_heads = inputs
    ctx.save_for_backward(qkv, cos, sin, output[0], output[1])
    ctx.num_heads = num_heads


def _backward(ctx, dout, _dlse):
    qkv, cos, sin, out, lse = ctx.saved_tensors
    return attention_bwd(dout, qkv, cos, sin, out, lse, ctx.num_heads), None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup)


def rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    check_input("qkv", qkv)
    return attention_fwd(qkv, cos, sin, num_heads)[0]
