"""trm_kernels: the fused ops of the TRM recursion, usable in any recursive model.

Every op validates its arguments once here, then runs the implementation chosen by
:mod:`trm_kernels.backend` (``reference`` PyTorch everywhere; fused backends where
registered). Semantics are those of :mod:`trm_kernels.reference`. Modules built on the
ops are in :mod:`trm_kernels.nn`; :func:`patch` runs existing TRM / HRM code on them in one
call. The guide is kernels/README.md.

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
from .verify import get_verify, set_verify, use_verify

__all__ = [
    "add_rmsnorm",
    "inject",
    "swiglu",
    "swiglu_mlp",
    "swiglu_mlp_rmsnorm",
    "linear_add_rmsnorm",
    "token_mlp_rmsnorm",
    "rope_attention",
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

rope_cos_sin = reference.rope_cos_sin  # (seq_len, head_dim, base=10000.0) -> fp32 cos, sin [seq_len, head_dim]

_OPS = ("add_rmsnorm", "inject", "swiglu", "swiglu_mlp", "swiglu_mlp_rmsnorm", "linear_add_rmsnorm",
        "token_mlp_rmsnorm", "rope_attention", "stablemax_cross_entropy", "softmax_cross_entropy")  # fmt: skip
for _name in _OPS:
    register(_name, "reference", getattr(reference, _name))

try:  # the fused backends register themselves where their toolchain is importable
    import triton  # noqa: F401
except ImportError:
    pass
else:
    from . import attention as _attention
    from . import channel_mlp as _channel_mlp
    from . import cross_entropy as _ce
    from . import inject as _inject
    from . import rmsnorm as _rmsnorm
    from . import swiglu as _swiglu
    from . import token_mlp as _token_mlp
    from ._triton import takes

    register("add_rmsnorm", "triton", _rmsnorm.add_rmsnorm, _rmsnorm.supports)
    if torch.version.cuda is not None:  # a CUDA build of torch: the extension can be built or loaded
        register("add_rmsnorm", "cuda", _rmsnorm.add_rmsnorm_cuda, _rmsnorm.supports)
    register("rope_attention", "triton", _attention.rope_attention, _attention.supports)
    register("inject", "triton", _inject.inject, takes)
    register("swiglu", "triton", _swiglu.swiglu, takes)
    register("swiglu_mlp", "triton", _channel_mlp.swiglu_mlp, takes)
    register("swiglu_mlp_rmsnorm", "triton", _channel_mlp.swiglu_mlp_rmsnorm, takes)
    register("linear_add_rmsnorm", "triton", _channel_mlp.linear_add_rmsnorm, takes)
    register("token_mlp_rmsnorm", "triton", _token_mlp.token_mlp_rmsnorm, _token_mlp.supports)
    register("stablemax_cross_entropy", "triton", _ce.stablemax_cross_entropy, _ce.supports)
    register("softmax_cross_entropy", "triton", _ce.softmax_cross_entropy, _ce.supports)

_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT:
        raise TypeError(f"{name} must be float64/float32/float16/bfloat16, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def _check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    _check_float(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_dim(name: str, t: torch.Tensor, dim: int) -> None:
    if not -t.dim() <= dim < t.dim():
        raise ValueError(f"dim={dim} is out of range for {name} of rank {t.dim()}")


def _check_heads(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


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


def swiglu(gate_up: torch.Tensor, dim: int = -1, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` on the packed tensor: gate the first half along `dim`, up the second.

    gate_up [..., 2I, ...] (2I along `dim`; -1 for an MLP, -2 for TRM's token mixer's
    [B, 2I, D]) -> [..., I, ...] in gate_up's dtype, computed in fp32 and rounded once. The
    backward recomputes the activation from gate_up (nothing else is saved).
    """
    _check_float("gate_up", gate_up)
    _check_dim("gate_up", gate_up, dim)
    if gate_up.shape[dim] % 2:
        raise ValueError(f"gate_up must have an even size along dim={dim}, got {gate_up.shape[dim]}")
    return call("swiglu", gate_up.device, backend, gate_up, dim)


