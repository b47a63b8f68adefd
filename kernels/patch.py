"""One call to run existing TRM and HRM code on the fused ops: ``trm_kernels.patch(model)``.

It looks for modules built like the TRM reference implementation's (SamsungSAILMontreal/
TinyRecursiveModels, HRM's likewise), by structure and attribute names, never by class:

- a **block**: ``forward(cos_sin, hidden_states)``, post-norm, with ``mlp`` (a SwiGLU:
  ``gate_up_proj``, gate first, and ``down_proj``, no biases), ``norm_eps``, and either
  ``self_attn`` (``qkv_proj`` packed as [q | k | v], ``o_proj``, ``num_heads``,
  ``num_key_value_heads``, ``head_dim``, ``causal``, no biases) or ``mlp_t`` (a SwiGLU over
  the sequence axis, applied to the block's input transposed);
- a **reasoning module**: ``forward(hidden_states, input_injection, **kwargs)`` with
  ``layers``, adding the injection and running the layers.

Each one found is given a forward computing the same with the fused ops (the module, its
parameters and its state dict stay as they are, so optimizers and checkpoints are
unaffected); a module that looks like one of these but cannot be mapped whole is left
untouched and named with the reason, never half-patched. Switches per op, as Liger-Kernel's
``apply_liger_kernel_to_*`` has: an op switched off runs its plain PyTorch reference.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from . import add_rmsnorm, inject, linear_add_rmsnorm, rope_attention, swiglu_mlp, swiglu_mlp_rmsnorm, token_mlp_rmsnorm
from .nn import weight_as

OPS = ("attention", "rmsnorm", "swiglu", "token_mixer", "inject")


@dataclass
class PatchReport:
    """What ``patch`` did: the modules it gave a fused forward (name -> the ops it fused) and
    those it left as they were (name -> why)."""

    replaced: dict[str, list[str]] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"patched {len(self.replaced)} module(s), left {len(self.left_alone)} alone"]
        lines += [f"  patched {name or '(root)'}: {', '.join(ops) or 'no op switched on'}"
                  for name, ops in self.replaced.items()]  # fmt: skip
        lines += [f"  left alone {name or '(root)'}: {why}" for name, why in self.left_alone.items()]
        return "\n".join(lines)


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


def _forward_takes(module: nn.Module, names: tuple[str, ...]) -> bool:
    try:
        params = list(inspect.signature(module.forward).parameters)
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


def _norm(use: bool):
    backend = None if use else "reference"
    return lambda h, branch, eps, dim=-1: add_rmsnorm(h, branch, dim, eps, backend)


def _mlp(mlp, use: bool):
    backend = None if use else "reference"

    def run(h):  # bias-free projections (checked): the whole MLP is one op, SwiGLU inside its GEMMs
        return swiglu_mlp(h, weight_as(mlp.gate_up_proj, h.dtype), weight_as(mlp.down_proj, h.dtype), backend)

    return run


def _block_forward(block, ops: set[str]):
    norm, mlp = _norm("rmsnorm" in ops), _mlp(block.mlp, "swiglu" in ops)
    eps = block.norm_eps
    if hasattr(block, "mlp_t"):
        backend = None if "token_mixer" in ops else "reference"

        def mix(h, cos_sin):
            w_gate_up, w_down = weight_as(block.mlp_t.gate_up_proj, h.dtype), weight_as(block.mlp_t.down_proj, h.dtype)
            return token_mlp_rmsnorm(h, w_gate_up, w_down, eps, backend)

    else:
        attn = block.self_attn
        backend = None if "attention" in ops else "reference"

        def mix(h, cos_sin):
            cos, sin = (None, None) if cos_sin is None else (t[: h.shape[1]] for t in cos_sin)
            out = rope_attention(attn.qkv_proj(h), cos, sin, attn.num_heads, backend,
                                 num_kv_heads=attn.num_key_value_heads, causal=bool(attn.causal),
                                 head_dim=attn.head_dim)  # fmt: skip
            if "rmsnorm" in ops:  # o_proj, the residual add and the norm as one op: the norm in the GEMM's epilogue
                return linear_add_rmsnorm(out, weight_as(attn.o_proj, h.dtype), h, eps)
            return norm(h, attn.o_proj(out), eps)

    if {"rmsnorm", "swiglu"} <= ops:  # the MLP sub-layer as one op: residual + RMSNorm in the down GEMM too

        def sublayer(h):
            w_gate_up, w_down = weight_as(block.mlp.gate_up_proj, h.dtype), weight_as(block.mlp.down_proj, h.dtype)
            return swiglu_mlp_rmsnorm(h, w_gate_up, w_down, eps)

    else:

        def sublayer(h):
            return norm(h, mlp(h), eps)

    def forward(self, cos_sin, hidden_states):
        return sublayer(mix(hidden_states, cos_sin))

    return forward


def _reasoning_forward(use: bool):
    backend = None if use else "reference"

    def forward(self, hidden_states, input_injection, **kwargs):
        hidden_states = inject(hidden_states, input_injection, None, backend)
        for layer in self.layers:
            hidden_states = layer(hidden_states=hidden_states, **kwargs)
        return hidden_states

    return forward


def patch(
    model: nn.Module,
    *,
    attention: bool = True,
    rmsnorm: bool = True,
    swiglu: bool = True,
    token_mixer: bool = True,
    inject: bool = True,
) -> PatchReport:
    """Give every reference-structured TRM/HRM block and reasoning module of `model` a forward
    on the fused ops (in place); returns what was patched and what was left alone, and why.

    Each switch turns one op off (it then runs its plain PyTorch reference): ``attention``
    (packed-qkv attention with RoPE, causal and grouped-query as the module says),
    ``rmsnorm`` (the residual add + RMSNorm after each sub-layer, in o_proj's GEMM epilogue
    after attention), ``swiglu`` (the MLP's
    activation), ``token_mixer`` (the whole ``mlp_t`` sub-layer), ``inject`` (the input
    injection of a reasoning module). Outputs and gradients equal the unpatched model's
    within each op's tolerance (exactly on the reference backend, a CPU's default).
    Patching twice is harmless: a patched module is recognised and patched anew.
    """
    chosen = {op for op, on in zip(OPS, (attention, rmsnorm, swiglu, token_mixer, inject), strict=True) if on}
    report = PatchReport()
    for name, module in model.named_modules():
        if _looks_like_block(module):
            problem = _block_problem(module)
            if problem:
                report.left_alone[name] = problem
                continue
            fused = ["token_mixer" if hasattr(module, "mlp_t") else "attention", "rmsnorm", "swiglu"]
            module.forward = types.MethodType(_block_forward(module, chosen), module)
            report.replaced[name] = [op for op in fused if op in chosen]
        elif _looks_like_reasoning_module(module):
            module.forward = types.MethodType(_reasoning_forward("inject" in chosen), module)
            report.replaced[name] = ["inject"] if "inject" in chosen else []
    if not report.replaced and not report.left_alone:
        report.left_alone[""] = "no module built like the reference's TRM/HRM blocks or reasoning modules"
    return report


__all__ = ["OPS", "PatchReport", "patch"]
