"""The recurrent-depth LM built from trm_kernels.nn against its plain-PyTorch twin."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import trm_kernels as K
from oracle import check
from trm_benchmarks.recurrent_depth import (
    PAD,
    QUICK,
    SEP,
    PlainRecurrentDepthLM,
    RecurrentDepthLM,
    copy_task,
    lm_loss,
    main,
    step_flops,
    training_step,
)

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


def padded(tokens, width, left=False):
    """`tokens` [B, L] padded with junk tokens to [B, width]; the key mask False on the padding."""
    junk = torch.randint(0, QUICK.vocab_size, (tokens.shape[0], width - tokens.shape[1]), generator=torch.Generator())
    mask = torch.ones(tokens.shape[0], width, dtype=torch.bool)
    if left:
        mask[:, : junk.shape[1]] = False
        return torch.cat((junk, tokens), 1), mask
    mask[:, tokens.shape[1] :] = False
    return torch.cat((tokens, junk), 1), mask


def test_padding_does_not_change_the_loss():
    """Before: training_step's loss counted the padded positions (and the one predicted from them)."""
    torch.manual_seed(0)
    model = RecurrentDepthLM(QUICK).double()
    tokens = torch.randint(0, QUICK.vocab_size, (3, 17), generator=torch.Generator().manual_seed(2))
    width = QUICK.seq_len + 1
    right, left = padded(tokens, width), padded(tokens, width, left=True)
    with K.use_backend("reference"):
        want = lm_loss(model, tokens)
        for batch in (right, left):
            torch.testing.assert_close(lm_loss(model, *batch), want)
        losses = []
        for batch in ((tokens, torch.ones_like(tokens, dtype=torch.bool)), right, left):
            twin = RecurrentDepthLM(QUICK).double()
            twin.load_state_dict(model.state_dict())
            losses.append(training_step(twin, *batch, backend="reference")())
    torch.testing.assert_close(torch.stack(losses), want.expand(3))


def test_more_tokens_than_seq_len_say_so():
    """Before: ValueError: cos must have shape (30, 32), got (24, 32)."""
    with pytest.raises(ValueError, match=r"^input has 30 tokens but the model was built with seq_len=24$"):
        RecurrentDepthLM(QUICK)(torch.zeros(2, 30, dtype=torch.long))


def test_the_training_example_learns_the_copy_task_in_seconds(capsys):
    tokens, mask = copy_task(QUICK, 4, torch.Generator().manual_seed(0))
    for row, real in zip(tokens, mask, strict=True):
        n = (int(real.sum()) - 1) // 2  # n tokens, SEP, the same n tokens, padding
        assert row[n] == SEP and torch.equal(row[:n], row[n + 1 : 2 * n + 1]) and (row[~real] == PAD).all()
    losses = main(["--steps", "60"])
    out = capsys.readouterr().out
    assert "step 60: loss" in out and len(losses) == 60
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05  # it learns
    with pytest.raises(SystemExit):
        main(["--steps", "0"])
    assert "--steps 0: must be >= 1" in capsys.readouterr().err
