"""What every Triton op file shares: can a kernel run here, and shape bookkeeping.

Ops are registered with ``torch.library.custom_op`` plus an explicit fake implementation.
They are opaque to Inductor, which is what we want (the kernel is already the fusion).
Unlike ``triton_op``, they also pass ``opcheck`` on CPU under the Triton interpreter.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator

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


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will want a gradient of any of `tensors` (None: an absent optional
    input) from the op about to run."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- launches: every kernel of the package starts through `launch` ---------------------------

# CUDA's limits on a launch grid (programs along x, y, z): the interpreter runs any grid, a
# GPU refuses a larger one with "invalid argument" at launch. The kernels put every product
# that grows with the batch on axis x (as one flattened program index), so y and z stay small.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def grid_problem(grid: tuple[int, ...]) -> str | None:
    """Why CUDA cannot launch `grid`, or None."""
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS, strict=False)):
        if n > limit:
            return f"{n:,} programs along grid axis {'xyz'[axis]}, over CUDA's limit of {limit:,}"
    if len(grid) > 3 or any(n < 0 for n in grid):
        return f"grid {grid} is not 1 to 3 non-negative sizes"
    return None


def _device_of(args: tuple) -> torch.device | None:
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)


@contextlib.contextmanager
def device_guard(device: torch.device | None) -> Iterator[torch.device | None]:
    """Make the tensors' CUDA device current for the launch, and yield it (None off CUDA).

    Triton launches on the *current* device, whatever device the pointers live on: a tensor
    on cuda:1 in a process whose current device is 0 would be refused by Triton's pointer
    check (or read from the wrong GPU). PyTorch ops take the device from their tensors; our
    launches do the same through this guard."""
    if device is None or device.type != "cuda":
        yield None
    elif device.index is None or device.index == torch.cuda.current_device():
        yield device
    else:
        with torch.cuda.device(device):
            yield device


def _checked(kernel, sizes) -> tuple[int, ...]:
    """`sizes` as a grid, or a ValueError naming the kernel and the limit it is over."""
    sizes = tuple(sizes)
    if (problem := grid_problem(sizes)) is not None:
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
        raise ValueError(f"{name}: {problem}; the input is too large for one launch")
    return sizes


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on the device of its tensors, after checking the grid
    against CUDA's limits. `grid` is a tuple, or (for an autotuned kernel) a function of the
    chosen config's meta-parameters as Triton takes it; a grid over a limit raises a
    ValueError naming the kernel and the limit before anything is launched."""
    with device_guard(_device_of(args)):
        if callable(grid):
            kernel[lambda config: _checked(kernel, grid(config))](*args, **meta)
        else:
            kernel[_checked(kernel, grid)](*args, **meta)


_BUDGETS: dict[torch.device, tuple[int, int]] = {}  # a plain dict, which torch.compile traces
# (compute capability, shared bytes per block) that every device reports while set: how
# trm_benchmarks.launches plans a GPU's launches on meta tensors, on any machine
STAND_IN: tuple[int, int] | None = None


def device_budget(device: torch.device) -> tuple[int, int] | None:
    """(compute capability as 10 * major + minor, shared memory a block may use) of a CUDA
    device, read from the device once; None where no limit applies (the interpreter on CPU)."""
    if STAND_IN is not None:
        return STAND_IN
    if device.type != "cuda":
        return None
    if device not in _BUDGETS:
        props = torch.cuda.get_device_properties(device)
        _BUDGETS[device] = (10 * props.major + props.minor, props.shared_memory_per_block_optin)
    return _BUDGETS[device]


def on_gpu(t: torch.Tensor) -> bool:
    """Whether `t`'s kernels are planned for a GPU: a CUDA tensor, or any tensor while a
    stand-in GPU is set (STAND_IN); not the interpreter's CPU tensors."""
    return t.is_cuda or STAND_IN is not None


def needed_on(row: dict[int, int], capability: int) -> int:
    """A kernel's shared memory on a GPU of `capability`, from its compiled figures per listed
    architecture ({capability: bytes}, as trm_benchmarks.ptx reports them): the listed one
    standing for it (trm_kernels.arch.nearest), else the most any listed one needs."""
    from . import arch

    stands_for = arch.nearest(capability)
    return row[stands_for.capability] if stands_for is not None else max(row.values())


def fits(budget: tuple[int, int] | None, dtype: torch.dtype, needed: int) -> bool:
    """Whether a matrix kernel (a GEMM epilogue, the token mixer) needing `needed` bytes of
    shared memory in bf16/fp16 launches under `budget` (device_budget's; None: no limit, the
    interpreter) in `dtype`. Never in fp32 on a GPU: with IEEE products these kernels have no
    tensor cores to use, their tiles need up to twice bf16's shared memory (over the 99 KB of
    sm_86/89/120) and spill registers; cuBLAS's fp32 GEMM plus the element-wise kernels run
    instead."""
    return budget is None or (dtype != torch.float32 and needed <= budget[1])


def has_configs(cache: dict, launchable, t: torch.Tensor) -> bool:
    """Whether ``launchable(device, dtype)`` leaves any config for tensors like `t`, kept per
    (device, dtype) in `cache`: a plain dict, which torch.compile traces."""
    key = (t.device, t.dtype)
    if key not in cache:
        cache[key] = bool(launchable(t.device, t.dtype))
    return cache[key]
