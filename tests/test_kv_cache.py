"""kv_cache_attention against an independent oracle: each sequence's keys concatenated from its
cache and its new tokens, rotated in float64, an explicit lower-right causal mask, SDPA."""

import pytest
import torch
import torch.nn.functional as F
import trm_kernels as K
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import DEVICE, DTYPES, check, rope_partner
from trm_kernels import reference as R

pytestmark = pytest.mark.skipif("triton" not in K.available("kv_cache_attention"), reason="triton is not installed")


def oracle(qkv, k_cache, v_cache, lens, cos, sin, heads, kv, causal=True, rope="rotate_half", window=0):
    """float64 output [B, Sq, H*d] and each sequence's rotated new keys [B, Sq, KV, d]."""
    batch, seq, _ = qkv.shape
    d = k_cache.shape[-1]
    outs, new_keys = [], []
    for b in range(batch):
        cached = int(lens[b])
        x = qkv[b].double().view(seq, heads + 2 * kv, d)
        q, k, v = x[:, :heads], x[:, heads : heads + kv], x[:, heads + kv :]
        pos = torch.arange(cached, cached + seq, device=qkv.device)
        if cos is not None:
            c, s = cos[pos].double()[:, None], sin[pos].double()[:, None]
            q, k = q * c + rope_partner(q, rope) * s, k * c + rope_partner(k, rope) * s
        new_keys.append(k)
        keys = torch.cat([k_cache[b, :cached].double(), k]).repeat_interleave(heads // kv, 1)
        values = torch.cat([v_cache[b, :cached].double(), v]).repeat_interleave(heads // kv, 1)
        n = torch.arange(cached + seq, device=qkv.device)
        mask = torch.ones(seq, cached + seq, dtype=torch.bool, device=qkv.device)
        if causal:
            mask &= n[None] <= pos[:, None]
        if window:
            mask &= n[None] > pos[:, None] - window
        o = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                           attn_mask=mask)  # fmt: skip
        outs.append(o.transpose(0, 1).reshape(seq, heads * d))
    return torch.stack(outs), torch.stack(new_keys)


def case(batch, seq, capacity, heads, kv, d, dtype, rope="rotate_half", seed=0, lens=None, hf_layout=False):
    g = torch.Generator(DEVICE).manual_seed(seed)
    qkv = torch.randn(batch, seq, (heads + 2 * kv) * d, generator=g, device=DEVICE).to(dtype)
    if lens is None:
        lens = torch.randint(0, capacity - seq + 1, (batch,), generator=g, device=DEVICE, dtype=torch.int32)
    shape = (batch, kv, capacity, d) if hf_layout else (batch, capacity, kv, d)
    caches = [torch.randn(shape, generator=g, device=DEVICE).to(dtype) for _ in range(2)]
    if hf_layout:  # Hugging Face's [B, KVH, C, d], seen as [B, C, KVH, d]
        caches = [c.transpose(1, 2) for c in caches]
    cos, sin = (t.to(DEVICE) for t in K.rope_cos_sin(capacity, d, 1000.0, rope=rope))
    return qkv, *caches, lens, cos, sin


def check_cache_attention(batch, seq, capacity, heads, kv, d, dtype, backend="triton", rope="rotate_half", causal=True,
                          window=None, seed=0, lens=None, hf_layout=False, splits=0):  # fmt: skip
    qkv, k_cache, v_cache, lens, cos, sin = case(batch, seq, capacity, heads, kv, d, dtype, rope, seed, lens, hf_layout)
    want, new_keys = oracle(qkv, k_cache, v_cache, lens, cos, sin, heads, kv, causal, rope, window or 0)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        ref = R.kv_cache_attention(qkv, k_ref, v_ref, lens, cos, sin, heads, kv, causal, rope, window or 0)
        if splits:
            from trm_kernels import kv_cache

            k_got, v_got = k_cache, v_cache
            got = kv_cache.kv_cache_attention(qkv, k_got, v_got, lens, cos, sin, heads, kv, causal, rope,
                                              window or 0, splits=splits)  # fmt: skip
        else:
            k_got, v_got = k_cache.clone(), v_cache.clone()
            got = K.kv_cache_attention(qkv, k_got, v_got, lens, cos, sin, heads, backend, num_kv_heads=kv,
                                       causal=causal, rope=rope, window=window)  # fmt: skip
    what = f"B{batch} Sq{seq} C{capacity} H{heads}/{kv} d{d} {rope} causal={causal} window={window} {dtype}"
    check(got, ref, want, what)
    # the cache: the new tokens' rotated keys and values at their positions, nothing else touched
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=DEVICE)
    rows = torch.arange(batch, device=DEVICE)[:, None]
    pos = lens.long()[:, None] + torch.arange(seq, device=DEVICE)
    written[rows, pos] = True
    assert torch.equal(k_got[~written], k_ref[~written]) and torch.equal(v_got[~written], v_ref[~written]), what
    values = qkv.view(batch, seq, heads + 2 * kv, d)[:, :, heads + kv :]
    assert torch.equal(v_got[rows, pos], values), what
    check(k_got[rows, pos], k_ref[rows, pos], new_keys, f"{what}: the cached keys")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
