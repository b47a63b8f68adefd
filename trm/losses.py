"""Deep-supervision loss: LM loss (stablemax or softmax CE) plus the halting BCE, and metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import trm_kernels as K

from .model import Carry

IGNORE_LABEL = -100
_CE = {"stablemax": K.stablemax_cross_entropy, "softmax": K.softmax_cross_entropy}


def act_loss(
    outputs: dict[str, torch.Tensor], carry: Carry, loss: str = "stablemax"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed (not averaged) loss of one supervision step over every slot, and metric sums.

    lm_loss: per sequence, the CE summed over valid tokens / number of valid tokens,
    summed over the batch. halt_loss: BCE(q_halt, the current argmax is exactly right),
    summed. Total = lm_loss + 0.5 * halt_loss (HRM adds its q_continue BCE to the latter);
    the caller divides by the global batch.
    Metrics count halted slots only and stay on the device (no host sync).
    """
    if loss not in _CE:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(_CE)}")
    labels, logits, q_halt = carry.data["labels"], outputs["logits"], outputs["q_halt"]
    mask = labels != IGNORE_LABEL
    counts = mask.sum(-1)
    divisor = counts.clamp_min(1)
    with torch.no_grad():
        is_correct = mask & (logits.argmax(-1) == labels)
        seq_correct = is_correct.sum(-1) == counts
        valid = carry.halted & (counts > 0)
        metrics = {
            "count": valid.sum(),
            "accuracy": torch.where(valid, is_correct.sum(-1) / divisor, 0).sum(),
            "exact_accuracy": (valid & seq_correct).sum(),
            "q_halt_accuracy": (valid & ((q_halt >= 0) == seq_correct)).sum(),
            "steps": torch.where(valid, carry.steps, 0).sum(),
        }
    # each token's loss over its sequence's count, then the sum: the reference's order (in float64 for stablemax)
    lm_loss = (_CE[loss](logits, labels, IGNORE_LABEL) / divisor[:, None]).sum()
    halt_loss = F.binary_cross_entropy_with_logits(q_halt, seq_correct.to(q_halt.dtype), reduction="sum")
    metrics["lm_loss"] = lm_loss.detach()
    metrics["halt_loss"] = halt_loss.detach()
    if "target_q_continue" in outputs:  # HRM: Q-learning of the continue value
        halt_loss = halt_loss + F.binary_cross_entropy_with_logits(
            outputs["q_continue"], outputs["target_q_continue"], reduction="sum"
        )
    return lm_loss + 0.5 * halt_loss, metrics
