"""trm_kernels.patch on models built like the TRM and HRM reference implementations.

The modules below are written here, with the structure and attribute names those codebases
use (post-norm blocks called as block(cos_sin=..., hidden_states=...), packed qkv_proj,
gate_up_proj with the gate first, a reasoning module adding the injection), and plain
PyTorch inside. The patched model's outputs and gradients are held against the unpatched
one's, and against float64, under the suite's tolerance rule.
"""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
import trm_kernels as K
from oracle import check
from torch import nn
from trm_kernels.patch import FusedForward
from trm_kernels.verify import relative_error

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

    attention_type = Attention

    def __init__(self, hidden, heads, kv, seq, mlp_t=False, causal=False, bias=False):
        super().__init__()
        if mlp_t:
            self.mlp_t = SwiGLU(seq, 16)
        else:
            self.self_attn = self.attention_type(hidden, hidden // heads, heads, kv, causal)
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

    def __init__(self, hrm=False, mlp_t=False, kv=4, causal=False, bias=False, hidden=128, seq=10, block=Block):
        super().__init__()
        layers = lambda: [block(hidden, 4, kv, seq, mlp_t, causal, bias) for _ in range(2)]  # noqa: E731
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


# ---------------------------------------------------------------------------------------------
# copies of a patched model compute with their own weights


def some_inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 10, 128, generator=gen) for _ in range(3)]


def check_against(out, grads, unpatched, inputs):
    """out and grads (run's) match the unpatched model's under the tolerance rule."""
    want_out, want_grads = run(copy.deepcopy(unpatched), inputs, torch.float32)
    oracle_out, oracle_grads = run(copy.deepcopy(unpatched), inputs, torch.float64)
    check(out, want_out, oracle_out, "output")
    for i, (g, w, o) in enumerate(zip(grads, want_grads, oracle_grads, strict=True)):
        check(g, w, o, f"gradient {i}")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_patched_model_computes_with_its_own_weights(how):
    torch.manual_seed(0)
    model = TinyRecursive(hrm=True)
    K.patch(model)
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    fused = {name: m.__dict__["forward"] for name, m in clone.named_modules() if "forward" in m.__dict__}
    assert len(fused) == 6 and all(isinstance(f, FusedForward) for f in fused.values())
    assert all(f.module is clone.get_submodule(name) for name, f in fused.items())  # bound to the copy's modules
    inputs = some_inputs()
    out, grads = run(clone, inputs, torch.float32)
    assert all(p.grad is None for p in model.parameters())  # no gradient lands on the original
    assert all(p.grad is not None and p.grad.count_nonzero() for p in clone.parameters())
    want, want_grads = run(model, inputs, torch.float32)
    assert torch.equal(out, want) and all(torch.equal(g, w) for g, w in zip(grads, want_grads, strict=True))


class EMAHelper:
    """The TRM reference's EMA (models/ema.py): its ema_copy deep-copies the training model
    and writes the EMA weights into the copy, which is then evaluated."""

    def __init__(self, mu):
        self.mu, self.shadow = mu, {}

    def register(self, module):
        self.shadow = {name: p.data.clone() for name, p in module.named_parameters() if p.requires_grad}

    def update(self, module):
        for name, p in module.named_parameters():
            if p.requires_grad:
                self.shadow[name].data = (1.0 - self.mu) * p.data + self.mu * self.shadow[name].data

    def ema(self, module):
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.data.copy_(self.shadow[name].data)

    def ema_copy(self, module):
        module_copy = copy.deepcopy(module)
        self.ema(module_copy)
        return module_copy


def test_the_reference_ema_copy_of_a_patched_model_evaluates_the_ema_weights():
    torch.manual_seed(0)
    model = TinyRecursive()
    K.patch(model)
    ema = EMAHelper(mu=0.5)
    ema.register(model)
    with torch.no_grad():  # a few "training steps" move the weights away from the EMA's
        for _ in range(2):
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
            ema.update(model)
    inputs = some_inputs()
    evaluated, grads = run(ema.ema_copy(model), inputs, torch.float32)
    trained, _ = run(copy.deepcopy(model), inputs, torch.float32)
    assert (evaluated - trained).norm() > 0.1 * trained.norm()  # not the training weights
    unpatched = TinyRecursive()
    ema.ema(unpatched)
    check_against(evaluated, grads, unpatched, inputs)


