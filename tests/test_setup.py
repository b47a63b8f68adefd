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
