"""The CUDA extension (csrc/): the module built by setup.py, else a JIT build on first use.

``load()`` returns the compiled module, or None (with one warning saying why) where it
cannot be had: then the ``cuda`` backend's ops run their Triton kernels instead.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math"]  # the JIT build adds the one GPU architecture it is for


def load(device: torch.device | None = None):
    """The extension for the GPU architecture of `device` (default: the current CUDA device),
    or None where none can be had."""
    capability = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None
    return _load(capability)


@functools.cache
def _load(capability: tuple[int, int] | None):
    try:
        from . import _C  # built by `pip install --no-build-isolation -e .` on a CUDA machine

        return _C
    except ImportError:
        pass
    if capability is None:
        return None
    # Built for exactly this architecture, under a name of its own: torch's JIT cache is keyed by
    # the name, the sources and the flags given here, not by the GPU, and a module built for one
    # architecture found in the cache on another (a shared home directory) has no kernels for it.
    arch = "".join(str(c) for c in capability)
    sources = [str(CSRC / "add_rmsnorm.cu"), str(CSRC / "binding.cpp")]
    try:
        from torch.utils.cpp_extension import load as jit_load

        return jit_load(f"trm_kernels_cuda_sm{arch}", sources, extra_cflags=["-O3"], verbose=False,
                        extra_cuda_cflags=[*NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"])  # fmt: skip
    except Exception as e:  # no nvcc, no ninja, a compiler error: all mean "use Triton"
        warnings.warn(f"trm_kernels: the CUDA extension could not be built for sm_{arch} ({e}); the 'cuda' "
                      "backend runs the Triton kernels instead", stacklevel=3)  # fmt: skip
        return None
