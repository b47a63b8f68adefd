"""trm_kernels.nn: each module against plain PyTorch written here, TRM built from them, and
compilation without graph breaks."""

import inspect
import math
import pydoc

import pytest
import torch
import torch.nn.functional as F
import trm_kernels as K
import trm_kernels.nn as KN
from torch import nn

from trm.config import preset
from trm.model import TRM


def rms(x, eps=1e-5):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def rotate(x, cos, sin):  # x [B, S, H, d]
    x1, x2 = x.chunk(2, -1)
    return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]


def plain_attention(h, qkv_w, o_w, heads, kv, d, cos, sin, causal, mask):
    """Attention written from the definition: scores, -inf where not allowed, softmax."""
    b, s, _ = h.shape
    q, k, v = (h @ qkv_w.T).view(b, s, heads + 2 * kv, d).split([heads, kv, kv], 2)
    if cos is not None:
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k, v = k.repeat_interleave(heads // kv, 2), v.repeat_interleave(heads // kv, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    allowed = torch.ones(b, 1, s, s, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, s, heads * d) @ o_w.T


@pytest.mark.parametrize("causal, kv, rope, masked", [(False, 4, True, False), (True, 2, True, True),
                                                      (True, 1, False, True), (False, 4, False, False)])  # fmt: skip
def test_rope_attention_module_is_attention_by_its_definition(causal, kv, rope, masked):
    torch.manual_seed(0)
    attn = KN.RoPEAttention(32, 4, num_kv_heads=kv, causal=causal).double()
    h = torch.randn(2, 7, 32, dtype=torch.float64)
    cos, sin = (t.double() for t in K.rope_cos_sin(7, 8)) if rope else (None, None)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3]) if masked else None
    got = attn(h, cos, sin, key_mask=mask)
    want = plain_attention(h, attn.qkv_proj.weight, attn.o_proj.weight, 4, kv, 8, cos, sin, causal, mask)
    torch.testing.assert_close(got, want)
    assert attn.qkv_proj.weight.shape == ((4 + 2 * kv) * 8, 32) and attn.o_proj.weight.shape == (32, 32)


def test_norms_and_the_mlp_are_their_definitions_with_gradients():
    torch.manual_seed(0)
    x, stream = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    norm = KN.RMSNorm(16).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    torch.testing.assert_close(norm(x), rms(x) * norm.weight)
    assert KN.RMSNorm(16, weight=False).weight is None
    pre = KN.AddRMSNorm(16, prenorm=True).double()
    with torch.no_grad():
        pre.weight.copy_(norm.weight)
    total, normed = pre(x, stream)
    torch.testing.assert_close(total, x + stream)
    torch.testing.assert_close(normed, rms(x + stream) * norm.weight)
    normed.sum().backward()
    w = norm.weight.detach().clone().requires_grad_()
    (rms(x + stream) * w).sum().backward()
    torch.testing.assert_close(pre.weight.grad, w.grad)
    post = KN.AddRMSNorm(16, weight=False)
    torch.testing.assert_close(post(x.float(), stream.float()), rms(x + stream).float())
    mlp = KN.SwiGLUMLP(16, 24).double()
    gate, up = (x @ mlp.gate_up_proj.weight.T).chunk(2, -1)
    torch.testing.assert_close(mlp(x), (F.silu(gate) * up) @ mlp.down_proj.weight.T)


def test_token_mixer_is_the_transposed_swiglu_and_norm_of_the_reference():
    torch.manual_seed(0)
    mixer = KN.TokenMixer(9, 16).double()
    h = torch.randn(2, 9, 12, dtype=torch.float64)
    t = h.transpose(1, 2)
    gate, up = (t @ mixer.gate_up_proj.weight.T).chunk(2, -1)
    want = rms(t + (F.silu(gate) * up) @ mixer.down_proj.weight.T).transpose(1, 2)
    torch.testing.assert_close(mixer(h), want)


def test_trm_is_built_from_the_modules_and_keeps_its_checkpoint_keys():
    model = TRM(preset("sudoku-att").model)
    block = model.net.layers[0]
    assert isinstance(block.self_attn, KN.RoPEAttention) and isinstance(block.mlp, KN.SwiGLUMLP)
    assert isinstance(block.attn_norm, KN.AddRMSNorm) and block.attn_norm.weight is None
    mixer = TRM(preset("sudoku-mlp").model).net.layers[1]
    assert isinstance(mixer.mlp_t, KN.TokenMixer)
    keys = {k for k in model.state_dict() if k.startswith("net.layers.0.")}
    assert keys == {"net.layers.0.self_attn.qkv_proj.weight", "net.layers.0.self_attn.o_proj.weight",
                    "net.layers.0.mlp.gate_up_proj.weight", "net.layers.0.mlp.down_proj.weight"}  # fmt: skip


def test_a_stack_of_modules_compiles_without_graph_breaks():
    torch.manual_seed(0)
    attn, mlp = KN.RoPEAttention(128, 4, num_kv_heads=2, causal=True), KN.SwiGLUMLP(128, 48)
    norm1, norm2 = KN.RMSNorm(128), KN.AddRMSNorm(128, prenorm=True)
    cos, sin = K.rope_cos_sin(6, 32)

    def block(h):
        total, n = norm2(attn(norm1(h), cos, sin), h)
        return total + mlp(n)

    h = torch.randn(2, 6, 128)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h), block(h))
    if "triton" in K.available("swiglu") and not torch.cuda.is_available():
        with K.use_backend("triton"):
            torch.testing.assert_close(torch.compile(block, fullgraph=True, backend="aot_eager")(h), block(h))


def test_every_module_documents_its_forward():
    """Before: help(trm_kernels.nn.RoPEAttention.forward) showed nn.Module's stock text."""
    stock = inspect.getdoc(torch.nn.Module.forward)
    modules = [
        m for m in vars(KN).values() if isinstance(m, type) and issubclass(m, nn.Module) and m.__module__ == KN.__name__
    ]
    assert {m.__name__ for m in modules} >= {"RMSNorm", "AddRMSNorm", "SwiGLUMLP", "RoPEAttention", "TokenMixer"}
    for module in modules:
        doc = inspect.getdoc(module.forward)
        assert doc and doc != stock and "->" in doc and "dtype" in doc, module.__name__
    text = pydoc.render_doc(KN.RoPEAttention.forward, renderer=pydoc.plaintext)
    assert "h [B, S, D] -> [B, S, D]" in text and "key_mask: [B, S] bool" in text and "rope_cos_sin" in text
