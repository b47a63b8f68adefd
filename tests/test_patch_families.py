"""trm_kernels.patch on the model families besides TRM/HRM: Hugging Face Llama-style decoder
layers and Huginn-style sandwich blocks.

The models below are written here, in plain PyTorch, with the module structure and names of
transformers' Llama (separate or packed projections, GQA, rotate-half RoPE from given cos/sin,
causal) and of Huginn's raven_modeling_minimal.py (norm_1..norm_4, a packed Wqkv, interleaved
RoPE from freqs_cis, an adapter on cat([state, embeds]) in the LM's forward); transformers is
not needed. The patched model's outputs and gradients are held against the unpatched one's
and against float64 under the suite's tolerance rule.
"""

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
import trm_kernels as K
from oracle import check
from torch import nn
from trm_kernels import patch_llama, patch_sandwich
from trm_kernels.nn import KVCache
from trm_kernels.patch_family import _PACKED
from trm_kernels.verify import relative_error

TRITON = "triton" in K.available("swiglu") and not torch.cuda.is_available()
HIDDEN, SEQ = 64, 8


def wide(t):
    """The dtype RoPE is computed in: fp32, float64 for the oracle."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm (Huginn's is the same with ``eps``): weights away from ones."""

    def __init__(self, hidden, eps=1e-6, name="variance_epsilon"):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(hidden))
        setattr(self, name, eps)
        self.name = name

    def forward(self, h):
        dtype, h = h.dtype, wide(h)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + getattr(self, self.name))
        return self.weight * h.to(dtype)


class OffsetRMSNorm(RMSNorm):
    """Gemma's convention: the weight is stored as an offset from one, (1 + weight) * h."""

    def forward(self, h):
        dtype, h = h.dtype, wide(h)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + getattr(self, self.name))
        return ((1 + self.weight) * h).to(dtype)


# ---------------------------------------------------------------------------------------------
# a Llama-style decoder stack


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):  # q, k [B, H, S, d]; cos, sin [B or 1, S, d]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class ListCache:
    """A cache of a kind the patch cannot drive (as transformers' DynamicCache: grows by update)."""

    def __init__(self):
        self.keys, self.values = {}, {}

    def update(self, k, v, layer_idx):
        if layer_idx in self.keys:
            k, v = torch.cat([self.keys[layer_idx], k], 2), torch.cat([self.values[layer_idx], v], 2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v


def attend_cached(q, k, v, cache: KVCache, causal):
    """Plain-PyTorch attention of new tokens against a KVCache (rotated keys written in place)."""
    b, kv, s, _ = k.shape
    for i in range(b):
        start = int(cache.lengths[i])
        cache.k[i, start : start + s], cache.v[i, start : start + s] = k[i].transpose(0, 1), v[i].transpose(0, 1)
    positions = torch.arange(cache.capacity)
    query_positions = cache.lengths[:, None] + torch.arange(s)
    allowed = positions < (cache.lengths + s)[:, None, None]
    if causal:
        allowed = allowed & (positions <= query_positions[..., None])
    keys, values = cache.k.transpose(1, 2), cache.v.transpose(1, 2)
    group = q.shape[1] // kv
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    cache.lengths += s
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None])


