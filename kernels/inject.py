"""The recursion's input injection h + (a + b) in one pass (Triton).

a + b is rounded to the storage dtype before h is added, exactly as the reference's two
eager adds round, so the fused result equals the reference bit for bit. a and b may
broadcast to h (e.g. [B, 1, D] against [B, S, D]): the kernel reads them through strides
with zeros on the broadcast axes, as h is seen as [d0, d1, d2]. The gradient of h is the
output gradient itself; that of a broadcast injection is it summed over the broadcast axes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton import check_input, launch

BLOCK = 2048


@triton.jit
def _strided(i, d1, d2, s0, s1, s2):
    """Offsets of the flat indices i of a [d0, d1, d2] tensor in a tensor with strides (s0, s1, s2)."""
    return (i // (d1 * d2)) * s0 + ((i // d2) % d1) * s1 + (i % d2) * s2


@triton.jit
def _inject(
    H, A, B, OUT, n, d1, d2, a0, a1, a2, b0, b1, b2,
    HAS_B: tl.constexpr, BROADCAST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    a_off, b_off = i, i
    if BROADCAST:
        a_off, b_off = _strided(i, d1, d2, a0, a1, a2), _strided(i, d1, d2, b0, b1, b2)
    inj = tl.load(A + a_off, mask=mask, other=0.0)
    if HAS_B:
        inj = (inj.to(tl.float32) + tl.load(B + b_off, mask=mask, other=0.0).to(tl.float32)).to(OUT.dtype.element_ty)
    h = tl.load(H + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + i, (h + inj.to(tl.float32)).to(OUT.dtype.element_ty), mask=mask)


def _padded(t: torch.Tensor, shape: torch.Size) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`shape` and t's strides when broadcast to it, with leading axes of size 1 up to rank 3."""
    pad = max(0, 3 - len(shape))
    return (1,) * pad + tuple(shape), (0,) * pad + t.expand(shape).stride()


def _as_3d(shape: torch.Size) -> tuple[int, int, int]:
    """h's shape seen as [d0, d1, d2]: the leading axes merged."""
    padded = (1,) * max(0, 3 - len(shape)) + tuple(shape)
    return math.prod(padded[:-2]), padded[-2], padded[-1]


def _strides(t: torch.Tensor, shape: torch.Size) -> tuple[int, int, int] | None:
    """t's strides broadcast to `shape` seen as [d0, d1, d2] (0 on broadcast axes), or None
    when its leading axes do not merge into one (e.g. [B, 1, 1, D] against [B, T, S, D])."""
    sizes, strides = _padded(t, shape)
    lead = [(st, size) for st, size in zip(strides[:-2], sizes[:-2], strict=True) if size > 1]
    if not all(st == nxt * size for (st, _), (nxt, size) in zip(lead, lead[1:], strict=False)):
        return None
    return (lead[-1][0] if lead else 0), strides[-2], strides[-1]


@torch.library.custom_op("trm::inject", mutates_args=())
def inject_fwd(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    has_b = b is not None
    h = h.contiguous()
    n = h.numel()
    _, d1, d2 = _as_3d(h.shape)
    broadcast = a.shape != h.shape or (has_b and b.shape != h.shape)
    strides = []
    for t in (a, b if has_b else a):
        t = t.contiguous()
        if broadcast and _strides(t, h.shape) is None:  # read through three strides where possible, else expanded
            t = t.expand(h.shape).contiguous()
        strides.append((t, _strides(t, h.shape) if broadcast else (0, 0, 0)))
    (a, a_strides), (b, b_strides) = strides
    out = torch.empty_like(h)
    launch(_inject, (triton.cdiv(n, BLOCK),), h, a, b, out, n, d1, d2, *a_strides, *b_strides, HAS_B=has_b,
           BROADCAST=broadcast, BLOCK=BLOCK)  # fmt: skip
    return out


@inject_fwd.register_fake
def _(h, a, b):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    h, a, b = inputs
    ctx.shapes = (a.shape, b.shape if b is not None else None)


def _backward(ctx, dout):
    a_shape, b_shape = ctx.shapes
    da = dout if a_shape == dout.shape else dout.sum_to_size(a_shape)
    db = None if b_shape is None else (dout if b_shape == dout.shape else dout.sum_to_size(b_shape))
    return dout, da, db


inject_fwd.register_autograd(_backward, setup_context=_setup)


def inject(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    check_input("h", h)
    return inject_fwd(h, a, b)
