"""trm_kernels.patch on models built like the TRM and HRM reference implementations.

The modules below are written here, with the structure and attribute names those codebases
use (post-norm blocks called as block(cos_sin=..., hidden_states=...), packed qkv_proj,
gate_up_proj with the gate first, a reasoning module adding the injection), and plain
PyTorch inside. The patched model's outputs and gradients are held against the unpatched
one's, and against float64, under the suite's tolerance rule.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import trm_kernels as K
from oracle import check
from torch import nn

TRITON = "triton" in K.available("swiglu") and not torch.cuda.is_available()


class CastedLinear(nn.Module):
    def __init__(self, fan_in, fan_out, bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / math.sqrt(fan_in))
        self.bias = nn.Parameter(torch.zeros(fan_out)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class SwiGLU(nn.Module):
    def __init__(self, hidden, inter, bias=False):
        super().__init__()
        self.gate_up_proj = CastedLinear(hidden, 2 * inter, bias)
        self.down_proj = CastedLinear(inter, hidden)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    def __init__(self, hidden, head_dim, num_heads, num_key_value_heads, causal=False):
        super().__init__()
        self.head_dim, self.num_heads, self.causal = head_dim, num_heads, causal
        self.num_key_value_heads = num_key_value_heads
        self.qkv_proj = CastedLinear(hidden, (num_heads + 2 * num_key_value_heads) * head_dim)
        self.o_proj = CastedLinear(num_heads * head_dim, hidden)

    def forward(self, cos_sin, hidden_states):
        b, s, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(b, s, self.num_heads + 2 * self.num_key_value_heads, self.head_dim)
        q = qkv[:, :, : self.num_heads]
        k = qkv[:, :, self.num_heads : self.num_heads + self.num_key_value_heads]
        v = qkv[:, :, self.num_heads + self.num_key_value_heads :]
        if cos_sin is not None:
            cos, sin = cos_sin
            wide = torch.promote_types(q.dtype, cos.dtype)  # the reference's fp32 (float64 for the oracle)
            q, k = (rotate(t.to(wide), cos.to(wide), sin.to(wide)).to(t.dtype) for t in (q, k))
        group = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=self.causal)  # fmt: skip
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


def rotate(x, cos, sin):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos.unsqueeze(-2) + torch.cat((-x2, x1), -1) * sin.unsqueeze(-2)


def rms_norm(h, eps):
    dtype = h.dtype
    h = h.to(torch.float32)
    return (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).to(dtype)


class Block(nn.Module):
    """The reference's post-norm block: attention or mlp_t (a SwiGLU over the sequence), then the MLP."""

    def __init__(self, hidden, heads, kv, seq, mlp_t=False, causal=False, bias=False):
        super().__init__()
        if mlp_t:
            self.mlp_t = SwiGLU(seq, 16)
        else:
            self.self_attn = Attention(hidden, hidden // heads, heads, kv, causal)
        self.mlp = SwiGLU(hidden, 24, bias)
        self.norm_eps = 1e-5

    def forward(self, cos_sin, hidden_states):
        if hasattr(self, "mlp_t"):
            t = hidden_states.transpose(1, 2)
            hidden_states = rms_norm(t + self.mlp_t(t), self.norm_eps).transpose(1, 2)
        else:
            hidden_states = rms_norm(hidden_states + self.self_attn(cos_sin=cos_sin, hidden_states=hidden_states),
                                     self.norm_eps)  # fmt: skip
        return rms_norm(hidden_states + self.mlp(hidden_states), self.norm_eps)


class ReasoningModule(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden_states, input_injection, **kwargs):
        hidden_states = hidden_states + input_injection
        for layer in self.layers:
            hidden_states = layer(hidden_states=hidden_states, **kwargs)
        return hidden_states


class TinyRecursive(nn.Module):
    """One L_level net called as TRM calls it (z from y + x, then y from z), or HRM's two levels."""

    def __init__(self, hrm=False, mlp_t=False, kv=4, causal=False, bias=False, hidden=128, seq=10):
        super().__init__()
        layers = lambda: [Block(hidden, 4, kv, seq, mlp_t, causal, bias) for _ in range(2)]  # noqa: E731
        self.L_level = ReasoningModule(layers())
        if hrm:
            self.H_level = ReasoningModule(layers())
        self.cos, self.sin = K.rope_cos_sin(seq, hidden // 4)

    def forward(self, x, y, z):
        cos_sin = (self.cos.to(x.device), self.sin.to(x.device))
        high = getattr(self, "H_level", self.L_level)
        for _ in range(2):
            z = self.L_level(z, y + x, cos_sin=cos_sin)
            y = high(y, z, cos_sin=cos_sin)
        return y


def run(model, inputs, dtype):
    model = model.to(dtype)
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in inputs]
    out = model(*leaves)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape).to(dtype)).sum().backward()
    grads = [t.grad for t in leaves] + [p.grad for p in model.parameters()]
    return out.detach(), grads