class LlamaAttention(nn.Module):
    def __init__(self, hidden, heads, kv, layer_idx, packed=False, bias=False, qk_norm=False):
        super().__init__()
        self.head_dim, self.num_heads, self.num_key_value_heads = hidden // heads, heads, kv
        self.is_causal, self.layer_idx, self.scaling = True, layer_idx, (hidden // heads) ** -0.5
        d = self.head_dim
        if packed:  # Phi-3's
            self.qkv_proj = nn.Linear(hidden, (heads + 2 * kv) * d, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, heads * d, bias=bias)
            self.k_proj, self.v_proj = nn.Linear(hidden, kv * d, bias=False), nn.Linear(hidden, kv * d, bias=False)
        self.o_proj = nn.Linear(heads * d, hidden, bias=False)
        if qk_norm:  # Qwen3's (Gemma 3's with the weight as an offset from one)
            norm = OffsetRMSNorm if qk_norm == "offset" else RMSNorm
            self.q_norm, self.k_norm = norm(d), norm(d)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_value=None, **kwargs):
        b, s, _ = hidden_states.shape
        shape = (b, s, -1, self.head_dim)
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(hidden_states).split([self.num_heads * self.head_dim,
                                                           self.num_key_value_heads * self.head_dim,
                                                           self.num_key_value_heads * self.head_dim], -1)  # fmt: skip
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if isinstance(past_key_value, KVCache):
            out = self.attend_cache(q, k, v, past_key_value)
        else:
            if past_key_value is not None:
                k, v = past_key_value.update(k, v, self.layer_idx)
            group = self.num_heads // self.num_key_value_heads
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            causal = attention_mask is None and self.is_causal and q.shape[2] == k.shape[2]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def attend_cache(self, q, k, v, cache):
        return attend_cached(q, k, v, cache, self.is_causal)


class LlamaMLP(nn.Module):
    def __init__(self, hidden, inter, packed=False, bias=False):
        super().__init__()
        if packed:
            self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        else:
            self.gate_proj, self.up_proj = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act_fn(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hidden, heads, kv, layer_idx, packed=False, bias=False, qk_norm=False,
                 eps_name="variance_epsilon"):  # fmt: skip
        super().__init__()
        self.self_attn = LlamaAttention(hidden, heads, kv, layer_idx, packed, bias, qk_norm)
        self.mlp = LlamaMLP(hidden, 96, packed)
        self.input_layernorm = RMSNorm(hidden, name=eps_name)
        self.post_attention_layernorm = RMSNorm(hidden, name=eps_name)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, use_cache=False,
                cache_position=None, position_embeddings=None, **kwargs):  # fmt: skip
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                       position_embeddings=position_embeddings,
                                       past_key_value=past_key_value)  # fmt: skip
        hidden_states = residual + hidden_states
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaModel(nn.Module):
    """Called on input embeddings (their gradient is checked), to the final norm."""

    def __init__(self, heads=2, kv=1, layers=2, **variant):
        super().__init__()
        self.layers = nn.ModuleList(LlamaDecoderLayer(HIDDEN, heads, kv, i, **variant) for i in range(layers))
        self.norm = RMSNorm(HIDDEN)
        self.head_dim = HIDDEN // heads

    def forward(self, inputs_embeds, past_key_values=None, attention_mask=None):
        s = inputs_embeds.shape[1]
        if isinstance(past_key_values, list):  # KVCaches, one a layer: each sequence at its own positions
            positions = past_key_values[0].lengths[:, None] + torch.arange(s)
        else:
            start = 0 if past_key_values is None else len(past_key_values.keys) and past_key_values.keys[0].shape[2]
            positions = torch.arange(start, start + s)[None]
        cos, sin = K.rope_cos_sin(64, self.head_dim)
        cos, sin = (t[positions].to(inputs_embeds.dtype) for t in (cos, sin))
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            cache = past_key_values[i] if isinstance(past_key_values, list) else past_key_values
            h = layer(h, attention_mask=attention_mask, past_key_value=cache, position_embeddings=(cos, sin))
        return self.norm(h)


# ---------------------------------------------------------------------------------------------
# a Huginn-style recurrent-depth LM


def freqs_cis(seq, head_dim, dtype):
    """Huginn's precompute_freqs_cis: [1, S, 1, d/2, 2], cos and sin of each interleaved pair."""
    cos, sin = K.rope_cos_sin(seq, head_dim, rope="interleaved")
    return torch.stack([cos[:, ::2], sin[:, ::2]], -1)[None, :, None].to(torch.promote_types(dtype, torch.float32))


