"""One decision for every process of a distributed run.

The package decides some things by measuring where it runs: which candidate of an op is
fastest (:mod:`trm_kernels.tune`), which config Triton's autotuner keeps, whether a fused
kernel passed its parity check (:mod:`trm_kernels.verify`). Measured per process, those can
differ between ranks (timing noise, one GPU's fault), and ranks would then run different
kernels with different numerics, or one rank would fall back and slow all. Under
``torch.distributed`` with more than one process, each such decision is gathered here and
made once from every rank's measurement, so every rank runs the same kernels.

Every rank reaches a decision at the same point: the first call of a signature, which data
parallel training makes in the same order on every rank (same model, same batch shape per
rank). Nothing is gathered during CUDA-graph capture or ``torch.compile`` tracing (no
decision is measured there), nor in a single process.
"""

from __future__ import annotations

import torch.distributed as dist


def active() -> bool:
    """Whether decisions are shared: an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(value):
    """Every rank's `value` (picklable), in rank order; ``[value]`` in a single process."""
    if not active():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)  # (NCCL: through the current CUDA device, which trm sets per rank)
    return values


def first(value):
    """Rank 0's `value` on every rank (`value` itself in a single process)."""
    return gather(value)[0]
