"""One call to run existing TRM and HRM code on the fused ops: ``trm_kernels.patch(model)``.

Other model families have a module each (``patch_llama``: Hugging Face Llama-style decoder
layers; ``patch_sandwich``: Huginn-style sandwich blocks; see ``patch_family``), recognised
first and checked the same way; what follows is TRM / HRM's.

It looks for modules built like the TRM reference implementation's (SamsungSAILMontreal/
TinyRecursiveModels, HRM's likewise), by structure and attribute names, never by class:

- a **block**: ``forward(cos_sin, hidden_states)``, post-norm, with ``mlp`` (a SwiGLU:
  ``gate_up_proj``, gate first, and ``down_proj``, no biases), ``norm_eps``, and either
  ``self_attn`` (``qkv_proj`` packed as [q | k | v], ``o_proj``, ``num_heads``,
  ``num_key_value_heads``, ``head_dim``, ``causal``, no biases) or ``mlp_t`` (a SwiGLU over
  the sequence axis, applied to the block's input transposed);
- a **reasoning module**: ``forward(hidden_states, input_injection, **kwargs)`` with
  ``layers``, adding the injection and running the layers.

Names and structure say what a module looks like, not what its forward computes (a block
with these names may have learnable norm weights, be pre-norm, apply dropout), so **each
module found is verified before its forward is replaced**, and patched only if it passes:

- *The check.* The module's own forward and the fused one run once on a small random input
  (2 batch rows; a sequence of 4, or the length its ``mlp_t`` fixes; for attention, RoPE
  tables of its ``head_dim``), from a local generator, both on the ``reference`` backend
  (plain PyTorch, on any device, no Triton: the check is of the mapping, exact up to
  rounding; the fused kernels are the parity guard's business, ``trm_kernels.verify``), in
  float32 on the module's device, in training mode (where dropout shows), with the
  gradients of the inputs and of every floating parameter of the module, frozen or not.
- *The rule* (the project's, ``verify.tolerance_problem``), both ways: the fused results
  against the module's own in float64 (the module's own float32 run the reference), and
  the module's own against the fused forward in float64 (the fused float32 run the
  reference); a gradient one side computes and the other does not (unless all zero) fails.
  The second way catches a forward that is not a function of its input (dropout: its
  float64 run is no oracle). A forward that cannot run in float32 (FlashAttention, as in
  HRM, takes fp16 / bf16 only) is checked in bfloat16, else float16, against the fused
  forward in float64 alone; where neither runs in float64 (a reasoning module over such
  layers), bit for bit.
- *Left alone*, with the measured difference in the report, is every module that fails,
  e.g. ``its forward differs from the fused one (forward rel. error 0.41; gradient of
  norm1.weight: none computed by the fused forward)``, and every one whose check cannot run
  (its forward or the fused one raises on the check input: the exception is reported).
- *Reasoning modules* are verified after the blocks, with their layers as they are by then
  (patched or not), called with the ``cos_sin`` keyword the blocks take (the first
  attention layer's RoPE tables, else None): the whole forward is checked, not only the
  injection, so a final norm or anything else it adds shows. One whose layers are not
  called as ``(cos_sin, hidden_states)``, or whose hidden size its layers do not tell,
  is left alone: its arguments are unknown.
- *State.* The check leaves the module as it was: the global RNG states (CPU, the module's
  device) are restored, parameters and buffers are used through copies
  (``torch.func.functional_call``, so a forward updating a buffer updates a copy), no
  ``.grad`` is written, training flags are restored; autocast is off and autograd on during
  it. Cost: a forward and backward of one module on a few rows, in float32 twice (the
  module's, the fused) and float64 twice, per module.

A patched module's forward is a :class:`FusedForward` held in the module's ``__dict__``:
a picklable object that looks every submodule and parameter up through the module at call
time, so ``copy.deepcopy`` (whose memo maps the module to its copy), ``pickle`` /
``torch.save`` round trips, ``.to()`` and ``load_state_dict`` act on the patched module as
on the original (the reference's ``EMAHelper.ema_copy``, a deepcopy given the EMA weights,
evaluates the EMA weights). The module, its parameters and its state dict stay as they are,
so optimizers and checkpoints are unaffected; a module that cannot be mapped whole is left
untouched and named with the reason, never half-patched. Switches per op, as Liger-Kernel's
``apply_liger_kernel_to_*`` has: an op switched off runs its plain PyTorch reference.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import (
    add_rmsnorm,
    inject,
    linear_add_rmsnorm,
    rope_attention,
    swiglu_mlp,
    swiglu_mlp_rmsnorm,
    token_mlp_rmsnorm,
)
from .nn import weight_as
from .patch_check import _exception, _verify, _verify_calls
from .patch_llama import LLAMA
from .patch_sandwich import SANDWICH, adapter_note

OPS = ("attention", "rmsnorm", "swiglu", "token_mixer", "inject")
FAMILIES = {family.kind: family for family in (LLAMA, SANDWICH)}  # besides TRM/HRM's, which are here


@dataclass
class PatchReport:
    """What ``patch`` did: the modules it gave a fused forward (name -> the ops it fused) and
    those it left as they were (name -> why: a part it cannot map, or the measured difference
    between the module's forward and the fused one); ``notes``: for a patched module of a model
    family (name -> which fused ops its forward runs and which calls still take its own forward)."""

    replaced: dict[str, list[str]] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"patched {len(self.replaced)} module(s), left {len(self.left_alone)} alone"]
        for name, ops in self.replaced.items():
            lines.append(f"  patched {name or '(root)'}: {', '.join(ops) or 'no op switched on'}")
            lines += [f"    runs {self.notes[name]}"] if name in self.notes else []
        lines += [f"  left alone {name or '(root)'}: {why}" for name, why in self.left_alone.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# recognising the modules


def _has_bias(linear: nn.Module) -> bool:
    return getattr(linear, "bias", None) is not None


def _linear_problem(module, name: str, what: str, bias_note: str = "") -> str | None:
    """Why `module.name` is not a bias-free linear layer with a weight, or None."""
    layer = getattr(module, name, None)
    if not isinstance(getattr(layer, "weight", None), torch.Tensor):
        return f"{what} has no {name}.weight"
    if _has_bias(layer):
        return f"{what}.{name} has a bias{bias_note}"
    return None


def _swiglu_problem(mlp, what: str) -> str | None:
    for name in ("gate_up_proj", "down_proj"):
        if problem := _linear_problem(mlp, name, what, " (the reference's SwiGLU has none)"):
            return problem
    if mlp.gate_up_proj.weight.shape[0] != 2 * mlp.down_proj.weight.shape[1]:
        return f"{what}.gate_up_proj is not [2 * intermediate, in] for its down_proj"
    return None


def _attention_problem(attn) -> str | None:
    for name in ("num_heads", "num_key_value_heads", "head_dim", "causal"):
        if not hasattr(attn, name):
            return f"self_attn has no {name}"
    for name in ("qkv_proj", "o_proj"):
        if problem := _linear_problem(attn, name, "self_attn"):
            return problem
    width = (attn.num_heads + 2 * attn.num_key_value_heads) * attn.head_dim
    if attn.qkv_proj.weight.shape[0] != width:
        return f"self_attn.qkv_proj has {attn.qkv_proj.weight.shape[0]} outputs, not (heads + 2 kv heads) * head_dim"
    return None


def _original_forward(module: nn.Module) -> Callable:
    """The forward the module had before patch gave it one (its current one if unpatched)."""
    own = module.__dict__.get("forward")
    if isinstance(own, FusedForward):
        return own.original if own.original is not None else type(module).forward.__get__(module)
    return module.forward


def _forward_takes(module: nn.Module, names: tuple[str, ...]) -> bool:
    try:
        params = list(inspect.signature(_original_forward(module)).parameters)
    except (TypeError, ValueError):
        return False
    return tuple(params[: len(names)]) == names


def _block_problem(module: nn.Module) -> str | None:
    """None if `module` is a reference-structured block that maps whole, else why not."""
    if not _forward_takes(module, ("cos_sin", "hidden_states")):
        return "forward is not (cos_sin, hidden_states)"
    if not isinstance(getattr(module, "norm_eps", None), float):
        return "no float norm_eps"
    problem = _swiglu_problem(getattr(module, "mlp", None), "mlp") if hasattr(module, "mlp") else "no mlp"
    if problem:
        return problem
    if hasattr(module, "self_attn") == hasattr(module, "mlp_t"):
        return "has both or neither of self_attn and mlp_t"
    if hasattr(module, "mlp_t"):
        return _swiglu_problem(module.mlp_t, "mlp_t")
    return _attention_problem(module.self_attn)


def _looks_like_block(module: nn.Module) -> bool:
    return hasattr(module, "mlp") and (hasattr(module, "self_attn") or hasattr(module, "mlp_t"))


def _looks_like_reasoning_module(module: nn.Module) -> bool:
    return isinstance(getattr(module, "layers", None), nn.ModuleList) and _forward_takes(
        module, ("hidden_states", "input_injection")
    )


# ---------------------------------------------------------------------------------------------
# the fused forwards: module-level functions of the module, everything looked up through it per call


def _backend(ops: tuple[str, ...], op: str) -> str | None:
    """None (the backend chosen as every op's is) for an op switched on, the reference for one off."""
    return None if op in ops else "reference"


def _block_forward(block: nn.Module, ops: tuple[str, ...], cos_sin, hidden_states):
    h, eps = hidden_states, block.norm_eps
    if hasattr(block, "mlp_t"):
        mixer = block.mlp_t
        h = token_mlp_rmsnorm(h, weight_as(mixer.gate_up_proj, h.dtype), weight_as(mixer.down_proj, h.dtype), eps,
                              _backend(ops, "token_mixer"))  # fmt: skip
    else:
        attn = block.self_attn
        cos, sin = (None, None) if cos_sin is None else (t[: h.shape[1]] for t in cos_sin)
        out = rope_attention(attn.qkv_proj(h), cos, sin, attn.num_heads, _backend(ops, "attention"),
                             num_kv_heads=attn.num_key_value_heads, causal=bool(attn.causal),
                             head_dim=attn.head_dim)  # fmt: skip
        if "rmsnorm" in ops:  # o_proj, the residual add and the norm as one op: the norm in the GEMM's epilogue
            h = linear_add_rmsnorm(out, weight_as(attn.o_proj, h.dtype), h, eps)
        else:
            h = add_rmsnorm(h, attn.o_proj(out), -1, eps, "reference")
    w_gate_up, w_down = weight_as(block.mlp.gate_up_proj, h.dtype), weight_as(block.mlp.down_proj, h.dtype)
    if "rmsnorm" in ops and "swiglu" in ops:  # the MLP sub-layer as one op: residual + RMSNorm in the down GEMM too
        return swiglu_mlp_rmsnorm(h, w_gate_up, w_down, eps)
    # bias-free projections (checked): the whole MLP is one op, SwiGLU inside its GEMMs
    return add_rmsnorm(h, swiglu_mlp(h, w_gate_up, w_down, _backend(ops, "swiglu")), -1, eps, _backend(ops, "rmsnorm"))


def _reasoning_forward(module: nn.Module, ops: tuple[str, ...], hidden_states, input_injection, **kwargs):
    hidden_states = inject(hidden_states, input_injection, None, _backend(ops, "inject"))
    for layer in module.layers:
        hidden_states = layer(hidden_states=hidden_states, **kwargs)
    return hidden_states


_FORWARDS = {"block": _block_forward, "reasoning module": _reasoning_forward,
             **{kind: family.forward for kind, family in FAMILIES.items()}}  # fmt: skip


class FusedForward:
    """A patched module's forward: ``FusedForward(module, kind, ops, original)(*args)`` runs
    the fused forward of `kind` (``"block"`` or ``"reasoning module"``) with the ops named in
    `ops` on, every submodule and parameter looked up through `module` at call time.

    Stored in the module's ``__dict__`` as ``forward``; a plain picklable object, so a
    ``copy.deepcopy`` of the module (or of a model holding it) gets one bound to the copy,
    and a pickle round trip one bound to the unpickled module. `original` is the forward the
    module had in its ``__dict__`` before (None: its class's), what a re-patch verifies
    against and what a module left alone gets back.
    """

    def __init__(self, module: nn.Module, kind: str, ops, original: Callable | None = None):
        self.module, self.kind, self.ops, self.original = module, kind, tuple(ops), original

    def __call__(self, *args, **kwargs):
        return _FORWARDS[self.kind](self.module, self.ops, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # the module's forward's, as inspect.signature reports it
        return inspect.Signature(list(inspect.signature(_FORWARDS[self.kind]).parameters.values())[2:])

    def __repr__(self) -> str:
        return f"FusedForward({type(self.module).__name__}, {self.kind!r}, ops={list(self.ops)})"


def _set_forward(module: nn.Module, forward: Callable | None) -> None:
    """Give `module` this forward in its __dict__ (None: none there, its class's runs)."""
    if forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = forward


def _install(module: nn.Module, kind: str, ops: list[str], problem: str | None) -> str | None:
    """Give `module` the fused forward if it maps (`problem` None) and passes the check; else
    leave it with (or give it back) its own. Returns why it was left alone, or None."""
    own = module.__dict__.get("forward")
    prior = own.original if isinstance(own, FusedForward) else own
    fused = FusedForward(module, kind, ops, prior)
    if problem is None:
        try:
            problem = _verify(module, fused, _original_forward(module))
        except Exception as e:  # the check itself failed: not verified, so not patched
            problem = f"cannot check it: {_exception(e)}"
    _set_forward(module, prior if problem else fused)
    return problem


def patch(
    model: nn.Module,
    *,
    attention: bool = True,
    rmsnorm: bool = True,
    swiglu: bool = True,
    token_mixer: bool = True,
    inject: bool = True,
) -> PatchReport:
    """Give every reference-structured TRM/HRM block and reasoning module of `model`, and every
    Llama-style decoder layer and Huginn-style sandwich block, a forward on the fused ops (in
    place), each only after it was verified to compute what the module's own forward computes;
    returns what was patched (with ``notes`` for the families: the ops and which calls keep the
    module's own forward) and what was left alone, and why, every candidate by module path.

    Each switch turns one op off (it then runs its plain PyTorch reference): ``attention``
    (packed-qkv attention with RoPE, causal and grouped-query as the module says),
    ``rmsnorm`` (the residual add + RMSNorm after each sub-layer, in o_proj's GEMM epilogue
    after attention), ``swiglu`` (the MLP's activation), ``token_mixer`` (the whole ``mlp_t``
    sub-layer), ``inject`` (the input injection of a reasoning module).

    Verification (see the module docstring): blocks first, then reasoning modules with their
    layers as they are by then; each module's forward and the fused one run once on a small
    random input in float32 on the reference backend, forward and gradients (inputs and all
    parameters) compared under the tolerance rule against both forwards in float64. A module that
    differs, or whose check cannot run, is left alone with the measured difference or the
    exception in the report. The check leaves RNG states, ``.grad``, parameters, buffers and
    training flags as they were. Outputs and gradients of what is patched then equal the
    unpatched model's within each op's tolerance (exactly on the reference backend, a CPU's
    default). The forwards look the module up at call time: deepcopy, pickle, ``.to()`` and
    ``load_state_dict`` act on a patched model as on the original. Patching twice is
    harmless: a patched module is recognised, verified against its own forward and patched
    anew with the new switches.
    """
    chosen = {op for op, on in zip(OPS, (attention, rmsnorm, swiglu, token_mixer, inject), strict=True) if on}
    report = PatchReport()
    blocks, reasoning = [], []
    for name, module in model.named_modules():
        family = next((f for f in FAMILIES.values() if f.looks_like(module)), None)
        if family is not None:
            _install_family(report, name, module, family, chosen)
        elif why := adapter_note(name, module):
            report.left_alone[name] = why
        elif _looks_like_block(module):
            blocks.append((name, module))
        elif _looks_like_reasoning_module(module):
            reasoning.append((name, module))
    for name, module in blocks:
        fused = ["token_mixer" if hasattr(module, "mlp_t") else "attention", "rmsnorm", "swiglu"]
        ops = [op for op in fused if op in chosen]
        if problem := _install(module, "block", ops, _block_problem(module)):
            report.left_alone[name] = problem
        else:
            report.replaced[name] = ops
    for name, module in reasoning:  # after the blocks: verified with its layers as they now are
        ops = ["inject"] if "inject" in chosen else []
        if problem := _install(module, "reasoning module", ops, None):
            report.left_alone[name] = problem
        else:
            report.replaced[name] = ops
    if not report.replaced and not report.left_alone:
        report.left_alone[""] = ("no module built like the reference's TRM/HRM blocks or reasoning modules, "
                                 "a Llama-style decoder layer or a sandwich block")  # fmt: skip
    return report


def _install_family(report: PatchReport, name: str, module: nn.Module, family, chosen: set[str]) -> None:
    ops = [op for op in family.switches if op in chosen]
    generation = ["kv_cache"] if family.cache_calls is not None else []  # on while its calls are checked
    if problem := _install(module, family.kind, ops + generation, family.problem(module)):
        report.left_alone[name] = problem
        return
    fused, cache_problem = module.__dict__["forward"], None
    if generation:
        cache_problem = _verify_calls(module, fused, _original_forward(module), family.cache_calls(module))
        fused.ops = tuple(ops) + (() if cache_problem else ("kv_cache",))
    report.replaced[name] = ops
    off = [op for op in family.switches if op not in chosen]
    report.notes[name] = (family.note(module, fused.ops) + (f"; calls with a cache: its own forward ({cache_problem})"
                          if cache_problem else "") + (f"; off (their plain PyTorch reference): {', '.join(off)}"
                          if off else ""))  # fmt: skip


__all__ = ["OPS", "FusedForward", "PatchReport", "patch"]