def apply_rotary_emb_complex_like(q, k, freqs):
    qk = wide(torch.cat([q, k], dim=2).unflatten(-1, (-1, 2)))
    rotated = torch.stack([qk[..., 0] * freqs[..., 0] - qk[..., 1] * freqs[..., 1],
                           qk[..., 1] * freqs[..., 0] + qk[..., 0] * freqs[..., 1]], -1).flatten(3)  # fmt: skip
    return torch.split(rotated.type_as(q), q.shape[2], dim=2)


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden, heads, qk_bias=False):
        super().__init__()
        self.n_head = self.n_kv_heads = heads
        self.head_dim = hidden // heads
        self.Wqkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        if qk_bias:  # a Huginn option
            self.qk_bias = nn.Parameter(0.1 * torch.randn(2, 1, heads, self.head_dim))

    def forward(self, x, freqs_cis, block_idx, mask=None, past_key_values=None, return_attn=False):
        b, s, e = x.shape
        q, k, v = (t.view(b, s, self.n_head, self.head_dim) for t in self.Wqkv(x).split(e, dim=2))
        if hasattr(self, "qk_bias"):
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k = apply_rotary_emb_complex_like(q, k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, block_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1)
        return self.proj(y.transpose(1, 2).reshape(b, s, e))


class GatedMLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.fc, self.proj = nn.Linear(hidden, 2 * inter, bias=False), nn.Linear(inter, hidden, bias=False)
        self.nonlin = nn.SiLU()

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(self.nonlin(gate) * up)


class SandwichBlock(nn.Module):
    def __init__(self, hidden, heads, layer_id, qk_bias=False, extra_norm=False):
        super().__init__()
        self.norm_1, self.norm_2, self.norm_3, self.norm_4 = (RMSNorm(hidden, 1e-6, "eps") for _ in range(4))
        self.attn, self.mlp, self.layer_id = CausalSelfAttention(hidden, heads, qk_bias), GatedMLP(hidden, 96), layer_id
        if extra_norm:
            self.norm_5 = RMSNorm(hidden, 1e-6, "eps")

    def forward(self, x, freqs_cis, step_idx, mask=None, past_key_values=None, return_attn=False):
        attn = self.attn(self.norm_1(x), freqs_cis, step_idx, mask, past_key_values, return_attn)
        x = self.norm_2(attn + x)
        mlp_in = self.norm_5(self.norm_3(x)) if hasattr(self, "norm_5") else self.norm_3(x)
        x = self.norm_4(self.mlp(mlp_in) + x)
        return x, None


class RavenLM(nn.Module):
    """prelude -> adapter(cat([state, embeds])) and the core blocks, `steps` times -> coda -> ln_f."""

    def __init__(self, heads=2, steps=2, **variant):
        super().__init__()
        block = lambda i: SandwichBlock(HIDDEN, heads, i, **variant)  # noqa: E731
        self.transformer = nn.ModuleDict(dict(
            prelude=nn.ModuleList([block(0)]), adapter=nn.Linear(2 * HIDDEN, HIDDEN, bias=False),
            core_block=nn.ModuleList([block(1), block(2)]), coda=nn.ModuleList([block(3)]),
            ln_f=RMSNorm(HIDDEN, 1e-6, "eps"),
        ))  # fmt: skip
        self.steps, self.head_dim = steps, HIDDEN // heads

    def forward(self, inputs_embeds, mask=None):
        t = self.transformer
        freqs = freqs_cis(inputs_embeds.shape[1], self.head_dim, inputs_embeds.dtype)
        x = inputs_embeds
        for block in t.prelude:
            x, _ = block(x, freqs, 0, mask)
        embeds, x = x, torch.zeros_like(x)
        for step in range(self.steps):
            x = t.adapter(torch.cat([x, embeds], dim=-1))
            for block in t.core_block:
                x, _ = block(x, freqs, step, mask)
        for block in t.coda:
            x, _ = block(x, freqs, 0, mask)
        return t.ln_f(x)


