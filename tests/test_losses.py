"""The ACT loss head against a float64 hand computation of the paper's loss."""

import math

import pytest
import torch

from trm.losses import act_loss
from trm.model import Carry


def make(logits, labels, q_halt, halted, steps):
    b, s = labels.shape
    carry = Carry(
        y=torch.zeros(b, 1, 1),
        z=torch.zeros(b, 1, 1),
        steps=steps,
        halted=halted,
        data={"inputs": labels.clamp_min(0), "labels": labels, "puzzle_identifiers": torch.zeros(b)},
    )
    return {"logits": logits, "q_halt": q_halt}, carry


def stablemax_nll(row, label):
    s = [x + 1 if x >= 0 else 1 / (1 - x) for x in row]
    return -math.log(s[label] / sum(s))


def test_act_loss_and_metrics_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5) * 3
    labels = torch.randint(0, 5, (3, 4))
    labels[1, 2:] = -100
    labels[2] = logits[2].argmax(-1)  # slot 2 exactly right
    q_halt = torch.tensor([0.5, -1.0, 2.0])
    halted = torch.tensor([True, False, True])
    steps = torch.tensor([3, 1, 2], dtype=torch.int32)
    outputs, carry = make(logits, labels, q_halt, halted, steps)
    loss, metrics = act_loss(outputs, carry)

    lm, bce, exact = 0.0, 0.0, []
    for i in range(3):
        valid = [j for j in range(4) if labels[i, j] != -100]
        lm += sum(stablemax_nll(logits[i, j].double().tolist(), int(labels[i, j])) for j in valid) / len(valid)
        right = all(int(logits[i, j].argmax()) == int(labels[i, j]) for j in valid)
        exact.append(right)
        p = 1 / (1 + math.exp(-q_halt[i].item()))
        bce += -math.log(p) if right else -math.log(1 - p)
    assert loss.item() == pytest.approx(lm + 0.5 * bce, rel=1e-5)
    assert metrics["lm_loss"].item() == pytest.approx(lm, rel=1e-5)
    assert metrics["count"].item() == 2  # halted slots only
    assert metrics["exact_accuracy"].item() == exact[0] + exact[2]
    assert metrics["steps"].item() == 3 + 2
    assert metrics["q_halt_accuracy"].item() == (exact[0] == (0.5 >= 0)) + (exact[2] == (2.0 >= 0))


def test_softmax_loss_option_and_unknown_loss():
    logits, labels = torch.randn(2, 3, 4), torch.randint(0, 4, (2, 3))
    outputs, carry = make(logits, labels, torch.zeros(2), torch.ones(2, dtype=torch.bool), torch.ones(2))
    loss, metrics = act_loss(outputs, carry, "softmax")
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(-1).sum()
    assert metrics["lm_loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        act_loss(outputs, carry, "mse")
