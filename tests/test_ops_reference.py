"""The reference ops against hand-written float64 formulas, gradcheck, and argument validation."""

import math

import pytest
import torch
import trm_kernels as K
from trm_kernels import reference as R


def test_add_rmsnorm_matches_float64_formula():
    x, r = torch.randn(3, 5, 37, dtype=torch.float64), torch.randn(3, 5, 37, dtype=torch.float64)
    for dim in (-1, -2):
        h = x + r
        want = h / torch.sqrt((h**2).mean(dim, keepdim=True) + 1e-5)
        torch.testing.assert_close(K.add_rmsnorm(x, r, dim=dim), want)


def test_add_rmsnorm_computes_in_fp32_and_returns_input_dtype():
    x = torch.randn(4, 64).half()
    out = K.add_rmsnorm(x)
    assert out.dtype == torch.float16
    want = (x.double() / x.double().square().mean(-1, keepdim=True).add(1e-5).sqrt()).half()
    torch.testing.assert_close(out, want, atol=1e-3, rtol=1e-3)


def test_inject_parenthesisation_is_the_references():
    h, a, b = (torch.randn(2, 3, 8).bfloat16() * 100 for _ in range(3))
    assert torch.equal(K.inject(h, a, b), h + (a + b))
    assert torch.equal(K.inject(h, a), h + a)


def test_swiglu_both_axes():
    g = torch.randn(2, 6, 10, dtype=torch.float64)
    gate, up = g[..., :5], g[..., 5:]
    torch.testing.assert_close(K.swiglu(g), gate / (1 + torch.exp(-gate)) * up)
    gate, up = g[:, :3], g[:, 3:]
    torch.testing.assert_close(K.swiglu(g, dim=-2), gate / (1 + torch.exp(-gate)) * up)


def test_rope_is_a_rotation_by_relative_position():
    """<rope(q, i), rope(k, j)> depends only on i - j, and norms are preserved."""
    seq, d = 12, 16
    cos, sin = K.rope_cos_sin(seq, d)
    q = torch.randn(1, 1, 1, d).expand(1, seq, 1, d).double()
    k = torch.randn(1, 1, 1, d).expand(1, seq, 1, d).double()
    qr, kr = R.apply_rope(q, cos.double(), sin.double()), R.apply_rope(k, cos.double(), sin.double())
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    dots = qr[0, :, 0] @ kr[0, :, 0].T  # [i, j]
    lag3 = torch.diagonal(dots, -3)  # dots[i + 3, i]
    torch.testing.assert_close(lag3, torch.full_like(lag3, dots[3, 0].item()), atol=1e-5, rtol=1e-5)


def test_rope_attention_matches_explicit_float64_attention():
    b, s, h, d = 2, 7, 3, 8
    qkv = torch.randn(b, s, 3 * h * d, dtype=torch.float64)
    cos, sin = (t.double() for t in K.rope_cos_sin(s, d))
    q, k, v = qkv.view(b, s, 3, h, d).unbind(2)
    theta = torch.outer(torch.arange(s, dtype=torch.float64), 1 / 10000 ** (torch.arange(0, d, 2).double() / d))

    def rotate(x):  # explicit pairwise rotation of (x_i, x_{i + d/2})
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        c, sn = theta.cos()[None, :, None], theta.sin()[None, :, None]
        return torch.cat((x1 * c - x2 * sn, x1 * sn + x2 * c), -1)

    q, k = rotate(q), rotate(k)
    att = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d), -1)
    want = torch.einsum("bhij,bjhd->bihd", att, v).reshape(b, s, h * d)
    torch.testing.assert_close(K.rope_attention(qkv, cos, sin, h), want)


def test_stablemax_cross_entropy_matches_hand_formula():
    logits = torch.randn(3, 5, 7) * 4
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 1] = -100
    out = K.stablemax_cross_entropy(logits, labels)

    def s(x):
        return x + 1 if x >= 0 else 1 / (1 - x)

    for i in range(3):
        for j in range(5):
            row = [s(float(v)) for v in logits[i, j].double()]
            want = 0.0 if labels[i, j] == -100 else -math.log(row[labels[i, j]] / sum(row))
            assert out[i, j].item() == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_softmax_cross_entropy_matches_hand_formula():
    logits = torch.randn(4, 9)
    labels = torch.tensor([0, 3, -100, 8])
    out = K.softmax_cross_entropy(logits, labels)
    lse = torch.logsumexp(logits.double(), -1)
    want = torch.where(labels >= 0, lse - logits.double()[torch.arange(4), labels.clamp_min(0)], 0)
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("op", ["add_rmsnorm", "swiglu", "token_mlp_rmsnorm", "rope_attention", "stablemax", "softmax"])
def test_reference_backward_gradcheck(op):
    t = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    if op == "add_rmsnorm":
        args, fn = (t(3, 4, 6), t(3, 4, 6)), lambda x, r: R.add_rmsnorm(x, r, dim=-2)
    elif op == "token_mlp_rmsnorm":
        args, fn = (t(2, 5, 3), t(8, 5), t(5, 4)), R.token_mlp_rmsnorm
    elif op == "swiglu":
        args, fn = (t(3, 8),), R.swiglu
    elif op == "rope_attention":
        cos, sin = (x.double() for x in K.rope_cos_sin(5, 4))
        args, fn = (t(2, 5, 24),), lambda qkv: R.rope_attention(qkv, cos, sin, 2)
    else:
        labels = torch.tensor([[1, -100, 0], [2, 2, 1]])
        ce = R.stablemax_cross_entropy if op == "stablemax" else R.softmax_cross_entropy
        args, fn = (t(2, 3, 4),), lambda x: ce(x, labels)
    assert torch.autograd.gradcheck(fn, args)


