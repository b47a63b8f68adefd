"""QK-norm in the attention ops (rope_attention, kv_cache_attention, nn.RoPEAttention) against an
independent float64 oracle: each head normalised by hand, rotated, then an explicit softmax."""

import pytest
import torch
import trm_kernels as K
from oracle import DEVICE, DTYPES, check, compare, rope_partner
from trm_kernels import reference as R

pytestmark = pytest.mark.skipif("triton" not in K.available("rope_attention"), reason="triton is not installed")


def oracle(qkv, cos, sin, heads, kv, mode, wq, wk, eps=1e-6, rope="rotate_half", causal=True):
    """float64 [B, S, H*d]: q and k heads x / sqrt(mean(x^2) + eps) * w before or after the
    rotation, then softmax(q k^T / sqrt(d)) v with query head h reading kv head h // (H / KVH)."""
    batch, seq, width = qkv.shape
    d = width // (heads + 2 * kv)
    x = qkv.double().view(batch, seq, heads + 2 * kv, d)
    q, k, v = x[:, :, :heads], x[:, :, heads : heads + kv], x[:, :, heads + kv :]

    def norm(t, w):
        t = t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps)
        return t * w.double() if w is not None else t

    c, s = cos[:seq].double()[:, None], sin[:seq].double()[:, None]
    if mode == "before":
        q, k = norm(q, wq), norm(k, wk)
    q, k = q * c + rope_partner(q, rope) * s, k * c + rope_partner(k, rope) * s
    if mode == "after":
        q, k = norm(q, wq), norm(k, wk)
    k, v = k.repeat_interleave(heads // kv, 2), v.repeat_interleave(heads // kv, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d**0.5
    if causal:
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool, device=qkv.device).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, seq, heads * d)


def weights(d, dtype=torch.float32, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    return [(1 + 0.5 * torch.randn(d, generator=g, device=DEVICE)).to(dtype) for _ in range(2)]


@pytest.mark.parametrize("mode", ["before", "after"])
@pytest.mark.parametrize("rope", ["rotate_half", "interleaved"])
def test_the_reference_is_the_oracle_in_float64(mode, rope):
    """Forward and every gradient (qkv, both weights) of the reference backend in float64."""
    heads, kv, d = 4, 2, 16
    qkv = torch.randn(2, 7, (heads + 2 * kv) * d, dtype=torch.float64, device=DEVICE)
    cos, sin = (t.double().to(DEVICE) for t in K.rope_cos_sin(9, d, 300.0, rope=rope))
    wq, wk = weights(d, torch.float64)

    def ours(qkv, wq, wk):
        return K.rope_attention(qkv, cos, sin, heads, "reference", num_kv_heads=kv, causal=True, rope=rope,
                                qk_norm=mode, q_norm_weight=wq, k_norm_weight=wk, qk_norm_eps=1e-5)  # fmt: skip

    def theirs(qkv, wq, wk):
        return oracle(qkv, cos, sin, heads, kv, mode, wq, wk, 1e-5, rope)

    torch.testing.assert_close(ours(qkv, wq, wk), theirs(qkv, wq, wk), rtol=1e-12, atol=1e-12)
    got = torch.autograd.functional.vjp(ours, (qkv, wq, wk), torch.ones(2, 7, heads * d, dtype=torch.float64))[1]
    want = torch.autograd.functional.vjp(theirs, (qkv, wq, wk), torch.ones(2, 7, heads * d, dtype=torch.float64))[1]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    plain = K.rope_attention(qkv, cos, sin, heads, "reference", num_kv_heads=kv, causal=True, rope=rope)
    assert (plain - ours(qkv, wq, wk)).norm() / plain.norm() > 0.05  # the norm is not a no-op here


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["before", "after"])
@pytest.mark.parametrize("rope", ["rotate_half", "interleaved"])
def test_fused_qk_norm_forward_and_backward(dtype, mode, rope):
    """The triton path (norm pass + attention kernels) against the reference and float64:
    the output and the gradients of qkv and of both weights (GQA, causal, a padded d of 48)."""
    heads, kv, d = 4, 2, 48
    qkv = torch.randn(2, 19, (heads + 2 * kv) * d, device=DEVICE).to(dtype)
    cos, sin = (t.to(DEVICE) for t in K.rope_cos_sin(24, d, rope=rope))
    wq, wk = weights(d, seed=len(mode + rope))

    def op(backend):
        def run(qkv, wq, wk):
            tables = (cos, sin) if qkv.dtype != torch.float64 else (cos.double(), sin.double())
            return K.rope_attention(qkv, *tables, heads, backend, num_kv_heads=kv, causal=True, rope=rope,
                                    qk_norm=mode, q_norm_weight=wq, k_norm_weight=wk)  # fmt: skip

        return run

    compare(op("triton"), op("reference"), [qkv, wq, wk], f"qk_norm={mode} {rope} {dtype}")


