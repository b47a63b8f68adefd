"""AdamATan2, sparse sign-SGD, warm-up and EMA against textbook implementations."""

import math

import pytest
import torch

from trm.model import PuzzleEmbedding
from trm.optim import EMA, AdamATan2, SparseSignSGD, warmup_lr


def test_adam_atan2_matches_a_per_element_textbook_implementation():
    torch.manual_seed(0)
    p = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    opt = AdamATan2([p], lr=0.01, betas=(0.9, 0.95), weight_decay=0.5)
    ref = p.detach().clone().tolist()
    m = [[0.0] * 3 for _ in range(5)]
    v = [[0.0] * 3 for _ in range(5)]
    for step in range(1, 8):
        grads = torch.randn(5, 3, dtype=torch.float64)
        p.grad = grads.clone()
        opt.step()
        for i in range(5):
            for j in range(3):
                g = grads[i, j].item()
                ref[i][j] *= 1 - 0.01 * 0.5
                m[i][j] = 0.9 * m[i][j] + 0.1 * g
                v[i][j] = 0.95 * v[i][j] + 0.05 * g * g
                m_hat, v_hat = m[i][j] / (1 - 0.9**step), v[i][j] / (1 - 0.95**step)
                ref[i][j] -= 0.01 * math.atan2(m_hat, math.sqrt(v_hat))
        torch.testing.assert_close(p.detach(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_adam_atan2_is_invariant_to_gradient_scale():
    a, b = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    oa, ob = AdamATan2([a], lr=0.1), AdamATan2([b], lr=0.1)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for _ in range(3):
        a.grad, b.grad = g.clone(), g * 1e-6
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b)


def test_adam_atan2_rejects_bad_settings():
    with pytest.raises(ValueError, match="betas"):
        AdamATan2([torch.zeros(1, requires_grad=True)], betas=(0.9, 1.0))


def test_sparse_sign_sgd_touches_batch_rows_only_and_sums_duplicates():
    emb = PuzzleEmbedding(6, 3).train()
    emb.weights.copy_(torch.arange(18, dtype=torch.float32).view(6, 3))
    before = emb.weights.clone()
    ids = torch.tensor([1, 4, 1])
    rows = emb(ids)
    grad = torch.tensor([[1.0, -1.0, 2.0], [-3.0, 0.0, 1.0], [-2.0, 0.5, -1.0]])
    (rows * grad).sum().backward()
    opt = SparseSignSGD(emb, lr=0.1, weight_decay=0.5)
    opt.step()
    opt.zero_grad()
    # row 1 appears twice: gradient sum [-1, -0.5, 1]
    want1 = before[1] * (1 - 0.05) - 0.1 * torch.tensor([-1.0, -1.0, 1.0])
    want4 = before[4] * (1 - 0.05) - 0.1 * torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(emb.weights[1], want1)
    torch.testing.assert_close(emb.weights[4], want4)
    untouched = [0, 2, 3, 5]
    assert torch.equal(emb.weights[untouched], before[untouched])
    assert emb.local_weights.grad is None


def test_warmup_then_constant():
    assert warmup_lr(1e-3, 1, 10) == pytest.approx(1e-4)
    assert warmup_lr(1e-3, 5, 10) == pytest.approx(5e-4)
    assert warmup_lr(1e-3, 10, 10) == warmup_lr(1e-3, 10_000, 10) == 1e-3


def test_ema_update_and_temporary_swap():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, rate=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * start + 0.1 * (start + 1))
    live = model.weight.detach().clone()
    with ema.applied(model):
        torch.testing.assert_close(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, live)
