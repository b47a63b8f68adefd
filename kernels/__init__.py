"""trm_kernels: the fused ops of the TRM recursion, usable in any recursive model.

Every op validates its arguments once here, then runs the implementation chosen by
:mod:`trm_kernels.backend` (``reference`` PyTorch everywhere; fused backends where
registered). Semantics are those of :mod:`trm_kernels.reference`. Modules built on the
ops are in :mod:`trm_kernels.nn`; :func:`patch` runs existing TRM / HRM code (and Llama-style
decoder layers, Huginn-style sandwich blocks) on them in one call. The guide is kernels/README.md.

Example, one post-norm block of your own recursive model::

    import trm_kernels as K

    def block(h, injection, qkv_proj, o_proj, gate_up_proj, down_proj, cos, sin, heads):
        h = K.inject(h, injection)
        h = K.add_rmsnorm(h, o_proj(K.rope_attention(qkv_proj(h), cos, sin, heads)))
        return K.add_rmsnorm(h, down_proj(K.swiglu(gate_up_proj(h))))
"""

from __future__ import annotations

import torch

from . import reference, verify  # noqa: F401  (trm_kernels.verify: the parity guard)
from .backend import available, call, get_backend, register, set_backend, use_backend
from .checks import _check_dim, _check_eps, _check_float, _check_norm_weight
from .verify import get_verify, set_verify, use_verify

__all__ = [
    "add_rmsnorm",
    "inject",
    "swiglu",
    "swiglu_mlp",
    "swiglu_mlp_rmsnorm",
    "linear_add_rmsnorm",
    "sandwich_rmsnorm",
    "concat_linear",
    "token_mlp_rmsnorm",
    "rope_attention",
    "kv_cache_attention",
    "rope_cos_sin",
    "stablemax_cross_entropy",
    "softmax_cross_entropy",
    "available",
    "get_backend",
    "set_backend",
    "use_backend",
    "get_verify",
    "set_verify",
    "use_verify",
    "nn",
    "patch",
    "PatchReport",
]

rope_cos_sin = reference.rope_cos_sin  # (seq_len, head_dim, base, *, rope) -> fp32 cos, sin [seq_len, head_dim]

_OPS = ("add_rmsnorm", "inject", "swiglu", "swiglu_mlp", "swiglu_mlp_rmsnorm", "linear_add_rmsnorm",
        "token_mlp_rmsnorm", "rope_attention", "kv_cache_attention", "stablemax_cross_entropy",
        "softmax_cross_entropy",
        "concat_linear", "sandwich_rmsnorm")  # fmt: skip
for _name in _OPS:
    register(_name, "reference", getattr(reference, _name))

try:  # the fused backends register themselves where their toolchain is importable
    import triton  # noqa: F401
except ImportError:
    pass
else:
    from . import attention as _attention
    from . import channel_mlp as _channel_mlp
    from . import concat_linear as _concat_linear
    from . import cross_entropy as _ce
    from . import inject as _inject
    from . import kv_cache as _kv_cache
    from . import qk_norm as _qk_norm  # noqa: F401  (QK-norm's ops, registered before any call)
    from . import rmsnorm as _rmsnorm
    from . import sandwich as _sandwich
    from . import swiglu as _swiglu
    from . import token_mlp as _token_mlp
    from ._triton import takes

    register("add_rmsnorm", "triton", _rmsnorm.add_rmsnorm, _rmsnorm.supports)
    if torch.version.cuda is not None:  # a CUDA build of torch: the extension can be built or loaded
        register("add_rmsnorm", "cuda", _rmsnorm.add_rmsnorm_cuda, _rmsnorm.supports)
    register("rope_attention", "triton", _attention.rope_attention, _attention.supports)
    register("kv_cache_attention", "triton", _kv_cache.kv_cache_attention, _kv_cache.supports)
    register("inject", "triton", _inject.inject, takes)
    register("swiglu", "triton", _swiglu.swiglu, takes)
    register("swiglu_mlp", "triton", _channel_mlp.swiglu_mlp, takes)
    register("swiglu_mlp_rmsnorm", "triton", _channel_mlp.swiglu_mlp_rmsnorm, _channel_mlp.sublayer_supports)
    register("linear_add_rmsnorm", "triton", _channel_mlp.linear_add_rmsnorm, _channel_mlp.linear_norm_supports)
    register("sandwich_rmsnorm", "triton", _sandwich.sandwich_rmsnorm, _sandwich.supports)
    register("concat_linear", "triton", _concat_linear.concat_linear, takes)
    register("token_mlp_rmsnorm", "triton", _token_mlp.token_mlp_rmsnorm, _token_mlp.supports)
    register("stablemax_cross_entropy", "triton", _ce.stablemax_cross_entropy, _ce.supports)
    register("softmax_cross_entropy", "triton", _ce.softmax_cross_entropy, _ce.supports)