@pytest.mark.parametrize("mode", ["before", "after"])
def test_a_norm_without_weight_with_a_mask_and_a_window(mode):
    """No weights (RMSNorm alone), a key mask and a sliding window, fp16, not causal."""
    heads, kv, d = 2, 1, 32
    qkv = torch.randn(3, 22, (heads + 2 * kv) * d, device=DEVICE).half()
    cos, sin = (t.to(DEVICE) for t in K.rope_cos_sin(22, d))
    mask = torch.arange(22, device=DEVICE) < torch.tensor([[22], [9], [1]], device=DEVICE)

    def op(backend):
        def run(qkv):
            tables = (cos, sin) if qkv.dtype != torch.float64 else (cos.double(), sin.double())
            return K.rope_attention(qkv, *tables, heads, backend, num_kv_heads=kv, key_mask=mask, window=6,
                                    qk_norm=mode, qk_norm_eps=1e-5)  # fmt: skip

        return run

    compare(op("triton"), op("reference"), [qkv], f"unweighted qk_norm={mode}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["before", "after"])
def test_decoding_with_a_cache_equals_attention_over_the_whole_sequence(backend, mode):
    """Prompts of 5 and 3 tokens (the second right-padded in the prefill), then single-token
    steps at each sequence's own offset: every sequence's outputs equal attention over its
    tokens at once (causal, QK-norm), and the cache holds the normalised, rotated keys."""
    heads, kv, d, total = 4, 2, 32, 9
    qkv = torch.randn(2, total, (heads + 2 * kv) * d, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in K.rope_cos_sin(12, d, rope="interleaved"))
    wq, wk = weights(d)
    norm = dict(qk_norm=mode, q_norm_weight=wq, k_norm_weight=wk, num_kv_heads=kv, rope="interleaved")
    k_cache, v_cache = (torch.zeros(2, 12, kv, d, device=DEVICE) for _ in range(2))
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        prefill = K.kv_cache_attention(qkv[:, :5], k_cache, v_cache, lens, cos, sin, heads, backend, **norm)
        lens.copy_(torch.tensor([5, 3]))  # the second prompt has 3 real tokens
        steps = []
        for i in range(4):
            token = torch.stack([qkv[0, 5 + i], qkv[1, 3 + i]])[:, None]
            steps.append(K.kv_cache_attention(token, k_cache, v_cache, lens, cos, sin, heads, backend, **norm))
            lens += 1
    decoded = torch.cat(steps, 1)  # [2, 4, H * d]: tokens 5..8 of the first, 3..6 of the second
    for b, (real, got) in enumerate(((9, torch.cat([prefill[0], decoded[0]])),
                                     (7, torch.cat([prefill[1, :3], decoded[1]])))):  # fmt: skip
        x = qkv[b : b + 1, :real]
        want = oracle(x, cos, sin, heads, kv, mode, wq, wk, rope="interleaved")
        ref = R.rope_attention(x, cos, sin, heads, kv, True, None, "interleaved", 0, wq, wk, mode)
        check(got[None], ref, want, f"{backend} decode, qk_norm={mode}, sequence {b}")
        keys = x.view(1, real, heads + 2 * kv, d)[:, :, heads : heads + kv]
        pos = torch.arange(real, device=DEVICE)
        normed = R._rope_qk(keys, keys, cos[pos], sin[pos], "interleaved", mode, wk, wk, 1e-6)[0]
        torch.testing.assert_close(k_cache[b : b + 1, :real], normed, rtol=1e-5, atol=1e-5)


def test_the_module_learns_its_norm_weights_and_caches():
    """nn.RoPEAttention(qk_norm=...): q_norm.weight / k_norm.weight get gradients and are in the
    state dict; generation through a cache equals the whole sequence at once."""
    import trm_kernels.nn as KN

    attn = KN.RoPEAttention(64, 2, 1, causal=True, qk_norm="before").to(DEVICE)
    assert {"q_norm.weight", "k_norm.weight"} <= set(attn.state_dict())
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
    cos, sin = (t.to(DEVICE) for t in K.rope_cos_sin(8, 32))
    x = torch.randn(2, 8, 64, device=DEVICE)
    attn(x, cos, sin).square().sum().backward()
    assert attn.q_norm.weight.grad.abs().sum() > 0 and attn.k_norm.weight.grad.abs().sum() > 0
    cache = attn.new_cache(2, 8)
    with torch.no_grad():
        parts = [attn(x[:, :5], cos, sin, cache=cache)] + [attn(x[:, i : i + 1], cos, sin, cache=cache)
                                                           for i in range(5, 8)]  # fmt: skip
        whole = attn(x, cos, sin)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-5, atol=1e-5)
    attn.k_norm.eps = 1e-5
    with pytest.raises(ValueError, match="q_norm.eps=1e-06 and k_norm.eps=1e-05 differ"):
        attn(x, cos, sin)
    bare = KN.RoPEAttention(64, 2, qk_norm="after", qk_norm_weight=False)
    assert bare.q_norm.weight is None and not any("norm" in k for k in bare.state_dict())
    with pytest.raises(ValueError, match="qk_norm must be None, 'before' or 'after'"):
        KN.RoPEAttention(64, 2, qk_norm="pre")


