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
NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math"]  # the target GPUs are added by torch (TORCH_CUDA_ARCH_LIST)


@functools.cache
def load():
    try:
        from . import _C  # built by `pip install --no-build-isolation -e .` on a CUDA machine

        return _C
    except ImportError:
        pass
    if not torch.cuda.is_available():
        return None
    sources = [str(CSRC / "add_rmsnorm.cu"), str(CSRC / "binding.cpp")]
    try:
        from torch.utils.cpp_extension import load as jit_load

        return jit_load("trm_kernels_cuda", sources, extra_cuda_cflags=NVCC_FLAGS, extra_cflags=["-O3"],
                        verbose=False)  # fmt: skip
    except Exception as e:  # no nvcc, no ninja, a compiler error: all mean "use Triton"
        warnings.warn(f"trm_kernels: the CUDA extension could not be built ({e}); the 'cuda' backend runs the "
                      "Triton kernels instead", stacklevel=2)  # fmt: skip
        return None
