"""Plain PyTorch implementations of every op on the TRM hot path.

These are the semantics: the CPU path, and the oracle every fused kernel is tested
against. Each one is written to be obviously right, not fast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32; float64 stays float64 (so gradcheck is exact)."""
    return torch.promote_types(dtype, torch.float32)


def add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    dim: int = -1,
    eps: float = 1e-5,
    weight: torch.Tensor | None = None,
    prenorm: bool = False,
):
    """rmsnorm(x + residual) over `dim`, times `weight` if given, computed in fp32 (or wider).

    The sum is taken in the promoted dtype of x and residual (rounded as an eager add
    rounds it); the norm and the weight in fp32, rounded once. Post-norm (the default)
    returns the normalised sum in that promoted dtype. ``prenorm=True`` returns
    ``(sum, normalised)``: the new residual stream in the promoted dtype, and its norm in
    x's dtype (the input of the next sub-layer).
    """
    h = x if residual is None else x + residual
    h32 = h.to(_compute_dtype(h.dtype))
    y = h32 * torch.rsqrt(h32.square().mean(dim=dim, keepdim=True) + eps)
    if weight is not None:
        shape = [1] * h.dim()
        shape[dim] = -1
        y = y * weight.to(y.dtype).view(shape)
    if prenorm:
        return h, y.to(x.dtype)
    return y.to(h.dtype)


