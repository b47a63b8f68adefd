"""CUDA-graph recursion: static-buffer semantics on CPU, capture vs eager on a GPU."""

import pytest
import torch

from trm.config import ModelConfig
from trm.graphs import StaticGraph
from trm.losses import act_loss
from trm.model import TRM


def test_static_buffers_are_refilled_and_outputs_overwritten():
    calls = []

    def fn(a, b):
        calls.append(1)
        return a + b, a * b

    g = StaticGraph(fn, capture=False)
    x, y = torch.randn(3), torch.randn(3)
    s, p = g(x, y)
    torch.testing.assert_close(s, x + y)
    x2, y2 = torch.randn(3), torch.randn(3)
    s2, p2 = g(x2, y2)
    assert s2 is s and p2 is p  # the same static outputs, overwritten
    torch.testing.assert_close(s2, x2 + y2)
    torch.testing.assert_close(p2, x2 * y2)
    g(torch.randn(4), torch.randn(4))  # a new shape: a new entry
    assert len(g) == 2


def test_feeding_outputs_back_as_inputs_is_a_recursion():
    g = StaticGraph(lambda a, b: (0.5 * a + b, b + 1), capture=False)
    a, b = torch.randn(5), torch.randn(5)
    ea, eb = a.clone(), b.clone()
    for _ in range(6):
        a, b = g(a, b)
        ea, eb = 0.5 * ea + eb, eb + 1
    torch.testing.assert_close(a, ea)
    torch.testing.assert_close(b, eb)


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=7, seq_len=20, hidden_size=64, num_heads=2, puzzle_emb_len=2, T=3, n=2, n_sup=3)
    return ModelConfig(**{**base, **kw})


def batch(size=4, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    data = {
        "inputs": torch.randint(1, 7, (size, 20), generator=g),
        "labels": torch.randint(1, 7, (size, 20), generator=g),
        "puzzle_identifiers": torch.zeros(size, dtype=torch.long),
    }
    return {k: v.to(device) for k, v in data.items()}


def run_steps(model: TRM, data, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Training supervision steps (loss + backward) and the accumulated gradients."""
    carry, losses = model.initial_carry(data), []
    torch.manual_seed(3)
    for _ in range(steps):
        carry, out = model(carry, data)
        loss, _ = act_loss(out, carry)
        loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mlp_t", [False, True])
def test_static_buffer_path_equals_eager_on_cpu(monkeypatch, mlp_t):
    """The graph code path (static buffers, no capture on CPU) computes what eager computes."""
    torch.manual_seed(0)
    model = TRM(small(mlp_t=mlp_t))
    data = batch()
    want_losses, want_grads = run_steps(model, data, 3)
    want_solve = [t.clone() for t, _ in model.eval().solve(data)]
    model.train().zero_grad(set_to_none=True)
    monkeypatch.setattr(model, "_graphed", lambda x: True)
    losses, grads = run_steps(model, data, 3)
    assert losses == pytest.approx(want_losses, rel=1e-6)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, msg=name)
    solve = [t.clone() for t, _ in model.eval().solve(data)]
    for got, want in zip(solve, want_solve, strict=True):
        torch.testing.assert_close(got, want)
    assert len(model.graphs["no_grad_part"]) == 1 and len(model.graphs["eval_step"]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mlp_t", [False, True])
def test_captured_graphs_equal_eager_on_gpu(mlp_t):
    torch.manual_seed(0)
    model = TRM(small(mlp_t=mlp_t, forward_dtype="float32")).cuda()
    data = batch(device="cuda")
    model.cfg.cuda_graphs = False
    want_losses, want_grads = run_steps(model, data, 4)
    want_solve = [t.clone() for t, _ in model.eval().solve(data)]
    model.train().zero_grad(set_to_none=True)
    model.cfg.cuda_graphs = True
    losses, grads = run_steps(model, data, 4)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-5, msg=name)
    solve = [t.clone() for t, _ in model.eval().solve(data)]
    for got, want in zip(solve, want_solve, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    entries = model.graphs["no_grad_part"]._entries
    assert entries[next(iter(entries))].graph is not None
