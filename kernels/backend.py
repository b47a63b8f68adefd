"""The one place that decides which implementation of an op runs.

Backends: ``reference`` (plain PyTorch, every device), ``triton`` and ``cuda`` (fused
kernels, registered by their own modules when importable). The choice, in order of
precedence: the ``backend=`` argument of an op call, :func:`set_backend` /
:func:`use_backend`, the ``TRM_BACKEND`` environment variable, then ``auto``: the fastest
registered backend for the tensor's device that supports the call (dtype, shape), which on
CPU is always ``reference``. In ``auto`` mode a fused backend is trusted only once it has
matched the reference on a signature (:mod:`trm_kernels.verify`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

from . import verify

BACKENDS = ("reference", "triton", "cuda")
_CHOICES = ("auto", *BACKENDS)

# op name -> backend name -> (implementation, supports(*args) -> bool or None for "always")
_REGISTRY: dict[str, dict[str, tuple[Callable, Callable | None]]] = {}
# Per-device order in which `auto` tries backends. Benchmarks decide it; until a GPU run
# has measured the CUDA extension against Triton, Triton (verified under the interpreter)
# comes first and `cuda` is chosen explicitly.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cuda", "reference"), "cpu": ("reference",)}
# A chosen backend that has no implementation of an op at all runs this one instead: the
# extension has only add + RMSNorm, so `cuda` means "the extension where it has the op,
# Triton elsewhere" (TRM_BACKEND=cuda runs a whole model).
FALLBACK: dict[str, str] = {"cuda": "triton"}
_override: str | None = None


def _validate(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return name


def register(op: str, backend: str, fn: Callable, supports: Callable[..., bool] | None = None) -> None:
    """Add an implementation. `supports(*args)` says whether it takes a call (dtype, shape);
    `auto` skips a backend that does not, an explicitly chosen one raises its own error."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for op {op!r}")
    _REGISTRY.setdefault(op, {})[backend] = (fn, supports)


def get_backend() -> str:
    """The backend requested globally (``auto`` unless set)."""
    if _override is not None:
        return _override
    return _validate(os.environ.get("TRM_BACKEND", "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """Run every op with `name` from now on: ``"auto"`` (the default), ``"reference"``
    (plain PyTorch, any device and dtype), ``"triton"`` or ``"cuda"`` (the extension where it
    has the op, Triton elsewhere). A backend that cannot take a call then raises an error
    naming the argument instead of falling back. Overrides ``TRM_BACKEND``; a ``backend=``
    argument of an op call overrides this."""
    global _override
    _override = _validate(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("reference"): ...``: set_backend for the block, restored after it."""
    global _override
    previous, _override = _override, _validate(name)
    try:
        yield
    finally:
        _override = previous


def available(op: str) -> tuple[str, ...]:
    """The backends registered for `op` here (``reference`` always; ``triton`` where Triton
    imports; ``cuda`` for add_rmsnorm with a CUDA build of torch)."""
    return tuple(_REGISTRY.get(op, {}))


def call(op: str, device: torch.device, backend: str | None, *args):
    """Run `op` on `args` with the chosen backend (see the module docstring)."""
    name = _validate(backend) if backend is not None else get_backend()
    impls = _REGISTRY[op]
    if name != "auto":
        chosen = name if name in impls else FALLBACK.get(name, name)
        if chosen not in impls:
            raise RuntimeError(f"backend {name!r} is not available for op {op!r} (available: {', '.join(impls)})")
        return impls[chosen][0](*args)
    reference = impls["reference"][0]
    for candidate in AUTO_ORDER.get(device.type, ("reference",)):
        if candidate in impls:
            fn, supports = impls[candidate]
            if supports is None or supports(*args):
                return fn(*args) if candidate == "reference" else verify.guarded(op, candidate, fn, reference, args)
    return reference(*args)