def test_moving_and_loading_weights_after_patching_take_effect():
    torch.manual_seed(0)
    model, other = TinyRecursive(mlp_t=True), TinyRecursive(mlp_t=True)
    unpatched = copy.deepcopy(model)
    K.patch(model)
    inputs = some_inputs()
    out, grads = run(model, inputs, torch.float64)  # run moves the patched model to float64
    want, want_grads = run(copy.deepcopy(unpatched), inputs, torch.float64)
    assert out.dtype == torch.float64 and all(p.dtype == torch.float64 for p in model.parameters())
    for got, expected in zip([out, *grads], [want, *want_grads], strict=True):  # the model's norm computes in fp32
        assert relative_error(got, expected) < 1e-6
    model.load_state_dict(other.state_dict())
    model.zero_grad(set_to_none=True)
    out, grads = run(model, inputs, torch.float32)
    check_against(out, grads, other, inputs)


# ---------------------------------------------------------------------------------------------
# what does not compute what the fused forward computes is left alone


class RMSNorm(nn.Module):
    """A learnable RMSNorm, applied as norm(h) * weight."""

    def __init__(self, weight, eps=1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight), eps

    def forward(self, h):
        return rms_norm(h, self.eps) * self.weight


class WeightedNormBlock(Block):
    """The reference's attribute names and post-norm order, with learnable norm weights."""

    ones = False  # weights at their usual init: the forward matches, only their gradients tell

    def __init__(self, hidden, *args):
        super().__init__(hidden, *args)
        weight = lambda: torch.ones(hidden) if self.ones else 1 + 0.5 * torch.randn(hidden)  # noqa: E731
        self.norm1, self.norm2 = RMSNorm(weight()), RMSNorm(weight())

    def forward(self, cos_sin, hidden_states):
        h = self.norm1(hidden_states + self.self_attn(cos_sin=cos_sin, hidden_states=hidden_states))
        return self.norm2(h + self.mlp(h))


class OnesNormBlock(WeightedNormBlock):
    ones = True


class PreNormBlock(Block):
    """The reference's attribute names, pre-norm: h + attn(norm(h)), h + mlp(norm(h))."""

    def forward(self, cos_sin, hidden_states):
        h = hidden_states
        h = h + self.self_attn(cos_sin=cos_sin, hidden_states=rms_norm(h, self.norm_eps))
        return h + self.mlp(rms_norm(h, self.norm_eps))


class DropoutBlock(Block):
    """The reference's block with dropout after attention, and a buffer its forward updates."""

    def __init__(self, *args):
        super().__init__(*args)
        self.dropout = nn.Dropout(0.1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, cos_sin, hidden_states):
        self.calls += 1
        h = hidden_states
        h = rms_norm(h + self.dropout(self.self_attn(cos_sin=cos_sin, hidden_states=h)), self.norm_eps)
        return rms_norm(h + self.mlp(h), self.norm_eps)


@pytest.mark.parametrize(
    "block, expected, unexpected",
    [
        (WeightedNormBlock, ["forward rel. error", "gradient of norm1.weight: none computed by the fused forward"], []),
        (OnesNormBlock, ["gradient of norm2.weight: none computed by the fused forward"], ["forward rel. error"]),
        (PreNormBlock, ["forward rel. error", "gradient of hidden_states rel. error"], ["none computed"]),
        (DropoutBlock, ["forward rel. error"], []),  # checked in training mode: dropout shows
    ],
)
def test_a_block_that_computes_something_else_is_left_alone_with_the_difference(block, expected, unexpected):
    torch.manual_seed(0)
    model = TinyRecursive(block=block).eval()  # eval: dropout off, so outputs compare bit for bit
    inputs = some_inputs()
    want, want_grads = run(copy.deepcopy(model), inputs, torch.float32)
    report = K.patch(model)
    blocks = [f"L_level.layers.{i}" for i in range(2)]
    assert sorted(report.left_alone) == blocks and list(report.replaced) == ["L_level"]
    for name in blocks:
        why = report.left_alone[name]
        assert why.startswith("its forward differs from the fused one (") and f"left alone {name}: {why}" in str(report)
        assert all(e in why for e in expected) and not any(u in why for u in unexpected), why
        assert "forward" not in model.get_submodule(name).__dict__
    out, grads = run(model, inputs, torch.float32)
    assert torch.equal(out, want) and all(torch.equal(g, w) for g, w in zip(grads, want_grads, strict=True))


