"""What every Triton op file shares: can a kernel run here, and shape bookkeeping.

Ops are registered with ``torch.library.custom_op`` plus an explicit fake implementation.
They are opaque to Inductor, which is what we want (the kernel is already the fusion).
Unlike ``triton_op``, they also pass ``opcheck`` on CPU under the Triton interpreter.
"""

from __future__ import annotations

import math
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def takes(t: torch.Tensor, *_args) -> bool:
    """Whether a Triton kernel can run on `t` here: a supported dtype, on a device it runs on."""
    return t.dtype in FUSED_DTYPES and (t.is_cuda or (t.device.type == "cpu" and interpreting()))


def check_input(name: str, t: torch.Tensor) -> None:
    """Triton kernels take fp32/fp16/bf16 CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    if t.dtype not in FUSED_DTYPES:
        raise TypeError(
            f"{name} is {t.dtype}: the triton backend takes float32/float16/bfloat16; "
            "use backend='reference' for float64"
        )
    if t.is_cuda or (t.device.type == "cpu" and interpreting()):
        return
    raise ValueError(
        f"{name} is on {t.device}: the triton backend needs CUDA tensors "
        "(or CPU tensors with TRITON_INTERPRET=1 set before import); use backend='reference'"
    )


def split_at(shape: torch.Size, dim: int) -> tuple[int, int, int]:
    """(outer, n, inner): the tensor seen as [outer, n, inner] with `dim` the middle axis."""
    dim = dim % len(shape)
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
