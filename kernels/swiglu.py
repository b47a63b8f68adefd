"""SwiGLU (and GeGLU) on the packed [gate | up] tensor (Triton), forward and backward.

out = silu(gate) * up (``activation="geglu"``: gelu_tanh(gate) * up, Gemma's). The tensor
is seen as [outer, 2, half]: gate is the first half of the split axis, up the second. For
the last axis half = I; for the sequence axis of ``mlp_t`` ([B, 2I, D]) half = I * D, with
no copies either way. The backward recomputes the activation from gate and up (nothing but
the input is saved) and writes d(gate) and d(up) into one packed gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import check_input, launch, split_at

BLOCK = 1024
GATED = ("swiglu", "geglu")  # silu(gate) * up, gelu_tanh(gate) * up


@triton.jit
def _gelu_sigmoid(g):
    """sigmoid(2 t), t = sqrt(2 / pi) (g + 0.044715 g^3): gelu_tanh(g) = 0.5 g (1 + tanh(t)) =
    g times this, as F.gelu(approximate="tanh") defines it (no tanh needed)."""
    return tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))


@triton.jit
def _gate(g, ACTIVATION: tl.constexpr):
    """The gate's activation f(g) and its derivative f'(g), fp32: silu, or gelu_tanh = g s with
    s = sigmoid(z), z = 2 sqrt(2 / pi) (g + 0.044715 g^3)."""
    if ACTIVATION == "geglu":
        s = _gelu_sigmoid(g)
        f = g * s
        df = s + f * (1 - s) * (1.5957691216057308 * (1 + 3 * 0.044715 * g * g))
    else:
        s = tl.sigmoid(g)
        f = g * s
        df = s + f * (1 - s)
    return f, df


@triton.jit
def _swiglu_fwd(GU, OUT, n_out, half, BLOCK: tl.constexpr, ACTIVATION: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_out
    g_off = (i // half) * (2 * half) + i % half
    g = tl.load(GU + g_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + g_off + half, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == "geglu":
        f = g * _gelu_sigmoid(g)
    else:
        f = g * tl.sigmoid(g)
    tl.store(OUT + i, (f * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DOUT, GU, DGU, n_out, half, BLOCK: tl.constexpr, ACTIVATION: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_out
    g_off = (i // half) * (2 * half) + i % half
    g = tl.load(GU + g_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + g_off + half, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(DOUT + i, mask=mask, other=0.0).to(tl.float32)
    f, df = _gate(g, ACTIVATION)
    tl.store(DGU + g_off, (d * u * df).to(DGU.dtype.element_ty), mask=mask)
    tl.store(DGU + g_off + half, (d * f).to(DGU.dtype.element_ty), mask=mask)


def _out_shape(shape: torch.Size, dim: int) -> list[int]:
    out = list(shape)
    out[dim] //= 2
    return out


def _half(shape: torch.Size, dim: int) -> int:
    _, n, inner = split_at(shape, dim)
    return (n // 2) * inner


@torch.library.custom_op("trm::swiglu", mutates_args=())
def swiglu_fwd(gate_up: torch.Tensor, dim: int, activation: str = "swiglu") -> torch.Tensor:
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(_out_shape(gate_up.shape, dim))
    n = out.numel()
    launch(_swiglu_fwd, (triton.cdiv(n, BLOCK),), gate_up, out, n, _half(gate_up.shape, dim), BLOCK=BLOCK,
           ACTIVATION=activation)  # fmt: skip
    return out


@swiglu_fwd.register_fake
def _(gate_up, dim, activation="swiglu"):
    return gate_up.new_empty(_out_shape(gate_up.shape, dim))


@torch.library.custom_op("trm::swiglu_backward", mutates_args=())
def swiglu_bwd(dout: torch.Tensor, gate_up: torch.Tensor, dim: int, activation: str = "swiglu") -> torch.Tensor:
    dout, gate_up = dout.contiguous(), gate_up.contiguous()
    dgu = torch.empty_like(gate_up)
    n = dout.numel()
    launch(_swiglu_bwd, (triton.cdiv(n, BLOCK),), dout, gate_up, dgu, n, _half(gate_up.shape, dim), BLOCK=BLOCK,
           ACTIVATION=activation)  # fmt: skip
    return dgu


@swiglu_bwd.register_fake
def _(dout, gate_up, dim, activation="swiglu"):
    return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.dim, ctx.activation = inputs[1], inputs[2] if len(inputs) > 2 else "swiglu"


def _backward(ctx, dout):
    (gate_up,) = ctx.saved_tensors
    return swiglu_bwd(dout, gate_up, ctx.dim, ctx.activation), None, None


swiglu_fwd.register_autograd(_backward, setup_context=_setup)


def swiglu(gate_up: torch.Tensor, dim: int = -1, activation: str = "swiglu") -> torch.Tensor:
    check_input("gate_up", gate_up)
    if activation not in GATED:
        raise ValueError(f"swiglu: activation must be one of {', '.join(map(repr, GATED))}, got {activation!r}")
    return swiglu_fwd(gate_up, dim % gate_up.dim(), activation)
