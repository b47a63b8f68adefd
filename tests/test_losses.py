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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stablemax_loss_and_gradient_are_bitwise_the_reference_formulation(dtype):
    """The reference implementation takes log-stablemax in float64, divides each token's loss by
    its sequence's count, sums in float64 and adds the halting BCE; its fp32 training then gets
    float64 gradients down to the logits. Written here in that order, independently of trm."""
    torch.manual_seed(0)
    logits = (torch.randn(6, 9, 11) * 3).to(dtype)
    labels = torch.randint(0, 11, (6, 9))
    labels[1, 4:] = -100
    labels[3] = -100  # a sequence with nothing to predict
    q_halt = torch.randn(6)
    halted = torch.ones(6, dtype=torch.bool)

    def reference_loss(x, q):
        mask = labels != -100
        divisor = mask.sum(-1).clamp_min(1).unsqueeze(-1)
        x64 = x.to(torch.float64)
        s = torch.where(x64 < 0, 1 / (1 - x64 + 1e-30), x64 + 1)
        logp = torch.log(s / s.sum(-1, keepdim=True))
        picked = logp.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
        lm = (-torch.where(mask, picked, 0) / divisor).sum()
        correct = ((x.argmax(-1) == labels) | ~mask).all(-1)
        halt = torch.nn.functional.binary_cross_entropy_with_logits(q, correct.to(q.dtype), reduction="sum")
        return lm + 0.5 * halt

    ours = logits.clone().requires_grad_()
    want = logits.clone().requires_grad_()
    q_ours, q_want = q_halt.clone().requires_grad_(), q_halt.clone().requires_grad_()
    loss, _ = act_loss(*make(ours, labels, q_ours, halted, torch.ones(6)))
    (loss * (1 / 6)).backward()
    ref = reference_loss(want, q_want)
    ((1 / 6) * ref).backward()
    assert loss.dtype == ref.dtype == torch.float64
    assert torch.equal(loss, ref)
    assert torch.equal(ours.grad, want.grad) and torch.equal(q_ours.grad, q_want.grad)
