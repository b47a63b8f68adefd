"""Speed chosen by measurement: where a fused GEMM kernel competes with cuBLAS plus separate
ops, the first call of each signature times both on its real inputs and keeps the faster.

A fused GEMM epilogue wins only if our Triton GEMM runs close enough to cuBLAS (the
roofline's break-even line says how close); whether it does depends on the GPU, the shapes
and the Triton version, so it is measured where it runs, not assumed. Like Triton's
autotuner: once per signature (op, device, dtypes, shapes, whether a gradient is needed)
and process, each candidate warmed up and then timed (``triton.testing.do_bench``: median
of repeated runs, forward plus backward where a gradient is needed), the choice cached.

A candidate that raises while it is timed (out of resources, a grid over a limit, out of
memory) is skipped, reported in :data:`decisions` and by one :class:`TuneWarning`, and the
choice is made among the others (the first, the default, where every one raised: the
parity guard then checks it). Under ``torch.distributed`` rank 0 times and chooses, and every
rank takes its choice (:mod:`trm_kernels.ranks`), so all ranks run the same kernels; Triton's
autotuner keeps rank 0's config likewise (:func:`shared_autotuner`).

Setting: ``TRM_TUNE`` = ``on`` (default) | ``off`` (no timing: the fused kernel runs, as it
does where nothing can be timed: the interpreter, CUDA-graph capture, ``torch.compile``
tracing) | ``composed`` (no timing: cuBLAS + the separate ops run; the benchmarks' "without
the fusion"). :data:`decisions` holds every choice with both timings; ``trm doctor`` and the
benchmarks print them. The parity guard checks the candidate chosen for the call it
checks (:func:`same_choice`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import ranks
from .settings import env_choice

MODES = ("on", "off", "composed")


@dataclass
class Decision:
    op: str
    signature: str
    choice: str
    times_ms: dict[str, float] = field(default_factory=dict)  # candidate -> median milliseconds (rank 0's)
    failed: dict[str, str] = field(default_factory=dict)  # candidate -> the error it raised (and where)
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it cannot run this signature


class TuneWarning(RuntimeWarning):
    """A candidate raised while it was timed and was skipped for a signature."""


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


def choose(op: str, candidates: dict[str, Callable], args: tuple, skipped: dict[str, str] | None = None) -> str:
    """The name of the candidate to run on `args` (each candidate takes ``*args`` and
    returns one tensor; the first is the fused kernel and the default, the last the
    composition of cuBLAS and separate ops). Times them all on the first call of a
    signature where timing is possible (see the module docstring), then keeps the choice.
    `skipped`: the candidates left out for this signature, each with the reason (a shape
    its kernel does not take); recorded in :data:`decisions` whether or not anything is
    timed, so that :func:`report` (and ``trm doctor``) say why the fused kernel did not run."""
    global _last
    if _following and _last in candidates:
        return _last
    if mode() == "composed":
        _last = list(candidates)[-1]
        return _last
    key = (op, *(((a.dtype, a.shape, a.device, a.requires_grad and torch.is_grad_enabled()) if isinstance(
        a, torch.Tensor) else a) for a in args))  # fmt: skip
    decision = decisions.get(key)
    if (decision is None or not (decision.times_ms or decision.failed)) and len(candidates) > 1 and _can_time(args):
        decision = decisions[key] = _decide(op, candidates, args)
        decision.skipped = dict(skipped or {})
    elif decision is None and skipped and not torch.compiler.is_compiling():  # untimed: the default, and why
        decision = decisions[key] = Decision(op, _describe(args), next(iter(candidates)), skipped=dict(skipped))
    _last = decision.choice if decision is not None else next(iter(candidates))
    return _last


def _measure(candidates: dict[str, Callable], args: tuple) -> tuple[dict[str, float], dict[str, str]]:
    """(milliseconds of each candidate that ran, the error of each that raised)."""
    times, failed = {}, {}
    with torch.enable_grad() if torch.is_grad_enabled() else torch.no_grad():
        for name, fn in candidates.items():
            try:
                times[name] = _time(_run(fn, args))
            except Exception as e:  # out of resources, a grid over a limit, out of memory: skip it
                failed[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    return times, failed


def _decide(op: str, candidates: dict[str, Callable], args: tuple) -> Decision:
    """Time every candidate and keep the fastest that ran (the default where each raised);
    under torch.distributed rank 0 does, and every rank takes its decision."""

    def measured() -> Decision:
        times, failed = _measure(candidates, args)
        usable = {name: t for name, t in times.items() if name not in failed}
        choice = min(usable, key=usable.get) if usable else next(iter(candidates))
        return Decision(op, _describe(args), choice, times, failed)

    decision = ranks.agree(f"tune/{op}/{','.join(candidates)}/{_describe(args)}", measured)
    if decision.failed:
        warnings.warn(f"trm_kernels: while timing {op} ({decision.signature}), "
                      + "; ".join(f"{name} raised {error}" for name, error in decision.failed.items())
                      + f": skipped; {decision.choice} runs", TuneWarning, stacklevel=4)  # fmt: skip
    return decision


def shared_autotuner(autotuner):
    """`autotuner` (a ``triton.autotune`` kernel) that under torch.distributed keeps rank 0's
    config for each key on every rank (another rank times nothing: it takes rank 0's choice);
    unchanged in a single process."""
    autotuner.cache = _SharedConfigs(autotuner.configs, autotuner.base_fn.__name__)
    return autotuner


class _SharedConfigs(dict):
    """Triton's autotuner cache (key -> chosen config). On rank 0 each new entry is published;
    on another rank a key not yet here is rank 0's entry, fetched when the autotuner asks
    whether it has one (so it does not time the configs itself)."""

    def __init__(self, configs: list, name: str):
        super().__init__()
        self.configs, self.name = configs, name

    def _key(self, key) -> str:
        return f"autotune/{self.name}/{key!r}"

    def __contains__(self, key) -> bool:
        if super().__contains__(key):
            return True
        if ranks.active() and ranks.rank() != 0:
            chosen = ranks.agree(self._key(key), lambda: -1)  # -1: none came; this rank times the configs
            if chosen >= 0:
                super().__setitem__(key, self.configs[chosen])
                return True
        return False

    def __setitem__(self, key, config) -> None:
        super().__setitem__(key, config)
        if ranks.active() and ranks.rank() == 0:
            ranks.agree(self._key(key), lambda: next((i for i, c in enumerate(self.configs) if c is config), -1))


def report() -> list[dict]:
    """Every choice made in this process: op, signature, chosen candidate, timings (ms), the
    candidates that raised while timed, and those skipped for the signature with the reason
    (e.g. a hidden size over the fused kernel's limit: the composition runs)."""
    return [
        {"op": d.op, "signature": d.signature, "choice": d.choice, "times_ms": dict(d.times_ms),
         "failed": dict(d.failed), "skipped": dict(d.skipped)}
        for d in decisions.values()
    ]  # fmt: skip
