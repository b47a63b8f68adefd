"""What a model family tells ``trm_kernels.patch``, and the helpers its forwards share.

A family (one module each: ``patch_llama``, ``patch_sandwich``) says which modules it takes
(by structure and attribute names, never by class), why one it takes cannot be mapped, the
fused forward, the check's input for ``patch_check``, and the report's note: the fused ops it
runs and which calls still go to the module's own forward.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .nn import KVCache, weight_as


@dataclass(frozen=True)
class Family:
    kind: str  # the FusedForward's kind, e.g. "llama decoder layer"
    looks_like: Callable[[nn.Module], bool]
    problem: Callable[[nn.Module], str | None]  # None: it maps whole
    switches: tuple[str, ...]  # the patch switches its forward honours
    forward: Callable  # (module, ops, *args, **kwargs)
    check_input: Callable[[nn.Module], tuple[dict, dict] | str]  # (tensor inputs, other keywords) or why none
    note: Callable[[nn.Module, tuple[str, ...]], str]
    # calls with a cache its forward drives (generation), checked too: (dtype, device) -> the keywords of a
    # prefill and a decode step sharing a fresh cache; the op "kv_cache" is on if they match
    cache_calls: Callable[[nn.Module], Callable[[torch.dtype, torch.device], list[dict]]] | None = None


def backend(ops: tuple[str, ...], op: str) -> str | None:
    """None (the backend chosen as every op's is) for an op switched on, the reference for one off."""
    return None if op in ops else "reference"


def own_forward(module: nn.Module) -> Callable:
    """The forward the module had before it was patched, for the calls a fused forward does not take."""
    fused = module.__dict__.get("forward")
    original = getattr(fused, "original", None)
    return original if original is not None else type(module).forward.__get__(module)


def linear_weight(module: nn.Module, name: str) -> torch.Tensor | None:
    layer = getattr(module, name, None)
    weight = getattr(layer, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def norm_problem(norm: nn.Module | None, name: str, size: int | None = None) -> str | None:
    """Why `norm` is not an RMSNorm with a weight [size] and a float eps (``variance_epsilon``, HF's, or ``eps``)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return f"{name} has no weight [hidden]"
    if size is not None and weight.shape[0] != size:
        return f"{name}.weight has {weight.shape[0]} elements, not the hidden size {size}"
    if norm_eps(norm) is None:
        return f"{name} has no float variance_epsilon or eps"
    return None


def norm_eps(norm: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(norm, name, None)
        if isinstance(eps, float):
            return eps
    return None


# q/k/v (or gate/up) weights as one packed matrix. With a KVCache (generation: many calls, one
# set of weights) the concatenation is made once per cache and layer and kept while the cache
# lives; otherwise per call, so gradients reach the separate parameters and any write to them
# (an optimizer step, load_state_dict, an EMA's ``p.data.copy_``, which no version counter sees)
# shows on the next call. Keyed on the weights' storage and version too, for writes mid-generation.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed_weight(module: nn.Module, names: tuple[str, ...], dtype: torch.dtype, cache=None) -> torch.Tensor:
    """The named linear layers' weights in `dtype`, concatenated along their rows (one layer: its weight)."""
    layers = [getattr(module, name) for name in names]
    if len(layers) == 1:
        return weight_as(layers[0], dtype)
    if not isinstance(cache, KVCache) or torch.is_grad_enabled():
        return torch.cat([weight_as(layer, dtype) for layer in layers])
    stamp = tuple((layer.weight.data_ptr(), layer.weight._version) for layer in layers)
    held = _PACKED.setdefault(cache, {})
    key = (id(module), names, dtype)
    if key not in held or held[key][0] != stamp:
        held[key] = (stamp, torch.cat([weight_as(layer, dtype) for layer in layers]))
    return held[key][1]


@functools.lru_cache(maxsize=256)
def _signature(fn: Callable) -> inspect.Signature:
    return inspect.signature(fn)


def call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """The call's arguments by the names of the module's own forward (its ``**kwargs`` flattened
    in, defaults filled), or None where they do not bind to it or fill its ``*args``."""
    own = own_forward(module)
    func = getattr(own, "__func__", None)  # a bound method: its function's signature is cached
    signature = _signature(func) if func is not None else inspect.signature(own)
    lead = (own.__self__,) if func is not None else ()
    try:
        bound = signature.bind(*lead, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    named = dict(list(bound.arguments.items())[len(lead) :])
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and named.pop(name, ()):
            return None
    return named


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-token tables [S, d] or [1, S, d] (every row at the same positions) as [S, d], else None."""
    if cos.dim() == 3 and cos.shape[0] == 1:
        cos, sin = cos[0], sin[0]
    return (cos, sin) if cos.dim() == 2 and sin.shape == cos.shape else None