def add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    dim: int = -1,
    eps: float = 1e-5,
    backend: str | None = None,
    *,
    weight: torch.Tensor | None = None,
    prenorm: bool = False,
):
    """Residual add + RMSNorm: ``rmsnorm(x + residual) * weight`` over axis `dim`.

    Shapes: x [..., N, ...] with N = x.shape[dim] the normalised axis (-1: hidden; -2: the
    sequence, as TRM's ``mlp_t`` normalises); residual x's shape; weight [N] (optional,
    learnable, any float dtype; applied in fp32). Statistics in fp32:
    ``y = h * rsqrt(mean(h^2) + eps) * weight``, h = x + residual, rounded once.

    dtypes: x and residual may differ (an fp32 residual stream with a bf16 branch x): the sum
    is taken in their promoted dtype (with equal dtypes rounded to it first, as an eager add
    rounds). Post-norm (default) returns y in the sum's dtype. ``prenorm=True`` returns
    ``(h, y)``: the new residual stream h in the sum's dtype and its norm y in x's dtype,
    the input of the next sub-layer (``h, y = add_rmsnorm(branch, stream, prenorm=True)``).
    Gradients flow to x, residual and weight.
    """
    _check_float("x", x)
    _check_dim("x", x, dim)
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has shape {tuple(x.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    if weight is not None:
        _check_float("weight", weight)
        if weight.shape != (x.shape[dim],):
            raise ValueError(f"weight must have shape ({x.shape[dim]},) = x.shape[{dim}], got {tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if prenorm and residual is None:
        raise ValueError("prenorm=True needs a residual (the stream that x is added to)")
    return call("add_rmsnorm", x.device, backend, x, residual, dim, eps, weight, prenorm)


def inject(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """The recursion's input injection ``h + (a + b)`` (or ``h + a``), in h's dtype.

    h [...]; a and b of h's dtype, broadcastable to h's shape (e.g. [B, 1, D] or [D] against
    [B, S, D]). ``a + b`` is rounded before h is added, as ``z + (y + x)`` rounds in the TRM
    reference. Gradients: h gets the output's; a and b get it summed over their broadcast axes.
    """
    _check_float("h", h)
    for name, t in (("a", a), ("b", b)):
        if t is None:
            continue
        _check_float(name, t)
        if t.dtype != h.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but h has dtype {h.dtype}")
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}")
        try:
            fits = torch.broadcast_shapes(t.shape, h.shape) == h.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, which does not broadcast to h's {tuple(h.shape)}")
    return call("inject", h.device, backend, h, a, b)


def swiglu(
    gate_up: torch.Tensor, dim: int = -1, backend: str | None = None, *, activation: str = "swiglu"
) -> torch.Tensor:
    """``silu(gate) * up`` on the packed tensor: gate the first half along `dim`, up the second.

    gate_up [..., 2I, ...] (2I along `dim`; -1 for an MLP, -2 for TRM's token mixer's
    [B, 2I, D]) -> [..., I, ...] in gate_up's dtype, computed in fp32 and rounded once. The
    backward recomputes the activation from gate_up (nothing else is saved).
    ``activation="geglu"``: ``gelu(gate, approximate="tanh") * up`` (Gemma's GeGLU) instead.
    """
    _check_float("gate_up", gate_up)
    _check_dim("gate_up", gate_up, dim)
    if gate_up.shape[dim] % 2:
        raise ValueError(f"gate_up must have an even size along dim={dim}, got {gate_up.shape[dim]}")
    if activation not in ("swiglu", "geglu"):
        raise ValueError(f"activation must be 'swiglu' or 'geglu' (gated; relu2 is swiglu_mlp's), got {activation!r}")
    return call("swiglu", gate_up.device, backend, gate_up, dim, activation)


def swiglu_mlp(
    x: torch.Tensor,
    w_gate_up: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    w_down: torch.Tensor,
    backend: str | None = None,
    *,
    activation: str = "swiglu",
) -> torch.Tensor:
    """The SwiGLU MLP ``down(silu(gate) * up)`` with the activation inside the GEMMs.

    x [..., D]; w_gate_up [2I, D] (rows 0..I-1 gate, I..2I-1 up: ``nn.Linear(D, 2I)``'s
    weight); w_down [D, I] (``nn.Linear(I, D)``'s); all one dtype and device (cast the
    weights first); returns [..., D] in it. No biases. Computes what
    ``F.linear(swiglu(F.linear(x, w_gate_up)), w_down)`` computes, with the same roundings
    (the gate|up product and d(act) rounded to the dtype before SwiGLU); gradients flow to
    x and both weights. The triton backend runs the gate|up GEMM with SwiGLU in its epilogue
    (writing [..., I], not [..., 2I]) and, backward, d(gate|up) in the down projection's dgrad
    epilogue, keeping x and gate|up for backward but not the activation; on a GPU it times
    that against cuBLAS + the separate SwiGLU kernel on each signature's first call and runs
    the faster (``TRM_TUNE=off``: always the fused kernels; see ``trm_kernels.tune``).

    ``activation``: ``"swiglu"`` (the default, above), ``"geglu"`` (``gelu(gate,
    approximate="tanh") * up``, Gemma's) or ``"relu2"`` (``relu(x @ w_gate_up^T)^2``, not gated:
    Primer's, Nemotron's; w_gate_up is then [I, D], backward keeps the [..., I] product), the activation
    computed in fp32 from the rounded product and rounded once, its derivative in the dgrad
    epilogue. ``w_gate_up`` may also be the pair ``(w_gate, w_up)`` of two [I, D] weights
    (Llama's gate_proj and up_proj): the kernel reads the up weight at its distance in memory
    from the gate's, with no concatenation, and both get gradients (swiglu and geglu).
    """
    w_gate, w_up = _check_mlp(x, w_gate_up, w_down, activation=activation)
    return call("swiglu_mlp", x.device, backend, x, w_gate, w_down, *_mlp_extra(activation, w_up))


def _mlp_extra(activation: str, w_up: torch.Tensor | None) -> tuple:
    """The backends' trailing (activation, w_up) arguments; none for the packed SwiGLU MLP."""
    return (activation, w_up) if activation != "swiglu" or w_up is not None else ()


def _check_mlp_weights(name: str, x: torch.Tensor, w_gate_up, w_down, axis: str, size: int) -> None:
    """w_gate_up [2I, size] and w_down [size, I] of x's dtype and device (axis: what size is)."""
    for wname, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        _check_float(wname, w)
        if w.dtype != x.dtype:
            raise TypeError(f"{wname} has dtype {w.dtype} but {name} has dtype {x.dtype}")
        if w.device != x.device:
            raise ValueError(f"{wname} is on {w.device} but {name} is on {x.device}")
    if w_gate_up.dim() != 2 or w_gate_up.shape[1] != size or w_gate_up.shape[0] % 2:
        raise ValueError(f"w_gate_up must be [2*inter, {axis}={size}], got shape {tuple(w_gate_up.shape)}")
    if w_down.shape != (size, w_gate_up.shape[0] // 2):
        raise ValueError(f"w_down must be [{axis}, inter] = {(size, w_gate_up.shape[0] // 2)}, "
                         f"got {tuple(w_down.shape)}")  # fmt: skip


def _check_mlp(x: torch.Tensor, w_gate_up, w_down: torch.Tensor, name: str = "x", activation: str = "swiglu"):
    """x, the weights and the activation checked; returns (w_gate_up, None), or (w_gate, w_up)
    for a pair of weights, as the backends take them."""
    _check_float(name, x)
    if activation not in reference.MLP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, reference.MLP_ACTIVATIONS))}, "
                         f"got {activation!r}")  # fmt: skip
    if isinstance(w_gate_up, tuple | list):
        if activation == "relu2":
            raise ValueError("w_gate_up must be one [inter, hidden] weight for activation='relu2' (no up "
                             "projection), got a pair")  # fmt: skip
        if len(w_gate_up) != 2:
            raise ValueError(f"w_gate_up as a pair must be (w_gate, w_up), got {len(w_gate_up)} items")
        _check_unpacked(name, x, {"w_gate_up[0] (gate)": w_gate_up[0], "w_gate_up[1] (up)": w_gate_up[1]}, w_down)
        return w_gate_up[0], w_gate_up[1]
    if activation == "relu2":
        _check_unpacked(name, x, {"w_gate_up": w_gate_up}, w_down)
    else:
        _check_mlp_weights(name, x, w_gate_up, w_down, "hidden", x.shape[-1])
    return w_gate_up, None