@pytest.mark.parametrize("block", [Block, DropoutBlock])
def test_patching_keeps_the_rng_state_grads_buffers_and_training_modes(block):
    torch.manual_seed(0)
    model = TinyRecursive(hrm=True, block=block)
    model.H_level.eval()  # mixed modes
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = {name: (p.grad, p.grad.clone()) for name, p in model.named_parameters()}
    state = {name: t.clone() for name, t in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    report = K.patch(model)
    assert len(report.replaced) == (6 if block is Block else 2)  # DropoutBlock's layers: left alone
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is grads[name][0] and torch.equal(p.grad, grads[name][1]) for name, p in model.named_parameters())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(t, state[name]) for name, t in model.state_dict().items())  # DropoutBlock's calls too
    assert [m.training for m in model.modules()] == modes


def test_patching_twice_verifies_against_the_modules_own_forward_and_takes_the_new_switches():
    torch.manual_seed(0)
    model = TinyRecursive()
    unpatched = copy.deepcopy(model)
    K.patch(model)
    report = K.patch(model, swiglu=False, inject=False)
    assert report.replaced["L_level.layers.0"] == ["attention", "rmsnorm"] and report.replaced["L_level"] == []
    fused = model.L_level.layers[0].__dict__["forward"]
    assert isinstance(fused, FusedForward) and fused.original is None and fused.ops == ("attention", "rmsnorm")
    inputs = some_inputs()
    out, grads = run(model, inputs, torch.float32)
    check_against(out, grads, unpatched, inputs)
    model.L_level.layers[0].mlp.down_proj.bias = nn.Parameter(torch.zeros(128))  # no longer maps: its own forward back
    report = K.patch(model)
    assert "has a bias" in report.left_alone["L_level.layers.0"] and "forward" not in model.L_level.layers[0].__dict__


class FlashAttention(Attention):
    """Attention that, like FlashAttention (HRM's), takes fp16 and bf16 only."""

    def forward(self, cos_sin, hidden_states):
        if hidden_states.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        return super().forward(cos_sin, hidden_states)


class FlashBlock(Block):
    attention_type = FlashAttention


class FlashWeightedNormBlock(WeightedNormBlock):
    attention_type = FlashAttention


def test_a_forward_that_runs_only_in_half_precision_is_checked_in_bfloat16():
    torch.manual_seed(0)
    report = K.patch(TinyRecursive(block=FlashBlock))
    assert sorted(report.replaced) == ["L_level", "L_level.layers.0", "L_level.layers.1"] and not report.left_alone
    report = K.patch(TinyRecursive(block=FlashWeightedNormBlock))
    assert list(report.replaced) == ["L_level"]  # its layers run in bf16 only: checked bit for bit in bf16
    why = report.left_alone["L_level.layers.0"]
    assert (
        "forward rel. error" in why and "none computed by the fused forward" in why and why.endswith(", in bfloat16)")
    )
    report = K.patch(TinyRecursive(block=FlashWeightedNormBlock).to(torch.float16))  # same: the check casts
    assert "L_level.layers.0" in report.left_alone


class Scale(nn.Module):
    def forward(self, hidden_states, scale=2.0):
        return hidden_states * scale


class NormedReasoningModule(ReasoningModule):
    """A reasoning module with a final (learnable) norm the fused forward (inject, then the layers) lacks."""

    def __init__(self, layers):
        super().__init__(layers)
        self.norm = RMSNorm(1 + 0.5 * torch.randn(128))

    def forward(self, hidden_states, input_injection, **kwargs):
        return self.norm(super().forward(hidden_states, input_injection, **kwargs))


def test_a_reasoning_module_is_verified_with_its_layers_or_left_alone():
    torch.manual_seed(0)
    model = NormedReasoningModule([Block(128, 4, 4, 10) for _ in range(2)])
    report = K.patch(model)
    assert sorted(report.replaced) == ["layers.0", "layers.1"]
    assert report.left_alone[""].startswith("its forward differs from the fused one (forward rel. error")
    report = K.patch(ReasoningModule([Scale()]))  # its layers' arguments are unknown: not checked, not patched
    assert report.left_alone == {"": "cannot check it: its layers.0 is not called as (cos_sin, hidden_states), "
                                     "so its arguments are unknown"}  # fmt: skip