# ---------------------------------------------------------------------------------------------
# checks


def run(model, x, dtype, **kwargs):
    model = model.to(dtype)
    leaf = x.detach().to(dtype).clone().requires_grad_()
    out = model(leaf, **kwargs)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape).to(dtype)).sum().backward()
    return out.detach(), [leaf.grad] + [p.grad for p in model.parameters()]


def check_patched(make, backend, dtype=torch.float32):
    """Patch a copy of make()'s model; its output and every gradient against the unpatched one's."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, SEQ, HIDDEN)
    patched = copy.deepcopy(model)
    params, state = dict(patched.named_parameters()), {k: v.clone() for k, v in patched.state_dict().items()}
    report = K.patch(patched)
    assert dict(patched.named_parameters()) == params  # the same parameter objects ...
    assert patched.state_dict().keys() == state.keys()  # ... the same state dict, unchanged
    assert all(torch.equal(v, state[k]) for k, v in patched.state_dict().items())
    want, want_grads = run(copy.deepcopy(model), x, dtype)
    oracle, oracle_grads = run(copy.deepcopy(model), x, torch.float64)
    with K.use_backend(backend):
        out, grads = run(patched, x, dtype)
    check(out, want, oracle, "output")
    names = ["input"] + [name for name, _ in model.named_parameters()]
    for name, g, w, o in zip(names, grads, want_grads, oracle_grads, strict=True):
        assert g is not None, name  # the gradient reached the original parameter
        check(g, w, o, f"gradient of {name}")
    return report


LLAMAS = {
    "separate q/k/v, gqa": dict(),
    "packed qkv_proj and gate_up_proj": dict(packed=True),
    "multi-head, eps": dict(kv=2, eps_name="eps"),
    "q/k norms (Qwen3)": dict(qk_norm=True),
}
LAYERS = ["layers.0", "layers.1"]


@pytest.mark.parametrize("variant", list(LLAMAS))
def test_llama_layers_are_patched_and_match_on_the_reference_backend(variant):
    report = check_patched(lambda: LlamaModel(**LLAMAS[variant]), "reference")
    assert report.replaced == {name: ["attention", "rmsnorm", "swiglu"] for name in LAYERS} and not report.left_alone
    for name in LAYERS:
        lines = f"patched {name}: attention, rmsnorm, swiglu\n    runs add_rmsnorm(weight), rope_attention"
        assert lines in str(report)
        assert "add_rmsnorm(weight, prenorm=True), swiglu_mlp" in report.notes[name]
        assert "rope_attention (kv_cache_attention with a trm_kernels.nn.KVCache, checked too)" in report.notes[name]
        assert ("checked too) with QK-norm before RoPE" in report.notes[name]) == ("norm" in variant)
        assert ("q/k/v and gate/up weights concatenated per call" in report.notes[name]) != ("packed" in variant)


SANDWICH_BLOCKS = [f"transformer.{name}" for name in ("prelude.0", "core_block.0", "core_block.1", "coda.0")]


def test_sandwich_blocks_are_patched_the_adapter_named_and_all_match_on_the_reference_backend():
    report = check_patched(RavenLM, "reference")
    assert report.replaced == {name: ["attention", "rmsnorm", "swiglu"] for name in SANDWICH_BLOCKS}
    assert list(report.left_alone) == ["transformer.adapter"]
    assert "the concatenation is made in its parent's forward" in report.left_alone["transformer.adapter"]
    assert "sandwich_rmsnorm (norm_2 + norm_3)" in report.notes["transformer.core_block.0"]


def counting(monkeypatch, module, *names):
    """Calls of the fused ops `names` as `module` (a family's) makes them, by name."""
    calls = collections.Counter()
    for name in names:
        op = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _op=op, _name=name, **k: calls.update([_name]) or _op(*a, **k))
    return calls


