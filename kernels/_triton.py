"""What every Triton op file shares: can a kernel run here, and shape bookkeeping.

Ops are registered with ``torch.library.custom_op`` plus an explicit fake implementation.
They are opaque to Inductor, which is what we want (the kernel is already the fusion).
Unlike ``triton_op``, they also pass ``opcheck`` on CPU under the Triton interpreter.
"""

from __future__ import annotations

import math
import os
import warnings

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why the Triton interpreter cannot run our kernels with these versions, or None.

    Triton before 3.8 turns a runtime loop bound into a Python int with ``int(array)`` on a
    one-element array, which NumPy 2.4 no longer allows. Every kernel that loops over a
    runtime length (attention's key and query blocks) then fails with "only 0-dimensional
    arrays can be converted to Python scalars". Compiled kernels (on a GPU) are unaffected.
    """
    if _version(triton_version) < (3, 8) and _version(numpy_version) >= (2, 4):
        return (
            f"the Triton interpreter of triton {triton_version} cannot run with numpy {numpy_version}: "
            "loops over a runtime length fail. Install numpy<2.4 or triton>=3.8 to use TRITON_INTERPRET=1"
        )
    return None


if interpreting():
    import numpy
    import triton

    if (_problem := interpreter_problem(triton.__version__, numpy.__version__)) is not None:
        warnings.warn(_problem, stacklevel=2)


FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton decides at import of a kernel module whether its kernels are interpreted: a
# TRITON_INTERPRET=1 set later leaves them compiled for a GPU ("0 active drivers" on a CPU).
INTERPRETED = interpreting()


def _interpretable(t: torch.Tensor) -> bool:
    """A CPU tensor the interpreter can run our kernels on: not bf16 (the interpreter's bf16
    arithmetic and tl.dot return wrong values silently), and the interpreter chosen in time."""
    return t.device.type == "cpu" and INTERPRETED and interpreting() and t.dtype != torch.bfloat16


def takes(t: torch.Tensor, *_args) -> bool:
    """Whether a Triton kernel can run on `t` here: a supported dtype, on a device it runs on."""
    return t.dtype in FUSED_DTYPES and (t.is_cuda or _interpretable(t))


def check_input(name: str, t: torch.Tensor) -> None:
    """Triton kernels take fp32/fp16/bf16 CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    Meta tensors pass too: they run the op's fake implementation, which gives the output
    shapes without a kernel (how trm_benchmarks.roofline counts a step on any machine)."""
    if t.dtype not in FUSED_DTYPES:
        raise TypeError(
            f"{name} is {t.dtype}: the triton backend takes float32/float16/bfloat16; "
            "use backend='reference' for float64"
        )
    if t.is_cuda or t.is_meta or _interpretable(t):
        return
    if t.device.type == "cpu" and interpreting() and not INTERPRETED:
        raise RuntimeError(
            f"{name} is on the CPU, and TRITON_INTERPRET=1 was set after trm_kernels was imported: Triton "
            "compiled the kernels for a GPU at import. Set it before importing (in the shell, or first thing "
            "in the script)"
        )
    if t.device.type == "cpu" and interpreting():
        raise TypeError(
            f"{name} is bfloat16 on the CPU: the Triton interpreter computes bf16 wrongly (its arithmetic and "
            "tl.dot give wrong values without an error); use float32/float16 there, or backend='reference'"
        )
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


def precision(t: torch.Tensor) -> str:
    """tl.dot's input_precision for t's dtype: fp32 gets IEEE products, as PyTorch's fp32
    matmul and attention do (Triton would use tf32); half types their own."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will want a gradient of any of `tensors` from the op about to run."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