def _check_unpacked(name: str, x: torch.Tensor, weights: dict, w_down) -> None:
    """Each of `weights` [inter, hidden] (one inter) and w_down [hidden, inter], x's dtype and device."""
    hidden = x.shape[-1]
    for wname, w in (*weights.items(), ("w_down", w_down)):
        _check_float(wname, w)
        if w.dtype != x.dtype:
            raise TypeError(f"{wname} has dtype {w.dtype} but {name} has dtype {x.dtype}")
        if w.device != x.device:
            raise ValueError(f"{wname} is on {w.device} but {name} is on {x.device}")
    inter = next(iter(weights.values())).shape[0]
    for wname, w in weights.items():
        if w.shape != (inter, hidden):
            raise ValueError(f"{wname} must be [inter, hidden] = {(inter, hidden)}, got {tuple(w.shape)}")
    if w_down.shape != (hidden, inter):
        raise ValueError(f"w_down must be [hidden, inter] = {(hidden, inter)}, got {tuple(w_down.shape)}")


def swiglu_mlp_rmsnorm(
    h: torch.Tensor,
    w_gate_up: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    w_down: torch.Tensor,
    eps: float = 1e-5,
    backend: str | None = None,
    *,
    weight: torch.Tensor | None = None,
    activation: str = "swiglu",
) -> torch.Tensor:
    """A post-norm SwiGLU MLP sub-layer: ``rmsnorm(h + swiglu_mlp(h, w_gate_up, w_down)) [* weight]``.

    h [..., D]; w_gate_up [2I, D] (gate rows first), w_down [D, I]; one dtype and device;
    returns [..., D] in it. The norm is over the last axis, statistics in fp32 with `eps`
    inside the root (``y = s * rsqrt(mean(s^2) + eps) * weight``, s = h + mlp rounded to the
    dtype, y rounded once); ``weight`` [D] is the norm's optional learnable weight (any float
    dtype, h's device, applied in fp32; None, TRM's post-norm blocks: no weight). It computes
    what ``add_rmsnorm(swiglu_mlp(h, ...), h, eps=eps, weight=weight)`` computes; gradients
    flow to h, both projections and the weight (summed over the rows in fp32, rounded once to
    its dtype). On the triton backend the down projection's GEMM adds the residual and
    normalises whole rows (weight included) in its epilogue for hidden D <= 512, after the
    gate|up GEMM with SwiGLU in its own; backward keeps h, gate|up, the pre-norm sum and one
    fp32 rstd per row. For D > 512 (a language model's 2048-8192) the SwiGLU epilogue or
    cuBLAS runs the down GEMM and the add + RMSNorm kernel (rows up to 16,384) normalises:
    a fallback, not an error, whose reason ``trm_kernels.tune.report()`` and ``trm doctor``
    list. On a GPU the first call of each signature times the candidates (the SwiGLU epilogue
    alone, cuBLAS + separate kernels) and runs the fastest (``trm_kernels.tune``).
    ``activation`` and a pair ``(w_gate, w_up)`` for w_gate_up: as :func:`swiglu_mlp`'s (every
    kernel above takes them: the one-kernel sub-layer too).
    """
    w_gate, w_up = _check_mlp(h, w_gate_up, w_down, "h", activation)
    eps = _check_eps(eps)
    if weight is not None:
        _check_norm_weight("weight", weight, h.shape[-1], "h", h)
    extra = _mlp_extra(activation, w_up)
    return call("swiglu_mlp_rmsnorm", h.device, backend, h, w_gate, w_down, eps, weight, *extra)


