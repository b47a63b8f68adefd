"""Builds the CUDA extension (csrc/) where CUDA torch and nvcc are present; a plain install elsewhere."""

import glob
import os
import shutil

from setuptools import setup


def cuda_extensions():
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    if not sources or os.environ.get("TRM_NO_CUDA_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc") is None:
        return [], {}
    ext = CUDAExtension(
        "trm_kernels._C",
        sources,
        # as kernels/cuda_ext.py's NVCC_FLAGS; torch adds the target GPUs (TORCH_CUDA_ARCH_LIST)
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++20", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
