"""trm_kernels: the fused ops of the TRM recursion, usable in any recursive model.

Every op validates its arguments once here, then runs the implementation chosen by
:mod:`trm_kernels.backend` (``reference`` PyTorch everywhere; fused backends where
registered). Semantics are those of :mod:`trm_kernels.reference`.

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
]

rope_cos_sin = reference.rope_cos_sin

_OPS = ("add_rmsnorm", "inject", "swiglu", "token_mlp_rmsnorm", "rope_attention", "stablemax_cross_entropy",
        "softmax_cross_entropy")  # fmt: skip
for _name in _OPS:
    register(_name, "reference", getattr(reference, _name))

try:  # the fused backends register themselves where their toolchain is importable
    import triton  # noqa: F401
except ImportError:
    pass
else:
    from . import attention as _attention
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
    register("token_mlp_rmsnorm", "triton", _token_mlp.token_mlp_rmsnorm, takes)
    register("stablemax_cross_entropy", "triton", _ce.stablemax_cross_entropy, takes)
    register("softmax_cross_entropy", "triton", _ce.softmax_cross_entropy, takes)

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


def add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    dim: int = -1,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """rmsnorm(x + residual) over axis `dim` (-1: hidden; -2: sequence, as in ``mlp_t``)."""
    _check_float("x", x)
    _check_dim("x", x, dim)
    if residual is not None:
        _check_same("residual", residual, "x", x)
    return call("add_rmsnorm", x.device, backend, x, residual, dim, eps)


def inject(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """h + (a + b) (or h + a): the recursion's input injection."""
    _check_float("h", h)
    _check_same("a", a, "h", h)
    if b is not None:
        _check_same("b", b, "h", h)
    return call("inject", h.device, backend, h, a, b)


def swiglu(gate_up: torch.Tensor, dim: int = -1, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up on the packed [gate | up] tensor, split along `dim`."""
    _check_float("gate_up", gate_up)
    _check_dim("gate_up", gate_up, dim)
    if gate_up.shape[dim] % 2:
        raise ValueError(f"gate_up must have an even size along dim={dim}, got {gate_up.shape[dim]}")
    return call("swiglu", gate_up.device, backend, gate_up, dim)


def token_mlp_rmsnorm(
    h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float = 1e-5, backend: str | None = None
) -> torch.Tensor:
    """The ``mlp_t`` sub-layer: rmsnorm over the sequence of h + W_down @ swiglu(W_gate_up @ h).

    h [B, S, D]; w_gate_up [2I, S] (gate rows first); w_down [S, I]. Where no gradient is
    needed (the no-grad recursion, evaluation) the triton backend runs it as one kernel
    that never writes the [B, 2I, D] intermediate; with grad it composes the fused ops,
    which keep what their backward needs.
    """
    _check_float("h", h)
    if h.dim() != 3:
        raise ValueError(f"h must be [batch, seq, hidden], got shape {tuple(h.shape)}")
    seq = h.shape[1]
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        _check_float(name, w)
        if w.dtype != h.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but h has dtype {h.dtype}")
        if w.device != h.device:
            raise ValueError(f"{name} is on {w.device} but h is on {h.device}")
    if w_gate_up.dim() != 2 or w_gate_up.shape[1] != seq or w_gate_up.shape[0] % 2:
        raise ValueError(f"w_gate_up must be [2*inter, seq={seq}], got shape {tuple(w_gate_up.shape)}")
    if w_down.shape != (seq, w_gate_up.shape[0] // 2):
        raise ValueError(f"w_down must be [seq, inter] = {(seq, w_gate_up.shape[0] // 2)}, got {tuple(w_down.shape)}")
    return call("token_mlp_rmsnorm", h.device, backend, h, w_gate_up, w_down, eps)


def rope_attention(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, backend: str | None = None
) -> torch.Tensor:
    """Non-causal attention with RoPE; qkv [B, S, 3*H*d] as [q | k | v] heads -> [B, S, H*d]."""
    _check_float("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [batch, seq, 3*heads*head_dim], got shape {tuple(qkv.shape)}")
    if num_heads <= 0 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv's last dim {qkv.shape[-1]} is not divisible by 3*num_heads={3 * num_heads}")
    head_dim = qkv.shape[-1] // (3 * num_heads)
    for name, t in (("cos", cos), ("sin", sin)):
        _check_float(name, t)
        if t.shape != (qkv.shape[1], head_dim):
            raise ValueError(f"{name} must have shape {(qkv.shape[1], head_dim)}, got {tuple(t.shape)}")
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but qkv is on {qkv.device}")
    return call("rope_attention", qkv.device, backend, qkv, cos, sin, num_heads)


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
    """Per-token stablemax cross-entropy (float64 out, as the TRM reference's), 0 at ignored labels."""
    _check_ce(logits, labels)
    return call("stablemax_cross_entropy", logits.device, backend, logits, labels, ignore_index)


def softmax_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, backend: str | None = None
) -> torch.Tensor:
    """Per-token softmax cross-entropy (fp32 out), 0 at ignored labels."""
    _check_ce(logits, labels)
    return call("softmax_cross_entropy", logits.device, backend, logits, labels, ignore_index)
