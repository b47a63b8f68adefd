"""The check ``trm_kernels.patch`` makes before it replaces a module's forward: the module's own
forward against the fused one, on a small random input, on the reference backend (see the
``patch`` module's docstring for the rule and what is left alone)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import rope_cos_sin, use_backend
from .verify import relative_error, tolerance_problem

if TYPE_CHECKING:
    from .patch import FusedForward

ROWS, SEQ = 2, 4  # the check input's batch rows, and its sequence length where the module does not fix one
# the dtypes a module is checked in: float32, or where its forward cannot run in float32 the first half type it runs in
CHECK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Probe(nn.Module):
    """Holds the module under check, so torch.func.functional_call can run any function of it
    with its parameters and buffers replaced by copies (the module's own never touched)."""

    def __init__(self, target: nn.Module):
        super().__init__()
        self.target = target

    def forward(self, fn: Callable, args: tuple, kwargs: dict):
        return fn(*args, **kwargs)


def _weight(module: nn.Module, path: str) -> torch.Tensor | None:
    for name in path.split("."):
        module = getattr(module, name, None)
    return module if isinstance(module, torch.Tensor) else None


def _check_input(module: nn.Module, kind: str) -> tuple[dict[str, torch.Tensor], dict] | str:
    """The check's inputs (name -> a CPU float32 tensor) and keyword arguments, or why there are none."""
    from .patch import FAMILIES, _forward_takes  # (patch imports this module)

    if kind in FAMILIES:
        return FAMILIES[kind].check_input(module)
    layers = [module] if kind == "block" else list(module.layers)
    if kind != "block":
        for i, layer in enumerate(layers):
            if not _forward_takes(layer, ("cos_sin", "hidden_states")):
                return f"its layers.{i} is not called as (cos_sin, hidden_states), so its arguments are unknown"
    hidden = seq = head_dim = None
    for layer in layers:
        width = _weight(layer, "mlp.gate_up_proj.weight")
        width = width if width is not None else _weight(layer, "self_attn.qkv_proj.weight")
        hidden = hidden or (width.shape[-1] if width is not None else None)
        mixer = _weight(layer, "mlp_t.gate_up_proj.weight")
        seq = seq or (mixer.shape[-1] if mixer is not None else None)
        d = getattr(getattr(layer, "self_attn", None), "head_dim", None)
        head_dim = head_dim or (d if isinstance(d, int) and d > 0 and d % 2 == 0 else None)
    if hidden is None and layers:
        return "the hidden size of its layers is unknown"
    gen = torch.Generator().manual_seed(0)
    shape = (ROWS, seq or SEQ, hidden or 8)
    names = ("hidden_states",) if kind == "block" else ("hidden_states", "input_injection")
    inputs = {name: torch.randn(shape, generator=gen) for name in names}
    kwargs = {"cos_sin": rope_cos_sin(shape[1], head_dim) if head_dim else None} if layers else {}
    return inputs, kwargs


def _tables(value, device: torch.device, dtype: torch.dtype):
    """A keyword argument of the check on the device: RoPE tables (a tensor or a tuple of them)
    in fp32 (float64 for the oracle)."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    if isinstance(value, tuple):
        return tuple(t.to(device, wide) for t in value)
    return value.to(device, wide) if isinstance(value, torch.Tensor) else value


def _copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached copy of a parameter or buffer, floating ones in `dtype`."""
    return t.detach().to(dtype if t.is_floating_point() else t.dtype, copy=True)


def _run(module: nn.Module, fn: Callable, kind: str, inputs: dict, kwargs: dict, dtype: torch.dtype):
    """fn(module's inputs) in `dtype` on the module's device, with the module's parameters and
    buffers replaced by copies in `dtype`: its output (detached) and the gradients of
    sum(out * g), g fixed random, for the inputs and the parameters (None: not reached), and
    what it returned the output as (a tensor, or the first of a tuple of it and Nones)."""
    probe = _Probe(module)
    device = next((t.device for t in module.parameters()), torch.device("cpu"))
    leaves = {name: t.to(device, dtype, copy=True).requires_grad_() for name, t in inputs.items()}
    params = {name: _copy(p, dtype).requires_grad_(p.is_floating_point()) for name, p in probe.named_parameters()}
    buffers = {name: _copy(b, dtype) for name, b in probe.named_buffers()}
    args = (leaves["hidden_states"],) if kind == "block" else tuple(leaves.values())
    call_kwargs = {name: _tables(value, device, dtype) for name, value in kwargs.items()}
    if kind == "block":  # as the reference calls blocks: by keyword
        args, call_kwargs = (), {"cos_sin": call_kwargs["cos_sin"], "hidden_states": args[0]}
    elif kind not in ("block", "reasoning module"):  # a model family's: every argument by keyword
        args, call_kwargs = (), {**leaves, **call_kwargs}
    out = torch.func.functional_call(probe, {**params, **buffers}, (fn, args, call_kwargs))
    form = "a tensor"
    if isinstance(out, tuple) and out and all(t is None for t in out[1:]):  # Huginn's (x, None)
        out, form = out[0], f"a tuple of {len(out)} (a tensor, then None)"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"returned a {type(out).__name__}, not a tensor (or a tensor and Nones)")
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    wrt = {**leaves, **{name.removeprefix("target."): p for name, p in params.items() if p.requires_grad}}
    grads = torch.autograd.grad((out * g).sum(), list(wrt.values()), allow_unused=True)
    return out.detach(), dict(zip(wrt, grads, strict=True)), form