def linear_add_rmsnorm(
    a: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor,
    eps: float = 1e-5,
    backend: str | None = None,
    *,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer, the residual add and a post-norm: ``rmsnorm(h + a @ w^T) [* weight]``.

    a [..., K]; w [N, K] (``nn.Linear``'s layout, no bias); h [..., N] with a's leading
    shape; one dtype and device; returns [..., N] in it. The norm is over the last axis,
    statistics in fp32 with `eps` inside the root (``y = s * rsqrt(mean(s^2) + eps) * weight``);
    ``weight`` [N] is the norm's optional learnable weight (any float dtype, h's device,
    applied in fp32; None, TRM's attention sub-layer ``h = rmsnorm(h + o_proj(attn))``: no
    weight). It computes what ``add_rmsnorm(F.linear(a, w), h, eps=eps, weight=weight)``
    computes, rounding the product and the sum to the dtype as that does; gradients flow to
    a, w, h and the weight (summed over the rows in fp32, rounded once to its dtype). On the
    triton backend the GEMM adds the residual and normalises whole rows (weight included) in
    its epilogue for N <= 512; backward keeps a, the pre-norm sum and one fp32 rstd per row,
    and runs the norm's backward kernel and two cuBLAS GEMMs. For N > 512 (a language
    model's 2048-8192) cuBLAS's GEMM and the add + RMSNorm kernel (rows up to 16,384) run: a
    fallback, not an error, whose reason ``trm_kernels.tune.report()`` and ``trm doctor``
    list. On a GPU the first call of each signature where both run times the epilogue against
    cuBLAS + the add + RMSNorm kernel and runs the faster (``trm_kernels.tune``).
    """
    _check_float("a", a)
    _check_float("h", h)
    _check_float("w", w)
    for name, t in (("w", w), ("h", h)):
        if t.dtype != a.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but a has dtype {a.dtype}")
        if t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}")
    if w.dim() != 2 or w.shape[1] != a.shape[-1]:
        raise ValueError(f"w must be [out_features, in_features={a.shape[-1]}], got shape {tuple(w.shape)}")
    if h.shape != (*a.shape[:-1], w.shape[0]):
        raise ValueError(f"h must be {(*a.shape[:-1], w.shape[0])} (a's leading shape, w's out_features), "
                         f"got {tuple(h.shape)}")  # fmt: skip
    eps = _check_eps(eps)
    if weight is not None:
        _check_norm_weight("weight", weight, h.shape[-1], "h", h)
    return call("linear_add_rmsnorm", h.device, backend, a, w, h, eps, weight)


def concat_linear(
    x: torch.Tensor,
    e: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """A linear layer on a concatenation, ``F.linear(torch.cat([x, e], -1), weight, bias)``,
    without making the concatenation: a recurrent-depth LM's adapter (Huginn's
    ``adapter(cat([state, embeds], -1))``, an ``nn.Linear(Kx + Ke, N)``).

    x [..., Kx]; e [..., Ke] with x's leading shape; weight [N, Kx + Ke] (``nn.Linear``'s
    layout: columns 0..Kx-1 multiply x, Kx.. multiply e); bias [N] or None; all one dtype and
    device (cast the weights first); returns [..., N] in it. Gradients flow to x, e, weight and
    bias. The triton backend runs one GEMM over x's columns, then e's, into one fp32
    accumulator (the bias added in fp32, the result rounded once); backward multiplies by the
    weight's column blocks and writes the weight gradient's two blocks into one buffer (cuBLAS).
    On a GPU the first call of each signature times that against ``torch.cat`` + cuBLAS and runs
    the faster (``trm_kernels.tune``); fp32 on a GPU takes the composition.
    """
    _check_float("x", x)
    for name, t in (("e", e), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _check_float(name, t)
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for name, t in (("x", x), ("e", e)):
        if t.dim() == 0:
            raise ValueError(f"{name} must be [..., features], got a 0-dim tensor")
    if e.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"e has shape {tuple(e.shape)} but must have x's leading shape {tuple(x.shape[:-1])} "
                         f"(x has shape {tuple(x.shape)})")  # fmt: skip
    k = x.shape[-1] + e.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be [out_features, Kx + Ke = {x.shape[-1]} + {e.shape[-1]} = {k}], "
                         f"got shape {tuple(weight.shape)}")  # fmt: skip
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) = weight.shape[0], got {tuple(bias.shape)}")
    return call("concat_linear", x.device, backend, x, e, weight, bias)


def sandwich_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    next_weight: torch.Tensor,
    eps: float = 1e-5,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sandwich block's closing norm and the next sub-layer's input norm as one op:
    returns ``(stream, next_input)``.

    Huginn-style recurrent-depth blocks: ``x = norm_2(x + attn(norm_1(x)))``, then
    ``norm_3(x)`` is the MLP's input: ``stream, mlp_in = sandwich_rmsnorm(attn_out, x,
    norm_2.weight, norm_3.weight)``. Over the last axis, statistics in fp32 with `eps` inside
    the root: ``stream = (x + residual) * rsqrt(mean((x + residual)^2) + eps) * weight``
    rounded to the sum's dtype, and ``next_input = stream * rsqrt(mean(stream^2) + eps) *
    next_weight`` from the rounded stream, in its dtype: exactly what ``s = add_rmsnorm(x,
    residual, eps=eps, weight=weight)`` and ``add_rmsnorm(s, eps=eps, weight=next_weight)``
    compute. x and residual [..., N] of one shape and device; their dtypes may differ (a bf16
    branch on an fp32 stream: the sum in the promoted dtype, as add_rmsnorm takes it); weight
    and next_weight [N], any float dtype, applied in fp32. Gradients flow to x, residual,
    weight and next_weight (the weights' summed over the rows in fp32, rounded once to their
    dtype). The triton backend is one kernel forward (both norms in one pass over each row;
    it saves one fp32 rstd per row and norm) and one backward (recomputing the sum and the
    stream), rows of up to 16,384 elements; `auto` runs the reference beyond.
    """
    _check_float("x", x)
    _check_float("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)} but x has shape {tuple(x.shape)}")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    for name, w in (("weight", weight), ("next_weight", next_weight)):
        _check_norm_weight(name, w, x.shape[-1], "x", x)
    eps = _check_eps(eps)
    return call("sandwich_rmsnorm", x.device, backend, x, residual, weight, next_weight, eps)


