"""TRM structure and recursion semantics, against the paper's numbers and hand-written loops."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import OpLog

import trm.model
from trm.config import ModelConfig, preset
from trm.layers import TokenMixer, intermediate_size
from trm.model import TRM


@pytest.mark.parametrize(
    "name, count",
    [
        ("sudoku-mlp", 5_028_866),
        ("sudoku-att", 6_828_034),
        ("maze", 6_822_914),
        ("arc1", 6_829_058),
        ("arc2", 6_829_058),
    ],
)
def test_parameter_counts_match_the_paper(name, count):
    assert TRM(preset(name).model).num_parameters() == count


def test_intermediate_sizes():
    assert intermediate_size(512, 4) == 1536
    assert intermediate_size(97, 4) == 512


def small(**kw) -> ModelConfig:
    base = dict(
        vocab_size=7,
        seq_len=9,
        hidden_size=32,
        num_heads=4,
        puzzle_emb_len=2,
        T=2,
        n=2,
        n_sup=3,
        num_puzzle_identifiers=3,
        forward_dtype="float64",
    )
    return ModelConfig(**{**base, **kw})


def batch_of(cfg: ModelConfig, size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "inputs": torch.randint(1, cfg.vocab_size, (size, cfg.seq_len), generator=g),
        "labels": torch.randint(1, cfg.vocab_size, (size, cfg.seq_len), generator=g),
        "puzzle_identifiers": torch.randint(0, cfg.num_puzzle_identifiers, (size,), generator=g),
    }


def test_token_mixer_equals_the_transposed_reference_formulation_without_copies():
    mixer = TokenMixer(9, 4.0, eps=1e-5).double()
    h = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 9, 16, dtype=torch.float64)
    with OpLog() as log:
        out = mixer(h)
        got = torch.autograd.grad(out, [h, mixer.gate_up_proj.weight, mixer.down_proj.weight], grad)
    copies = log.count(torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten.contiguous)
    assert copies == 0  # no transposed copies of h, the gate|up product or gradients

    w_gu = mixer.gate_up_proj.weight.detach().clone().requires_grad_()
    w_down = mixer.down_proj.weight.detach().clone().requires_grad_()
    x = h.detach().clone().requires_grad_()
    gate, up = F.linear(x.transpose(1, 2), w_gu).chunk(2, -1)  # [B, D, S]: SwiGLU over S
    mix = F.linear(F.silu(gate) * up, w_down).transpose(1, 2)
    want = (x + mix) * torch.rsqrt((x + mix).square().mean(dim=1, keepdim=True) + 1e-5)  # RMSNorm over S
    torch.testing.assert_close(out, want)
    for g, w in zip(got, torch.autograd.grad(want, [x, w_gu, w_down], grad), strict=True):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match=r"\[batch, seq, hidden\]"):
        mixer(h[0])


def test_embedding_layout_scale_and_prefix():
    cfg = small()
    model = TRM(cfg).double()
    model.puzzle_emb.weights.normal_()
    b = batch_of(cfg)
    x = model.embed(b["inputs"], b["puzzle_identifiers"])
    assert x.shape == (4, cfg.seq_len + cfg.puzzle_emb_len, cfg.hidden_size)
    scale = cfg.hidden_size**0.5
    torch.testing.assert_close(x[:, 0], model.puzzle_emb.weights[b["puzzle_identifiers"]].double() * scale)
    assert torch.all(x[:, 1 : cfg.puzzle_emb_len] == 0)
    tokens = model.embed_tokens.embedding_weight.double()[b["inputs"]]
    torch.testing.assert_close(x[:, cfg.puzzle_emb_len :], tokens * scale)


@pytest.mark.parametrize("mlp_t", [False, True])
def test_deep_recursion_equals_a_hand_written_loop_and_no_grad_cycles_match_grad_cycles(mlp_t):
    cfg = small(mlp_t=mlp_t)
    torch.manual_seed(0)
    model = TRM(cfg)
    b = batch_of(cfg)
    x = model.embed(b["inputs"], b["puzzle_identifiers"])
    y0, z0 = model.initial_y_z(4)
    y, z, logits, q = model.deep_recursion(x, y0, z0)

    cos, sin = (None, None) if mlp_t else (model.rope_cos, model.rope_sin)
    hy, hz = y0, z0
    for _ in range(cfg.T):  # every cycle with grad: the values must be the same
        for _ in range(cfg.n):
            hz = model.net(hz, hy, x, cos=cos, sin=sin)
        hy = model.net(hy, hz, cos=cos, sin=sin)
    torch.testing.assert_close(y, hy.detach())
    torch.testing.assert_close(z, hz.detach())
    torch.testing.assert_close(logits, model.lm_head(hy)[:, cfg.puzzle_emb_len :])
    torch.testing.assert_close(q, model.q_head(hy[:, 0]).float())
    assert not y.requires_grad and logits.requires_grad


@pytest.mark.parametrize("mlp_t", [False, True])
def test_no_grad_cycles_cast_each_weight_once_with_the_same_results(mlp_t, monkeypatch):
    cfg = small(mlp_t=mlp_t, forward_dtype="bfloat16", T=3, n=2)
    torch.manual_seed(0)
    model = TRM(cfg)
    b = batch_of(cfg)
    linears = 4 * cfg.num_layers + 2  # per layer: mixer (2) and mlp (2); lm_head and q_head

    def run():
        with OpLog() as log:
            with torch.no_grad():
                answers = [logits.clone() for logits, _ in model.solve(b)]
            carry, out = model(model.initial_carry(b), b)  # training step: casts reused in the no-grad cycles only
            (out["logits"].float().sum() + out["q_halt"].sum()).backward()
        return answers, carry.y, [p.grad.clone() for p in model.parameters()], log.count(torch.ops.aten._to_copy)

    reused = run()
    model.zero_grad()
    monkeypatch.setattr(trm.model, "casts_reused", lambda module: contextlib.nullcontext())
    per_call = run()
    for a, b_ in zip(reused[:3], per_call[:3], strict=True):  # the same casts: bitwise the same values
        torch.testing.assert_close(a, b_, rtol=0, atol=0)
    calls = cfg.T * (cfg.n + 1)
    # eval steps: once per step instead of once per net call; training: the no-grad cycles likewise
    saved = (
        cfg.n_sup * (calls - 1) * 4 * cfg.num_layers
        + (cfg.T - 1) * (cfg.n + 1) * 4 * cfg.num_layers
        - 4 * cfg.num_layers
    )
    assert per_call[3] - reused[3] == saved and reused[3] > linears


def test_only_the_last_cycle_carries_gradient():
    cfg = small()
    model = TRM(cfg)
    b = batch_of(cfg)
    x = model.embed(b["inputs"], b["puzzle_identifiers"]).detach()
    y0, z0 = (t.clone().requires_grad_() for t in model.initial_y_z(4))
    _, _, logits, _ = model.deep_recursion(x, y0, z0)
    logits.sum().backward()
    # y0/z0 enter only through the no-grad cycles (T = 2): no gradient reaches them
    assert y0.grad is None and z0.grad is None


def test_blocks_are_post_norm():
    cfg = small()
    model = TRM(cfg)
    h = torch.randn(2, cfg.seq_len + cfg.puzzle_emb_len, cfg.hidden_size, dtype=torch.float64)
    out = model.net(h, torch.zeros_like(h), cos=model.rope_cos, sin=model.rope_sin)
    torch.testing.assert_close(out.square().mean(-1), torch.ones(out.shape[:2], dtype=out.dtype), atol=1e-4, rtol=0)


def test_q_head_starts_at_minus_five_and_y_z_init_are_buffers():
    model = TRM(small())
    assert torch.all(model.q_head.weight == 0) and torch.all(model.q_head.bias == -5)
    names = dict(model.named_parameters())
    assert "y_init" not in names and "z_init" not in names and "puzzle_emb.weights" not in names
    assert {"y_init", "z_init", "puzzle_emb.weights"} <= set(model.state_dict())


def test_carry_refill_by_mask():
    cfg = small()
    model = TRM(cfg).eval()
    first, second = batch_of(cfg, seed=0), batch_of(cfg, seed=1)
    carry, _ = model(model.initial_carry(first), first)
    assert torch.equal(carry.data["inputs"], first["inputs"]) and torch.all(carry.steps == 1)
    carry.halted = torch.tensor([True, False, True, False])
    y_before = carry.y.clone()
    new, _ = model(carry, second)
    keep = ~carry.halted
    assert torch.equal(new.data["inputs"][carry.halted], second["inputs"][carry.halted])
    assert torch.equal(new.data["inputs"][keep], first["inputs"][keep])
    assert new.steps.tolist() == [1, 2, 1, 2]
    # a reset slot restarts from y_init: it equals a fresh run on the new example
    fresh, _ = model(model.initial_carry(second), second)
    torch.testing.assert_close(new.y[0], fresh.y[0])
    assert not torch.allclose(new.y[1], fresh.y[1]) and not torch.equal(new.y[1], y_before[1])


def test_evaluation_halts_exactly_at_n_sup():
    cfg = small()
    model = TRM(cfg).eval()
    with torch.no_grad():
        model.q_head.bias.fill_(10.0)  # would halt at once in training
    b = batch_of(cfg)
    carry = model.initial_carry(b)
    for step in range(1, cfg.n_sup + 1):
        carry, _ = model(carry, b)
        assert carry.halted.tolist() == [step == cfg.n_sup] * 4


def test_training_halts_on_q_and_exploration_imposes_a_minimum():
    cfg = small(n_sup=5)
    model = TRM(cfg).train()
    with torch.no_grad():
        model.q_head.bias.fill_(10.0)
    b = batch_of(cfg, size=64)
    cfg.halt_exploration_prob = 0.0
    carry, _ = model(model.initial_carry(b), b)
    assert carry.halted.all()
    cfg.halt_exploration_prob = 1.0  # every slot draws a minimum in [2, n_sup]
    torch.manual_seed(0)
    carry, _ = model(model.initial_carry(b), b)
    assert not carry.halted.any()
    with torch.no_grad():
        model.q_head.bias.fill_(-10.0)
    carry.halted[:] = False
    for _ in range(cfg.n_sup - 1):
        carry, _ = model(carry, b)
    assert carry.halted.all() and torch.all(carry.steps == cfg.n_sup)


def test_solve_supports_more_steps_than_n_sup():
    cfg = small()
    model = TRM(cfg).eval()
    b = batch_of(cfg)
    outs = list(model.solve(b, steps=cfg.n_sup + 4))
    assert len(outs) == cfg.n_sup + 4
    carry = model.initial_carry(b)
    for _ in range(cfg.n_sup):
        carry, out = model(carry, b)
    torch.testing.assert_close(outs[cfg.n_sup - 1][0], out["logits"])


@pytest.mark.parametrize("mlp_t", [False, True])
def test_the_whole_training_step_compiles_as_one_graph_and_matches_eager(mlp_t):
    """fullgraph=True: no graph break anywhere in the step, the puzzle-embedding rows included."""
    cfg = small(mlp_t=mlp_t, forward_dtype="float32", halt_exploration_prob=0.0)
    torch.manual_seed(0)
    eager = TRM(cfg)
    eager.puzzle_emb.weights.normal_()
    compiled = copy.deepcopy(eager)
    b = batch_of(cfg)
    results = []
    for model, forward in ((eager, eager), (compiled, torch.compile(compiled, fullgraph=True))):
        carry = model.initial_carry(b)
        for _ in range(2):
            carry, out = forward(carry, b)
            (out["logits"].square().sum() + out["q_halt"].sum()).backward()
        grads = [p.grad for p in model.parameters()] + [model.puzzle_emb.local_weights.grad]
        results.append((carry.y, out["logits"], *grads))
    for a, b_ in zip(*results, strict=True):  # fp32 sums in another order: ~1e-5 of the largest element
        assert (a - b_).abs().max() <= 2e-4 * a.abs().max()


def test_puzzle_rows_keep_receiving_gradients_after_the_model_is_converted():
    cfg = small()
    model = TRM(cfg)
    b = batch_of(cfg)
    model.initial_carry(b)  # reserves the rows' leaf
    model.double()  # turns every buffer, the leaf too, into a converted copy
    carry, out = model(model.initial_carry(b), b)
    out["logits"].sum().backward()
    rows = model.puzzle_emb.local_weights
    assert rows.is_leaf and rows.dtype == torch.float64 and rows.grad is not None and rows.grad.abs().sum() > 0
    assert torch.equal(model.puzzle_emb.local_ids, b["puzzle_identifiers"])
    model.zero_grad()
    assert rows.grad is None


@pytest.mark.parametrize("mlp_t", [False, True])
def test_learned_position_encodings_are_the_references(mlp_t):
    """pos_encodings=learned: a [S, D] table (init std 1/sqrt(D)) added to the input embedding,
    the sum scaled by 1/sqrt(2) and then by sqrt(D); attention then rotates nothing."""
    cfg = small(pos_encodings="learned", mlp_t=mlp_t)
    torch.manual_seed(0)
    model = TRM(cfg)
    s, d = cfg.seq_len + cfg.puzzle_emb_len, cfg.hidden_size
    assert model.embed_pos.embedding_weight.shape == (s, d)
    assert model.num_parameters() == TRM(small(mlp_t=mlp_t)).num_parameters() + s * d
    with torch.no_grad():
        model.puzzle_emb.weights.normal_()
    b = batch_of(cfg)
    tokens = F.embedding(b["inputs"], model.embed_tokens.embedding_weight.double())
    prefix = torch.zeros(4, cfg.puzzle_emb_len, d, dtype=torch.float64)
    prefix[:, 0] = model.puzzle_emb.weights[b["puzzle_identifiers"]].double()
    want = 0.707106781 * (torch.cat((prefix, tokens), 1) + model.embed_pos.embedding_weight.double()) * d**0.5
    assert torch.equal(model.embed(b["inputs"], b["puzzle_identifiers"]), want)
    if not mlp_t:
        assert torch.equal(model.rope_cos, torch.ones_like(model.rope_cos))
        assert torch.equal(model.rope_sin, torch.zeros_like(model.rope_sin))


def test_attention_without_rope_is_plain_attention_bit_for_bit():
    """pos_encodings=none or learned: the identity rotation leaves q and k exactly as projected."""
    import trm_kernels as K

    cfg = small(pos_encodings="none", forward_dtype="float32")
    model = TRM(cfg)
    qkv = torch.randn(2, cfg.seq_len + cfg.puzzle_emb_len, 3 * cfg.hidden_size)
    heads, hd = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    got = K.rope_attention(qkv, model.rope_cos, model.rope_sin, heads, backend="reference")
    q, k, v = qkv.view(2, -1, 3, heads, hd).unbind(2)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert torch.equal(got, want.transpose(1, 2).reshape(2, -1, cfg.hidden_size))