@contextlib.contextmanager
def _state_kept(module: nn.Module) -> Iterator[None]:
    """Run the check in training mode on the reference backend, with autograd on and autocast
    off, and leave the RNG states and training flags as they were."""
    modes = [(m, m.training) for m in module.modules()]
    devices = {t.device for t in module.parameters()} | {t.device for t in module.buffers()}
    accelerators = {d.type for d in devices} - {"cpu", "meta"}
    device_type = next(iter(accelerators), None)
    indices = [d.index or 0 for d in devices if d.type == device_type] if device_type else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=sorted(set(indices)), device_type=device_type))
        for kind in {"cpu", *accelerators}:
            if torch.amp.is_autocast_available(kind):
                stack.enter_context(torch.autocast(kind, enabled=False))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(use_backend("reference"))
        module.train()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode


def _exception(e: Exception) -> str:
    message = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {message[:200]}"


def _zeros_for(oracle: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The oracle's result, or zeros where it computes none (a gradient it does not reach)."""
    return oracle if oracle is not None else torch.zeros(like.shape, dtype=torch.float64, device=like.device)


def _difference(fused, original, original64, fused64, what: str) -> str | None:
    """None when the fused result and the module's own agree under the tolerance rule both
    ways: the fused one against the module's own in float64, and the module's own against the
    fused one in float64 (each where that float64 run exists; with neither, bit for bit);
    else the measured difference."""
    if fused is None or original is None:
        present = original if fused is None else fused
        if present is None or not present.count_nonzero():
            return None
        return f"{what}: none computed by the {'fused' if fused is None else 'original'} forward"
    if fused.shape != original.shape:
        return f"{what}: shape {tuple(fused.shape)}, the module's own {tuple(original.shape)}"
    problem = None
    if original64 is not None:
        problem = tolerance_problem(fused, original, _zeros_for(original64.get(what), original), what)
    if fused64 is not None:
        problem = problem or tolerance_problem(original, fused, _zeros_for(fused64.get(what), fused), what)
    if original64 is None and fused64 is None and not torch.equal(fused, original):
        problem = f"{what}: not bit-equal"
    if problem is None:
        return None
    if not (torch.isfinite(fused).all() and torch.isfinite(original).all()):
        return problem
    return f"{what} rel. error {relative_error(fused, original):.2g}"


def _results(run) -> dict[str, torch.Tensor | None]:
    """One _run's output and gradients by what the report calls them."""
    out, grads, _ = run
    return {"forward": out, **{f"gradient of {name}": g for name, g in grads.items()}}


def _verify(module: nn.Module, fused: FusedForward, original: Callable) -> str | None:
    """None when `fused` computes what `original` does (see the module docstring), else why not."""
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        return "cannot check it: it has tensors on the meta device (patch once they are materialised)"
    with _state_kept(module):
        spec = _check_input(module, fused.kind)
        if isinstance(spec, str):
            return f"cannot check it: {spec}"
        inputs, kwargs = spec
        shape = list(next(iter(inputs.values())).shape)
        first = None
        for dtype in CHECK_DTYPES:
            try:
                ref_run = _run(module, original, fused.kind, inputs, kwargs, dtype)
                ref = _results(ref_run)
                break
            except Exception as e:  # any: the module's own code, on an input it may not take
                first = first or _exception(e)
        else:
            return f"cannot check it: its forward raised {first} on a float32 input {shape}"
        try:
            got_run = _run(module, fused, fused.kind, inputs, kwargs, dtype)
            got = _results(got_run)
        except Exception as e:
            return f"the fused forward raised {_exception(e)} where its own forward runs"
        if got_run[2] != ref_run[2]:
            return f"its forward returns {ref_run[2]}, the fused one {got_run[2]}"
        ref64, got64 = None, None
        with contextlib.suppress(Exception):  # e.g. FlashAttention: only the fused forward runs in float64
            ref64 = _results(_run(module, original, fused.kind, inputs, kwargs, torch.float64))
        with contextlib.suppress(Exception):  # a reasoning module's layers that run in half precision only
            got64 = _results(_run(module, fused, fused.kind, inputs, kwargs, torch.float64))
    problems = [_difference(got.get(what), ref.get(what), ref64, got64, what) for what in dict.fromkeys([*ref, *got])]
    # the forward's difference first, then gradients the fused forward does not compute, then the others
    problems = sorted((p for p in problems if p), key=lambda p: (not p.startswith("forward"), "none computed" not in p))
    if not problems:
        return None
    more = f"; {len(problems) - 4} more" if len(problems) > 4 else ""
    where = "" if dtype == torch.float32 else f", in {str(dtype).removeprefix('torch.')}"
    return f"its forward differs from the fused one ({'; '.join(problems[:4])}{more}{where})"


def _run_calls(module: nn.Module, fn: Callable, calls: Callable[[torch.dtype, torch.device], list[dict]], dtype):
    """fn on each of calls(dtype, device)'s keyword sets in turn (sharing what they share, a cache),
    without gradients, the module's parameters and buffers replaced by copies in `dtype`: the outputs."""
    probe = _Probe(module)
    device = next((t.device for t in module.parameters()), torch.device("cpu"))
    state = {name: _copy(t, dtype) for name, t in (*probe.named_parameters(), *probe.named_buffers())}
    with torch.no_grad():
        outs = [torch.func.functional_call(probe, state, (fn, (), kwargs)) for kwargs in calls(dtype, device)]
    return {f"call {i} forward": out[0] if isinstance(out, tuple) else out for i, out in enumerate(outs)}


def _verify_calls(module: nn.Module, fused: FusedForward, original: Callable, calls) -> str | None:
    """None when `fused` gives what `original` gives on a sequence of calls without gradients
    (a prefill and a decode step with a fresh cache each way), in float32 on the reference
    backend, under the tolerance rule against both in float64; else why not."""
    with _state_kept(module):
        try:
            ref = _run_calls(module, original, calls, torch.float32)
        except Exception as e:
            return f"cannot check it: its forward raised {_exception(e)}"
        try:
            got = _run_calls(module, fused, calls, torch.float32)
        except Exception as e:
            return f"the fused forward raised {_exception(e)} where its own forward runs"
        ref64, got64 = None, None
        with contextlib.suppress(Exception):
            ref64 = _run_calls(module, original, calls, torch.float64)
        with contextlib.suppress(Exception):
            got64 = _run_calls(module, fused, calls, torch.float64)
    problems = [p for what in ref if (p := _difference(got.get(what), ref[what], ref64, got64, what))]
    return f"its forward differs from the fused one ({'; '.join(problems[:4])})" if problems else None
