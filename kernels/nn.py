"""Drop-in modules built on the fused ops, for TRM and any other (recursive) model.

Every module computes with ``trm_kernels``' ops, so the backend (reference PyTorch, Triton,
the CUDA extension) is chosen where every op's is: per call, globally, or automatically
(see ``trm_kernels.backend``). Linear layers are ``torch.nn.Linear`` unless a ``linear``
factory is given (``linear(in_features, out_features, bias=...)``, e.g. TRM's ``CastedLinear``
that keeps an fp32 master weight and computes in the input's dtype); weights are laid out as
``nn.Linear``'s, [out_features, in_features], so checkpoints of models built that way load.

Shapes: B batch, S sequence, D hidden, H query heads, KVH key/value heads, d head size, I the
MLP's intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import (
    add_rmsnorm,
    concat_linear,
    kv_cache_attention,
    rope_attention,
    sandwich_rmsnorm,
    swiglu,
    swiglu_mlp,
    token_mlp_rmsnorm,
)

Linear = Callable[..., nn.Module]


def weight_as(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight in `dtype` (through its own cast where it has one, as TRM's CastedLinear)."""
    cast = getattr(linear, "weight_as", None)
    return cast(dtype) if cast is not None else linear.weight.to(dtype)


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last axis (or `dim`), statistics in fp32.

    x [..., N, ...] with N = `size` along `dim`; weight [N], fp32, initialised to ones, or
    none (``weight=False``, as TRM's post-norm blocks). Returns x's dtype.
    """

    def __init__(self, size: int, eps: float = 1e-5, weight: bool = True, dim: int = -1):
        super().__init__()
        self.size, self.eps, self.dim = size, eps, dim
        self.weight = nn.Parameter(torch.ones(size)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., N, ...] (N = `size` along `dim`) -> the same shape, in x's dtype:
        ``x * rsqrt(mean(x^2) + eps) * weight`` over `dim`, the statistics in fp32 and the result
        rounded once. fp32, fp16, bf16 (float64 on the reference backend)."""
        return add_rmsnorm(x, None, self.dim, self.eps, weight=self.weight)

    def extra_repr(self) -> str:
        return f"{self.size}, eps={self.eps}, weight={self.weight is not None}, dim={self.dim}"


class AddRMSNorm(RMSNorm):
    """Residual add + RMSNorm in one op: ``forward(x, residual)``, x the sub-layer's output.

    Post-norm (default): returns ``rmsnorm(residual + x) * weight`` (TRM: ``h = norm(h + f(h))``),
    in the dtype of the sum. Pre-norm (``prenorm=True``): returns ``(stream, normed)``: the new
    residual stream ``residual + x`` (fp32 if the stream is fp32 and x bf16) and its norm in
    x's dtype, the next sub-layer's input. Shapes as x; weight [size] or none.
    """

    def __init__(self, size: int, eps: float = 1e-5, weight: bool = True, prenorm: bool = False, dim: int = -1):
        super().__init__(size, eps, weight, dim)
        self.prenorm = prenorm

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
        """x, the sub-layer's output, and residual, the stream: the same shape [..., N, ...] (N =
        `size` along `dim`); their dtypes may differ (a bf16 x on an fp32 stream), the sum is
        taken in the promoted dtype. Post-norm -> ``rmsnorm(residual + x) * weight`` in the sum's
        dtype; pre-norm -> ``(residual + x, its norm)``, the new stream in the sum's dtype and its
        norm in x's dtype (the next sub-layer's input). Statistics in fp32; gradients reach x,
        residual and the weight."""
        return add_rmsnorm(x, residual, self.dim, self.eps, weight=self.weight, prenorm=self.prenorm)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", prenorm={self.prenorm}"


class SandwichRMSNorm(nn.Module):
    """A sandwich block's closing norm and the next sub-layer's input norm, one op: ``forward(x,
    residual) -> (stream, next_input)`` (``trm_kernels.sandwich_rmsnorm``).

    Huginn-style recurrent-depth blocks, ``x = norm_2(x + attn(norm_1(x)))`` then ``norm_3(x)``
    as the MLP's input: ``weight`` is norm_2's, ``next_weight`` norm_3's ([size] each, fp32,
    initialised to ones). Over the last axis, statistics in fp32.
    """

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.size, self.eps = size, eps
        self.weight = nn.Parameter(torch.ones(size))
        self.next_weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, the sub-layer's output, and residual, the stream, [..., size] -> (stream, next_input):
        ``stream = rmsnorm(residual + x) * weight`` in the sum's dtype (x's and residual's may
        differ: the sum in the promoted dtype) and ``next_input = rmsnorm(stream) * next_weight``
        in the stream's dtype; gradients reach x, residual and both weights."""
        return sandwich_rmsnorm(x, residual, self.weight, self.next_weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.size}, eps={self.eps}"


