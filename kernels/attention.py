"""Multi-head attention with RoPE applied inside the kernel (Triton), forward and backward.

Flash-attention style: online softmax over key blocks, fp32 accumulation, the log-sum-exp
saved per query row for the backward. The kernels read q, k and v straight out of the
packed projection ``qkv`` [B, S, (H + 2 * KVH) * d] (H query heads, then KVH key heads, then
KVH value heads) and write the gradient straight into a packed ``dqkv``, so there are no
split, transpose, repeat or concatenation copies.

Variants, all compile-time switches of the same kernels: RoPE or none; non-causal or causal
(query i attends keys j <= i); a key mask [B, S] (False: the key is padding); grouped-query
attention (KVH divides H; query head h uses key/value head h // (H / KVH); KVH = 1 is
multi-query). A query row left with no key to attend (a causal row whose keys are all masked)
gets 0, and no gradient.

RoPE (rotate-half) acts on the two halves of a head: r1 = x1 cos - x2 sin,
r2 = x2 cos + x1 sin. It is applied in fp32 at load, and the rotated q and k are rounded
to the input dtype (as the reference rounds them) before the matrix products. Scores are
q.k = r1(q).r1(k) + r2(q).r2(k): two half-width dots, no concatenation (without RoPE the
same two dots on the raw halves). The backward un-rotates dq and dk (the transpose of the
rotation) before storing them. Any sequence length works (masked tails). head_dim is any
even number from 32 to 128: each half is padded to a power of two in registers (96 computes
as 128), which tensor-core products need; below 32 a half is under the 16-wide minimum of a
tensor-core product, above 128 the accumulators of a 64-row tile no longer fit in registers.
The dK/dV backward of a key/value head sums over the query heads of its group in one
program: deterministic, no atomics.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._triton import GRID_LIMITS, check_input, device_budget, launch, next_pow2, on_gpu, precision, takes

HEAD_DIMS = range(32, 129, 2)  # even head sizes 32..128
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp2 instead of exp in the softmax


@triton.jit
def _cols(valid, c, WIDTH: tl.constexpr, PADDED: tl.constexpr):
    """Mask [rows, PADDED] of valid rows and real columns; the column test only where there is
    padding, so that unpadded loads keep their 16-byte vectors."""
    mask = valid[:, None]
    if WIDTH != PADDED:
        mask = mask & (c[None, :] < WIDTH)
    return mask


@triton.jit
def _rows(base, rows, row_stride, valid, D: tl.constexpr, D_P: tl.constexpr):
    """Rows of one head as stored, [rows, D_P] (columns past D read as 0)."""
    d = tl.arange(0, D_P)
    return tl.load(base + rows[:, None].to(tl.int64) * row_stride + d[None, :], mask=_cols(valid, d, D, D_P), other=0.0)


@triton.jit
def _load_pairs(rows_ptr, valid, HALF: tl.constexpr, HALF_P: tl.constexpr, INTERLEAVED: tl.constexpr):
    """A head's rows as the two members of its RoPE pairs, (x1, x2) each [rows, HALF_P], zero
    past HALF: columns (c, c + HALF) rotate-half, (2c, 2c + 1) interleaved (one contiguous
    load of the row, split in registers, so the accesses stay vectorised). Every kernel holds
    a head as these two halves: a dot product over the head is the sum of the halves' dots."""
    c = tl.arange(0, HALF_P)
    if INTERLEAVED:
        w = tl.arange(0, 2 * HALF_P)
        x = tl.load(rows_ptr + w[None, :], mask=_cols(valid, w, 2 * HALF, 2 * HALF_P), other=0.0)
        x1, x2 = tl.split(tl.reshape(x, [x.shape[0], HALF_P, 2]))
    else:
        mask = _cols(valid, c, HALF, HALF_P)
        x1 = tl.load(rows_ptr + c[None, :], mask=mask, other=0.0)
        x2 = tl.load(rows_ptr + HALF + c[None, :], mask=mask, other=0.0)
    return x1, x2