def token_mlp_rmsnorm(
    h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float = 1e-5, backend: str | None = None
) -> torch.Tensor:
    """TRM's ``mlp_t`` sub-layer: ``rmsnorm over S of (h + W_down @ swiglu(W_gate_up @ h))``.

    h [B, S, D]; w_gate_up [2I, S] (gate rows first); w_down [S, I]; all one dtype (cast the
    weights first); returns [B, S, D] in it. Each batch element is multiplied by the weights
    from the left (no transposes; the weight gradients are summed over the batch in fp32 and
    rounded once). The triton backend runs it as one kernel that never writes the [B, 2I, D]
    intermediate (S <= 256). With grad that kernel also writes the pre-norm sum and rstd, all
    its backward keeps, and the backward recomputes gate|up by one batched GEMM; on a GPU the
    first call of each signature times that against the composition of the fused elementwise
    ops, which keeps every intermediate, and runs the faster (``trm_kernels.tune``).
    """
    _check_float("h", h)
    if h.dim() != 3:
        raise ValueError(f"h must be [batch, seq, hidden], got shape {tuple(h.shape)}")
    _check_mlp_weights("h", h, w_gate_up, w_down, "seq", h.shape[1])
    return call("token_mlp_rmsnorm", h.device, backend, h, w_gate_up, w_down, eps)