def plain_weight(linear: nn.Module) -> bool:
    """Whether a linear layer computes ``F.linear(x, weight)`` and nothing else: a bias-free
    ``nn.Linear`` (not a subclass, which may change its forward) or a layer with
    ``weight_as`` (its own cast, as TRM's CastedLinear). Fused ops take such layers' weights."""
    if getattr(linear, "bias", None) is not None:
        return False
    return type(linear) is nn.Linear or callable(getattr(linear, "weight_as", None))


class SwiGLUMLP(nn.Module):
    """``down(silu(gate) * up)`` with gate and up from one packed projection, gate first.

    x [..., D] -> [..., D]. gate_up_proj [2I, D] (rows 0..I-1 gate, I..2I-1 up), down_proj
    [D, I]. Without biases (and with ``nn.Linear`` or a ``linear`` whose layers have
    ``weight_as``) the whole MLP is one op, ``trm_kernels.swiglu_mlp``: SwiGLU inside the
    GEMMs on the triton backend; otherwise the projections run as modules around the fused
    ``trm_kernels.swiglu``. Either way it computes what the module composition computes. To
    load a model with separate ``gate_proj`` and ``up_proj`` (Llama-style), concatenate
    their weights, gate first.
    """

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, linear: Linear = nn.Linear):
        super().__init__()
        self.gate_up_proj = linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D] in x's dtype: ``down_proj(silu(gate) * up)`` with
        ``gate, up = gate_up_proj(x).chunk(2, -1)`` (gate first). The projections' weights are
        used in x's dtype (fp32, fp16, bf16; float64 on the reference backend)."""
        if plain_weight(self.gate_up_proj) and plain_weight(self.down_proj):
            return swiglu_mlp(x, weight_as(self.gate_up_proj, x.dtype), weight_as(self.down_proj, x.dtype))
        return self.down_proj(swiglu(self.gate_up_proj(x)))


