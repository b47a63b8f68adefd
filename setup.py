"""Builds the CUDA extension (csrc/) where CUDA torch and nvcc are present; a plain install elsewhere.

With pip's default build isolation torch is absent from the build environment, so the
extension is not built here: `pip install --no-build-isolation -e .` builds it ahead of
time, and otherwise `trm_kernels.cuda_ext` JIT-builds it with ninja (a dependency on Linux)
on first use. The target GPUs are torch's choice: TORCH_CUDA_ARCH_LIST if set, else the
GPUs visible at build time. `trm doctor` says how the extension was obtained.
"""

import glob
import os
import shutil
import sys

from setuptools import setup


def cuda_extensions() -> tuple[list, dict, str]:
    """(ext_modules, cmdclass, why): the extension to build, or none and the reason."""
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}, "no csrc/ sources"
    if os.environ.get("TRM_NO_CUDA_EXT") == "1":
        return [], {}, "TRM_NO_CUDA_EXT=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}, "torch is not importable here (build isolation?): it is JIT-built on first use instead"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} has no CUDA"
    if CUDA_HOME is None or shutil.which("nvcc") is None:
        return [], {}, "no CUDA toolkit (nvcc) found: it is JIT-built on first use if one appears"
    ext = CUDAExtension(
        "trm_kernels._C",
        sources,
        # as kernels/cuda_ext.py's NVCC_FLAGS; torch adds the target GPUs (TORCH_CUDA_ARCH_LIST)
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++20", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, "building trm_kernels._C"


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import cuda_extensions
    ext_modules, cmdclass, why = cuda_extensions()
    print(f"trm: CUDA extension: {why}", file=sys.stderr)
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
