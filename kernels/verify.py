"""The parity guard: a fused implementation is checked against the reference before it is trusted.

In ``auto`` mode, the first call a fused backend (triton, cuda) takes with a new signature
(op, backend, device, dtypes, shapes, whether a gradient is needed) also runs the reference
on two slices of the same inputs, the first and the last ``ROWS`` batch rows (the last
programs' tiles, where a fault that depends on the batch size shows), and compares under
the tolerance rule below: the call's own output at those rows, and where a gradient is
needed the fused backward over the whole batch at those rows (the weights' gradients,
sums over the batch, on the first rows). An exception (compile error, out of resources,
launch failure) or a mismatch disables that fused implementation for that signature for
the rest of the process: the call, and every later one with the signature, returns the
reference's result, and one warning names the op, the backend, the signature and the
error. Under ``torch.distributed`` every rank also takes rank 0's verdict
(:mod:`trm_kernels.ranks`): a signature that fails on rank 0 is disabled on every rank, so
all run the same kernels; one that fails on another rank alone is disabled there (that
rank's fused kernel is wrong: it runs the reference, and says so).
Bounded cost: once per signature, the reference on a few rows, and with grad one more
fused forward and backward of the op.

Setting: ``TRM_VERIFY`` = ``first`` (default) | ``always`` (every call; for debugging) |
``off``; or :func:`set_verify` / :func:`use_verify`. The check never runs inside CUDA-graph
capture or ``torch.compile`` tracing: there a disabled signature still gets the reference,
an unchecked one the fused kernel. Graph capture in ``trm.graphs`` warms the function up
eagerly first, so its signatures are checked before capture.

Tolerance rule (the test suite's too): the fused result's error against a float64 oracle
may be at most 2x the error the reference op makes in the same dtype, plus two units of
rounding of the output dtype (of fp32, where a fused kernel returns float64: it computes in
fp32). Error is the relative norm ``||out - oracle|| / ||oracle||``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import ranks, tune
from .settings import env_choice

MODES = ("first", "always", "off")
ROWS = 2  # batch rows compared per check
# the arguments of each op that are batched along dim 0 (the rest are weights, tables, scalars)
BATCHED: dict[str, tuple[int, ...]] = {
    "add_rmsnorm": (0, 1),
    "inject": (0, 1, 2),
    "swiglu": (0,),
    "swiglu_mlp": (0,),
    "swiglu_mlp_rmsnorm": (0,),
    "linear_add_rmsnorm": (0, 2),
    "sandwich_rmsnorm": (0, 1),
    "concat_linear": (0, 1),
    "token_mlp_rmsnorm": (0,),
    "rope_attention": (0, 6),  # qkv, key_mask
    "kv_cache_attention": (0, 1, 2, 3),  # qkv, k_cache, v_cache, cache_len
    "stablemax_cross_entropy": (0, 1),
    "softmax_cross_entropy": (0, 1),
}
QK_NORM = ("q_norm_weight", "k_norm_weight", "qk_norm", "qk_norm_eps")  # the attention ops' last four
# each op's parameters in order (the implementations take them positionally)
PARAMETERS: dict[str, tuple[str, ...]] = {
    "add_rmsnorm": ("x", "residual", "dim", "eps", "weight", "prenorm"),
    "inject": ("h", "a", "b"),
    "swiglu": ("gate_up", "dim", "activation"),
    "swiglu_mlp": ("x", "w_gate_up", "w_down", "activation", "w_up"),  # w_up: w_gate_up[1] of a pair
    "swiglu_mlp_rmsnorm": ("h", "w_gate_up", "w_down", "eps", "weight", "activation", "w_up"),
    "linear_add_rmsnorm": ("a", "w", "h", "eps", "weight"),
    "sandwich_rmsnorm": ("x", "residual", "weight", "next_weight", "eps"),
    "concat_linear": ("x", "e", "weight", "bias"),
    "token_mlp_rmsnorm": ("h", "w_gate_up", "w_down", "eps"),
    "rope_attention": (
        "qkv",
        "cos",
        "sin",
        "num_heads",
        "num_kv_heads",
        "causal",
        "key_mask",
        "rope",
        "window",
        *QK_NORM,
    ),
    "kv_cache_attention": (
        "qkv",
        "k_cache",
        "v_cache",
        "cache_len",
        "cos",
        "sin",
        "num_heads",
        "num_kv_heads",
        "causal",
        "rope",
        "window",
        *QK_NORM,
    ),
    "stablemax_cross_entropy": ("logits", "labels", "ignore_index"),
    "softmax_cross_entropy": ("logits", "labels", "ignore_index"),
}
# ops without a backward (the KV cache is written in place: generation)
FORWARD_ONLY = frozenset({"kv_cache_attention"})
# learnable, not batched
WEIGHTS: dict[str, tuple[int, ...]] = {
    "add_rmsnorm": (4,),
    "swiglu_mlp": (1, 2, 4),
    "swiglu_mlp_rmsnorm": (1, 2, 4, 6),
    "linear_add_rmsnorm": (1, 4),
    "sandwich_rmsnorm": (2, 3),
    "concat_linear": (2, 3),
    "token_mlp_rmsnorm": (1, 2),
    "rope_attention": (9, 10),
}
_override: str | None = None


class ParityWarning(RuntimeWarning):
    """A fused implementation failed its check and was disabled for a signature."""


@dataclass
class Record:
    op: str
    backend: str
    signature: str
    ok: bool
    detail: str  # the measured error against the bound, or the exception


verified: dict[tuple, Record] = {}  # signature -> its check, passed or not


def get_verify() -> str:
    """The parity guard's mode: ``first`` (default: each new signature checked once), ``always``
    (every call, for debugging) or ``off``; set by set_verify / use_verify or ``TRM_VERIFY``."""
    if _override is not None:
        return _override
    return env_choice("TRM_VERIFY", "first", MODES)


def set_verify(mode: str) -> None:
    """Set the parity guard's mode from now on (see get_verify); overrides ``TRM_VERIFY``."""
    global _override
    if mode not in MODES:
        raise ValueError(f"unknown verify mode {mode!r}; choose one of {', '.join(MODES)}")
    _override = mode


