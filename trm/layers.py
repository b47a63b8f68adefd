"""The building blocks of the tiny net: casted linears, SwiGLU, RoPE attention, post-norm block.

Attribute names follow the reference (``qkv_proj``, ``gate_up_proj``, ...) so that its
checkpoints map onto ours by renaming prefixes only. Every hot-path op goes through
``trm_kernels``; nothing here depends on which backend runs them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import trm_kernels as K
import trm_kernels.nn as KN
from torch import nn


def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal truncated at +-2 std, rescaled so that the truncated distribution has std `std`."""
    if std == 0:
        return tensor.zero_()
    a, b = -2.0, 2.0
    z = (math.erf(b / math.sqrt(2)) - math.erf(a / math.sqrt(2))) / 2
    pdf = math.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
    # variance of a standard normal truncated to [a, b] is 1 - 2*b*pdf/z (symmetric bounds)
    comp_std = std / math.sqrt(1 - 2 * b * pdf / z)
    with torch.no_grad():
        return nn.init.trunc_normal_(tensor, std=comp_std, a=a * comp_std, b=b * comp_std)


def intermediate_size(hidden: int, expansion: float) -> int:
    """round_up(round(expansion * hidden * 2/3), 256): 1536 for 512, 512 for a 97-token mixer."""
    inter = round(expansion * hidden * 2 / 3)
    return -(-inter // 256) * 256


class CastedLinear(nn.Module):
    """fp32 master weight, computed in the input's dtype; truncated LeCun-normal init."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_(torch.empty(out_features, in_features), std=in_features**-0.5))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.casts: dict[torch.dtype, torch.Tensor] | None = None  # within casts_reused(): the casts made

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        if self.casts is None:
            return self.weight.to(dtype)
        cast = self.casts.get(dtype)
        if cast is None:
            cast = self.casts[dtype] = self.weight.to(dtype)
        return cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight_as(x.dtype), bias)


@contextlib.contextmanager
def casts_reused(module: nn.Module) -> Iterator[None]:
    """Without grad, cast each CastedLinear weight of `module` once for the whole block
    (on first use) instead of once per call: the same values, 2-4 fewer kernels per block
    call, and the net is called 15-21 times per step. Not with grad: there each call's
    weight gradient must reach the fp32 master through its own cast, as in the reference,
    rather than be summed in the compute dtype first. Not under torch.compile, which
    removes the repeats itself."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    linears = [m for m in module.modules() if isinstance(m, CastedLinear)]
    before = [m.casts for m in linears]
    for m in linears:
        m.casts = {}
    try:
        yield
    finally:
        for m, casts in zip(linears, before, strict=True):
            m.casts = casts


class SwiGLU(KN.SwiGLUMLP):
    """down(silu(gate) * up) over the last axis, I = intermediate_size(hidden, expansion)."""

    def __init__(self, hidden: int, expansion: float):
        super().__init__(hidden, intermediate_size(hidden, expansion), linear=CastedLinear)


class TokenMixer(KN.TokenMixer):
    """The ``mlp_t`` sub-layer: h [B, S, D] -> rmsnorm over S of (h + a SwiGLU over S of h).

    The reference transposes h to [B, D, S] and back; ``trm_kernels.token_mlp_rmsnorm``
    multiplies each batch element by the weights from the left instead, with no transpose
    copies, and without grad runs the whole sub-layer as one kernel on the triton backend.
    """

    def __init__(self, seq_len: int, expansion: float, eps: float = 1e-5):
        super().__init__(seq_len, intermediate_size(seq_len, expansion), eps, linear=CastedLinear)


class Attention(KN.RoPEAttention):
    """Non-causal multi-head self-attention with RoPE, no biases."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__(hidden, num_heads, linear=CastedLinear)


class Block(nn.Module):
    """Post-norm block: h = rmsnorm(h + mix(h)); h = rmsnorm(h + SwiGLU(h)). No norm weights.

    The second sub-layer is one op, ``trm_kernels.swiglu_mlp_rmsnorm`` (the modules ``mlp`` and
    ``mlp_norm`` hold its weights and eps, so state dicts keep the reference's names); with
    attention, o_proj, the residual add and the norm are one op too,
    ``trm_kernels.linear_add_rmsnorm``."""

    def __init__(self, hidden: int, num_heads: int, expansion: float, seq_len: int, mlp_t: bool, eps: float):
        super().__init__()
        if mlp_t:
            self.mlp_t = TokenMixer(seq_len, expansion, eps)
        else:
            self.self_attn = Attention(hidden, num_heads)
            self.attn_norm = KN.AddRMSNorm(hidden, eps, weight=False)
        self.mlp = SwiGLU(hidden, expansion)
        self.mlp_norm = KN.AddRMSNorm(hidden, eps, weight=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        if hasattr(self, "mlp_t"):
            h = self.mlp_t(h)
        else:
            attn = self.self_attn  # attn_norm(o_proj(heads), h) as one op: the norm in o_proj's epilogue
            h = K.linear_add_rmsnorm(attn.attend(h, cos, sin), attn.o_proj.weight_as(h.dtype), h, self.attn_norm.eps)
        # mlp_norm(mlp(h), h) as one op: on the triton backend both GEMMs carry the elementwise work
        w_gate_up, w_down = self.mlp.gate_up_proj.weight_as(h.dtype), self.mlp.down_proj.weight_as(h.dtype)
        return K.swiglu_mlp_rmsnorm(h, w_gate_up, w_down, self.mlp_norm.eps)


class ReasoningNet(nn.Module):
    """The tiny net TRM calls over and over: net(h, a, b) = blocks(h + (a + b)).

    Reference: ``ReasoningModule`` (``L_level``).
    """

    def __init__(self, num_layers: int, **block_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(Block(**block_kwargs) for _ in range(num_layers))

    def forward(self, h, a, b=None, cos=None, sin=None) -> torch.Tensor:
        h = K.inject(h, a, b)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return h
