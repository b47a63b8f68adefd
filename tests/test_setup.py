"""Which branch setup.py takes for the CUDA extension, and why (what `trm doctor` also reports)."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def setup_module_here(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("trm_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() does not run
    return module


def test_setup_says_why_it_builds_no_extension_here(monkeypatch):
    setup = setup_module_here(monkeypatch)
    monkeypatch.setenv("TRM_NO_CUDA_EXT", "1")
    assert setup.cuda_extensions() == ([], {}, "TRM_NO_CUDA_EXT=1")
    monkeypatch.delenv("TRM_NO_CUDA_EXT")
    ext, cmdclass, why = setup.cuda_extensions()
    if torch.version.cuda is None:  # this CPU wheel: nothing to build, and the reason names it
        assert (ext, cmdclass) == ([], {}) and why == f"torch {torch.__version__} has no CUDA"
    else:
        assert ext or "nvcc" in why


def test_doctor_says_how_the_extension_was_obtained():
    from trm.doctor import _extension

    text = _extension()
    if torch.version.cuda is None:
        assert text == "not built: this torch has no CUDA (the cuda backend is unavailable)"
    else:
        assert any(word in text for word in ("built by the install", "JIT-built", "unavailable", "no GPU"))


def test_the_jit_build_is_named_and_compiled_for_the_gpus_architecture(monkeypatch):
    """torch's JIT cache is keyed by name, sources and flags, not by the GPU: each
    architecture gets a module of its own, compiled for exactly it."""
    import torch.utils.cpp_extension as cpp
    from trm_kernels import cuda_ext

    built = []
    monkeypatch.setitem(__import__("sys").modules, "trm_kernels._C", None)  # no module from the install
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp, "load", lambda name, sources, **kw: built.append((name, kw["extra_cuda_cflags"])) or name)
    cuda_ext._load.cache_clear()
    try:
        for capability in ((8, 6), (9, 0), (8, 6)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
            cuda_ext.load()
    finally:
        cuda_ext._load.cache_clear()
    assert [name for name, _ in built] == ["trm_kernels_cuda_sm86", "trm_kernels_cuda_sm90"]  # once each
    assert "-gencode=arch=compute_90,code=sm_90" in built[1][1]


class _Extension:
    """Stands in for the built module: says it takes rows only where the test says."""

    def __init__(self, takes: bool):
        self.takes, self.asked = takes, []

    def add_rmsnorm_takes(self, tensors):
        self.asked.append(tensors)
        return self.takes


def test_the_extension_is_used_only_where_it_says_it_takes_the_rows(monkeypatch):
    """Unaligned rows of 520 elements would fail in the kernels (cudaErrorInvalidValue): the
    extension is asked first, with every tensor its kernel reads (dy too, backward)."""
    from trm_kernels import cuda_ext, rmsnorm

    x = torch.randn(4, 520)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    for takes in (True, False):
        ext = _Extension(takes)
        monkeypatch.setattr(cuda_ext, "load", lambda device=None, e=ext: e)
        assert (rmsnorm._extension(x, x, None, 1, False, "cuda") is ext) == takes
        dy = torch.randn(4, 520)
        rmsnorm._extension(x, None, None, 1, False, "cuda", dy)
        assert ext.asked[0][0] is x and ext.asked[0][1] is x and ext.asked[1][2] is dy
    assert rmsnorm._extension(x, x, None, 1, False, "triton") is None  # only when the cuda backend asks
    assert rmsnorm._extension(x, x, torch.ones(520), 1, False, "cuda") is None  # no weights in the extension
    monkeypatch.setattr(cuda_ext, "load", lambda device=None: object())  # built before it could say
    assert rmsnorm._extension(x, x, None, 1, False, "cuda") is None