@triton.jit
def _store_pairs(rows_ptr, valid, x1, x2, HALF: tl.constexpr, HALF_P: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Store (x1, x2) where _load_pairs reads them (interleaved: two strided stores, once per
    program; joining the halves in registers spilled in fp32 on sm_80)."""
    c = tl.arange(0, HALF_P)
    mask = _cols(valid, c, HALF, HALF_P)
    if INTERLEAVED:
        tl.store(rows_ptr + 2 * c[None, :], x1, mask=mask)
        tl.store(rows_ptr + 2 * c[None, :] + 1, x2, mask=mask)
    else:
        tl.store(rows_ptr + c[None, :], x1, mask=mask)
        tl.store(rows_ptr + HALF + c[None, :], x2, mask=mask)


@triton.jit
def _trig(TABLE, pos, valid, HALF: tl.constexpr, HALF_P: tl.constexpr, INTERLEAVED: tl.constexpr):
    """A RoPE table's angle of each pair at positions `pos`: [rows, HALF_P] (the pair's first
    column: c rotate-half, 2c interleaved; the fp32 tables are small and cached)."""
    c = tl.arange(0, HALF_P)
    col = 2 * c if INTERLEAVED else c
    return tl.load(TABLE + pos[:, None] * (2 * HALF) + col[None, :], mask=_cols(valid, c, HALF, HALF_P), other=0.0)


@triton.jit
def _rotated(
    base, rows, row_stride, pos, COS, SIN, valid,
    HALF: tl.constexpr, HALF_P: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
):  # fmt: skip
    """The two halves of one head's rows (at positions `pos`), rotated by RoPE in fp32 and
    rounded to the storage dtype as the reference rounds q and k (or as stored, without
    RoPE): (x1, x2), each [rows, HALF_P], zero past HALF."""
    c = tl.arange(0, HALF_P)
    mask = _cols(valid, c, HALF, HALF_P)
    if INTERLEAVED:
        x1, x2 = _load_pairs(base + rows[:, None].to(tl.int64) * row_stride, valid, HALF, HALF_P, True)
        trig = pos[:, None] * (2 * HALF) + 2 * c[None, :]
    else:
        ptr = base + rows[:, None].to(tl.int64) * row_stride + c[None, :]
        x1 = tl.load(ptr, mask=mask, other=0.0)
        x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
        trig = pos[:, None] * (2 * HALF) + c[None, :]
    if ROPE:
        cos = tl.load(COS + trig, mask=mask, other=0.0)
        sin = tl.load(SIN + trig, mask=mask, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        dtype = base.dtype.element_ty
        x1, x2 = (a * cos - b * sin).to(dtype), (b * cos + a * sin).to(dtype)
    return x1, x2


@triton.jit
def _unrotate_store(
    base, rows, row_stride, COS, SIN, valid, d1, d2,
    HALF: tl.constexpr, HALF_P: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
):  # fmt: skip
    """Store the gradient w.r.t. the unrotated input: the rotation's transpose applied to (d1, d2)."""
    if ROPE:
        cos = _trig(COS, rows, valid, HALF, HALF_P, INTERLEAVED)
        sin = _trig(SIN, rows, valid, HALF, HALF_P, INTERLEAVED)
        d1, d2 = d1 * cos + d2 * sin, d2 * cos - d1 * sin
    dtype = base.dtype.element_ty
    _store_pairs(base + rows[:, None].to(tl.int64) * row_stride, valid, d1.to(dtype), d2.to(dtype), HALF, HALF_P,
                 INTERLEAVED)  # fmt: skip