def swiglu_mlp(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, backend: str | None = None
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
    """
    _check_mlp(x, w_gate_up, w_down)
    return call("swiglu_mlp", x.device, backend, x, w_gate_up, w_down)


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


def _check_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, name: str = "x") -> None:
    _check_float(name, x)
    _check_mlp_weights(name, x, w_gate_up, w_down, "hidden", x.shape[-1])


def swiglu_mlp_rmsnorm(
    h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float = 1e-5, backend: str | None = None
) -> torch.Tensor:
    """A post-norm SwiGLU MLP sub-layer: ``rmsnorm(h + swiglu_mlp(h, w_gate_up, w_down))``.

    h [..., D]; w_gate_up [2I, D] (gate rows first), w_down [D, I]; one dtype and device;
    returns [..., D] in it. The norm is over the last axis with no weight (TRM's post-norm
    blocks: ``h = rmsnorm(h + mlp(h))``), statistics in fp32; it computes what
    ``add_rmsnorm(swiglu_mlp(h, ...), h, eps=eps)`` computes. On the triton backend the
    down projection's GEMM adds the residual and normalises whole rows in its epilogue
    (hidden <= 512), after the gate|up GEMM with SwiGLU in its own; backward keeps h,
    gate|up, the pre-norm sum and one fp32 rstd per row. On a GPU the first call of each
    signature times that against the SwiGLU epilogue alone and against cuBLAS + separate
    kernels, and runs the fastest (``trm_kernels.tune``).
    """
    _check_mlp(h, w_gate_up, w_down, "h")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return call("swiglu_mlp_rmsnorm", h.device, backend, h, w_gate_up, w_down, float(eps))


def linear_add_rmsnorm(
    a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, eps: float = 1e-5, backend: str | None = None
) -> torch.Tensor:
    """A linear layer, the residual add and a post-norm: ``rmsnorm(h + a @ w^T)``.

    a [..., K]; w [N, K] (``nn.Linear``'s layout, no bias); h [..., N] with a's leading
    shape; one dtype and device; returns [..., N] in it. The norm is over the last axis with
    no weight, statistics in fp32 (TRM's attention sub-layer: ``h = rmsnorm(h + o_proj(attn))``);
    it computes what ``add_rmsnorm(F.linear(a, w), h, eps=eps)`` computes, rounding the
    product and the sum to the dtype as that does. On the triton backend the GEMM adds the
    residual and normalises whole rows in its epilogue (N <= 512); backward keeps a, the
    pre-norm sum and one fp32 rstd per row, and runs the norm's backward kernel and two
    cuBLAS GEMMs. On a GPU the first call of each signature times that against cuBLAS + the
    add + RMSNorm kernel and runs the faster (``trm_kernels.tune``).
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
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return call("linear_add_rmsnorm", h.device, backend, a, w, h, float(eps))


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
) -> torch.Tensor:
    """Multi-head attention on a packed projection, RoPE applied inside; returns [B, S, H * d].

    qkv [B, S, (H + 2 * KVH) * d]: H query heads, then KVH key heads, then KVH value heads,
    each d wide (``num_kv_heads`` KVH defaults to H; KVH < H is grouped-query attention,
    query head h using key/value head h // (H / KVH); 1 is multi-query). fp32/fp16/bf16 (float64
    on the reference backend). cos, sin [S, d] fp32 tables in the rotate-half convention
    (``rope_cos_sin``), or both None for no rotation (then ``head_dim`` lets the layout be
    checked). Scale 1/sqrt(d). ``causal``: query i attends keys j <= i. ``key_mask`` [B, S]
    bool: False marks padding keys, never attended (lengths L: ``torch.arange(S) < L[:, None]``).
    A query with no key to attend gets 0. The output has qkv's dtype; the gradient is one
    packed dqkv. Triton: d even in 32..128.
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
    if cos is not None:
        _check_float("cos", cos)
        if cos.dim() != 2:
            raise ValueError(f"cos must be [seq, head_dim], got shape {tuple(cos.shape)}")
        head_dim = _check_heads("head_dim", head_dim) if head_dim is not None else cos.shape[1]
    kv = _layout(qkv.shape[-1], num_heads, num_kv_heads, head_dim)
    d = qkv.shape[-1] // (num_heads + 2 * kv)
    for name, t in (("cos", cos), ("sin", sin)):
        if t is None:
            continue
        _check_float(name, t)
        if t.shape != (qkv.shape[1], d):
            raise ValueError(f"{name} must have shape {(qkv.shape[1], d)}, got {tuple(t.shape)}")
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but qkv is on {qkv.device}")
    if cos is not None and d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            got = getattr(key_mask, "dtype", type(key_mask).__name__)
            raise TypeError(f"key_mask must be a bool tensor, got {got}")
        if key_mask.shape != qkv.shape[:2]:
            raise ValueError(f"key_mask must be [batch, seq] = {tuple(qkv.shape[:2])}, got {tuple(key_mask.shape)}")
        if key_mask.device != qkv.device:
            raise ValueError(f"key_mask is on {key_mask.device} but qkv is on {qkv.device}")
    return call("rope_attention", qkv.device, backend, qkv, cos, sin, num_heads, kv, bool(causal), key_mask)


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
