"""Attention against a key/value cache (Triton): chunked prefill and decode, forward only.

Two launches per call. ``_cache_write`` rotates the new tokens' keys at their positions
(cache_len[b] + i) and writes them, with the values, into the caches in place. Then
``_cache_attn`` attends: one program holds a tile of rows, each row one (query token, query
head of a key/value group) pair, so that the G = H / KVH query heads sharing a key/value head
read each key block once (a decode step's tile is the group's heads); keys come from the
cache in blocks, online softmax in fp32 as in :mod:`trm_kernels.attention`. Causal is aligned
lower-right (query i sees positions up to cache_len[b] + i); ``window`` > 0 keeps only the
last `window` positions of those. Split-K (FlashDecoding): where a call has few row tiles
(decode, small batch) the key axis is cut into chunks, one program each, writing a partial
output and its log-sum-exp; ``_cache_combine`` merges them. The number of chunks depends on
static shapes only (the cache's capacity), so a decode step is graph-capturable.

The caches may have any strides with the head axis contiguous (a [B, KVH, C, d] cache,
Hugging Face's layout, is passed as ``cache.transpose(1, 2)``). No backward: training with
equal query and key lengths is :func:`trm_kernels.rope_attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton import check_input, device_budget, launch, next_pow2, on_gpu, precision, takes
from .attention import (
    HEAD_DIMS,
    LOG2E,
    _cols,
    _launch_by_batch,
    _rotated,
    _rows,
    _softmax_step,
    _store_pairs,
    head_dim_of,
)


@triton.jit
def _cache_write(
    QKV, COS, SIN, LENS, KC, VC, Sq, H, KVH, kc_b, kc_s, kc_h, vc_b, vc_s, vc_h,
    D: tl.constexpr, HALF_P: tl.constexpr, D_P: tl.constexpr, BLOCK_M: tl.constexpr, ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):  # fmt: skip
    """The new tokens' keys (rotated at their positions, rounded as the reference rounds them)
    and values into the caches at positions cache_len[b] + i, in the caches' own layout."""
    m_block, bg = tl.program_id(0), tl.program_id(1)
    b, g = bg // KVH, bg % KVH
    HALF: tl.constexpr = D // 2
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < Sq
    pos = tl.load(LENS + b).to(tl.int32) + rows
    row_stride = (H + 2 * KVH) * D
    base = QKV + b.to(tl.int64) * Sq * row_stride
    k1, k2 = _rotated(base + (H + g) * D, rows, row_stride, pos, COS, SIN, ok, HALF, HALF_P, ROPE, INTERLEAVED)
    k_row = KC + b.to(tl.int64) * kc_b + g.to(tl.int64) * kc_h + pos[:, None].to(tl.int64) * kc_s
    _store_pairs(k_row, ok, k1, k2, HALF, HALF_P, INTERLEAVED)
    v = _rows(base + (H + KVH + g) * D, rows, row_stride, ok, D, D_P)
    d = tl.arange(0, D_P)
    v_row = VC + b.to(tl.int64) * vc_b + g.to(tl.int64) * vc_h + pos[:, None].to(tl.int64) * vc_s
    tl.store(v_row + d[None, :], v, mask=_cols(ok, d, D, D_P))


