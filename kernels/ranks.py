"""One decision for every process of a distributed run: rank 0's.

The package decides some things by measuring where it runs: which candidate of an op is
fastest (:mod:`trm_kernels.tune`), which config Triton's autotuner keeps, whether a fused
kernel passed its parity check (:mod:`trm_kernels.verify`). Measured per process, those can
differ between ranks (timing noise, one GPU's fault), and ranks would then run different
kernels with different numerics, or one rank would fall back and slow all.

Under ``torch.distributed`` with more than one process, rank 0 makes each such decision
and publishes it in the process group's key-value store; every other rank takes rank 0's
(:func:`agree`). Rank 0 never waits, so a model called on rank 0 alone (evaluation or
logging on the main process, a common pattern) cannot hang. Another rank waits for rank 0's
decision (data-parallel training reaches each signature on every rank, rank 0 included) for
at most ``TRM_RANK_TIMEOUT`` seconds (default 300); past that, or where no store can be
had, it decides alone and says so in one :class:`RankWarning`.
"""

from __future__ import annotations

import datetime
import os
import pickle
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")
PREFIX = "trm_kernels/"


class RankWarning(RuntimeWarning):
    """A rank could not take rank 0's decision and made its own."""


def active() -> bool:
    """Whether decisions are shared: an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def timeout_seconds() -> float:
    """How long a rank other than 0 waits for rank 0's decision (``TRM_RANK_TIMEOUT``)."""
    text = os.environ.get("TRM_RANK_TIMEOUT", "300").strip() or "300"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"TRM_RANK_TIMEOUT={text!r}: a number of seconds") from None
    if not value > 0:
        raise ValueError(f"TRM_RANK_TIMEOUT={text!r}: a number of seconds > 0")
    return value


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()  # the process group's own store (torchrun's TCPStore)


def agree(key: str, decide: Callable[[], T]) -> T:
    """`decide()`'s value on rank 0, taken by every rank; `decide()` in a single process.

    `key` names the decision the same way on every rank (no device index in it). Rank 0
    decides and publishes; another rank waits for rank 0's value, and decides alone (with a
    RankWarning) if none comes within the timeout."""
    if not active():
        return decide()
    name = PREFIX + key
    try:
        store = _store()
    except Exception as e:  # a process group without a store (rare): each rank decides alone
        warnings.warn(f"trm_kernels: no key-value store to share {key} ({e}); rank {dist.get_rank()} decides "
                      "alone", RankWarning, stacklevel=2)  # fmt: skip
        return decide()
    if dist.get_rank() == 0:
        value = decide()
        store.set(name, pickle.dumps(value))
        return value
    try:
        store.wait([name], datetime.timedelta(seconds=timeout_seconds()))
        return pickle.loads(store.get(name))
    except Exception as e:  # rank 0 never reached this decision (a call made on this rank alone)
        warnings.warn(f"trm_kernels: rank {dist.get_rank()} had no decision from rank 0 for {key} within "
                      f"{timeout_seconds():g} s ({type(e).__name__}); it decides alone", RankWarning,
                      stacklevel=2)  # fmt: skip
        return decide()


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if active() else 0