from .attention_ops import kv_cache_attention, rope_attention  # noqa: E402


def _check_ce(logits: torch.Tensor, labels: torch.Tensor) -> None:
    _check_float("logits", logits)
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}, expected logits' shape without the last axis "
            f"{tuple(logits.shape[:-1])}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")


def stablemax_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, backend: str | None = None
) -> torch.Tensor:
    """Per-token stablemax cross-entropy: ``-log(s(x_y) / sum_j s(x_j))``, s(x) = x + 1 (x >= 0),
    1 / (1 - x) (x < 0).

    logits [..., V] (any float dtype), labels [...] integer; returns labels' shape in float64
    (the TRM reference's dtype; the triton backend computes in fp32), 0 where the label is
    `ignore_index`, NaN for a label outside [0, V) on every backend (not checked: a check
    would cost a device synchronisation). Reduce it yourself (TRM: per sequence, sum / count).
    """
    _check_ce(logits, labels)
    return call("stablemax_cross_entropy", logits.device, backend, logits, labels, ignore_index)


def softmax_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, backend: str | None = None
) -> torch.Tensor:
    """Per-token softmax cross-entropy: logits [..., V], labels [...] integer; returns labels'
    shape in fp32 (float64 for float64 logits), 0 at `ignore_index`, NaN for a label outside
    [0, V) on every backend."""
    _check_ce(logits, labels)
    return call("softmax_cross_entropy", logits.device, backend, logits, labels, ignore_index)


from . import nn  # noqa: E402  (modules built on the ops above)
from .patch import PatchReport, patch  # noqa: E402
