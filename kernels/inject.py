"""The recursion's input injection h + (a + b) in one pass (Triton).

a + b is rounded to the storage dtype before h is added, exactly as the reference's two
eager adds round, so the fused result equals the reference bit for bit. The gradient
of every input is the output gradient itself: the backward needs no kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import check_input

BLOCK = 2048


@triton.jit
def _inject(H, A, B, OUT, n, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    inj = tl.load(A + i, mask=mask, other=0.0)
    if HAS_B:
        inj = (inj.to(tl.float32) + tl.load(B + i, mask=mask, other=0.0).to(tl.float32)).to(OUT.dtype.element_ty)
    h = tl.load(H + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + i, (h + inj.to(tl.float32)).to(OUT.dtype.element_ty), mask=mask)


@torch.library.custom_op("trm::inject", mutates_args=())
def inject_fwd(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    has_b = b is not None
    h, a = h.contiguous(), a.contiguous()
    b = b.contiguous() if has_b else a
    out = torch.empty_like(h)
    n = h.numel()
    _inject[(triton.cdiv(n, BLOCK),)](h, a, b, out, n, HAS_B=has_b, BLOCK=BLOCK)
    return out


@inject_fwd.register_fake
def _(h, a, b):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    ctx.has_b = inputs[2] is not None


def _backward(ctx, dout):
    return dout, dout, (dout if ctx.has_b else None)


inject_fwd.register_autograd(_backward, setup_context=_setup)


def inject(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    check_input("h", h)
    return inject_fwd(h, a, b)
