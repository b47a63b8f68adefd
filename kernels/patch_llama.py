"""``trm_kernels.patch`` for Hugging Face Llama-style decoder layers (Llama, Mistral, Qwen, Phi-3's
packed projections), recognised by the transformers names, never by class:

``input_layernorm`` and ``post_attention_layernorm`` (RMSNorms with a ``weight`` and a float
``variance_epsilon`` or ``eps``), ``self_attn`` with ``q_proj`` / ``k_proj`` / ``v_proj`` (or a
packed ``qkv_proj``, [q | k | v]), ``o_proj`` and ``head_dim`` (heads from the projections'
shapes, or ``num_heads`` / ``num_key_value_heads`` and the config's for a packed one), ``mlp``
with ``gate_proj`` / ``up_proj`` (or a packed ``gate_up_proj``, gate first) and ``down_proj``.
Called as transformers calls it: ``layer(hidden_states, position_embeddings=(cos, sin), ...)``
with cos/sin [1 or B, S, d] (rotate-half) at the tokens' positions; it returns hidden_states.

The fused forward: ``add_rmsnorm`` (weighted) for the input norm, ``rope_attention`` (causal
as ``self_attn.is_causal`` says, default True; grouped-query as the shapes say), o_proj, then
the residual add and the post-attention norm as one weighted ``add_rmsnorm(prenorm=True)``
returning the stream and the MLP's input, and ``swiglu_mlp``. With a ``trm_kernels.nn.KVCache``
as ``past_key_value`` (generation, no gradient): q and k are rotated at the given positions and
``kv_cache_attention`` writes the cache, attends and the cache's lengths advance. Qwen3's
``self_attn.q_norm`` / ``k_norm`` (RMSNorms of each head before RoPE) become the attention's
QK-norm. What is not mapped (biases, another norm, activation or scale) is left to the check to
find.
Calls with an ``attention_mask``, another kind of cache, ``output_attentions``, no
``position_embeddings`` or arguments the layer's forward does not name run its own forward.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from . import add_rmsnorm, kv_cache_attention, rope_attention, rope_cos_sin, swiglu_mlp
from .nn import KVCache, weight_as
from .patch_family import (
    Family,
    backend,
    call_arguments,
    linear_weight,
    norm_eps,
    norm_problem,
    own_forward,
    packed_weight,
    rope_tables,
)
from .reference import apply_rope, head_rmsnorm

_HANDLED = {"hidden_states", "attention_mask", "position_embeddings", "past_key_value", "past_key_values",
            "position_ids", "cache_position", "use_cache", "output_attentions"}  # fmt: skip


def _looks_like(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"))


def _setting(attn: nn.Module, *names: str) -> int | None:
    """An int attribute of the attention module or of its ``config`` (transformers keeps them there)."""
    for holder in (attn, getattr(attn, "config", None)):
        for name in names:
            value = getattr(holder, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _attention_layout(attn: nn.Module) -> tuple[tuple[str, ...], int, int, int] | str:
    """(the q/k/v projections' names, heads, kv heads, head size), or why they are unknown."""
    d = getattr(attn, "head_dim", None)
    if not isinstance(d, int) or d < 2 or d % 2:
        return "self_attn has no even int head_dim"
    if linear_weight(attn, "qkv_proj") is not None:
        heads = _setting(attn, "num_heads", "num_attention_heads")
        kv = _setting(attn, "num_key_value_heads") or heads
        if heads is None:
            return "self_attn has a packed qkv_proj but no num_heads"
        if attn.qkv_proj.weight.shape[0] != (heads + 2 * kv) * d:
            rows = attn.qkv_proj.weight.shape[0]
            return f"self_attn.qkv_proj has {rows} outputs, not (heads + 2 kv heads) * head_dim"
        return ("qkv_proj",), heads, kv, d
    names = ("q_proj", "k_proj", "v_proj")
    if any(linear_weight(attn, name) is None for name in names):
        return "self_attn has neither q_proj, k_proj, v_proj nor a packed qkv_proj"
    rows = [getattr(attn, name).weight.shape[0] for name in names]
    if rows[0] % d or rows[1] % d or rows[1] != rows[2] or (rows[0] // d) % max(rows[1] // d, 1) or not rows[1]:
        return f"self_attn's q/k/v projections ({rows[0]}, {rows[1]}, {rows[2]} outputs) are not heads * head_dim {d}"
    return names, rows[0] // d, rows[1] // d, d


def _mlp_names(mlp: nn.Module) -> tuple[str, ...] | None:
    if linear_weight(mlp, "gate_up_proj") is not None:
        return ("gate_up_proj",)
    names = ("gate_proj", "up_proj")
    return names if all(linear_weight(mlp, n) is not None for n in names) else None


def _qk_norms(attn: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """Qwen3's per-head q_norm and k_norm, or None."""
    return (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") or hasattr(attn, "k_norm") else None


def _qk_norm_args(attn: nn.Module) -> dict:
    """The attention op's QK-norm arguments (before RoPE, as Qwen3 normalises), or none."""
    norms = _qk_norms(attn)
    if norms is None:
        return {}
    q_norm, k_norm = norms
    return dict(qk_norm="before", q_norm_weight=q_norm.weight, k_norm_weight=k_norm.weight,
                qk_norm_eps=norm_eps(q_norm))  # fmt: skip


def _problem(layer: nn.Module) -> str | None:
    problem = norm_problem(layer.input_layernorm, "input_layernorm")
    if problem:
        return problem
    hidden = layer.input_layernorm.weight.shape[0]
    if problem := norm_problem(layer.post_attention_layernorm, "post_attention_layernorm", hidden):
        return problem
    layout = _attention_layout(layer.self_attn)
    if isinstance(layout, str):
        return layout
    names, heads, _, d = layout
    attn = layer.self_attn
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        for name in ("q_norm", "k_norm"):
            if problem := norm_problem(getattr(attn, name, None), f"self_attn.{name}", d):
                return problem.replace("the hidden size", "the head size")
        if norm_eps(attn.q_norm) != norm_eps(attn.k_norm):
            return "self_attn.q_norm and k_norm have different eps"
    weights = [getattr(layer.self_attn, n).weight for n in names]
    if any(w.shape[1] != hidden for w in weights):
        return f"self_attn's projections do not take the hidden size {hidden}"
    o_proj = linear_weight(layer.self_attn, "o_proj")
    if o_proj is None or tuple(o_proj.shape) != (hidden, heads * d):
        return f"self_attn has no o_proj [{hidden}, {heads * d}]"
    gate_up, down = _mlp_names(layer.mlp), linear_weight(layer.mlp, "down_proj")
    if gate_up is None or down is None:
        return "mlp has neither gate_proj, up_proj nor a packed gate_up_proj, or no down_proj"
    rows = sum(getattr(layer.mlp, n).weight.shape[0] for n in gate_up)
    if tuple(down.shape) != (hidden, rows // 2) or rows % 2:
        return f"mlp's down_proj {tuple(down.shape)} does not fit its gate and up projections ({rows} outputs)"
    return None


def _own_call(named: dict | None, cache, ops: tuple[str, ...]) -> bool:
    """Whether the call takes the layer's own forward: anything the fused one does not map."""
    if named is None or named.get("attention_mask") is not None or named.get("output_attentions"):
        return True
    if named.get("position_embeddings") is None or not isinstance(named.get("hidden_states"), torch.Tensor):
        return True
    if cache is not None and (not isinstance(cache, KVCache) or torch.is_grad_enabled() or "kv_cache" not in ops):
        return True  # a cache it cannot drive, a gradient through the cache (kv_cache_attention has none), unchecked
    return any(value is not None for name, value in named.items() if name not in _HANDLED)


def _rotated(qkv: torch.Tensor, cos, sin, heads: int, kv: int, d: int, attn: nn.Module) -> torch.Tensor:
    """qkv with q and k turned at the tokens' own positions (tables [B or 1, S, d]), after
    their QK-norm where the attention has one."""
    b, s, _ = qkv.shape
    q, k, v = qkv.view(b, s, heads + 2 * kv, d).split([heads, kv, kv], dim=2)
    if norm := _qk_norm_args(attn):
        eps = norm["qk_norm_eps"]
        q, k = head_rmsnorm(q, norm["q_norm_weight"], eps), head_rmsnorm(k, norm["k_norm_weight"], eps)
    return torch.cat([apply_rope(q, cos, sin), apply_rope(k, cos, sin), v], dim=2).view(b, s, -1)


def _forward(layer: nn.Module, ops: tuple[str, ...], *args, **kwargs):
    named = call_arguments(layer, args, kwargs)
    caches = [] if named is None else [named.get(n) for n in ("past_key_value", "past_key_values")]
    cache = next((c for c in caches if c is not None), None)
    if _own_call(named, cache, ops):
        return own_forward(layer)(*args, **kwargs)
    x, (cos, sin) = named["hidden_states"], named["position_embeddings"]
    attn, mlp = layer.self_attn, layer.mlp
    names, heads, kv, d = _attention_layout(attn)
    ln_in, ln_post = layer.input_layernorm, layer.post_attention_layernorm
    y = add_rmsnorm(x, None, -1, norm_eps(ln_in), backend(ops, "rmsnorm"), weight=ln_in.weight)
    qkv = F.linear(y, packed_weight(attn, names, y.dtype, cache))
    causal = bool(getattr(attn, "is_causal", True))
    tables = rope_tables(cos, sin)
    if cache is not None:
        out = kv_cache_attention(_rotated(qkv, cos, sin, heads, kv, d, attn), cache.k, cache.v, cache.lengths, None,
                                 None, heads, backend(ops, "attention"), num_kv_heads=kv, causal=causal)  # fmt: skip
        cache.lengths += x.shape[1]
    else:
        if tables is None:  # per-sequence positions: turned here, the attention without tables
            qkv, tables, norm = _rotated(qkv, cos, sin, heads, kv, d, attn), (None, None), {}
        else:
            norm = _qk_norm_args(attn)
        out = rope_attention(qkv, *tables, heads, backend(ops, "attention"), num_kv_heads=kv, causal=causal,
                             head_dim=d, **norm)  # fmt: skip
    h, y = add_rmsnorm(F.linear(out, weight_as(attn.o_proj, out.dtype)), x, -1, norm_eps(ln_post),
                       backend(ops, "rmsnorm"), weight=ln_post.weight, prenorm=True)  # fmt: skip
    w_gate_up = packed_weight(mlp, _mlp_names(mlp), y.dtype, cache)
    return h + swiglu_mlp(y, w_gate_up, weight_as(mlp.down_proj, y.dtype), backend(ops, "swiglu"))


def _check_input(layer: nn.Module) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(0)
    hidden, d = layer.input_layernorm.weight.shape[0], layer.self_attn.head_dim
    cos, sin = rope_cos_sin(4, d)
    return {"hidden_states": torch.randn(2, 4, hidden, generator=gen)}, {"position_embeddings": (cos[None], sin[None])}


def _cache_calls(layer: nn.Module):
    """A prefill of 3 tokens and a decode step sharing a fresh KVCache, passed as the layer's
    forward names it (``past_key_value``, or ``past_key_values`` as newer transformers do)."""
    _, _, kv, d = _attention_layout(layer.self_attn)
    x = torch.randn(2, 4, layer.input_layernorm.weight.shape[0], generator=torch.Generator().manual_seed(2))
    cos, sin = rope_cos_sin(4, d)
    params = inspect.signature(own_forward(layer)).parameters
    key = "past_key_values" if "past_key_values" in params else "past_key_value"

    def calls(dtype: torch.dtype, device: torch.device) -> list[dict]:
        cache = KVCache(2, 4, kv, d, dtype, device)
        steps = (slice(0, 3), slice(3, 4))
        return [{"hidden_states": x[:, s].to(device, dtype), key: cache,
                 "position_embeddings": (cos[None, s].to(device, dtype), sin[None, s].to(device, dtype))}
                for s in steps]  # fmt: skip

    return calls


def _note(layer: nn.Module, ops: tuple[str, ...]) -> str:
    names, *_ = _attention_layout(layer.self_attn)
    packs = [what for what, n in (("q/k/v", len(names)), ("gate/up", len(_mlp_names(layer.mlp)))) if n > 1]
    packed = f"; {' and '.join(packs)} weights concatenated per call (once per KVCache in generation)" if packs else ""
    cached = " (kv_cache_attention with a trm_kernels.nn.KVCache, checked too)" if "kv_cache" in ops else ""
    normed = " with QK-norm before RoPE (self_attn.q_norm, k_norm)" if _qk_norms(layer.self_attn) else ""
    return (f"add_rmsnorm(weight), rope_attention{cached}{normed}, add_rmsnorm(weight, prenorm=True), "
            f"swiglu_mlp{packed}; "
            "its own forward for calls with an attention_mask, another past_key_value, output_attentions or no "
            "position_embeddings")  # fmt: skip


LLAMA = Family("llama decoder layer", _looks_like, _problem, ("attention", "rmsnorm", "swiglu"), _forward,
               _check_input, _note, _cache_calls)  # fmt: skip

__all__ = ["LLAMA"]
