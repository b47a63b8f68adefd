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
    generate,
    generation_rows,
    lm_loss,
    main,
    step_flops,
    training_step,
)

TRITON = "triton" in K.available("swiglu") and not torch.cuda.is_available()
SANDWICH = dataclasses.replace(QUICK, core="sandwich", injection="adapter")  # Huginn's block and adapter
CONFIGS = pytest.mark.parametrize("cfg", [QUICK, SANDWICH], ids=["prenorm-add", "sandwich-adapter"])


def twins(cfg=QUICK, seed=0):
    torch.manual_seed(seed)
    fused = RecurrentDepthLM(cfg)
    plain = PlainRecurrentDepthLM(cfg)
    plain.load_state_dict(fused.state_dict())  # the same parameter names
    fused.load_state_dict(plain.state_dict())  # both ways
    with torch.no_grad():  # norm weights away from their ones, so that their gradients matter
        for name, p in fused.named_parameters():
            if "norm." in name:
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


@CONFIGS
@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_fused_model_computes_what_its_plain_twin_computes(backend, dtype, cfg):
    if backend == "reference" and dtype == torch.float16:
        pytest.skip("fp16 is the interpreter's half type; the reference runs in fp32 and float64 here")
    fused, plain = twins(cfg)
    tokens, mask = data()
    oracle, oracle_grads = loss_and_grads(twins(cfg)[1], tokens, mask, torch.float64)
    want, want_grads = loss_and_grads(plain, tokens, mask, dtype)
    with K.use_backend(backend):
        got, grads = loss_and_grads(fused, tokens, mask, dtype)
    check(got, want, oracle, "logits")
    assert set(grads) == set(want_grads) == set(oracle_grads)
    for name, g in grads.items():
        check(g, want_grads[name], oracle_grads[name], f"gradient of {name}")


def recomputed(model, prompt, max_new_tokens, lengths):
    """Greedy generation without a cache, the oracle: every token from the whole prefix (right
    padding after a sequence's last token changes nothing before it: the model is causal)."""
    batch, p = prompt.shape
    rows, ends = torch.arange(batch), lengths.clone()
    tokens = torch.cat((torch.where(torch.arange(p) < lengths[:, None], prompt, PAD),
                        torch.full((batch, max_new_tokens), PAD)), 1)  # fmt: skip
    scores = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            scores.append(model(tokens[:, : int(ends.max())])[rows, ends - 1])
            tokens[rows, ends] = scores[-1].argmax(-1)
            ends += 1
    return tokens, torch.stack(scores, 1)