@contextlib.contextmanager
def use_verify(mode: str) -> Iterator[None]:
    """``with use_verify("always"): ...``: set_verify for the block, restored after it."""
    global _override
    previous = _override
    set_verify(mode)
    try:
        yield
    finally:
        _override = previous


def reset() -> None:
    """Forget every check (the next call of each signature is checked again)."""
    verified.clear()


def relative_error(out: torch.Tensor, oracle: torch.Tensor) -> float:
    oracle = oracle.double()
    return (out.double() - oracle).norm().item() / (oracle.norm().item() or 1.0)


def tolerance_problem(fused: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor, what: str) -> str | None:
    """None when `fused` passes the rule against `oracle`, else what failed (with the numbers)."""
    if fused.shape != oracle.shape:
        return f"{what}: shape {tuple(fused.shape)}, expected {tuple(oracle.shape)}"
    if not torch.isfinite(fused).all():
        return f"{what}: non-finite values"
    err_fused, err_ref = relative_error(fused, oracle), relative_error(ref, oracle)
    # a float64 output of a fused op (stablemax's loss, float64 as the reference's) was computed in fp32
    unit = max(torch.finfo(fused.dtype).eps, torch.finfo(torch.float32).eps)
    bound = 2 * err_ref + 2 * unit
    if err_fused > bound:
        return f"{what}: relative error {err_fused:.3g} > bound {bound:.3g} (reference {err_ref:.3g})"
    return None


def _capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        grad = ", grad" if value.requires_grad and torch.is_grad_enabled() else ""
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}{grad}"
    return repr(value)