@triton.jit
def _cache_attn(
    QKV, COS, SIN, LENS, KC, VC, OUT, PART_O, PART_LSE, Sq, H, KVH, kc_b, kc_s, kc_h, vc_b, vc_s, vc_h, chunk, window,
    scale,
    D: tl.constexpr, HALF_P: tl.constexpr, D_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, PREC: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
):  # fmt: skip
    """One tile of (query token, group head) rows of key/value head g against one chunk of
    the cache's positions; with SPLITS > 1 a partial output and its log2-sum-exp per row."""
    pid, bg = tl.program_id(0), tl.program_id(1)
    m_block, split = pid // SPLITS, pid % SPLITS
    b, g = bg // KVH, bg % KVH
    group = H // KVH
    HALF: tl.constexpr = D // 2
    r = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    i, h = r // group, g * group + r % group  # query token, query head
    q_ok = i < Sq
    cached = tl.load(LENS + b).to(tl.int32)
    pos = cached + i
    row_stride = (H + 2 * KVH) * D
    q_offsets = i * row_stride + h * D  # rows of different heads: per-row offsets, stride 1
    base = QKV + b.to(tl.int64) * Sq * row_stride
    q1, q2 = _rotated(base, q_offsets, 1, pos, COS, SIN, q_ok, HALF, HALF_P, ROPE, INTERLEAVED)
    total = cached + Sq  # positions in the cache after this call's write
    lo = split * chunk
    hi = tl.minimum(total, lo + chunk)
    if CAUSAL:  # no key past the tile's last query
        hi = tl.minimum(hi, cached + tl.minimum(Sq - 1, (m_block * BLOCK_M + BLOCK_M - 1) // group) + 1)
    if WINDOW:  # no key before the tile's first query's window
        lo = tl.maximum(lo, cached + (m_block * BLOCK_M) // group - window + 1)
    k_base = KC + b.to(tl.int64) * kc_b + g.to(tl.int64) * kc_h
    v_base = VC + b.to(tl.int64) * vc_b + g.to(tl.int64) * vc_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    qk_scale = scale * LOG2E
    dtype = OUT.dtype.element_ty
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_ok = cols < hi
        k1, k2 = _rotated(k_base, cols, kc_s, cols, COS, SIN, k_ok, HALF, HALF_P, False, INTERLEAVED)
        qk = tl.dot(q1, tl.trans(k1), input_precision=PREC) + tl.dot(q2, tl.trans(k2), input_precision=PREC)
        allowed = q_ok[:, None] & k_ok[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= pos[:, None])
        if WINDOW:
            allowed = allowed & (cols[None, :] > pos[:, None] - window)
        m_i, l_i, acc = _softmax_step(qk, allowed, m_i, l_i, acc, qk_scale, v_base, cols, vc_s, k_ok, D, D_P, PREC)
    attended = l_i > 0
    out = acc / tl.where(attended, l_i, 1.0)[:, None]
    d = tl.arange(0, D_P)
    row = (b.to(tl.int64) * Sq + i) * H + h  # the output's row of (b, i, h)
    if SPLITS == 1:
        tl.store(OUT + row[:, None] * D + d[None, :], out.to(dtype), mask=_cols(q_ok, d, D, D_P))
    else:
        part = (b.to(tl.int64) * SPLITS + split) * Sq * H + i * H + h
        tl.store(PART_O + part[:, None] * D + d[None, :], out, mask=_cols(q_ok, d, D, D_P))
        lse = tl.where(attended, m_i + tl.log2(tl.where(attended, l_i, 1.0)), float("-inf"))
        tl.store(PART_LSE + part, lse, mask=q_ok)


@triton.jit
def _cache_combine(
    PART_O, PART_LSE, OUT, rows_total, per_batch,
    D: tl.constexpr, D_P: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Merge the chunks' partial outputs of each (b, i, h) row by their log2-sum-exp weights."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < rows_total
    b, rest = r // per_batch, r % per_batch
    first = b.to(tl.int64) * SPLITS * per_batch + rest
    top = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(SPLITS):
        top = tl.maximum(top, tl.load(PART_LSE + first + s * per_batch, mask=ok, other=float("-inf")))
    top = tl.where(top == float("-inf"), 0.0, top)
    d = tl.arange(0, D_P)
    mask = _cols(ok, d, D, D_P)
    acc = tl.zeros([BLOCK_R, D_P], tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    for s in range(SPLITS):
        part = first + s * per_batch
        w = tl.exp2(tl.load(PART_LSE + part, mask=ok, other=float("-inf")) - top)
        acc += w[:, None] * tl.load(PART_O + part[:, None] * D + d[None, :], mask=mask, other=0.0)
        total += w
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(OUT + r[:, None].to(tl.int64) * D + d[None, :], out.to(OUT.dtype.element_ty), mask=mask)


COMBINE_ROWS = 32  # rows per program of the combine
WRITE_ROWS = 32  # new tokens per program of the cache write
TARGET_PROGRAMS = 264  # split-K until a call has about this many programs (2x an H100's 132 SMs)
MAX_SPLITS = 32


def tile(
    rows: int, head_dim: int, capability: tuple[int, int] | None, dtype: torch.dtype, interleaved: bool = False
) -> tuple[int, int, int]:
    """(rows, keys, warps) of the attention tile for a call with `rows` = Sq * group rows per
    key/value head: 16 rows where that covers them (a decode step's group: few rows, memory
    bound), else 64 (32 with heads over 64 wide, as attention.tiles); fp32 on a GPU 16 x 32
    (IEEE products, twice the bytes). The interleaved convention splits each key tile's
    pairs in registers: 8 warps (4 spilled up to 84 B in fp32 at head size 128), 64 x 32
    beyond a decode step. Each
    compiles without spills on sm_80..sm_120 (``python -m trm_benchmarks.ptx``)."""
    wide = next_pow2(head_dim // 2) > 32
    warps = 8 if interleaved else 4
    if dtype == torch.float32 and capability is not None:
        return 16, 32, warps
    if rows <= 16:
        return 16, 64, warps
    if interleaved:  # 32 x 64 spilled 8 B on sm_80 with triton 3.6
        return 64, 32, 8
    return (32, 64, warps) if wide else (64, 64, warps)


def splits_for(programs: int, capacity: int, block_n: int) -> int:
    """Chunks of the key axis: enough for about TARGET_PROGRAMS programs, at least one key block each."""
    blocks = triton.cdiv(capacity, block_n)
    return max(1, min(MAX_SPLITS, blocks, triton.cdiv(TARGET_PROGRAMS, max(programs, 1))))


def supports(qkv, k_cache, v_cache, cache_len, cos, sin, num_heads, num_kv_heads, causal, rope, window,
             *_qk_norm) -> bool:  # fmt: skip
    return takes(qkv) and head_dim_of(qkv, num_heads, num_kv_heads) in HEAD_DIMS


@torch.library.custom_op("trm::kv_cache_attention", mutates_args=("k_cache", "v_cache"))
def cache_attention(
    qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, num_heads: int, num_kv_heads: int, causal: bool,
    interleaved: bool, window: int, splits: int,
) -> torch.Tensor:  # fmt: skip
    qkv = qkv.contiguous()
    batch, seq, _ = qkv.shape
    d = head_dim_of(qkv, num_heads, num_kv_heads)
    if d not in HEAD_DIMS:
        raise ValueError(f"kv_cache_attention: head_dim {d} is not supported by the triton backend (even, 32..128)")
    rope = cos is not None
    half_p = next_pow2(d // 2)
    meta = dict(D=d, HALF_P=half_p, D_P=2 * half_p, ROPE=rope, INTERLEAVED=rope and interleaved)
    cos = cos.float().contiguous() if rope else qkv
    sin = sin.float().contiguous() if rope else qkv
    lens = cache_len.contiguous()
    strides = (*k_cache.stride()[:3], *v_cache.stride()[:3])
    _launch_by_batch(_cache_write, triton.cdiv(seq, WRITE_ROWS), num_kv_heads, batch,
              (qkv, cos, sin, lens, k_cache, v_cache, seq, num_heads, num_kv_heads, *strides), (0, 3, 4, 5),
              **meta, BLOCK_M=WRITE_ROWS)  # fmt: skip
    out = qkv.new_empty(batch, seq, num_heads * d)
    group = num_heads // num_kv_heads
    budget = device_budget(qkv.device) if on_gpu(qkv) else None
    capability = divmod(budget[0], 10) if budget is not None else None
    block_m, block_n, warps = tile(seq * group, d, capability, qkv.dtype, meta["INTERLEAVED"])
    m_blocks = triton.cdiv(seq * group, block_m)
    capacity = k_cache.shape[1]
    if splits <= 0:
        splits = splits_for(m_blocks * batch * num_kv_heads, capacity, block_n)
    chunk = triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n
    splits = triton.cdiv(capacity, chunk)  # no empty chunk
    if splits > 1:
        part_o = torch.empty(batch, splits, seq, num_heads, d, dtype=torch.float32, device=qkv.device)
        part_lse = torch.empty(batch, splits, seq, num_heads, dtype=torch.float32, device=qkv.device)
    else:
        part_o = part_lse = out
    args = (qkv, cos, sin, lens, k_cache, v_cache, out, part_o, part_lse, seq, num_heads, num_kv_heads, *strides,
            chunk, window, 1 / math.sqrt(d))  # fmt: skip
    _launch_by_batch(_cache_attn, m_blocks * splits, num_kv_heads, batch, args, (0, 3, 4, 5, 6, 7, 8), **meta,
              BLOCK_M=block_m, BLOCK_N=block_n, SPLITS=splits, PREC=precision(qkv), CAUSAL=causal,
              WINDOW=window > 0, num_warps=warps, num_stages=2 if capability is not None else 1)  # fmt: skip
    if splits > 1:
        rows = batch * seq * num_heads
        launch(_cache_combine, (triton.cdiv(rows, COMBINE_ROWS),), part_o, part_lse, out, rows, seq * num_heads,
               D=d, D_P=2 * half_p, SPLITS=splits, BLOCK_R=COMBINE_ROWS)  # fmt: skip
    return out


@cache_attention.register_fake
def _(qkv, k_cache, v_cache, cache_len, cos, sin, num_heads, num_kv_heads, causal, interleaved, window, splits):
    batch, seq, _ = qkv.shape
    d = head_dim_of(qkv, num_heads, num_kv_heads)
    return qkv.new_empty(batch, seq, num_heads * d)


def kv_cache_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int,
    causal: bool = True,
    rope: str = "rotate_half",
    window: int = 0,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    qk_norm: str | None = None,
    qk_norm_eps: float = 1e-6,
    *,
    splits: int = 0,
) -> torch.Tensor:
    """The triton backend of :func:`trm_kernels.kv_cache_attention` (`splits` > 0 forces the
    number of key chunks; 0 chooses). QK-norm is the row-local pass of ``qk_norm.py`` on the
    new tokens first (after RoPE: rotated there at their positions, then no rotation here)."""
    check_input("qkv", qkv)
    interleaved = rope == "interleaved"
    if qk_norm is not None:
        from .qk_norm import qk_norm as normed

        qkv, cos, sin = normed(qkv, q_norm_weight, k_norm_weight, qk_norm, cos, sin, num_heads, num_kv_heads,
                               interleaved, qk_norm_eps, cache_len)  # fmt: skip
    return cache_attention(qkv, k_cache, v_cache, cache_len, cos, sin, num_heads, num_kv_heads, causal, interleaved,
                           window, splits)  # fmt: skip
