"""The recurrent-depth LM built from trm_kernels.nn against its plain-PyTorch twin."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import trm_kernels as K
from oracle import check
from trm_benchmarks.recurrent_depth import QUICK, PlainRecurrentDepthLM, RecurrentDepthLM, step_flops

TRITON = "triton" in K.available("swiglu") and not torch.cuda.is_available()


def twins(cfg=QUICK, seed=0):
    torch.manual_seed(seed)
    fused = RecurrentDepthLM(cfg)
    plain = PlainRecurrentDepthLM(cfg)
    plain.load_state_dict(fused.state_dict())  # the same parameter names
    with torch.no_grad():  # norm weights away from their ones, so that their gradients matter
        for name, p in fused.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
                plain.get_parameter(name).copy_(p)
    return fused, plain


def data(cfg=QUICK, batch=3):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
    mask = torch.ones(batch, cfg.seq_len, dtype=torch.bool)
    mask[1, -7:] = False  # right padding
    mask[2, :5] = False  # left padding: its first queries attend nothing
    return tokens, mask


def loss_and_grads(model, tokens, mask, dtype=torch.float32):
    model = model.to(dtype)
    logits = model(tokens, mask)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    loss = (loss * mask[:, 1:].flatten()).sum()
    loss.backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_fused_model_computes_what_its_plain_twin_computes(backend, dtype):
    if backend == "reference" and dtype == torch.float16:
        pytest.skip("fp16 is the interpreter's half type; the reference runs in fp32 and float64 here")
    fused, plain = twins()
    tokens, mask = data()
    oracle, oracle_grads = loss_and_grads(twins()[1], tokens, mask, torch.float64)
    want, want_grads = loss_and_grads(plain, tokens, mask, dtype)
    with K.use_backend(backend):
        got, grads = loss_and_grads(fused, tokens, mask, dtype)
    check(got, want, oracle, "logits")
    assert set(grads) == set(want_grads) == set(oracle_grads)
    for name, g in grads.items():
        check(g, want_grads[name], oracle_grads[name], f"gradient of {name}")


def test_a_few_training_steps_give_the_twins_losses():
    fused, plain = twins()
    tokens, mask = data()
    losses = {}
    for name, model in (("fused", fused), ("plain", plain)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for _ in range(5):
            loss = F.cross_entropy(model(tokens, mask)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["fused"][-1] < losses["fused"][0] - 0.1  # it learns
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["plain"]), rtol=1e-4, atol=1e-5)


def test_the_fused_model_compiles_as_one_graph():
    fused, _ = twins()
    tokens, mask = data()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(tokens, mask), fused(tokens, mask))


def test_step_flops_counts_the_matrix_products():
    cfg = dataclasses.replace(QUICK, loops=1)
    d, s, heads, kv, hd, inter, v = 64, 24, 2, 1, 32, 128, 64
    tokens = 2 * s
    forward = 2 * tokens * d * ((heads + 2 * kv) * hd + heads * hd + 3 * inter) + 4 * 2 * heads * s * s * hd
    assert step_flops(cfg, 2) == 3 * (forward + 2 * tokens * d * v)