def signature(op: str, backend: str, args: tuple) -> tuple:
    """What selects a kernel and its config: computed on every guarded call, so no strings."""
    grad = torch.is_grad_enabled()
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    shapes = tuple((a.dtype, a.shape, grad and a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    return (op, backend, device, shapes)


def _rows(args: tuple, op: str, n: int) -> list:
    batched = BATCHED.get(op, ())
    return [a[:n] if i in batched and isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]


def outputs(out) -> tuple[torch.Tensor, ...]:
    """An op's result as a tuple of tensors (add_rmsnorm's pre-norm form returns two)."""
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def run_op(fn: Callable, args, grad_of: list[bool] | None = None, dtype: torch.dtype | None = None, seed: int = 0):
    """fn's output (detached; a tuple stays a tuple) on fresh copies of `args` (floating ones
    cast to `dtype` if given), and the gradients of sum(out * g) (summed over the outputs), g
    fixed random tensors, for the args `grad_of` marks (default: every floating tensor). The
    oracle of the checks here, of `trm doctor` and of the tests."""
    if grad_of is None:
        grad_of = [isinstance(a, torch.Tensor) and a.is_floating_point() for a in args]
    leaves = []
    for a, want in zip(args, grad_of, strict=True):
        if isinstance(a, torch.Tensor):
            a = a.detach().clone()
            a = a.to(dtype) if dtype is not None and a.is_floating_point() else a
            a.requires_grad_(want)
        leaves.append(a)
    with torch.enable_grad() if any(grad_of) else torch.no_grad():
        out = fn(*leaves)
        if any(grad_of):
            sum((o * g).sum() for o, g in zip(outputs(out), _cotangents(out, seed), strict=True)).backward()
    detached = tuple(o.detach() for o in outputs(out))
    return (detached if isinstance(out, tuple | list) else detached[0]), [
        a.grad for a, want in zip(leaves, grad_of, strict=True) if want
    ]


def _check(op: str, fused: Callable, reference: Callable, args: tuple) -> tuple[torch.Tensor, str | None]:
    """The fused call's real output, and what failed against the reference (None: passed)."""
    out = fused(*args)
    with tune.same_choice():  # the slices run the candidate the call ran (where an op times candidates)
        return out, _check_rows(op, fused, reference, args, out)


def parts(op: str, args: tuple) -> list[slice]:
    """The batch rows a check compares: the first ``ROWS`` and the last ``ROWS`` (the last
    programs' tiles, where a fault that depends on the batch size shows), or every row where
    the rows are not independent (add_rmsnorm normalising along dim 0, a norm of one row)."""
    first = next(a for a in args if isinstance(a, torch.Tensor))
    rows = first.shape[0] if first.dim() else 1
    if (op == "add_rmsnorm" and args[2] % first.dim() == 0) or (op == "sandwich_rmsnorm" and first.dim() == 1):
        return [slice(0, rows)]
    n = min(ROWS, rows)
    return [slice(0, n)] + ([slice(max(n, rows - n), rows)] if rows > n else [])


def _rows(args: tuple, op: str, part: slice) -> list:
    batched = BATCHED.get(op, ())
    return [a[part] if i in batched and isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]


def _cotangents(out, seed: int = 0) -> list[torch.Tensor]:
    """Fixed random gradients for each output of `out` (what run_op and the checks backpropagate)."""
    cots = []
    for i, o in enumerate(outputs(out)):
        gen = torch.Generator(o.device).manual_seed(seed + i)
        cots.append(torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype))
    return cots


def _gradients(fn: Callable, args, grad_of: list[bool], cotangents: list[torch.Tensor], dtype=None) -> list:
    """Gradients of sum(out * cotangent) w.r.t. the args `grad_of` marks; no copies of the
    inputs (a full batch is checked this way), float64 where `dtype` says."""
    leaves = []
    for a, want in zip(args, grad_of, strict=True):
        if isinstance(a, torch.Tensor):
            a = a.detach()
            a = (a.to(dtype) if dtype is not None and a.is_floating_point() else a).requires_grad_(want)
        leaves.append(a)
    with torch.enable_grad():
        out = outputs(fn(*leaves))
        total = sum((o * c.to(o.dtype)).sum() for o, c in zip(out, cotangents, strict=True))
        wanted = [a for a, want in zip(leaves, grad_of, strict=True) if want]
        return list(torch.autograd.grad(total, wanted, allow_unused=True))


def _check_rows(op: str, fused: Callable, reference: Callable, args: tuple, out) -> str | None:
    """Forward: the call's own output at the first and last rows against the reference on
    those rows (and float64). Backward, where a gradient is needed: the fused op's backward
    over the whole batch, the batched inputs' gradients at those rows against the
    reference's on the rows; the weights' gradients (sums over the batch) on the first rows."""
    slices = parts(op, args)
    for part in slices:
        rows = _rows(args, op, part)
        ref, _ = run_op(reference, rows, [False] * len(rows))
        oracle, _ = run_op(reference, rows, [False] * len(rows), torch.float64)
        for i, (f, r, o) in enumerate(zip(outputs(out), outputs(ref), outputs(oracle), strict=True)):
            what = f"forward, rows {part.start}..{part.stop - 1}" + (f" (output {i})" if i else "")
            if problem := tolerance_problem(f.detach()[part], r, o, what):
                return problem
    grad_of = [torch.is_grad_enabled() and isinstance(a, torch.Tensor) and a.requires_grad for a in args]
    if not any(grad_of):
        return None
    batched = [i in BATCHED.get(op, ()) for i, want in enumerate(grad_of) if want]
    cotangents = _cotangents(out)
    whole = _gradients(fused, args, grad_of, cotangents)
    for k, part in enumerate(slices):
        rows = _rows(args, op, part)
        cots = [c[part] for c in cotangents]
        ref = _gradients(reference, rows, grad_of, cots)
        oracle = _gradients(reference, rows, grad_of, cots, torch.float64)
        sliced = _gradients(fused, rows, grad_of, cots) if k == 0 and not all(batched) else None
        for i, (g, r, o) in enumerate(zip(whole, ref, oracle, strict=True)):
            what = f"backward (gradient {i}), rows {part.start}..{part.stop - 1}"
            if batched[i]:
                f = g[part] if g is not None else None
            elif sliced is not None:
                f = sliced[i]
            else:
                continue
            if r is None and (f is None or not f.any()):
                continue
            problem = tolerance_problem(f, r, o, what) if f is not None else f"{what}: none computed"
            if problem:
                return problem
    return None


def guarded(op: str, backend: str, fused: Callable, reference: Callable, args: tuple):
    """Run `fused` on `args` under the guard (see the module docstring)."""
    mode = get_verify()
    if mode == "off":
        return fused(*args)
    key = signature(op, backend, args)
    record = verified.get(key)
    if record is not None and not record.ok:
        return reference(*args)
    if _capturing() or (record is not None and mode == "first"):
        return fused(*args)
    try:
        out, problem = _check(op, fused, reference, args)
    except Exception as e:  # any failure of a fused kernel: compile, resources, launch, wrong shapes
        out, problem = None, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    described = ", ".join(_describe(a) for a in args)
    first = ranks.agree(f"verify/{op}/{backend}/{described}", lambda: problem)  # rank 0's verdict, for every rank
    if problem is None and first is not None:
        problem = f"on rank 0: {first}"
    verified[key] = Record(op, backend, described, problem is None, problem or "within tolerance")
    if problem is None:
        return out
    warnings.warn(
        f"trm_kernels: the {backend} {op} failed its check against the reference and is disabled for "
        f"({described}) on {key[2]}: {problem}. The reference runs instead; `trm doctor` reproduces the check.",
        ParityWarning,
        stacklevel=3,
    )
    return reference(*args)
