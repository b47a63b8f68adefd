"""The attention ops' public functions: ``rope_attention`` and ``kv_cache_attention`` (exported
by :mod:`trm_kernels`), their argument checks, and the dispatch to a backend."""

from __future__ import annotations

import torch

from . import reference
from .backend import call
from .checks import _check_float, _check_heads


def rope_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    backend: str | None = None,
    *,
    num_kv_heads: int | None = None,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    head_dim: int | None = None,
    rope: str = "rotate_half",
    window: int | None = None,
    qk_norm: str | None = None,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    qk_norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Multi-head attention on a packed projection, RoPE applied inside; returns [B, S, H * d].

    qkv [B, S, (H + 2 * KVH) * d]: H query heads, then KVH key heads, then KVH value heads,
    each d wide (``num_kv_heads`` KVH defaults to H; KVH < H is grouped-query attention,
    query head h using key/value head h // (H / KVH); 1 is multi-query). fp32/fp16/bf16 (float64
    on the reference backend). cos, sin [P, d] tables for positions 0..P-1 with P >= S
    (``rope_cos_sin``; positions 0..S-1 are used), or both None for no rotation (then
    ``head_dim`` lets the layout be checked). ``rope`` is the tables' and the weights'
    convention: ``"rotate_half"`` (default; the TRM reference, Hugging Face Llama: column i
    pairs with i + d/2) or ``"interleaved"`` (GPT-J, Meta's Llama, complex RoPE: columns 2i
    and 2i+1); a pair (a, b) turns to (a cos - b sin, b cos + a sin); for the opposite
    direction pass -sin. Half-width tables [P, d/2] (one angle per pair) are refused with
    how to widen them. Scale 1/sqrt(d). ``causal``: query i attends keys j <= i. ``window``
    (sliding window, left): only keys j > i - window (None or 0: all). ``key_mask`` [B, S]
    bool: False marks padding keys, never attended (lengths L: ``torch.arange(S) < L[:, None]``).
    A query with no key to attend gets 0. The output has qkv's dtype; the gradient is one
    packed dqkv. Triton: d even in 32..128.

    QK-norm (Qwen3, Gemma 3): ``qk_norm="before"`` (or ``"after"``) RoPE normalises
    every query and key head over its d columns, y = x * rsqrt(mean(x^2) + qk_norm_eps) * w,
    in fp32 and rounded to qkv's dtype, with ``q_norm_weight`` / ``k_norm_weight`` [d] (any
    float dtype, shared by the heads; None: no weight; Gemma's (1 + w) is passed as 1 + w).
    ``qk_norm_eps`` defaults to 1e-6 (Qwen3's and Gemma 3's). The weights get gradients.
    A norm over all heads at once (OLMo 2's, OLMoE's) is not this: normalise the projection before.
    """
    _check_float("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [batch, seq, (heads + 2 * kv_heads) * head_dim], got shape {tuple(qkv.shape)}")
    num_heads = _check_heads("num_heads", num_heads)
    if num_kv_heads is not None:
        _check_heads("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin go together: pass both (RoPE) or neither (no rotation)")
    _check_rope(rope)
    if cos is not None:
        _check_float("cos", cos)
        if cos.dim() != 2:
            raise ValueError(f"cos must be [positions, head_dim], got shape {tuple(cos.shape)}")
        head_dim = (
            _check_heads("head_dim", head_dim)
            if head_dim is not None
            else _table_head_dim(qkv, cos, num_heads, num_kv_heads)
        )
    kv = _layout(qkv.shape[-1], num_heads, num_kv_heads, head_dim)
    d = qkv.shape[-1] // (num_heads + 2 * kv)
    _check_tables(cos, sin, qkv, d, qkv.shape[1], "the sequence's S")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            got = getattr(key_mask, "dtype", type(key_mask).__name__)
            raise TypeError(f"key_mask must be a bool tensor, got {got}")
        if key_mask.shape != qkv.shape[:2]:
            raise ValueError(f"key_mask must be [batch, seq] = {tuple(qkv.shape[:2])}, got {tuple(key_mask.shape)}")
        if key_mask.device != qkv.device:
            raise ValueError(f"key_mask is on {key_mask.device} but qkv is on {qkv.device}")
    _check_window(window)
    norm = _check_qk_norm(qk_norm, q_norm_weight, k_norm_weight, qk_norm_eps, qkv, d)
    return call("rope_attention", qkv.device, backend, qkv, cos, sin, num_heads, kv, bool(causal), key_mask, rope,
                window or 0, *norm)  # fmt: skip


def _check_qk_norm(qk_norm, q_norm_weight, k_norm_weight, eps, qkv: torch.Tensor, d: int) -> tuple:
    """The attention ops' last four arguments, checked: (q weight, k weight, mode, eps)."""
    if qk_norm is not None and qk_norm not in reference.QK_NORMS:
        raise ValueError(f"qk_norm must be None, 'before' or 'after' (RoPE), got {qk_norm!r}")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is None:
            continue
        if qk_norm is None:
            raise ValueError(f"{name} is given but qk_norm is None: pass qk_norm='before' (or 'after') RoPE")
        _check_float(name, w)
        if w.shape != (d,):
            raise ValueError(f"{name} must have shape (head_dim,) = ({d},), got {tuple(w.shape)}")
        if w.device != qkv.device:
            raise ValueError(f"{name} is on {w.device} but qkv is on {qkv.device}")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps < float("inf"):
        raise ValueError(f"qk_norm_eps must be a finite number >= 0, got {eps!r}")
    return q_norm_weight, k_norm_weight, qk_norm, float(eps)