@pytest.mark.parametrize("seq", [1, 5, 24])  # decode, a chunk of prefill, the whole cache (Sq = Sk)
def test_cache_attention_against_sdpa(dtype, rope, ratio, seq):
    lens = torch.tensor([0, 24 - seq], dtype=torch.int32, device=DEVICE) if seq == 24 else None
    check_cache_attention(2, seq, 24, 8, 8 // ratio, 32, dtype, rope=rope, lens=lens, seed=seq + ratio)


@pytest.mark.parametrize("rope", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("causal", [True, False])
def test_the_reference_backend_is_the_oracle_in_float64(rope, causal):
    qkv, k_cache, v_cache, lens, cos, sin = case(3, 4, 20, 4, 2, 8, torch.float64, rope)
    want, new_keys = oracle(qkv, k_cache, v_cache, lens, cos, sin, 4, 2, causal, rope)
    got = K.kv_cache_attention(qkv, k_cache, v_cache, lens, cos, sin, 4, "reference", num_kv_heads=2, causal=causal,
                               rope=rope)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    rows, pos = torch.arange(3)[:, None], lens.long()[:, None] + torch.arange(4)
    torch.testing.assert_close(k_cache[rows, pos].double(), new_keys, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_split_k_decode_merges_the_chunks(splits):
    """FlashDecoding's chunks: any number of them (empty ones included) gives the same output."""
    check_cache_attention(3, 1, 100, 4, 1, 64, torch.float32, splits=splits, seed=splits)


def test_sliding_window_and_hugging_face_cache_layout():
    check_cache_attention(2, 6, 50, 8, 2, 32, torch.float32, window=9, hf_layout=True, splits=2)
    check_cache_attention(2, 3, 40, 4, 4, 48, DTYPES[-1], window=1, rope="interleaved")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decoding_token_by_token_equals_attention_over_the_whole_sequence(backend):
    """A prefill of 5 then 6 single-token decode steps, through a cache: rope_attention (causal)
    over all 11 tokens at once gives the same outputs."""
    heads, kv, d, total = 4, 2, 32, 11
    qkv = torch.randn(2, total, (heads + 2 * kv) * d, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in K.rope_cos_sin(16, d))
    k_cache, v_cache = (torch.zeros(2, 16, kv, d, device=DEVICE) for _ in range(2))
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    outs = []
    with torch.no_grad():
        for chunk in (slice(0, 5), *(slice(i, i + 1) for i in range(5, total))):
            outs.append(K.kv_cache_attention(qkv[:, chunk], k_cache, v_cache, lens, cos, sin, heads, backend,
                                              num_kv_heads=kv))  # fmt: skip
            lens += chunk.stop - chunk.start
        whole = R.rope_attention(qkv.double(), cos.double(), sin.double(), heads, kv, True)
    got = torch.cat(outs, 1)
    ref = R.rope_attention(qkv, cos, sin, heads, kv, True)
    check(got, ref, whole, f"{backend} decode")


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    seq=st.sampled_from([1, 2, 3, 9, 17]),
    extra=st.integers(0, 70),
    heads_kv=st.sampled_from([(1, 1), (2, 1), (4, 2), (8, 8), (8, 1)]),
    head_dim=st.sampled_from([32, 48, 64]),
    rope=st.sampled_from(["rotate_half", "interleaved", None]),
    causal=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_cache_attention_on_random_shapes(batch, seq, extra, heads_kv, head_dim, rope, causal, seed):
    capacity = seq + extra
    qkv, k_cache, v_cache, lens, cos, sin = case(batch, seq, capacity, *heads_kv, head_dim, torch.float32,
                                                 rope or "rotate_half", seed)  # fmt: skip
    if rope is None:
        cos = sin = None
    want, _ = oracle(qkv, k_cache, v_cache, lens, cos, sin, *heads_kv, causal, rope or "rotate_half")
    ref = R.kv_cache_attention(qkv, k_cache.clone(), v_cache.clone(), lens, cos, sin, *heads_kv, causal,
                               rope or "rotate_half")  # fmt: skip
    got = K.kv_cache_attention(qkv, k_cache, v_cache, lens, cos, sin, heads_kv[0], "triton", num_kv_heads=heads_kv[1],
                               causal=causal, rope=rope or "rotate_half")  # fmt: skip
    check(got, ref, want, f"B{batch} Sq{seq} C{capacity} {heads_kv} d{head_dim} {rope} causal={causal}")


def test_arguments_are_named():
    qkv, k_cache, v_cache, lens, cos, sin = case(2, 3, 8, 4, 2, 32, torch.float32)

    def call(**changes):
        args = dict(qkv=qkv, k_cache=k_cache, v_cache=v_cache, cache_len=lens, cos=cos, sin=sin, num_heads=4)
        kwargs = {"num_kv_heads": 2} | {k: changes.pop(k) for k in list(changes) if k in ("num_kv_heads", "window")}
        return K.kv_cache_attention(**(args | changes), **kwargs)

    with pytest.raises(ValueError, match=r"cache_len\[1\] = 6: with 3 new tokens that passes the cache's capacity 8"):
        call(cache_len=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(TypeError, match="cache_len must be an int32/int64 tensor"):
        call(cache_len=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"cos has 7 positions, fewer than the cache's capacity \(8\)"):
        call(cos=cos[:7], sin=sin[:7])
    with pytest.raises(ValueError, match="half-width"):
        call(cos=cos[:, :16], sin=sin[:, :16])
    with pytest.raises(TypeError, match="v_cache has dtype torch.float16"):
        call(v_cache=v_cache.half())
    with pytest.raises(ValueError, match="k_cache's last axis"):
        call(k_cache=k_cache.transpose(2, 3))
    with pytest.raises(ValueError, match="k_cache has 2 kv heads but qkv has 1"):
        call(num_kv_heads=1, qkv=torch.randn(2, 3, 6 * 32))
    with pytest.raises(ValueError, match="window must be"):
        call(window=-1)
    with pytest.raises(RuntimeError, match="no backward"):
        call(qkv=qkv.clone().requires_grad_())
    assert call(cache_len=5).shape == (2, 3, 128)  # one int for every sequence


def test_opcheck_and_compile_without_graph_breaks():
    qkv, k_cache, v_cache, lens, cos, sin = case(2, 3, 12, 4, 2, 32, torch.float32)
    torch.library.opcheck(torch.ops.trm.kv_cache_attention,
                          (qkv, k_cache, v_cache, lens, cos, sin, 4, 2, True, False, 0, 2))  # fmt: skip

    def step(qkv, k_cache, v_cache, lens):
        return K.kv_cache_attention(qkv, k_cache, v_cache, lens, cos, sin, 4, "triton", num_kv_heads=2)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = R.kv_cache_attention(qkv, k_ref, v_ref, lens, cos, sin, 4, 2)
    torch.testing.assert_close(compiled(qkv, k_cache, v_cache, lens), want)
    torch.testing.assert_close(k_cache, k_ref)  # the in-place write survives compilation


# ---- RoPE conventions (rope_attention and the cache share them) ------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 96])
def test_interleaved_rope_attention_forward_and_backward(dtype, head_dim):
    """The interleaved convention through the fused forward and backward (96: a padded half)."""
    from oracle import compare

    qkv = torch.randn(2, 21, 8 * head_dim, device=DEVICE).to(dtype)
    cos, sin = (t.to(DEVICE) for t in K.rope_cos_sin(30, head_dim, 500.0, rope="interleaved"))  # longer than S

    def ref(t):
        tables = (cos, sin) if t.dtype != torch.float64 else (cos.double(), sin.double())
        return R.rope_attention(t, *tables, 4, 2, True, None, "interleaved")

    compare(lambda t: K.rope_attention(t, cos, sin, 4, "triton", num_kv_heads=2, causal=True, rope="interleaved"),
            ref, [qkv], f"interleaved d{head_dim}")  # fmt: skip


def test_interleaved_is_rotate_half_with_the_pairs_moved():
    """An independent oracle of the convention: interleaved RoPE on a head equals rotate-half RoPE
    on the head with its columns permuted (2i -> i, 2i+1 -> i + d/2), q and k alike."""
    d, heads = 32, 2
    qkv = torch.randn(1, 9, 3 * heads * d, dtype=torch.float64)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    moved = qkv.view(1, 9, 3 * heads, d).clone()
    moved[:, :, : 2 * heads] = moved[:, :, : 2 * heads, perm]
    inter = [t.double() for t in K.rope_cos_sin(9, d, rope="interleaved")]
    half = [t.double() for t in K.rope_cos_sin(9, d)]
    for backend in ("reference", "triton"):
        dt = torch.float64 if backend == "reference" else torch.float32
        a = K.rope_attention(qkv.to(dt), *(t.to(dt) for t in inter), heads, backend, rope="interleaved")
        b = K.rope_attention(moved.view(1, 9, -1).to(dt), *(t.to(dt) for t in half), heads, backend)
        torch.testing.assert_close(a, b, rtol=1e-5 if dt == torch.float32 else 1e-12, atol=1e-6)
    wrong = K.rope_attention(qkv, *half, heads, "reference")  # the other convention is not close
    assert (wrong - a.double()).norm() / a.norm() > 0.05


def test_rope_tables_and_their_errors():
    cos, sin = K.rope_cos_sin(4, 8, rope="interleaved")
    assert torch.equal(cos[:, 0::2], cos[:, 1::2]) and torch.equal(cos[:, 0::2], K.rope_cos_sin(4, 8)[0][:, :4])
    qkv = torch.randn(1, 4, 3 * 2 * 8)
    with pytest.raises(ValueError, match=r"cos has 4 columns, half of a head of 8: half-width"):
        K.rope_attention(qkv, cos[:, :4], sin[:, :4], 2)
    with pytest.raises(ValueError, match="cos has 3 positions, fewer than the sequence's S"):
        K.rope_attention(qkv, cos[:3], sin[:3], 2)
    with pytest.raises(ValueError, match="rope must be one of"):
        K.rope_attention(qkv, cos, sin, 2, rope="neox")
    with pytest.raises(ValueError, match="rope must be one of"):
        K.rope_cos_sin(4, 8, rope="complex")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_module_with_a_cache_generates_what_it_computes_at_once(backend):
    """trm_kernels.nn.RoPEAttention with a KVCache: a prompt of 6 then 4 decode steps equals the
    module over the 10 tokens at once (causal), and the cache's lengths advance."""
    import trm_kernels.nn as KN

    attn = KN.RoPEAttention(128, 4, 2, causal=True, rope="interleaved").to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in K.rope_cos_sin(16, 32, rope="interleaved"))
    x = torch.randn(2, 10, 128, device=DEVICE)
    cache = attn.new_cache(2, 16)
    with torch.no_grad(), K.use_backend(backend):
        parts = [attn(x[:, :6], cos, sin, cache=cache)] + [attn(x[:, i : i + 1], cos, sin, cache=cache)
                                                           for i in range(6, 10)]  # fmt: skip
        whole = attn(x, cos, sin)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [10, 10]
    with pytest.raises(ValueError, match="key_mask and cache do not go together"):
        attn(x[:, :1], cos, sin, key_mask=torch.ones(2, 1, dtype=torch.bool), cache=cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 5, 40])
def test_sliding_window_rope_attention_forward_and_backward(dtype, window):
    """rope_attention with a left window (causal, GQA, a key mask), against the reference and
    float64; window 1 attends only itself, 40 is wider than the sequence (plain causal)."""
    from oracle import compare

    qkv = torch.randn(2, 37, 8 * 32, device=DEVICE).to(dtype)
    cos, sin = (t.to(DEVICE) for t in K.rope_cos_sin(37, 32))
    mask = torch.arange(37, device=DEVICE) < torch.tensor([[37], [20]], device=DEVICE)

    def ref(t):
        tables = (cos, sin) if t.dtype != torch.float64 else (cos.double(), sin.double())
        return R.rope_attention(t, *tables, 4, 2, True, mask, "rotate_half", window)

    compare(lambda t: K.rope_attention(t, cos, sin, 4, "triton", num_kv_heads=2, causal=True, key_mask=mask,
                                       window=window), ref, [qkv], f"window {window}")  # fmt: skip


def test_a_window_is_a_band_of_the_causal_mask():
    """The reference's window against an explicit band mask (an independent oracle)."""
    qkv = torch.randn(2, 9, 3 * 2 * 8, dtype=torch.float64)
    q, k, v = qkv.view(2, 9, 6, 8).split([2, 2, 2], 2)
    i, j = torch.arange(9)[:, None], torch.arange(9)
    band = (j <= i) & (j > i - 3)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=band)
    got = K.rope_attention(qkv, None, None, 2, "reference", causal=True, window=3, head_dim=8)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(2, 9, 16), rtol=1e-12, atol=1e-12)