class KVCache:
    """One attention layer's static key/value cache for generation: ``k``, ``v`` [B, C, KVH, d]
    (capacity C tokens per sequence) and ``lengths`` [B] int32, the tokens cached so far.
    ``RoPEAttention.forward(h, cos, sin, cache=cache)`` writes the new tokens' rotated keys
    and values at positions lengths[b]..., attends, and advances ``lengths``. Sequences of
    different lengths are different ``lengths`` (prefill each at its own length, or prefill
    a right-padded batch and set ``lengths`` to the real lengths after: the padding's
    entries are then overwritten by the next tokens). ``reset()`` empties it."""

    def __init__(self, batch: int, capacity: int, num_kv_heads: int, head_dim: int, dtype=None, device=None):
        self.k = torch.zeros(batch, capacity, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        self.lengths.zero_()


class RoPEAttention(nn.Module):
    """Self-attention on one packed projection: ``o_proj(attention(qkv_proj(h)))``.

    h [B, S, D] -> [B, S, D]. qkv_proj [(H + 2 * KVH) * d, D] produces [q heads | k heads |
    v heads]; o_proj [D, H * d]. ``num_kv_heads`` < ``num_heads`` is grouped-query attention
    (1: multi-query); ``head_dim`` defaults to D / H. ``forward(h, cos=None, sin=None,
    key_mask=None, cache=None)``: RoPE tables (``trm_kernels.rope_cos_sin``; None: no
    rotation), a key mask [B, S] bool (False: padding), a ``KVCache`` for generation.
    ``causal``, ``rope`` (the weights' RoPE convention, ``"rotate_half"`` or
    ``"interleaved"``) and ``window`` (sliding window: keys j > i - window) are fixed at
    construction. ``qk_norm`` ``"before"`` or ``"after"`` (RoPE) normalises each query and
    key head (QK-norm, as Qwen3 and Gemma 3 do before RoPE): ``q_norm`` and ``k_norm`` are
    ``RMSNorm(d, qk_norm_eps)`` modules (eps 1e-6; learnable weights ``q_norm.weight``,
    ``k_norm.weight`` [d], ones at first; ``qk_norm_weight=False``: none) whose norm the
    attention op applies inside. Scale 1/sqrt(d). See
    ``trm_kernels.rope_attention`` and ``trm_kernels.kv_cache_attention`` for the conventions.
    """

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        causal: bool = False,
        bias: bool = False,
        linear: Linear = nn.Linear,
        rope: str = "rotate_half",
        window: int | None = None,
        qk_norm: str | None = None,
        qk_norm_weight: bool = True,
        qk_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.rope, self.window = rope, window
        if qk_norm not in (None, "before", "after"):
            raise ValueError(f"qk_norm must be None, 'before' or 'after' (RoPE), got {qk_norm!r}")
        self.qk_norm = qk_norm
        if hidden % num_heads and head_dim is None:
            raise ValueError(f"hidden={hidden} is not divisible by num_heads={num_heads}; pass head_dim")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={num_heads}")
        self.head_dim, self.causal = head_dim or hidden // num_heads, causal
        self.qkv_proj = linear(hidden, (num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=bias)
        self.o_proj = linear(num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = self.k_norm = None  # QK-norm: each head's RMSNorm (the attention op applies them)
        if qk_norm is not None:
            self.q_norm, self.k_norm = (RMSNorm(self.head_dim, qk_norm_eps, qk_norm_weight) for _ in range(2))

    def _norm_args(self) -> dict:
        if self.qk_norm is None:
            return {}
        if self.q_norm.eps != self.k_norm.eps:
            raise ValueError(f"q_norm.eps={self.q_norm.eps} and k_norm.eps={self.k_norm.eps} differ: the attention "
                             "op's QK-norm takes one eps")  # fmt: skip
        return dict(qk_norm=self.qk_norm, qk_norm_eps=self.q_norm.eps, q_norm_weight=self.q_norm.weight,
                    k_norm_weight=self.k_norm.weight)  # fmt: skip

    def attend(
        self,
        h: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The heads' outputs before o_proj, [B, S, H * d] (for a caller fusing o_proj with
        what follows it, as ``trm_kernels.linear_add_rmsnorm`` does)."""
        if cache is None:
            return rope_attention(self.qkv_proj(h), cos, sin, self.num_heads, num_kv_heads=self.num_kv_heads,
                                  causal=self.causal, key_mask=key_mask, head_dim=self.head_dim,
                                  rope=self.rope, window=self.window, **self._norm_args())  # fmt: skip
        if key_mask is not None:
            raise ValueError("key_mask and cache do not go together: a cache's lengths say which tokens are real")
        out = kv_cache_attention(self.qkv_proj(h), cache.k, cache.v, cache.lengths, cos, sin, self.num_heads,
                                 num_kv_heads=self.num_kv_heads, causal=self.causal, rope=self.rope,
                                 window=self.window, **self._norm_args())  # fmt: skip
        cache.lengths += h.shape[1]
        return out

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """h [B, S, D] -> [B, S, D], in h's dtype (fp32, fp16, bf16; float64 on the reference
        backend): ``o_proj(attention(qkv_proj(h)))``.

        cos, sin: RoPE tables [P, d] for positions 0..P-1 (P >= S; with a cache P >= its
        capacity), fp32, in the module's ``rope`` convention, as
        ``trm_kernels.rope_cos_sin(P, d, rope=...)`` makes them; both or neither (None: no
        rotation). cache: a ``KVCache`` (generation, no gradient): h holds the next S tokens
        of each sequence, at positions cache.lengths[b] + i; their keys and values are
        cached, every query attends the cached tokens (causal: up to its own position), and
        cache.lengths advances by S. key_mask: [B, S] bool, True for a real token and False
        for padding, which no query attends (lengths L: ``torch.arange(S) < L[:, None]``);
        None: every token is real. Query i attends every real key (with ``causal``, set at
        construction, those j <= i); one with none to attend (a padded query at the start of a
        causal row) gives 0 before o_proj. Scale 1/sqrt(d); with fewer key/value heads,
        query head i reads key/value head i // (H / KVH). See ``trm_kernels.rope_attention``."""
        return self.o_proj(self.attend(h, cos, sin, key_mask, cache))

    def new_cache(self, batch: int, capacity: int, dtype=None, device=None) -> KVCache:
        """An empty ``KVCache`` for this layer (dtype and device: the qkv projection's by default)."""
        weight = self.qkv_proj.weight
        return KVCache(
            batch, capacity, self.num_kv_heads, self.head_dim, dtype or weight.dtype, device or weight.device
        )

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, causal={self.causal}"
                + (f", rope={self.rope}" if self.rope != "rotate_half" else "")
                + (f", window={self.window}" if self.window else "")
                + (f", qk_norm={self.qk_norm}" if self.qk_norm else ""))  # fmt: skip


class TokenMixer(nn.Module):
    """TRM's ``mlp_t`` sub-layer: mixing over the sequence axis, then RMSNorm over it.

    h [B, S, D] -> ``rmsnorm over S of (h + W_down @ swiglu(W_gate_up @ h))``, [B, S, D], in
    one fused op with no transposes (``trm_kernels.token_mlp_rmsnorm``). gate_up_proj
    [2I, S] (gate rows first), down_proj [S, I]: the layout of a SwiGLU over S applied to
    h transposed, as the TRM reference builds it. No biases, no norm weight.
    """

    def __init__(self, seq_len: int, intermediate: int, eps: float = 1e-5, linear: Linear = nn.Linear):
        super().__init__()
        self.eps = eps
        self.gate_up_proj = linear(seq_len, 2 * intermediate, bias=False)
        self.down_proj = linear(intermediate, seq_len, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, S, D], S the `seq_len` it was built for -> [B, S, D] in h's dtype: for each
        channel, ``rmsnorm over S of (h + down_proj(swiglu(gate_up_proj(h over S))))``, no norm
        weight, statistics in fp32; the weights are used in h's dtype (fp32, fp16, bf16)."""
        w_gate_up, w_down = weight_as(self.gate_up_proj, h.dtype), weight_as(self.down_proj, h.dtype)
        return token_mlp_rmsnorm(h, w_gate_up, w_down, eps=self.eps)


class ConcatLinear(nn.Module):
    """A linear layer on the concatenation of two inputs, without making it: ``forward(x, e)``
    is ``nn.Linear(in_x + in_e, out_features)(torch.cat([x, e], -1))``, one
    ``trm_kernels.concat_linear`` op (a recurrent-depth LM's adapter, Huginn's
    ``adapter(cat([state, embeds], -1))``).

    Parameters are an ``nn.Linear``'s, so its state dict loads either way: weight
    [out_features, in_x + in_e] (columns 0..in_x-1 multiply x), bias [out_features] or none;
    initialised as ``nn.Linear(in_x + in_e, out_features)`` initialises them.
    """

    def __init__(self, in_x: int, in_e: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_x, self.in_e, self.out_features = in_x, in_e, out_features
        linear = nn.Linear(in_x + in_e, out_features, bias=bias, device=device, dtype=dtype)
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [..., in_x], e [..., in_e] with x's leading shape -> [..., out_features] in x's dtype
        (fp32, fp16, bf16; float64 on the reference backend): ``cat([x, e], -1) @ weight^T + bias``.
        The weight and bias are used in x's dtype (cast if the module's differs); gradients reach
        x, e, the weight and the bias."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return concat_linear(x, e, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_x={self.in_x}, in_e={self.in_e}, out_features={self.out_features}, bias={self.bias is not None}"


__all__ = [
    "AddRMSNorm",
    "ConcatLinear",
    "KVCache",
    "RMSNorm",
    "RoPEAttention",
    "SandwichRMSNorm",
    "SwiGLUMLP",
    "TokenMixer",
    "plain_weight",
    "weight_as",
]