def _check_window(window) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ValueError(f"window must be a whole number of positions >= 1 (0 or None: no window), got {window!r}")


def kv_cache_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor | int,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    backend: str | None = None,
    *,
    num_kv_heads: int | None = None,
    causal: bool = True,
    rope: str = "rotate_half",
    window: int | None = None,
    qk_norm: str | None = None,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    qk_norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Attention of new tokens against a key/value cache (prefill, chunked prefill, decode),
    RoPE at each sequence's offset, the cache updated in place; returns [B, Sq, H * d].

    qkv [B, Sq, (H + 2 * KVH) * d]: the new tokens' packed projection (as ``rope_attention``;
    ``num_kv_heads`` KVH < H is grouped-query attention). k_cache, v_cache [B, C, KVH, d]:
    static buffers of capacity C in qkv's dtype and device, any strides with the last axis
    contiguous (Hugging Face's [B, KVH, C, d] cache is passed as ``cache.transpose(1, 2)``).
    cache_len [B] integer tensor (or one int for every sequence): the tokens already cached,
    which is also where the new ones go: token i of sequence b is at position
    cache_len[b] + i. The call rotates q and k there (cos, sin [P, d] with P >= C, the
    ``rope`` convention as in ``rope_attention``; both None: no rotation), writes the rotated
    keys and the values into the caches at those positions (``k_cache[b, cache_len[b] + i]``
    is the rotated key afterwards, for a cache of your own), and attends over the cached
    positions 0..cache_len[b] + Sq - 1. ``causal`` (default True) is aligned lower-right: query
    i sees positions up to cache_len[b] + i (SDPA's ``is_causal`` aligns upper-left, which
    differs when Sq < the keys). ``window`` (sliding window, left): only the last `window`
    positions up to the query's own (None or 0: no window). ``qk_norm``, ``q_norm_weight``,
    ``k_norm_weight``, ``qk_norm_eps``: QK-norm as in ``rope_attention`` (the cache then holds
    the normalised, rotated keys, as Hugging Face's Qwen3 caches them). Scale 1/sqrt(d). The
    caller advances cache_len by Sq.

    cache_len[b] + Sq must be <= C: checked on the host for CPU tensors; on a GPU an
    asynchronous device assertion (no synchronisation) stops the process rather than write
    past the cache. Forward only: with grad enabled and qkv (or a cache, or a QK-norm weight)
    requiring grad it raises (training with equal query and key lengths is
    ``rope_attention``, which has a backward).
    The triton backend: one write kernel, one attention kernel whose tile holds a key/value
    group's query heads (a decode step reads each key once per group), split over the
    cache's positions (FlashDecoding) where the batch gives few tiles; d even in 32..128.
    """
    _check_float("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [batch, new tokens, (heads + 2 * kv_heads) * head_dim], "
                         f"got shape {tuple(qkv.shape)}")  # fmt: skip
    num_heads = _check_heads("num_heads", num_heads)
    if num_kv_heads is not None:
        _check_heads("num_kv_heads", num_kv_heads)
    _check_rope(rope)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_float(name, t)
        if t.dim() != 4 or t.shape[0] != qkv.shape[0]:
            raise ValueError(f"{name} must be [batch={qkv.shape[0]}, capacity, kv_heads, head_dim], "
                             f"got shape {tuple(t.shape)}")  # fmt: skip
        if t.dtype != qkv.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but qkv has dtype {qkv.dtype}")
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but qkv is on {qkv.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last axis (head_dim) must be contiguous, got strides {t.stride()}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has shape {tuple(k_cache.shape)}")
    kv = _layout(qkv.shape[-1], num_heads, num_kv_heads if num_kv_heads is not None else k_cache.shape[2],
                 k_cache.shape[3])  # fmt: skip
    if kv != k_cache.shape[2]:
        raise ValueError(f"k_cache has {k_cache.shape[2]} kv heads but qkv has {kv}")
    d, capacity, seq = k_cache.shape[3], k_cache.shape[1], qkv.shape[1]
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin go together: pass both (RoPE) or neither (no rotation)")
    _check_tables(cos, sin, qkv, d, capacity, "the cache's capacity")
    if seq > capacity:
        raise ValueError(f"qkv has {seq} new tokens, more than the cache's capacity {capacity}")
    cache_len = _check_cache_len(cache_len, qkv, capacity)
    _check_window(window)
    learnable = (qkv, k_cache, v_cache, q_norm_weight, k_norm_weight)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in learnable):
        raise RuntimeError(
            "kv_cache_attention has no backward (it writes the cache in place): run it under torch.no_grad() "
            "for generation; to train, attend equal-length queries and keys with rope_attention"
        )
    norm = _check_qk_norm(qk_norm, q_norm_weight, k_norm_weight, qk_norm_eps, qkv, d)
    return call("kv_cache_attention", qkv.device, backend, qkv, k_cache, v_cache, cache_len, cos, sin, num_heads, kv,
                bool(causal), rope, window or 0, *norm)  # fmt: skip


def _check_cache_len(cache_len, qkv: torch.Tensor, capacity: int) -> torch.Tensor:
    """cache_len as an integer tensor [B] on qkv's device, with cache_len + Sq <= capacity
    checked (on the host for CPU tensors; by an asynchronous device assertion on a GPU)."""
    batch, seq = qkv.shape[:2]
    if isinstance(cache_len, int) and not isinstance(cache_len, bool):
        cache_len = torch.full((batch,), cache_len, dtype=torch.int32, device=qkv.device)
    if not isinstance(cache_len, torch.Tensor) or cache_len.dtype not in (torch.int32, torch.int64):
        got = getattr(cache_len, "dtype", type(cache_len).__name__)
        raise TypeError(f"cache_len must be an int32/int64 tensor [batch] or an int, got {got}")
    if cache_len.shape != (batch,):
        raise ValueError(f"cache_len must be [batch] = ({batch},), got {tuple(cache_len.shape)}")
    if cache_len.device != qkv.device:
        raise ValueError(f"cache_len is on {cache_len.device} but qkv is on {qkv.device}")
    fits = (cache_len >= 0) & (cache_len + seq <= capacity)
    if cache_len.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(fits.all()):
            bad = int((~fits).nonzero()[0, 0])
            raise ValueError(f"cache_len[{bad}] = {int(cache_len[bad])}: with {seq} new tokens that passes the "
                             f"cache's capacity {capacity} (or is negative)")  # fmt: skip
    elif not cache_len.is_meta:
        torch._assert_async(fits.all(), "kv_cache_attention: cache_len + new tokens passes the cache's capacity")
    return cache_len


def _check_rope(rope) -> None:
    if rope not in reference.ROPE_STYLES:
        raise ValueError(f"rope must be one of {', '.join(map(repr, reference.ROPE_STYLES))}, got {rope!r}")


def _table_head_dim(qkv: torch.Tensor, cos: torch.Tensor, num_heads: int, num_kv_heads: int | None) -> int:
    """The head size the tables say, with half-width tables ([P, d/2], one angle per pair, as
    complex-number RoPE keeps them) named as such when qkv's layout fits twice their width
    and not their width."""
    width = cos.shape[1]

    def fits(d: int) -> bool:
        try:
            _layout(qkv.shape[-1], num_heads, num_kv_heads, d)
        except ValueError:
            return False
        return True

    if not fits(width) and fits(2 * width):
        raise ValueError(
            f"cos has {width} columns, half of a head of {2 * width}: half-width (one angle per pair) tables. "
            f"Pass full-width ones: torch.cat((cos, cos), -1) for rope='rotate_half', "
            f"cos.repeat_interleave(2, -1) for rope='interleaved' (trm_kernels.rope_cos_sin builds either)"
        )
    return width


def _check_tables(cos, sin, qkv: torch.Tensor, d: int, positions: int, what: str) -> None:
    """cos and sin [P, d] with P >= `positions`, fp32-able, on qkv's device; d even."""
    for name, t in (("cos", cos), ("sin", sin)):
        if t is None:
            continue
        _check_float(name, t)
        if t.dim() != 2 or t.shape[1] != d:
            half = " (half-width tables: see rope_cos_sin)" if t.dim() == 2 and 2 * t.shape[1] == d else ""
            raise ValueError(f"{name} must be [positions, head_dim={d}], got {tuple(t.shape)}{half}")
        if t.shape[0] < positions:
            raise ValueError(f"{name} has {t.shape[0]} positions, fewer than {what} ({positions})")
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but qkv is on {qkv.device}")
    if cos is not None and d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")


def _layout(width: int, num_heads: int, num_kv_heads: int | None, head_dim: int | None) -> int:
    """The number of key/value heads of a packed qkv of this width, checked against what is
    known: a qkv laid out for fewer key/value heads than num_heads without num_kv_heads (found
    through the head size cos or head_dim gives) is refused, not misread."""
    if head_dim is None:
        kv = num_kv_heads or num_heads
        if width % (num_heads + 2 * kv):
            raise ValueError(f"qkv's last dim {width} is not (num_heads + 2 * num_kv_heads) * head_dim with "
                             f"num_heads={num_heads}, num_kv_heads={kv}")  # fmt: skip
        return kv
    heads, rest = divmod(width, head_dim)
    kv, odd = divmod(heads - num_heads, 2)
    if rest or odd or kv < 1 or num_heads % kv:
        raise ValueError(f"qkv's last dim {width} is not (num_heads + 2 * num_kv_heads) * head_dim for "
                         f"num_heads={num_heads} and head_dim={head_dim} (from cos or head_dim)")  # fmt: skip
    if num_kv_heads is None and kv != num_heads:
        raise ValueError(f"qkv's last dim {width} is ({num_heads} + 2 * {kv}) * {head_dim}: {kv} key/value heads; "
                         f"pass num_kv_heads={kv} for grouped-query attention")  # fmt: skip
    if num_kv_heads is not None and kv != num_kv_heads:
        raise ValueError(f"qkv's last dim {width} is ({num_heads} + 2 * {kv}) * {head_dim}, not the "
                         f"num_kv_heads={num_kv_heads} given")  # fmt: skip
    return kv