def inject(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The recursion's input injection: h + (a + b), or h + a; a and b broadcast to h.

    The parenthesisation is the reference's (`z_L + (z_H + x)`), which matters in bf16.
    """
    return h + (a if b is None else a + b)


def swiglu(gate_up: torch.Tensor, dim: int = -1, activation: str = "swiglu") -> torch.Tensor:
    """silu(gate) * up, with gate and up the two halves of `gate_up` along `dim` (gate first);
    ``activation="geglu"``: gelu(gate, approximate="tanh") * up."""
    gate, up = gate_up.chunk(2, dim=dim)
    return (F.silu(gate) if activation == "swiglu" else F.gelu(gate, approximate="tanh")) * up


MLP_ACTIVATIONS = ("swiglu", "geglu", "relu2")  # gated: silu(gate) * up, gelu_tanh(gate) * up; relu(h)^2


def mlp_activation(x: torch.Tensor, w_gate_up: torch.Tensor, activation: str = "swiglu",
                   w_up: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The channel MLP's activation [..., I] of x [..., D], as modules of bias-free ``nn.Linear``
    compute it: swiglu ``silu(gate) * up`` and geglu ``gelu(gate, approximate="tanh") * up``
    (Gemma) with gate|up = x @ w_gate_up^T, w_gate_up [2I, D] gate rows first, or gate = x @
    w_gate_up^T and up = x @ w_up^T for two [I, D] weights (Llama's gate_proj, up_proj);
    relu2 ``relu(x @ w_gate_up^T)^2`` (Primer, Nemotron) with w_gate_up [I, D] and no up."""
    if activation == "relu2":
        return F.relu(F.linear(x, w_gate_up)).square()
    if w_up is None:
        gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    else:
        gate, up = F.linear(x, w_gate_up), F.linear(x, w_up)
    return (F.silu(gate) if activation == "swiglu" else F.gelu(gate, approximate="tanh")) * up


def swiglu_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, activation: str = "swiglu",
               w_up: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The channel MLP ``down(act(x))``: x [..., D], w_gate_up [2I, D] (gate rows first; [I, D]
    with w_up [I, D] or with relu2), w_down [D, I] -> [..., D]; the ops a module of bias-free
    ``nn.Linear`` runs (see mlp_activation)."""
    if activation == "swiglu" and w_up is None:
        return F.linear(swiglu(F.linear(x, w_gate_up)), w_down)
    return F.linear(mlp_activation(x, w_gate_up, activation, w_up), w_down)


def swiglu_mlp_rmsnorm(
    h: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    eps: float = 1e-5,
    weight: torch.Tensor | None = None,
    activation: str = "swiglu",
    w_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """A post-norm MLP sub-layer: ``rmsnorm(h + swiglu_mlp(h, ..., activation, w_up)) [* weight]``
    over the last axis."""
    return add_rmsnorm(swiglu_mlp(h, w_gate_up, w_down, activation, w_up), h, -1, eps, weight)


def linear_add_rmsnorm(
    a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, eps: float = 1e-5, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """A linear layer's output added to the residual and normalised: ``rmsnorm(h + a @ w^T) [* weight]``
    over the last axis (TRM's attention sub-layer, no weight: o_proj, then the post-norm)."""
    return add_rmsnorm(F.linear(a, w), h, -1, eps, weight)


def sandwich_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, next_weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sandwich block's closing norm and the next sub-layer's opening one (Huginn's
    ``x = norm_2(x + attn(norm_1(x)))``, then ``norm_3(x)``), over the last axis:
    ``(stream, next_input)`` with ``stream = rmsnorm(x + residual) * weight`` in the sum's dtype
    and ``next_input = rmsnorm(stream) * next_weight`` from the rounded stream, in its dtype."""
    stream = add_rmsnorm(x, residual, -1, eps, weight)
    return stream, add_rmsnorm(stream, None, -1, eps, next_weight)


def concat_linear(
    x: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """A linear layer on the concatenation of x [..., Kx] and e [..., Ke]: weight [N, Kx + Ke]
    (columns 0..Kx-1 multiply x), bias [N] or None -> [..., N] (a recurrent-depth LM's adapter)."""
    return F.linear(torch.cat([x, e], -1), weight, bias)


def token_mlp_rmsnorm(
    h: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    eps: float = 1e-5,
    swiglu: Callable = swiglu,
    add_rmsnorm: Callable = add_rmsnorm,
) -> torch.Tensor:
    """The ``mlp_t`` sub-layer: rmsnorm over the sequence of h + W_down @ swiglu(W_gate_up @ h).

    h [B, S, D], w_gate_up [2I, S], w_down [S, I]. The reference transposes h to [B, D, S]
    and applies a last-axis SwiGLU; multiplying each batch element by the weights from the
    left is the same with no transpose copies: a batched GEMM whose weight has batch stride
    0. Not ``torch.matmul(w, h)``, which folds the batch into rows and copies h, the
    product and their gradients to transposed layouts. `swiglu` and `add_rmsnorm` are the
    element-wise ops to compose with (a fused backend passes its own).
    """
    gate_up = left_matmul(w_gate_up, h)  # [B, 2I, D]
    mix = left_matmul(w_down, swiglu(gate_up, 1))  # [B, S, D]
    return add_rmsnorm(h, mix, 1, eps)


_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")  # bmm with an fp32 result from half inputs (CUDA)


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over b of grad[b] @ x[b]^T, accumulated in fp32 (or wider) and rounded once.

    Summing per-example products already rounded to bf16 (what autograd does for a
    weight expanded over the batch) is ~1.4x less accurate than the reference's single GEMM
    over the folded batch; summing in fp32 matches it without transposed copies. fp32 and
    float64 inputs take exactly the ops autograd would.
    """
    wide = _compute_dtype(grad.dtype)
    if wide == grad.dtype:
        return torch.bmm(grad, x.transpose(1, 2)).sum(0)
    if grad.device.type != "cpu" and _BMM_OUT_DTYPE:  # CUDA (and meta, which stands for it)
        products = torch.ops.aten.bmm.dtype(grad, x.transpose(1, 2), wide)
    else:
        products = torch.bmm(grad.to(wide), x.to(wide).transpose(1, 2))
    return products.sum(0).to(grad.dtype)


class _LeftMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, x)
        return torch.bmm(w.expand(x.shape[0], -1, -1), x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, x = ctx.saved_tensors
        grad_w = _weight_grad(grad, x) if ctx.needs_input_grad[0] else None
        grad_x = torch.bmm(w.t().expand(x.shape[0], -1, -1), grad) if ctx.needs_input_grad[1] else None
        return grad_w, grad_x


def left_matmul(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w @ x[b] for every b (w [M, K], x [B, K, N] -> [B, M, N]): one batched GEMM with the
    weight at batch stride 0, whose weight gradient is summed over the batch in fp32."""
    if not (torch.is_grad_enabled() and w.requires_grad):
        return torch.bmm(w.expand(x.shape[0], -1, -1), x)
    return _LeftMatmul.apply(w, x)


ROPE_STYLES = ("rotate_half", "interleaved")


def rope_cos_sin(
    seq_len: int, head_dim: int, base: float = 10000.0, *, rope: str = "rotate_half"
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for positions 0..seq_len-1: (cos, sin), each fp32 [seq_len, head_dim].

    Pair i of a head turns by the angle position * base^(-2i/head_dim). ``rope`` says where
    the pair's two columns are: ``"rotate_half"`` (the TRM reference, Llama in Hugging Face
    transformers, NeoX) pairs column i with i + head_dim/2, and the tables repeat the angles
    as [angles, angles]; ``"interleaved"`` (GPT-J, Meta's original Llama, complex-number
    RoPE) pairs columns 2i and 2i+1, and each angle is repeated in place. head_dim must be
    even. Built as the TRM reference builds them (fp32 throughout)."""
    if rope not in ROPE_STYLES:
        raise ValueError(f"rope must be one of {', '.join(ROPE_STYLES)}, got {rope!r}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = freqs.repeat_interleave(2, dim=-1) if rope == "interleaved" else torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """The interleaved convention's partner: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: str = "rotate_half") -> torch.Tensor:
    """RoPE in fp32 (or wider) on x [B, S, H, d], rounded back to x's dtype: ``x * cos +
    partner(x) * sin``, which turns each pair (a, b) to (a cos - b sin, b cos + a sin).
    cos/sin [S, d] (every sequence at the same positions) or [B, S, d] (per sequence)."""
    x32 = x.to(_compute_dtype(x.dtype))
    cos, sin = cos.unsqueeze(-2).to(x32.dtype), sin.unsqueeze(-2).to(x32.dtype)
    partner = _rotate_pairs if rope == "interleaved" else _rotate_half
    return (x32 * cos + partner(x32) * sin).to(x.dtype)


QK_NORMS = ("before", "after")  # QK-norm before or after RoPE


def head_rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of each head of x [..., d] over its d columns, in fp32 (or wider), times the
    weight [d] (None: none), rounded back to x's dtype: QK-norm (Qwen3, Gemma 3)."""
    x32 = x.to(_compute_dtype(x.dtype))
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(y.dtype) if weight is not None else y).to(x.dtype)


def _rope_qk(q, k, cos, sin, rope: str, qk_norm: str | None, q_weight, k_weight, eps: float):
    """q and k rotated, and normalised before or after the rotation where ``qk_norm`` says."""
    if qk_norm == "before":
        q, k = head_rmsnorm(q, q_weight, eps), head_rmsnorm(k, k_weight, eps)
    if cos is not None:
        q, k = apply_rope(q, cos, sin, rope), apply_rope(k, cos, sin, rope)
    if qk_norm == "after":
        q, k = head_rmsnorm(q, q_weight, eps), head_rmsnorm(k, k_weight, eps)
    return q, k


def _split_qkv(qkv: torch.Tensor, num_heads: int, kv: int):
    batch, seq, width = qkv.shape
    head_dim = width // (num_heads + 2 * kv)
    return qkv.view(batch, seq, num_heads + 2 * kv, head_dim).split([num_heads, kv, kv], dim=2)


def rope_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int | None = None,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    rope: str = "rotate_half",
    window: int = 0,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    qk_norm: str | None = None,
    qk_norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Multi-head attention with RoPE on q and k (none when cos is None), scale 1/sqrt(d).

    qkv: [B, S, (H + 2 * KVH) * d] laid out as [q heads | k heads | v heads]; returns
    [B, S, H * d]. Query head h uses key/value head h // (H / KVH). cos/sin [P >= S, d]:
    positions 0..S-1 are used. `causal`: query i attends keys j <= i; `window` > 0: only keys
    j > i - window. `key_mask` [B, S] bool:
    False keys are never attended. A query with no key to attend gets 0. `qk_norm` "before"
    or "after" (RoPE): each q and k head through :func:`head_rmsnorm` with its weight [d].
    """
    kv = num_kv_heads or num_heads
    batch, seq, width = qkv.shape
    head_dim = width // (num_heads + 2 * kv)
    q, k, v = _split_qkv(qkv, num_heads, kv)
    if cos is not None:
        cos, sin = cos[:seq], sin[:seq]
    q, k = _rope_qk(q, k, cos, sin, rope, qk_norm, q_norm_weight, k_norm_weight, qk_norm_eps)
    if kv != num_heads:
        k, v = (t.repeat_interleave(num_heads // kv, dim=2) for t in (k, v))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if key_mask is None and not window:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        ones = torch.ones(seq, seq, dtype=torch.bool, device=qkv.device)
        allowed = ones if key_mask is None else key_mask[:, None, None, :].expand(batch, 1, seq, seq)
        if causal:
            allowed = allowed & ones.tril()
        if window:
            allowed = allowed & ones.triu(1 - window)
        attends = allowed.any(-1, keepdim=True)  # a row with no key: attend all, then output 0 (finite gradients)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~attends)
        out = torch.where(attends, out, 0)
    return out.transpose(1, 2).reshape(batch, seq, num_heads * head_dim)


def cache_positions(cache_len: torch.Tensor, seq: int) -> torch.Tensor:
    """[B, Sq] int64: the positions of a call's new tokens, cache_len[b] + 0..Sq-1."""
    return cache_len.long()[:, None] + torch.arange(seq, device=cache_len.device)


def kv_cache_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int | None = None,
    causal: bool = True,
    rope: str = "rotate_half",
    window: int = 0,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    qk_norm: str | None = None,
    qk_norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Attention of Sq new tokens against a key/value cache, the cache updated in place.

    qkv [B, Sq, (H + 2 * KVH) * d] (the new tokens' packed projection); k_cache, v_cache
    [B, C, KVH, d] (any strides, the last axis contiguous); cache_len [B] integer: tokens
    already cached per sequence. The new tokens sit at positions cache_len[b] + i: q and k
    are rotated there (cos/sin [P >= C, d]), the rotated keys and the values are written to
    the cache at those positions, and query i attends cached keys 0..cache_len[b] + Sq - 1,
    with `causal` up to its own position cache_len[b] + i (lower-right alignment), and with
    `window` > 0 only the last `window` of those (keys at positions > its own - window).
    `qk_norm` as in :func:`rope_attention` (the cache holds the normalised, rotated keys).
    Returns [B, Sq, H * d].
    """
    kv = num_kv_heads or num_heads
    batch, seq, _ = qkv.shape
    q, k, v = _split_qkv(qkv, num_heads, kv)
    pos = cache_positions(cache_len, seq)
    if cos is not None:
        cos, sin = cos[pos], sin[pos]
    q, k = _rope_qk(q, k, cos, sin, rope, qk_norm, q_norm_weight, k_norm_weight, qk_norm_eps)
    rows = torch.arange(batch, device=qkv.device)[:, None]
    k_cache[rows, pos] = k
    v_cache[rows, pos] = v
    keys, values = k_cache, v_cache
    if kv != num_heads:
        keys, values = (t.repeat_interleave(num_heads // kv, dim=2) for t in (keys, values))
    n = torch.arange(k_cache.shape[1], device=qkv.device)
    allowed = n < (pos[:, -1:, None] + 1)  # [B, 1, C]: every key cached after this call
    if causal:
        allowed = allowed & (n <= pos[:, :, None])
    if window:
        allowed = allowed & (n > pos[:, :, None] - window)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=allowed[:, None]
    )
    return out.transpose(1, 2).reshape(batch, seq, -1)


def _stablemax_s(x: torch.Tensor) -> torch.Tensor:
    # the negative branch sees min(x, 0): at x = 1 an unguarded 1 / (1 - x) is inf, and its
    # gradient, though masked by `where`, turns into NaN (inf * 0)
    return torch.where(x >= 0, x + 1, 1 / (1 - x.clamp(max=0)))


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token -log(s(x_label) / sum_j s(x_j)) in float64, 0 where label == ignore_index.

    Returns labels' shape in float64, as the TRM reference implementation does, so that the
    loss summed from it, and its gradient, are float64 until they reach the logits. A label
    outside [0, V) (other than ignore_index) gives NaN, on every backend: checking it on the
    host would cost a device synchronisation per call.
    """
    s = _stablemax_s(logits.double())
    logp = torch.log(s / s.sum(dim=-1, keepdim=True))
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    picked = logp.gather(-1, torch.where(valid & in_range, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, torch.where(in_range, -picked, torch.nan), 0)


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token softmax cross-entropy in fp32 (float64 for float64 logits), 0 at ignore_index;
    NaN for a label outside [0, V), as stablemax_cross_entropy."""
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    flat = F.cross_entropy(
        logits.to(_compute_dtype(logits.dtype)).flatten(0, -2),
        torch.where(in_range | ~valid, labels, ignore_index).long().flatten(),
        ignore_index=ignore_index,
        reduction="none",
    )
    return torch.where(valid & ~in_range, torch.nan, flat.view(labels.shape))