def test_arguments_are_named():
    qkv = torch.randn(1, 4, 6 * 32)
    cos, sin = K.rope_cos_sin(4, 32)
    w = torch.ones(32)

    def call(**kw):
        return K.rope_attention(qkv, cos, sin, 2, "reference", **kw)

    with pytest.raises(ValueError, match="qk_norm must be None, 'before' or 'after'"):
        call(qk_norm="pre")
    with pytest.raises(ValueError, match="q_norm_weight is given but qk_norm is None"):
        call(q_norm_weight=w)
    with pytest.raises(ValueError, match=r"k_norm_weight must have shape \(head_dim,\) = \(32,\), got \(64,\)"):
        call(qk_norm="before", k_norm_weight=torch.ones(64))
    with pytest.raises(TypeError, match="q_norm_weight"):
        call(qk_norm="before", q_norm_weight=torch.ones(32, dtype=torch.int64))
    with pytest.raises(ValueError, match="q_norm_weight is on meta but qkv is on cpu"):
        call(qk_norm="before", q_norm_weight=w.to("meta"))
    for eps in (-1.0, float("inf"), "1e-6"):
        with pytest.raises(ValueError, match="qk_norm_eps must be a finite number >= 0"):
            call(qk_norm="after", qk_norm_eps=eps)
    caches = [torch.zeros(1, 8, 2, 32) for _ in range(2)]
    tables = cos.repeat(2, 1), sin.repeat(2, 1)
    with pytest.raises(ValueError, match="qk_norm must be None"):
        K.kv_cache_attention(qkv, *caches, 0, *tables, 2, qk_norm=True)
    learnable = torch.nn.Parameter(torch.ones(32))  # a cache's write has no backward: refused, not half-done
    with pytest.raises(RuntimeError, match="kv_cache_attention has no backward"):
        K.kv_cache_attention(qkv, *caches, 0, *tables, 2, qk_norm="before", k_norm_weight=learnable)
    with torch.no_grad():
        K.kv_cache_attention(qkv, *caches, 0, *tables, 2, qk_norm="before", k_norm_weight=learnable)
    assert not caches[0].requires_grad


def test_opcheck_and_compile_without_graph_breaks():
    from trm_kernels import qk_norm

    qkv = torch.randn(2, 5, 8 * 32)
    cos, sin = K.rope_cos_sin(5, 32)
    wq, wk = (torch.rand(32) + 0.5 for _ in range(2))
    for args in ((qkv, wq, wk, cos, sin, None, 4, 2, False, 1e-6), (qkv, None, wk, None, None, None, 4, 2, True, 1e-5),
                 (qkv, wq, wk, *K.rope_cos_sin(8, 32), torch.tensor([0, 3], dtype=torch.int32), 4, 2, True,
                  1e-6)):  # fmt: skip
        torch.library.opcheck(torch.ops.trm.qk_norm, args)
    grad = torch.randn_like(qkv)
    for tables, interleaved in (((cos, sin), True), ((None, None), False)):
        torch.library.opcheck(torch.ops.trm.qk_norm_backward, (grad, qkv, wq, None, *tables, 4, 2, interleaved, 1e-6))
    wq.requires_grad_()

    def step(qkv, wq):
        return K.rope_attention(qkv, cos, sin, 4, "triton", num_kv_heads=2, causal=True, qk_norm="after",
                                q_norm_weight=wq, k_norm_weight=wk)  # fmt: skip

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = qkv.clone().requires_grad_()
    out = compiled(x, wq)
    out.sum().backward()
    want = R.rope_attention(qkv, cos, sin, 4, 2, True, None, "rotate_half", 0, wq.detach(), wk, "after")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert x.grad is not None and wq.grad is not None
    assert qk_norm.MODES == R.QK_NORMS
