"""Speed chosen by measurement: where a fused GEMM kernel competes with cuBLAS plus separate
ops, the first call of each signature times both on its real inputs and keeps the faster.

A fused GEMM epilogue wins only if our Triton GEMM runs close enough to cuBLAS (the
roofline's break-even line says how close); whether it does depends on the GPU, the shapes
and the Triton version, so it is measured where it runs, not assumed. Like Triton's
autotuner: once per signature (op, device, dtypes, shapes, whether a gradient is needed)
and process, each candidate warmed up and then timed (``triton.testing.do_bench``: median
of repeated runs, forward plus backward where a gradient is needed), the choice cached.

Setting: ``TRM_TUNE`` = ``on`` (default) | ``off`` (no timing: the fused kernel runs, as it
does where nothing can be timed: the interpreter, CUDA-graph capture, ``torch.compile``
tracing) | ``composed`` (no timing: cuBLAS + the separate ops run; the benchmarks' "without
the fusion"). :data:`decisions` holds every choice with both timings; ``trm doctor`` and the
benchmarks print them. The parity guard checks the candidate chosen for the call it
checks (:func:`same_choice`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .settings import env_choice

MODES = ("on", "off", "composed")


@dataclass
class Decision:
    op: str
    signature: str
    choice: str
    times_ms: dict[str, float] = field(default_factory=dict)  # candidate -> median milliseconds


decisions: dict[tuple, Decision] = {}
_timer: Callable[[Callable[[], object]], float] | None = None  # stand-in for tests
_last: str | None = None  # the choice of the latest call, which the parity guard's check follows
_following = False


_override: str | None = None


def mode() -> str:
    """``on`` (time each signature's candidates once), ``off`` (the fused kernels) or ``composed``
    (cuBLAS + separate ops): :func:`use_mode`'s, else ``TRM_TUNE``."""
    if _override is not None:
        return _override
    return env_choice("TRM_TUNE", "on", MODES)


@contextlib.contextmanager
def use_mode(value: str) -> Iterator[None]:
    """``with use_mode("off"): ...``: the fused kernels untimed for the block (``trm doctor``'s
    parity checks check them, not whichever candidate is faster)."""
    global _override
    if value not in MODES:
        raise ValueError(f"unknown tune mode {value!r}; choose one of {', '.join(MODES)}")
    previous, _override = _override, value
    try:
        yield
    finally:
        _override = previous


def set_timer(timer: Callable[[Callable[[], object]], float] | None) -> None:
    """Time candidates with `timer(fn) -> milliseconds` (None: ``triton.testing.do_bench``);
    it also makes choices on CPU, where nothing is timed otherwise (how the tests run it)."""
    global _timer
    _timer = timer


def reset() -> None:
    """Forget every choice (the next call of each signature is timed again)."""
    decisions.clear()


@contextlib.contextmanager
def same_choice() -> Iterator[None]:
    """Inside, every choice is the one the latest call made, without timing or caching: the
    parity guard checks a slice of a call's inputs with the candidate that call ran."""
    global _following
    previous, _following = _following, True
    try:
        yield
    finally:
        _following = previous


def _describe(args: tuple) -> str:
    def one(a):
        if isinstance(a, torch.Tensor):
            grad = ", grad" if a.requires_grad and torch.is_grad_enabled() else ""
            return f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)}{grad}"
        return repr(a)

    return ", ".join(one(a) for a in args)


def _can_time(args: tuple) -> bool:
    """Not untimed modes, not while torch.compile traces, never during CUDA-graph capture
    (timing synchronises and allocates); on CPU only with a stand-in timer."""
    if mode() != "on" or torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    return device.type == "cuda" or _timer is not None


def _run(fn: Callable, args: tuple) -> Callable[[], object]:
    """A closure running fn on args, with backward through every input that needs a gradient."""
    needs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad and torch.is_grad_enabled()]
    if not needs:
        return lambda: fn(*args)
    leaves = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]

    def step():
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        for a in leaves:
            if isinstance(a, torch.Tensor):
                a.grad = None

    return step


def _time(fn: Callable[[], object]) -> float:
    if _timer is not None:
        return float(_timer(fn))
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def choose(op: str, candidates: dict[str, Callable], args: tuple) -> str:
    """The name of the candidate to run on `args` (each candidate takes ``*args`` and
    returns one tensor; the first is the fused kernel and the default, the last the
    composition of cuBLAS and separate ops). Times them all on the first call of a
    signature where timing is possible (see the module docstring), then keeps the choice."""
    global _last
    if _following and _last in candidates:
        return _last
    if mode() == "composed":
        _last = list(candidates)[-1]
        return _last
    key = (op, *(((a.dtype, a.shape, a.device, a.requires_grad and torch.is_grad_enabled()) if isinstance(
        a, torch.Tensor) else a) for a in args))  # fmt: skip
    decision = decisions.get(key)
    if decision is None and _can_time(args):
        times = {}
        with torch.enable_grad() if torch.is_grad_enabled() else torch.no_grad():
            for name, fn in candidates.items():
                times[name] = _time(_run(fn, args))
        decision = decisions[key] = Decision(op, _describe(args), min(times, key=times.get), times)
    _last = decision.choice if decision is not None else next(iter(candidates))
    return _last


def report() -> list[dict]:
    """Every choice made in this process: op, signature, chosen candidate, timings (ms)."""
    return [
        {"op": d.op, "signature": d.signature, "choice": d.choice, "times_ms": dict(d.times_ms)}
        for d in decisions.values()
    ]
