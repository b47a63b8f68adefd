"""``trm_kernels.patch`` for Huginn-style sandwich blocks (tomg-group-umd's recurrent-depth LM,
``raven_modeling_minimal.py``), recognised by its names, never by class:

a block with ``norm_1`` .. ``norm_4`` (RMSNorms with a ``weight`` and a float ``eps`` or
``variance_epsilon``), ``attn`` (a packed ``Wqkv`` or ``qkv_proj``, [q | k | v]; ``proj`` or
``o_proj``; ``n_head`` / ``num_heads``, ``n_kv_heads`` / ``num_key_value_heads``, ``head_dim``
or hidden / heads) and ``mlp`` (a packed ``fc`` or ``gate_up_proj``, gate first; ``proj`` or
``down_proj``), computing ``x = norm_2(x + attn(norm_1(x))); x = norm_4(x + mlp(norm_3(x)))``,
called as Huginn calls it, ``block(x, freqs_cis, step_idx, mask=None, past_key_values=None,
return_attn=False)`` with ``freqs_cis`` [1, S, 1, d/2, 2] (cos, sin of each interleaved pair)
and returning ``(x, None)`` (a tensor, if its own forward returns one: the check compares).

The fused forward: ``add_rmsnorm`` (weighted) for norm_1, causal ``rope_attention`` with the
interleaved convention, proj, ``sandwich_rmsnorm`` for norm_2 and norm_3 together (the stream
and the MLP's input in one pass), ``swiglu_mlp`` and ``add_rmsnorm`` for norm_4. Calls with a
mask, a cache (Huginn's is keyed by recurrence step: not one ``kv_cache_attention`` drives) or
``return_attn`` run its own forward. Huginn's ``adapter`` (an ``nn.Linear`` on
``cat([state, embeds])``) is applied in the LM's own forward, which has no module boundary
between the concatenation and the layer: it is named in the report and left alone
(``trm_kernels.nn.ConcatLinear`` is the module to build such a model with).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from . import add_rmsnorm, rope_attention, rope_cos_sin, sandwich_rmsnorm, swiglu_mlp
from .nn import weight_as
from .patch_family import Family, backend, call_arguments, linear_weight, norm_eps, norm_problem, own_forward

NORMS = ("norm_1", "norm_2", "norm_3", "norm_4")
_HANDLED = {"x", "freqs_cis", "step_idx", "block_idx", "mask", "past_key_values", "return_attn"}


def _looks_like(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in (*NORMS, "attn", "mlp"))


def _first(module: nn.Module, *names: str) -> str | None:
    return next((name for name in names if linear_weight(module, name) is not None), None)


def _int(module: nn.Module, *names: str) -> int | None:
    value = next((getattr(module, n) for n in names if isinstance(getattr(module, n, None), int)), None)
    return None if isinstance(value, bool) else value


def _layout(block: nn.Module) -> tuple[str, str, str, str, int, int, int] | str:
    """(qkv, out, gate_up, down projections' names, heads, kv heads, head size), or why unknown."""
    attn, mlp = block.attn, block.mlp
    hidden = block.norm_1.weight.shape[0]
    qkv, out = _first(attn, "Wqkv", "qkv_proj"), _first(attn, "proj", "o_proj")
    gate_up, down = _first(mlp, "fc", "gate_up_proj"), _first(mlp, "proj", "down_proj")
    if None in (qkv, out, gate_up, down):
        return "attn needs Wqkv (or qkv_proj) and proj (or o_proj), mlp fc (or gate_up_proj) and proj (or down_proj)"
    heads = _int(attn, "n_head", "num_heads")
    kv = _int(attn, "n_kv_heads", "num_key_value_heads") or heads
    if heads is None:
        return "attn has no n_head or num_heads"
    d = _int(attn, "head_dim") or hidden // heads
    if d % 2 or getattr(attn, qkv).weight.shape != ((heads + 2 * kv) * d, hidden):
        return f"attn.{qkv} is not [(heads + 2 kv heads) * head_dim, hidden] with an even head_dim"
    if getattr(attn, out).weight.shape != (hidden, heads * d):
        return f"attn.{out} is not [hidden, heads * head_dim]"
    rows = getattr(mlp, gate_up).weight.shape
    if rows[0] % 2 or rows[1] != hidden or getattr(mlp, down).weight.shape != (hidden, rows[0] // 2):
        return f"mlp.{gate_up} and mlp.{down} are not [2 * inter, hidden] and [hidden, inter]"
    return qkv, out, gate_up, down, heads, kv, d


def _problem(block: nn.Module) -> str | None:
    if problem := norm_problem(block.norm_1, "norm_1"):
        return problem
    for name in NORMS[1:]:
        if problem := norm_problem(getattr(block, name), name, block.norm_1.weight.shape[0]):
            return problem
    if norm_eps(block.norm_2) != norm_eps(block.norm_3):
        return "norm_2 and norm_3 have different eps (sandwich_rmsnorm takes one)"
    layout = _layout(block)
    return layout if isinstance(layout, str) else None


def _tables(freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Huginn's [1, S, 1, d/2, 2] as full-width interleaved tables [S, d], else None."""
    if freqs_cis.dim() != 5 or freqs_cis.shape[0] != 1 or freqs_cis.shape[2] != 1 or freqs_cis.shape[4] != 2:
        return None
    pairs = freqs_cis[0, :, 0]
    return pairs[..., 0].repeat_interleave(2, -1), pairs[..., 1].repeat_interleave(2, -1)


def _own_call(named: dict | None) -> bool:
    """Whether the call takes the block's own forward: anything the fused one does not map."""
    if named is None or not all(isinstance(named.get(n), torch.Tensor) for n in ("x", "freqs_cis")):
        return True
    if named.get("return_attn") or named.get("mask") is not None or named.get("past_key_values") is not None:
        return True
    return any(value is not None for name, value in named.items() if name not in _HANDLED)


def _forward(block: nn.Module, ops: tuple[str, ...], *args, **kwargs):
    named = call_arguments(block, args, kwargs)
    tables = None if _own_call(named) else _tables(named["freqs_cis"])
    if tables is None:  # a call it does not map, or tables not in Huginn's layout
        return own_forward(block)(*args, **kwargs)
    x, (attn, mlp) = named["x"], (block.attn, block.mlp)
    qkv, out, gate_up, down, heads, kv, _ = _layout(block)
    n1, n2, n3, n4 = (getattr(block, name) for name in NORMS)
    y = add_rmsnorm(x, None, -1, norm_eps(n1), backend(ops, "rmsnorm"), weight=n1.weight)
    a = rope_attention(F.linear(y, weight_as(getattr(attn, qkv), y.dtype)), *tables, heads, backend(ops, "attention"),
                       num_kv_heads=kv, causal=True, rope="interleaved")  # fmt: skip
    a = F.linear(a, weight_as(getattr(attn, out), a.dtype))
    x, y = sandwich_rmsnorm(a, x, n2.weight, n3.weight, norm_eps(n2), backend(ops, "rmsnorm"))
    m = swiglu_mlp(y, weight_as(getattr(mlp, gate_up), y.dtype), weight_as(getattr(mlp, down), y.dtype),
                   backend(ops, "swiglu"))  # fmt: skip
    return add_rmsnorm(m, x, -1, norm_eps(n4), backend(ops, "rmsnorm"), weight=n4.weight), None


def _check_input(block: nn.Module) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(0)
    hidden, d = block.norm_1.weight.shape[0], _layout(block)[-1]
    cos, sin = rope_cos_sin(4, d, rope="interleaved")
    freqs_cis = torch.stack([cos[:, ::2], sin[:, ::2]], -1)[None, :, None]
    step = {"step_idx": 0} if "step_idx" in inspect.signature(own_forward(block)).parameters else {}
    return {"x": torch.randn(2, 4, hidden, generator=gen)}, {"freqs_cis": freqs_cis, **step}


def _note(block: nn.Module, ops: tuple[str, ...]) -> str:
    return ("add_rmsnorm(weight), rope_attention(interleaved, causal), sandwich_rmsnorm (norm_2 + norm_3), "
            "swiglu_mlp, add_rmsnorm(weight); its own forward for calls with a mask, past_key_values or "
            "return_attn")  # fmt: skip


def adapter_note(name: str, module: nn.Module) -> str | None:
    """Why a Huginn-style ``adapter`` (an nn.Linear on cat([state, embeds])) is left alone, or None if it is not one."""
    weight = getattr(module, "weight", None)
    if name.rsplit(".", 1)[-1] != "adapter" or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    return ("an nn.Linear on cat([state, embeds]) (concat_linear's shape): the concatenation is made in its "
            "parent's forward, which the patch does not see, so the adapter runs as it is")  # fmt: skip


SANDWICH = Family("sandwich block", _looks_like, _problem, ("attention", "rmsnorm", "swiglu"), _forward,
                  _check_input, _note)  # fmt: skip

__all__ = ["SANDWICH", "adapter_note"]