@triton.jit
def _keys_ok(KEY_MASK, b, cols, S, HAS_MASK: tl.constexpr):
    """Which key columns exist and may be attended."""
    ok = cols < S
    if HAS_MASK:
        ok = ok & (tl.load(KEY_MASK + b.to(tl.int64) * S + cols, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _allowed(q_rows, q_ok, k_cols, k_ok, CAUSAL: tl.constexpr, window=0, WINDOW: tl.constexpr = False):
    """[rows, cols]: may this query attend this key (with WINDOW, only keys j > i - window)."""
    ok = q_ok[:, None] & k_ok[None, :]
    if CAUSAL:
        ok = ok & (k_cols[None, :] <= q_rows[:, None])
    if WINDOW:
        ok = ok & (k_cols[None, :] > q_rows[:, None] - window)
    return ok


@triton.jit
def _window_start(first_row, window, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """The first key block a tile of queries from `first_row` on may attend: 0, or with a
    window the block of key first_row - window + 1."""
    if WINDOW:
        return (tl.maximum(first_row - window + 1, 0) // BLOCK_N) * BLOCK_N
    else:
        return 0


@triton.jit
def _softmax_step(
    qk, allowed, m_i, l_i, acc, qk_scale, v_base, cols, v_stride, k_ok,
    D: tl.constexpr, D_P: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax: scores qk [rows, BLOCK_N] (unscaled; -inf where not
    `allowed`), the running max m_i and sum l_i (log2 domain) and the output accumulator acc
    updated with the block's values (rows of v at `cols`). Shared by the attention forward and
    the KV-cache attention."""
    qk = tl.where(allowed, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _rows(v_base, cols, v_stride, k_ok, D, D_P)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_base.dtype.element_ty), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd(
    QKV, COS, SIN, KEY_MASK, OUT, LSE, S, H, KVH, scale, window,
    D: tl.constexpr, HALF_P: tl.constexpr, D_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, ROPE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    INTERLEAVED: tl.constexpr = False, WINDOW: tl.constexpr = False,
):  # fmt: skip
    m_block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // (H // KVH)
    HALF: tl.constexpr = D // 2
    dtype = OUT.dtype.element_ty
    row_stride = (H + 2 * KVH) * D
    base = QKV + b.to(tl.int64) * S * row_stride
    q_base, k_base, v_base = base + h * D, base + (H + g) * D, base + (H + KVH + g) * D
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = rows < S
    q1, q2 = _rotated(q_base, rows, row_stride, rows, COS, SIN, q_ok, HALF, HALF_P, ROPE, INTERLEAVED)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    qk_scale = scale * LOG2E
    end = tl.minimum(S, (m_block + 1) * BLOCK_M) if CAUSAL else S
    for start in range(_window_start(m_block * BLOCK_M, window, BLOCK_N, WINDOW), end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_ok = _keys_ok(KEY_MASK, b, cols, S, HAS_MASK)
        k1, k2 = _rotated(k_base, cols, row_stride, cols, COS, SIN, k_ok, HALF, HALF_P, ROPE, INTERLEAVED)
        qk = tl.dot(q1, tl.trans(k1), input_precision=PREC) + tl.dot(q2, tl.trans(k2), input_precision=PREC)
        allowed = _allowed(rows, q_ok, cols, k_ok, CAUSAL, window, WINDOW)
        m_i, l_i, acc = _softmax_step(qk, allowed, m_i, l_i, acc, qk_scale, v_base, cols, row_stride, k_ok, D, D_P,
                                      PREC)  # fmt: skip
    attended = l_i > 0
    out = acc / tl.where(attended, l_i, 1.0)[:, None]  # 0 for a row with no key to attend
    d = tl.arange(0, D_P)
    o_ptr = OUT + (b.to(tl.int64) * S + rows[:, None]) * (H * D) + h * D + d[None, :]
    tl.store(o_ptr, out.to(dtype), mask=_cols(q_ok, d, D, D_P))
    lse = tl.where(attended, m_i + tl.log2(tl.where(attended, l_i, 1.0)), float("inf"))  # log2 domain
    tl.store(LSE + bh.to(tl.int64) * S + rows, lse, mask=q_ok)


@triton.jit
def _attn_bwd_delta(OUT, DOUT, DELTA, S, H, D: tl.constexpr, D_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) per (b, h, query)."""
    m_block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_P)
    ok = rows < S
    mask = _cols(ok, d, D, D_P)
    offs = (b.to(tl.int64) * S + rows[:, None]) * (H * D) + h * D + d[None, :]
    o = tl.load(OUT + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * S + rows, tl.sum(o * do, axis=1), mask=ok)


@triton.jit
def _probabilities(q1, q2, k1, k2, lse, allowed, qk_scale, PREC: tl.constexpr):
    """P[q, k] recomputed from the saved log2-sum-exp; exactly 0 where not allowed (a row with
    nothing allowed saved lse = +inf, so its P is 0 everywhere)."""
    qk = tl.dot(q1, tl.trans(k1), input_precision=PREC) + tl.dot(q2, tl.trans(k2), input_precision=PREC)
    p = tl.exp2(qk * qk_scale - lse[:, None])
    return tl.where(allowed, p, 0.0)


@triton.jit
def _score_grad(p, do, v, delta, scale, dtype, PREC: tl.constexpr):
    """dS = P * (dO V^T - delta) * scale, in the input dtype for the next products."""
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return (p * (dp - delta[:, None]) * scale).to(dtype)


@triton.jit
def _rope_qk(
    QKV, COS, SIN, QK, S, H, KVH,
    D: tl.constexpr, HALF_P: tl.constexpr, BLOCK_M: tl.constexpr, INTERLEAVED: tl.constexpr = False,
):  # fmt: skip
    """The backward's q and k, rotated once ([B, S, (H + KVH) * d], as the forward rotates and
    rounds them), so that its inner loops load them without trigonometry: fewer registers.
    Stored as rotate-half halves in either convention (only their dot products are used)."""
    m_block, bj = tl.program_id(0), tl.program_id(1)
    b, j = bj // (H + KVH), bj % (H + KVH)  # head j of the q heads then the k heads
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < S
    src = QKV + b.to(tl.int64) * S * (H + 2 * KVH) * D + j * D
    x1, x2 = _rotated(src, rows, (H + 2 * KVH) * D, rows, COS, SIN, ok, D // 2, HALF_P, True, INTERLEAVED)
    dst = QK + b.to(tl.int64) * S * (H + KVH) * D + j * D
    c = tl.arange(0, HALF_P)
    ptr = dst + rows[:, None].to(tl.int64) * ((H + KVH) * D) + c[None, :]
    mask = _cols(ok, c, D // 2, HALF_P)
    tl.store(ptr, x1, mask=mask)
    tl.store(ptr + D // 2, x2, mask=mask)


@triton.jit
def _query_tile(
    QK_BASE, qk_stride, DOUT, LSE, DELTA, b, h, rows, S, H,
    D: tl.constexpr, HALF_P: tl.constexpr, D_P: tl.constexpr,
):  # fmt: skip
    """The backward's view of query rows of head h: validity, (rotated) q halves, lse, delta, dO."""
    q_ok = rows < S
    q1, q2 = _rotated(QK_BASE + h * D, rows, qk_stride, rows, QK_BASE, QK_BASE, q_ok, D // 2, HALF_P, False, False)
    bh = (b * H + h).to(tl.int64)
    lse = tl.load(LSE + bh * S + rows, mask=q_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * S + rows, mask=q_ok, other=0.0)
    do = _rows(DOUT + b.to(tl.int64) * S * (H * D) + h * D, rows, H * D, q_ok, D, D_P)
    return q_ok, q1, q2, lse, delta, do


@triton.jit
def _key_tile(
    QK_BASE, qk_stride, V_BASE, row_stride, KEY_MASK, b, g, cols, S, H,
    D: tl.constexpr, HALF_P: tl.constexpr, D_P: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """The backward's view of key rows of key/value head g: validity, (rotated) k halves and v."""
    k_ok = _keys_ok(KEY_MASK, b, cols, S, HAS_MASK)
    k1, k2 = _rotated(QK_BASE + (H + g) * D, cols, qk_stride, cols, QK_BASE, QK_BASE, k_ok, D // 2, HALF_P, False,
                      False)  # fmt: skip
    v = _rows(V_BASE + g * D, cols, row_stride, k_ok, D, D_P)
    return k_ok, k1, k2, v


@triton.jit
def _attn_bwd_dkdv(
    QKV, QK, COS, SIN, KEY_MASK, DOUT, LSE, DELTA, DQKV, S, H, KVH, qk_stride, scale, window,
    D: tl.constexpr, HALF_P: tl.constexpr, D_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, ROPE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    INTERLEAVED: tl.constexpr = False, WINDOW: tl.constexpr = False,
):  # fmt: skip
    """dK and dV of one block of keys of one key/value head, summed over its group's query heads.
    q and k come rotated (QK, row stride qk_stride); dK is un-rotated when stored."""
    n_block, bg = tl.program_id(0), tl.program_id(1)
    b, g = bg // KVH, bg % KVH
    group = H // KVH
    HALF: tl.constexpr = D // 2
    dtype = DQKV.dtype.element_ty
    row_stride = (H + 2 * KVH) * D
    qk_base = QK + b.to(tl.int64) * S * qk_stride
    v_base = QKV + b.to(tl.int64) * S * row_stride + (H + KVH) * D
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok, k1, k2, v = _key_tile(qk_base, qk_stride, v_base, row_stride, KEY_MASK, b, g, cols, S, H, D, HALF_P, D_P,
                                HAS_MASK)  # fmt: skip
    dk1 = tl.zeros([BLOCK_N, HALF_P], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF_P], tl.float32)
    dv = tl.zeros([BLOCK_N, D_P], tl.float32)
    qk_scale = scale * LOG2E
    first = (n_block * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0  # earlier queries see none of these keys
    last = tl.minimum(S, (n_block + 1) * BLOCK_N + window - 1) if WINDOW else S  # later queries: out of window
    for j in range(0, group):
        h = g * group + j
        for start in range(first, last, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q_ok, q1, q2, lse, delta, do = _query_tile(qk_base, qk_stride, DOUT, LSE, DELTA, b, h, rows, S, H, D,
                                                       HALF_P, D_P)  # fmt: skip
            allowed = _allowed(rows, q_ok, cols, k_ok, CAUSAL, window, WINDOW)
            p = _probabilities(q1, q2, k1, k2, lse, allowed, qk_scale, PREC)
            dv += tl.dot(tl.trans(p.to(dtype)), do, input_precision=PREC)
            ds = _score_grad(p, do, v, delta, scale, dtype, PREC)
            dk1 += tl.dot(tl.trans(ds), q1, input_precision=PREC)
            dk2 += tl.dot(tl.trans(ds), q2, input_precision=PREC)
    g_base = DQKV + b.to(tl.int64) * S * row_stride
    valid = cols < S  # masked keys get a zero gradient, stored
    _unrotate_store(g_base + (H + g) * D, cols, row_stride, COS, SIN, valid, dk1, dk2, HALF, HALF_P, ROPE,
                    INTERLEAVED)  # fmt: skip
    d = tl.arange(0, D_P)
    dv_ptr = g_base + (H + KVH + g) * D + cols[:, None].to(tl.int64) * row_stride + d[None, :]
    tl.store(dv_ptr, dv.to(dtype), mask=_cols(valid, d, D, D_P))


@triton.jit
def _attn_bwd_dq(
    QKV, QK, COS, SIN, KEY_MASK, DOUT, LSE, DELTA, DQKV, S, H, KVH, qk_stride, scale, window,
    D: tl.constexpr, HALF_P: tl.constexpr, D_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, ROPE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    INTERLEAVED: tl.constexpr = False, WINDOW: tl.constexpr = False,
):  # fmt: skip
    """dQ of one block of queries of one head; q and k come rotated, dQ is un-rotated when stored."""
    m_block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // (H // KVH)
    dtype = DQKV.dtype.element_ty
    row_stride = (H + 2 * KVH) * D
    qk_base = QK + b.to(tl.int64) * S * qk_stride
    v_base = QKV + b.to(tl.int64) * S * row_stride + (H + KVH) * D
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok, q1, q2, lse, delta, do = _query_tile(qk_base, qk_stride, DOUT, LSE, DELTA, b, h, rows, S, H, D, HALF_P,
                                               D_P)  # fmt: skip
    dq1 = tl.zeros([BLOCK_M, HALF_P], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF_P], tl.float32)
    qk_scale = scale * LOG2E
    end = tl.minimum(S, (m_block + 1) * BLOCK_M) if CAUSAL else S
    for start in range(_window_start(m_block * BLOCK_M, window, BLOCK_N, WINDOW), end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_ok, k1, k2, v = _key_tile(qk_base, qk_stride, v_base, row_stride, KEY_MASK, b, g, cols, S, H, D, HALF_P,
                                    D_P, HAS_MASK)  # fmt: skip
        allowed = _allowed(rows, q_ok, cols, k_ok, CAUSAL, window, WINDOW)
        p = _probabilities(q1, q2, k1, k2, lse, allowed, qk_scale, PREC)
        ds = _score_grad(p, do, v, delta, scale, dtype, PREC)
        dq1 += tl.dot(ds, k1, input_precision=PREC)
        dq2 += tl.dot(ds, k2, input_precision=PREC)
    g_base = DQKV + b.to(tl.int64) * S * row_stride
    _unrotate_store(g_base + h * D, rows, row_stride, COS, SIN, q_ok, dq1, dq2, D // 2, HALF_P, ROPE, INTERLEAVED)


class Tile(NamedTuple):
    block_m: int  # query rows per program
    block_n: int  # key rows per program
    warps: int
    stages: int


def tiles(
    head_dim: int, capability: tuple[int, int] | None, dtype: torch.dtype = torch.bfloat16, interleaved: bool = False
) -> dict[str, Tile]:
    """Each kernel's tile for this head size and dtype on this GPU (None: the interpreter): the
    largest that ptxas compiles without register spills on every architecture of its family,
    with the family's tensor-core instruction (`python -m trm_benchmarks.ptx` checks sm_80, 86,
    89, 90, 100 and 120 in bf16, fp16 and fp32; see its report). The backward's dK/dV
    accumulates three [BLOCK_N, d] tiles over a loop of products: on mma.sync GPUs (Ampere,
    Ada, consumer Blackwell) it fits registers at 32 x 32, on wgmma / tcgen05 GPUs (Hopper,
    B200) at 64 x 64. Heads wider than 64 take smaller tiles; warpgroup products need 64 rows
    in a tile's first product. fp32 on a GPU multiplies with IEEE products (no tensor cores)
    and holds twice the bytes per element: its 16- and 32-row tiles are the largest that
    compile without spills everywhere (the 16-bit tiles need up to 147 KB of shared memory
    and spill up to 20 KB in fp32). Every tile here compiles without spills with triton 3.9 and
    with 3.6, the oldest the package claims."""
    wide = next_pow2(head_dim // 2) > 32
    major = capability[0] if capability is not None else None
    if dtype == torch.float32 and major is not None:
        if wide:  # 8 warps spread dK/dV's accumulators (2 stages on wgmma GPUs, 1 on mma.sync ones)
            dkdv = Tile(16, 16, 8, 2) if major in (9, 10) else Tile(16, 16, 8, 1)
            # dQ at 4 warps spilled 8 B on sm_90/100 and 992 B on sm_120 with triton 3.6 (window,
            # interleaved); at 8 on sm_100 4 B with 3.9
            dq = {9: Tile(32, 16, 8, 1), 10: Tile(16, 16, 4, 1), 12: Tile(32, 16, 8, 1)}.get(major, Tile(32, 16, 4, 1))
            return {"fwd": Tile(32, 16, 4, 1), "dq": dq, "dkdv": dkdv}
        return {"fwd": Tile(16, 32, 4, 1), "dq": Tile(16, 32, 4, 1), "dkdv": Tile(16, 16, 4, 1)}
    if major in (9, 10):  # Hopper, B200: wgmma / tcgen05
        if wide:
            return {"fwd": Tile(64, 32, 8, 2), "dq": Tile(64, 32, 8, 2), "dkdv": Tile(16, 64, 8, 1)}
        return {"fwd": Tile(64, 64, 4, 2), "dq": Tile(64, 64, 4, 1), "dkdv": Tile(64, 64, 8, 1)}
    keys = 32 if interleaved else 64  # splitting interleaved pairs in registers: 64-key tiles spill, or need 108 KB
    if wide:
        return {"fwd": Tile(32, keys, 4, 2), "dq": Tile(32, 64, 8, 1), "dkdv": Tile(32, 32, 8, 1)}
    return {"fwd": Tile(64, keys, 4, 2), "dq": Tile(64, 64, 4, 1), "dkdv": Tile(32, 32, 8, 1)}


def _tiles_for(qkv: torch.Tensor, head_dim: int, interleaved: bool = False) -> dict[str, Tile]:
    budget = device_budget(qkv.device) if on_gpu(qkv) else None
    capability = divmod(budget[0], 10) if budget is not None else None
    return tiles(head_dim, capability, qkv.dtype, interleaved)


def _launch_by_batch(kernel, blocks: int, per_element: int, batch: int, args: tuple, batched: tuple[int, ...],
                     **meta) -> None:  # fmt: skip
    """`kernel` over a grid of (blocks, batch * per_element) programs, the second axis being
    batch x heads, in slices of the batch that keep it within CUDA's 65,535 on axis y (batch
    8192 x 8 heads is 65,536): the batch-major arguments at `batched` are sliced along dim 0,
    and each slice's kernel sees it as a batch of its own. One launch up to 8191 x 8 heads."""
    step = max(1, GRID_LIMITS[1] // per_element)
    for start in range(0, batch, step):
        part = slice(start, min(batch, start + step))
        sliced = [a[part] if i in batched else a for i, a in enumerate(args)]
        launch(kernel, (blocks, (part.stop - part.start) * per_element), *sliced, **meta)


DELTA_ROWS = 64  # rows per program of the backward's elementwise kernels (delta, the rotation of q and k)


def head_dim_of(qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> int:
    return qkv.shape[-1] // (num_heads + 2 * num_kv_heads)


def supports(qkv: torch.Tensor, cos, sin, num_heads: int, num_kv_heads: int, causal: bool, key_mask,
             rope: str = "rotate_half", window: int = 0, *_qk_norm) -> bool:  # fmt: skip
    return takes(qkv) and head_dim_of(qkv, num_heads, num_kv_heads) in HEAD_DIMS


def _meta(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos, causal: bool, key_mask,
          interleaved: bool = False, window: int = 0) -> dict:  # fmt: skip
    d = head_dim_of(qkv, num_heads, num_kv_heads)
    if d not in HEAD_DIMS:
        raise ValueError(f"rope_attention: head_dim {d} is not supported by the triton backend (even, 32..128)")
    return dict(D=d, HALF_P=next_pow2(d // 2), D_P=2 * next_pow2(d // 2), PREC=precision(qkv), ROPE=cos is not None,
                CAUSAL=causal, HAS_MASK=key_mask is not None,
                INTERLEAVED=cos is not None and interleaved, WINDOW=window > 0)  # fmt: skip


def _tables(qkv: torch.Tensor, cos, sin, key_mask):
    """Kernel arguments for the optional inputs: fp32 tables, an int8 mask, or qkv as a stand-in pointer."""
    cos = cos.float().contiguous() if cos is not None else qkv
    sin = sin.float().contiguous() if sin is not None else qkv
    mask = key_mask.contiguous().view(torch.int8) if key_mask is not None else qkv
    return cos, sin, mask


@torch.library.custom_op("trm::rope_attention", mutates_args=())
def attention_fwd(
    qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, num_heads: int, num_kv_heads: int,
    causal: bool, key_mask: torch.Tensor | None, interleaved: bool, window: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    qkv = qkv.contiguous()
    batch, seq, _ = qkv.shape
    meta = _meta(qkv, num_heads, num_kv_heads, cos, causal, key_mask, interleaved, window)
    d = head_dim_of(qkv, num_heads, num_kv_heads)
    out = qkv.new_empty(batch, seq, num_heads * d)
    lse = torch.empty(batch, num_heads, seq, dtype=torch.float32, device=qkv.device)
    t = _tiles_for(qkv, d, meta["INTERLEAVED"])["fwd"]
    args = (qkv, *_tables(qkv, cos, sin, key_mask), out, lse, seq, num_heads, num_kv_heads, 1 / math.sqrt(d), window)
    _launch_by_batch(_attn_fwd, triton.cdiv(seq, t.block_m), num_heads, batch, args, (0, 3, 4, 5), **meta,
                     BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.warps, num_stages=t.stages)  # fmt: skip
    return out, lse


@attention_fwd.register_fake
def _(qkv, cos, sin, num_heads, num_kv_heads, causal, key_mask, interleaved, window):
    batch, seq, _ = qkv.shape
    d = head_dim_of(qkv, num_heads, num_kv_heads)
    return qkv.new_empty(batch, seq, num_heads * d), qkv.new_empty(batch, num_heads, seq, dtype=torch.float32)


@torch.library.custom_op("trm::rope_attention_backward", mutates_args=())
def attention_bwd(
    dout: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, out: torch.Tensor,
    lse: torch.Tensor, num_heads: int, num_kv_heads: int, causal: bool, key_mask: torch.Tensor | None,
    interleaved: bool, window: int,
) -> torch.Tensor:  # fmt: skip
    dout, qkv = dout.contiguous(), qkv.contiguous()
    batch, seq, _ = qkv.shape
    meta = _meta(qkv, num_heads, num_kv_heads, cos, causal, key_mask, interleaved, window)
    d = head_dim_of(qkv, num_heads, num_kv_heads)
    delta = torch.empty_like(lse)
    row_blocks = triton.cdiv(seq, DELTA_ROWS)
    _launch_by_batch(_attn_bwd_delta, row_blocks, num_heads, batch, (out, dout, delta, seq, num_heads), (0, 1, 2), D=d,
                     D_P=meta["D_P"], BLOCK_M=DELTA_ROWS)  # fmt: skip
    dqkv = torch.empty_like(qkv)
    cos, sin, mask = _tables(qkv, cos, sin, key_mask)
    qk, qk_stride = qkv, (num_heads + 2 * num_kv_heads) * d
    if meta["ROPE"]:  # q and k rotated once for the backward's loops
        qk_stride = (num_heads + num_kv_heads) * d
        qk = qkv.new_empty(batch, seq, qk_stride)
        _launch_by_batch(_rope_qk, row_blocks, num_heads + num_kv_heads, batch,
                         (qkv, cos, sin, qk, seq, num_heads, num_kv_heads), (0, 3), D=d, HALF_P=meta["HALF_P"],
                         BLOCK_M=DELTA_ROWS, INTERLEAVED=meta["INTERLEAVED"])  # fmt: skip
    args = (qkv, qk, cos, sin, mask, dout, lse, delta, dqkv, seq, num_heads, num_kv_heads, qk_stride,
            1 / math.sqrt(d), window)  # fmt: skip
    chosen = _tiles_for(qkv, d, meta["INTERLEAVED"])
    for kernel, t, rows, programs in ((_attn_bwd_dkdv, chosen["dkdv"], "block_n", num_kv_heads),
                                      (_attn_bwd_dq, chosen["dq"], "block_m", num_heads)):  # fmt: skip
        _launch_by_batch(kernel, triton.cdiv(seq, getattr(t, rows)), programs, batch, args, (0, 1, 4, 5, 6, 7, 8),
                         **meta, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.warps,
                         num_stages=t.stages)  # fmt: skip
    return dqkv


@attention_bwd.register_fake
def _(dout, qkv, cos, sin, out, lse, num_heads, num_kv_heads, causal, key_mask, interleaved, window):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    qkv, cos, sin, num_heads, num_kv_heads, causal, key_mask, interleaved, window = inputs
    ctx.save_for_backward(qkv, cos, sin, key_mask, output[0], output[1])
    ctx.num_heads, ctx.num_kv_heads, ctx.causal, ctx.interleaved = num_heads, num_kv_heads, causal, interleaved
    ctx.window = window
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs backward ignores


def _backward(ctx, dout, _dlse):
    if dout is None:  # the output is unused
        return None, None, None, None, None, None, None, None, None
    qkv, cos, sin, key_mask, out, lse = ctx.saved_tensors
    dqkv = attention_bwd(dout, qkv, cos, sin, out, lse, ctx.num_heads, ctx.num_kv_heads, ctx.causal, key_mask,
                         ctx.interleaved, ctx.window)  # fmt: skip
    return dqkv, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup)


def rope_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    rope: str = "rotate_half",
    window: int = 0,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    qk_norm: str | None = None,
    qk_norm_eps: float = 1e-6,
) -> torch.Tensor:
    """The triton backend of :func:`trm_kernels.rope_attention`; QK-norm (``qk_norm`` "before"
    or "after" RoPE) is a row-local pass of its own before these kernels (``qk_norm.py``)."""
    check_input("qkv", qkv)
    if cos is not None and cos.shape[0] != qkv.shape[1]:  # a longer table: its first S positions
        cos, sin = cos[: qkv.shape[1]], sin[: qkv.shape[1]]
    interleaved = rope == "interleaved"
    if qk_norm is not None:
        from .qk_norm import qk_norm as normed

        qkv, cos, sin = normed(qkv, q_norm_weight, k_norm_weight, qk_norm, cos, sin, num_heads, num_kv_heads,
                               interleaved, qk_norm_eps)  # fmt: skip
    return attention_fwd(qkv, cos, sin, num_heads, num_kv_heads, causal, key_mask, interleaved, window)[0]