def test_the_fused_forwards_run_the_fused_ops(monkeypatch):
    torch.manual_seed(0)
    llama, raven = LlamaModel(), RavenLM()
    K.patch(llama), K.patch(raven)
    calls = counting(monkeypatch, patch_llama, "add_rmsnorm", "rope_attention", "swiglu_mlp", "kv_cache_attention")
    llama(torch.randn(2, SEQ, HIDDEN))
    assert calls == {"add_rmsnorm": 4, "rope_attention": 2, "swiglu_mlp": 2}
    calls = counting(monkeypatch, patch_sandwich, "add_rmsnorm", "rope_attention", "sandwich_rmsnorm", "swiglu_mlp")
    raven(torch.randn(2, SEQ, HIDDEN))
    assert calls == {"add_rmsnorm": 12, "rope_attention": 6, "sandwich_rmsnorm": 6, "swiglu_mlp": 6}  # 6 block calls


@pytest.mark.skipif(not TRITON, reason="the Triton interpreter runs on CPU only")
@pytest.mark.parametrize("make", [LlamaModel, lambda: LlamaModel(packed=True, qk_norm=True), RavenLM],
                         ids=["llama", "packed, q/k norms", "raven"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_patched_families_match_under_the_interpreter(make, dtype):
    check_patched(make, "triton", dtype)


@pytest.mark.parametrize(
    "make, name, expected",
    [
        (lambda: LlamaModel(bias=True), "layers.{}", ["gradient of self_attn.q_proj.bias: none computed by the fused"]),
        (lambda: LlamaModel(qk_norm="offset"), "layers.{}", ["forward rel. error", "q_proj.weight rel. error"]),
        (lambda: RavenLM(qk_bias=True), "transformer.core_block.{}", ["forward rel. error", "attn.qk_bias: none"]),
        (lambda: RavenLM(extra_norm=True), "transformer.core_block.{}", ["forward rel. error", "norm_5.weight: none"]),
    ],
    ids=["llama q_proj bias", "llama q/k norms (1 + w)", "huginn qk_bias", "sandwich extra norm"],
)
def test_a_block_changed_slightly_is_left_alone_with_the_measured_difference(make, name, expected):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, SEQ, HIDDEN)
    want, want_grads = run(copy.deepcopy(model), x, torch.float32)
    report = K.patch(model)
    assert not report.replaced
    for i in range(2):
        why = report.left_alone[name.format(i)]
        assert why.startswith("its forward differs from the fused one (") and all(e in why for e in expected), why
        assert "forward" not in model.get_submodule(name.format(i)).__dict__
    out, grads = run(model, x, torch.float32)  # its own forward, bit for bit
    assert torch.equal(out, want) and all(torch.equal(g, w) for g, w in zip(grads, want_grads, strict=True))


def test_an_lm_whose_root_is_not_a_trm_names_every_block():
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(llama=LlamaModel(), raven=RavenLM(), other=nn.Linear(3, 3)))
    report = K.patch(model)
    assert sorted(report.replaced) == sorted([f"llama.{n}" for n in LAYERS] + [f"raven.{n}" for n in SANDWICH_BLOCKS])
    assert list(report.left_alone) == ["raven.transformer.adapter"] and "" not in report.left_alone


# ---------------------------------------------------------------------------------------------
# generation


def generate(model, prompt, steps, caches):
    """Prefill `prompt`, then `steps` decode steps each feeding back the last output; the outputs."""
    with torch.no_grad():
        outs = [model(prompt, past_key_values=caches)]
        for _ in range(steps):
            outs.append(model(outs[-1][:, -1:], past_key_values=caches))
    return torch.cat(outs, dim=1)