def check_patched(make, backend, dtype):
    torch.manual_seed(0)
    model = make()
    inputs = [torch.randn(2, 10, 128) for _ in range(3)]
    patched = copy.deepcopy(model)
    report = K.patch(patched)
    want_out, want_grads = run(copy.deepcopy(model), inputs, dtype)
    oracle_out, oracle_grads = run(copy.deepcopy(model), inputs, torch.float64)
    with K.use_backend(backend):
        out, grads = run(patched, inputs, dtype)
    check(out, want_out, oracle_out, "output")
    for i, (g, w, o) in enumerate(zip(grads, want_grads, oracle_grads, strict=True)):
        check(g, w, o, f"gradient {i}")
    return report


CONFIGS = {
    "trm attention": dict(),
    "trm mlp_t": dict(mlp_t=True),
    "trm gqa causal": dict(kv=2, causal=True),
    "hrm": dict(hrm=True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_patched_reference_models_match_on_the_reference_backend(config):
    report = check_patched(lambda: TinyRecursive(**CONFIGS[config]), "reference", torch.float32)
    blocks = [f"{level}.layers.{i}" for level in ("L_level", "H_level")[: 1 + ("hrm" in config)] for i in range(2)]
    assert set(report.replaced) == {*blocks, "L_level", *(["H_level"] if "hrm" in config else [])}
    mixer = "token_mixer" if "mlp_t" in config else "attention"
    assert all(report.replaced[b] == [mixer, "rmsnorm", "swiglu"] for b in blocks) and not report.left_alone


@pytest.mark.skipif(not TRITON, reason="the Triton interpreter runs on CPU only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_patched_reference_models_match_under_the_interpreter(config, dtype):
    check_patched(lambda: TinyRecursive(**CONFIGS[config]), "triton", dtype)


def test_switched_off_ops_run_their_reference_and_the_report_says_so():
    torch.manual_seed(0)
    model = TinyRecursive()
    report = K.patch(model, attention=False, swiglu=False, inject=False)
    assert report.replaced["L_level.layers.0"] == ["rmsnorm"] and report.replaced["L_level"] == []
    assert "patched L_level.layers.0: rmsnorm" in str(report)


def test_a_model_that_cannot_be_mapped_is_left_untouched_and_named():
    torch.manual_seed(0)
    model = TinyRecursive(bias=True)  # an MLP with a bias: the fused path has none
    before = {name: m.forward for name, m in model.named_modules()}
    report = K.patch(model)
    assert report.left_alone == {f"L_level.layers.{i}": "mlp.gate_up_proj has a bias (the reference's SwiGLU has none)"
                                 for i in range(2)}  # fmt: skip
    assert all(model.get_submodule(name).forward == before[name] for name in report.left_alone)
    assert list(report.replaced) == ["L_level"]  # the reasoning module itself maps
    empty = K.patch(nn.Sequential(nn.Linear(3, 3)))
    assert empty.replaced == {} and "no module built like the reference" in empty.left_alone[""]
