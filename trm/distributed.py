"""The few collective helpers the training loop, the optimizer and evaluation share."""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every process's `t` (same shape everywhere), concatenated along dim 0 in rank order."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
