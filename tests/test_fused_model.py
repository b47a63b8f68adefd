"""The whole TRM supervision step with fused kernels equals the reference backend."""

import pytest
import torch
import trm_kernels as K

from trm.config import ModelConfig
from trm.losses import act_loss
from trm.model import TRM

pytestmark = pytest.mark.skipif("triton" not in K.available("rope_attention"), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def step(model: TRM, batch, steps: int = 2):
    """Two ACT supervision steps (the second continues from the carry): loss and gradients."""
    carry = model.initial_carry(batch)
    total = 0.0
    for _ in range(steps):
        carry, outputs = model(carry, batch)
        loss, _ = act_loss(outputs, carry)
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["puzzle_emb"] = model.puzzle_emb.local_weights.grad.clone()
    return total, grads, carry


@pytest.mark.parametrize("mlp_t", [False, True])
@pytest.mark.parametrize("dtype", ["float32"] + (["bfloat16"] if DEVICE == "cuda" else []))
def test_fused_step_equals_reference_step(mlp_t, dtype):
    cfg = ModelConfig(vocab_size=7, seq_len=30, hidden_size=64, num_heads=2, puzzle_emb_len=2, T=2, n=2, n_sup=3,
                      num_puzzle_identifiers=2, mlp_t=mlp_t, forward_dtype=dtype)  # fmt: skip
    torch.manual_seed(0)
    model = TRM(cfg).to(DEVICE).train()
    g = torch.Generator().manual_seed(1)
    batch = {
        "inputs": torch.randint(1, 7, (3, 30), generator=g),
        "labels": torch.randint(1, 7, (3, 30), generator=g),
        "puzzle_identifiers": torch.randint(0, 2, (3,), generator=g),
    }
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # same exploration draws
        with K.use_backend(backend):
            results[backend] = step(model, batch)
    (loss_r, grads_r, carry_r), (loss_f, grads_f, carry_f) = results["reference"], results["triton"]
    tol = 1e-4 if dtype == "float32" else 3e-2
    assert loss_f == pytest.approx(loss_r, rel=tol)
    torch.testing.assert_close(carry_f.y.float(), carry_r.y.float(), rtol=tol, atol=tol)
    assert torch.equal(carry_f.halted, carry_r.halted)
    for name, want in grads_r.items():
        err = (grads_f[name] - want).norm() / want.norm().clamp_min(1e-12)
        assert err < tol * 10, f"{name}: relative gradient error {err:.2e}"