def _stablemax64(x, labels):
    s = torch.where(x >= 0, x + 1, 1 / (1 - x))
    logp = torch.log(s / s.sum(-1, keepdim=True))
    valid = labels != -100
    return torch.where(valid, -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0)


def test_stablemax_op_gradient_equals_float64_gradient():
    x = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.tensor([[1, -100, 0], [2, 2, 1]])
    K.stablemax_cross_entropy(x, labels).sum().backward()
    x64 = x.detach().double().requires_grad_()
    _stablemax64(x64, labels).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: K.add_rmsnorm(torch.randn(2, 4), torch.randn(2, 5)), "residual has shape"),
        (lambda: K.add_rmsnorm(torch.randn(2, 4), [1.0]), "residual must be a torch.Tensor"),
        (lambda: K.add_rmsnorm(torch.randn(2, 4), dim=2), "dim=2 is out of range"),
        (lambda: K.add_rmsnorm(torch.randint(0, 3, (2, 4))), "x must be float"),
        (lambda: K.add_rmsnorm(torch.empty(0, 4)), "x is empty"),
        (lambda: K.add_rmsnorm([1.0, 2.0]), "x must be a torch.Tensor"),
        (lambda: K.inject(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4)), "b has shape"),
        (lambda: K.swiglu(torch.randn(2, 5)), "even size"),
        (lambda: K.token_mlp_rmsnorm(torch.randn(5, 4), torch.randn(8, 5), torch.randn(5, 4)), "h must be"),
        (lambda: K.token_mlp_rmsnorm(torch.randn(2, 5, 4), torch.randn(8, 6), torch.randn(5, 4)), "w_gate_up must be"),
        (lambda: K.token_mlp_rmsnorm(torch.randn(2, 5, 4), torch.randn(7, 5), torch.randn(5, 4)), "w_gate_up must be"),
        (lambda: K.token_mlp_rmsnorm(torch.randn(2, 5, 4), torch.randn(8, 5), torch.randn(5, 3)), "w_down must be"),
        (
            lambda: K.token_mlp_rmsnorm(torch.randn(2, 5, 4), torch.randn(8, 5).half(), torch.randn(5, 4)),
            "w_gate_up has dtype",
        ),
        (lambda: K.token_mlp_rmsnorm(torch.randn(2, 5, 4), torch.randn(8, 5), torch.empty(5, 0)), "w_down is empty"),
        (
            lambda: K.rope_attention(torch.randn(2, 3, 10), *K.rope_cos_sin(3, 4), 2),
            r"is not \(num_heads \+ 2 \* num_kv_heads\) \* head_dim",
        ),
        (lambda: K.rope_attention(torch.randn(2, 3, 24), *K.rope_cos_sin(2, 4), 2), "cos has 2 positions, fewer"),
        (lambda: K.rope_attention(torch.randn(3, 24), *K.rope_cos_sin(3, 4), 2), "qkv must be"),
        (
            lambda: K.stablemax_cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long)),
            "labels has shape",
        ),
        (lambda: K.stablemax_cross_entropy(torch.randn(2, 4), torch.zeros(2)), "labels must be an integer"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_backend_switch(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.setenv("TRM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        K.add_rmsnorm(x)
    monkeypatch.setenv("TRM_BACKEND", "reference")
    assert K.get_backend() == "reference"
    with K.use_backend("auto"):
        assert K.get_backend() == "auto"
        torch.testing.assert_close(K.add_rmsnorm(x), R.add_rmsnorm(x))
    assert K.get_backend() == "reference"
    for name in ("triton", "cuda"):  # as on a machine without triton: neither is registered
        monkeypatch.delitem(K.backend._REGISTRY["add_rmsnorm"], name, raising=False)
    for name in ("triton", "cuda"):
        with pytest.raises(RuntimeError, match=f"backend '{name}' is not available for op 'add_rmsnorm'"):
            K.add_rmsnorm(x, backend=name)


def test_stablemax_gradient_is_finite_at_logit_one():
    """1 / (1 - x) is only the x < 0 branch; at x = 1 it must not poison the gradient."""
    x = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    K.stablemax_cross_entropy(x, torch.tensor([2])).sum().backward()
    assert torch.isfinite(x.grad).all()