def kv_caches(model, batch=2, capacity=16, dtype=torch.float32):
    attn = model.layers[0].self_attn
    return [KVCache(batch, capacity, attn.num_key_value_heads, attn.head_dim, dtype) for _ in model.layers]


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if TRITON else []))
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed, q/k norms"])
def test_generation_with_a_kv_cache_runs_kv_cache_attention(monkeypatch, backend, packed):
    torch.manual_seed(0)
    model = LlamaModel(packed=packed, qk_norm=packed)
    patched = copy.deepcopy(model)
    K.patch(patched)
    prompt = torch.randn(2, 5, HIDDEN)
    want = generate(model, prompt, 3, kv_caches(model))
    oracle = generate(copy.deepcopy(model).double(), prompt.double(), 3, kv_caches(model, dtype=torch.float64))
    caches = kv_caches(model)
    calls = counting(monkeypatch, patch_llama, "rope_attention", "kv_cache_attention")
    with K.use_backend(backend):
        out = generate(patched, prompt, 3, caches)
    check(out, want, oracle, "generated")
    assert calls == {"kv_cache_attention": 2 * 4}  # two layers, a prefill and three decode steps
    assert all(int(n) == 8 for c in caches for n in c.lengths)
    held = _PACKED.get(caches[0], {})  # separate q/k/v and gate/up: concatenated once for the whole generation
    assert len(held) == (0 if packed else 2)


def test_the_weights_packed_for_a_generation_follow_a_write_to_the_parameters():
    torch.manual_seed(0)
    model = LlamaModel()
    patched = copy.deepcopy(model)
    K.patch(patched)
    prompt, caches, want_caches = torch.randn(2, 5, HIDDEN), kv_caches(model), kv_caches(model)
    generate(patched, prompt, 0, caches), generate(model, prompt, 0, want_caches)
    with torch.no_grad():  # between decode steps: an in-place write, seen by the version counter
        for m in (model, patched):
            m.layers[0].self_attn.k_proj.weight.mul_(0.5)
    step = torch.randn(2, 1, HIDDEN)
    with torch.no_grad():
        out, want = patched(step, past_key_values=caches), model(step, past_key_values=want_caches)
    assert relative_error(out, want) < 1e-5


class NonCausalCacheAttention(LlamaAttention):
    """Its own forward with a KVCache attends every cached key: not what the fused forward's does."""

    def attend_cache(self, q, k, v, cache):
        return attend_cached(q, k, v, cache, causal=False)


def test_a_layer_whose_cached_calls_differ_keeps_its_own_forward_for_them(monkeypatch):
    torch.manual_seed(0)
    model = LlamaModel()
    for i, layer in enumerate(model.layers):
        attn = NonCausalCacheAttention(HIDDEN, 2, 1, i)
        attn.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = attn
    patched = copy.deepcopy(model)
    report = K.patch(patched)
    assert list(report.replaced) == LAYERS  # the training forward maps; the cached calls do not
    why = "; calls with a cache: its own forward (its forward differs from the fused one (call 0 forward rel. error"
    assert why in report.notes["layers.0"]
    assert "checked too" not in report.notes["layers.0"]
    prompt = torch.randn(2, 5, HIDDEN)
    want = generate(model, prompt, 2, kv_caches(model))
    calls = counting(monkeypatch, patch_llama, "kv_cache_attention")
    assert torch.equal(generate(patched, prompt, 2, kv_caches(model)), want) and not calls


def test_a_cache_the_patch_cannot_drive_and_a_mask_take_the_layers_own_forward(monkeypatch):
    torch.manual_seed(0)
    model = LlamaModel()
    patched = copy.deepcopy(model)
    report = K.patch(patched)
    assert "its own forward for calls with an attention_mask, another past_key_value" in report.notes["layers.0"]
    prompt = torch.randn(2, 5, HIDDEN)
    want = generate(model, prompt, 2, ListCache())
    calls = counting(monkeypatch, patch_llama, "add_rmsnorm", "rope_attention", "kv_cache_attention")
    out = generate(patched, prompt, 2, ListCache())
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    masked = patched(prompt.new_ones(2, SEQ, HIDDEN), attention_mask=mask)
    assert torch.equal(out, want) and not calls
    assert torch.equal(masked, model(prompt.new_ones(2, SEQ, HIDDEN), attention_mask=mask))
