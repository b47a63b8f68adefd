"""The argument checks every public op shares: each error names the argument."""

from __future__ import annotations

import torch

_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT:
        raise TypeError(f"{name} must be float64/float32/float16/bfloat16, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def _check_dim(name: str, t: torch.Tensor, dim: int) -> None:
    if not -t.dim() <= dim < t.dim():
        raise ValueError(f"dim={dim} is out of range for {name} of rank {t.dim()}")


def _check_heads(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return float(eps)


def _check_norm_weight(name: str, weight, size: int, ref_name: str, ref: torch.Tensor) -> None:
    """A norm's learnable weight: [size] (size = ref's last axis), ref's device, any float dtype."""
    _check_float(name, weight)
    if weight.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},) = {ref_name}.shape[-1], got {tuple(weight.shape)}")
    if weight.device != ref.device:
        raise ValueError(f"{name} is on {weight.device} but {ref_name} is on {ref.device}")