@CONFIGS
@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON else []))
def test_greedy_generation_through_the_caches_is_the_plain_twins(backend, cfg):
    """Prompts of 10, 4 and 7 tokens (right-padded to 10), 8 new tokens: a prefill, then 7
    decode steps through one KV cache per loop (kv_cache_attention) give the tokens and fp32
    scores of generating by recomputing the whole prefix, in fp32 and float64."""
    fused, plain = twins(cfg)
    prompt = torch.randint(SEP + 1, cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([10, 4, 7])
    want_tokens, want = recomputed(plain, prompt, 8, lengths)
    oracle_tokens, oracle = recomputed(twins(cfg)[1].double(), prompt, 8, lengths)
    with K.use_backend(backend):
        tokens, scores = generate(fused, prompt, 8, lengths)
    plain_tokens, plain_scores = generate(plain, prompt, 8, lengths)  # the benchmark's plain provider
    assert tokens.shape == (3, 18) and scores.shape == (3, 8, cfg.vocab_size) and scores.dtype == torch.float32
    for got in (tokens, want_tokens, plain_tokens):
        assert torch.equal(got, oracle_tokens)
    assert (tokens[1, 12:] == PAD).all() and (tokens[2, 15:] == PAD).all() and torch.equal(tokens[0, :10], prompt[0])
    check(scores, want, oracle, f"{backend} scores")
    check(plain_scores, want, oracle, "plain cached scores")


def test_a_prefill_and_a_decode_step_compile_as_one_graph_each():
    """The caches' in-place writes and length updates survive torch.compile(fullgraph=True)."""
    fused, _ = twins()
    tokens = torch.randint(0, QUICK.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), K.use_backend("triton" if TRITON else "reference"):
        outs = []
        for model in (compiled, fused):
            caches = fused.new_caches(2, 16)
            outs.append((model(tokens, caches=caches), model(tokens[:, :1], caches=caches), caches))
    (prefill, decode, caches), (want_prefill, want_decode, want_caches) = outs
    torch.testing.assert_close(prefill, want_prefill)
    torch.testing.assert_close(decode, want_decode)
    for cache, want in zip(caches, want_caches, strict=True):
        assert cache.lengths.tolist() == [9, 9] and torch.equal(cache.k, want.k) and torch.equal(cache.v, want.v)


def test_generation_refuses_what_the_caches_cannot_hold():
    fused, _ = twins()
    with pytest.raises(ValueError, match="a cache of 25 positions but the model was built with seq_len=24"):
        generate(fused, torch.ones(1, 10, dtype=torch.long), 16)
    with pytest.raises(ValueError, match="lengths"):
        generate(fused, torch.ones(2, 10, dtype=torch.long), 4, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="one per loop"):
        fused(torch.ones(1, 1, dtype=torch.long), caches=fused.new_caches(1, 4)[:1])
    with pytest.raises(ValueError, match="core must be one of 'prenorm', 'sandwich', got 'post'"):
        dataclasses.replace(QUICK, core="post")


def test_the_generation_benchmark_rows_run_on_a_cpu():
    """The code path of the benchmark's prefill and decode rows, tiny and untimed in effect (a CPU
    smoke run: these numbers claim nothing)."""
    tokens = torch.randint(0, QUICK.vocab_size, (2, QUICK.seq_len + 1), generator=torch.Generator().manual_seed(4))
    providers = [("plain PyTorch", PlainRecurrentDepthLM, "reference")]
    providers.append(("trm_kernels.nn", RecurrentDepthLM, "triton" if TRITON else "reference"))
    for name, cls, backend in providers:
        got = generation_rows(QUICK, cls, backend, False, name, tokens, torch.device("cpu"), True, backend)
        assert [r.group for r in got] == ["prefill", "decode step"] and all(r.provider == name for r in got)
        assert all(r.ms > 0 and r.extra["tokens_per_s"] > 0 and r.extra["batch"] == 2 for r in got)
        assert got[0].case == "recurrent-depth LM B=2 P=12 x2 loops"


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


@CONFIGS
def test_the_fused_model_compiles_as_one_graph(cfg):
    fused, _ = twins(cfg)
    tokens, mask = data()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(tokens, mask), fused(tokens, mask))


def test_step_flops_counts_the_matrix_products():
    cfg = dataclasses.replace(QUICK, loops=1)
    d, s, heads, kv, hd, inter, v = 64, 24, 2, 1, 32, 128, 64
    tokens = 2 * s
    forward = 2 * tokens * d * ((heads + 2 * kv) * hd + heads * hd + 3 * inter) + 4 * 2 * heads * s * s * hd
    assert step_flops(cfg, 2) == 3 * (forward + 2 * tokens * d * v)
    adapter = 2 * tokens * (2 * d) * d  # [2D -> D] on cat([h, e])
    assert step_flops(dataclasses.replace(cfg, injection="adapter"), 2) == 3 * (forward + adapter + 2 * tokens * d * v)


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
    assert "greedy generation after SEP, through a KV cache per loop" in out and " of " in out.splitlines()[-1]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05  # it learns
    with pytest.raises(SystemExit):
        main(["--steps", "0"])
    assert "--steps 0: must be >= 1" in capsys.readouterr().err


def test_ctrl_c_in_the_training_example_exits_130_without_a_traceback(monkeypatch, capsys):
    import trm_benchmarks.recurrent_depth as rd

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rd, "train_copy_task", interrupted)
    with pytest.raises(SystemExit) as stop:
        rd.main(["--steps", "5"])
    assert stop.value.code == 130
    assert "interrupted: this example saves nothing, so nothing is lost" in capsys.readouterr().err
