"""Another recursive model on trm_kernels: a small causal recurrent-depth language model.

One pre-norm transformer block (grouped-query attention with RoPE, causal, a key mask for
padding; SwiGLU MLP; RMSNorm with learnable weights; an fp32 residual stream) is looped
``loops`` times over the sequence, the token embedding injected into the stream before every
loop, as looped / recurrent-depth transformers do; then a final norm and the output head.

``RecurrentDepthLM`` is built from ``trm_kernels.nn`` (fused ops); ``PlainRecurrentDepthLM``
is the same model in plain PyTorch (``nn.Linear``, SDPA, RMSNorm written out) with the same
parameter names, so one loads the other's state dict: the oracle of the tests and the
eager provider of the benchmark. ``rows`` times a training step of both (and
``torch.compile`` of the plain one) for the model benchmark; ``trm_benchmarks.roofline``
counts the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import trm_kernels as K
import trm_kernels.nn as KN
from torch import nn

from .common import Row, bench


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 512
    hidden_size: int = 512
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 1536
    loops: int = 8
    seq_len: int = 512
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


QUICK = LMConfig(vocab_size=64, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128, loops=2,
                 seq_len=24)  # fmt: skip


class Block(nn.Module):
    """Pre-norm: n = norm1(h); h, n = h + attn(n), norm2(h + attn(n)) in one op; h + mlp(n)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        d = cfg.hidden_size
        self.attn_norm = KN.RMSNorm(d, cfg.eps)
        self.self_attn = KN.RoPEAttention(d, cfg.num_heads, cfg.num_kv_heads, causal=True)
        self.mlp_norm = KN.AddRMSNorm(d, cfg.eps, prenorm=True)
        self.mlp = KN.SwiGLUMLP(d, cfg.intermediate_size)

    def forward(self, h, cos, sin, key_mask=None):
        h, n = self.mlp_norm(self.self_attn(self.attn_norm(h), cos, sin, key_mask), h)
        return h + self.mlp(n)


class RecurrentDepthLM(nn.Module):
    """tokens [B, S] (and a key mask [B, S], False for padding) -> logits [B, S, V] fp32."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.core = Block(cfg)
        self.norm = KN.RMSNorm(cfg.hidden_size, cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = K.rope_cos_sin(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embed(tokens)
        s = tokens.shape[1]
        cos, sin = self.cos[:s], self.sin[:s]
        h = torch.zeros_like(e)
        for _ in range(self.cfg.loops):
            h = self.core(self.inject(h, e), cos, sin, key_mask)
        return self.lm_head(self.final_norm(h)).float()

    def inject(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return K.inject(h, e)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


class _Norm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class _Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, h, cos, sin, key_mask):
        cfg, (b, s, _) = self.cfg, h.shape
        q, k, v = self.qkv_proj(h).view(b, s, -1, cfg.head_dim).split([cfg.num_heads, cfg.num_kv_heads,
                                                                        cfg.num_kv_heads], 2)  # fmt: skip

        def rope(x):
            x1, x2 = x.float().chunk(2, -1)
            return (x.float() * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]).to(x.dtype)

        q, k, v = rope(q).transpose(1, 2), rope(k).transpose(1, 2), v.transpose(1, 2)
        causal = torch.ones(s, s, dtype=torch.bool, device=h.device).tril()
        allowed = causal if key_mask is None else causal & key_mask[:, None, None, :]
        attends = allowed.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~attends, enable_gqa=True)
        out = torch.where(attends, out, 0)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class _MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class _PlainBlock(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn_norm, self.mlp_norm = _Norm(cfg.hidden_size), _Norm(cfg.hidden_size)
        self.self_attn, self.mlp = _Attention(cfg), _MLP(cfg)

    def forward(self, h, cos, sin, key_mask=None):
        branch = self.self_attn(_rms(h, self.attn_norm.weight, self.eps), cos, sin, key_mask)
        h = h + branch
        return h + self.mlp(_rms(h, self.mlp_norm.weight, self.eps).to(branch.dtype))


class PlainRecurrentDepthLM(RecurrentDepthLM):
    """The same model in plain PyTorch, with the same parameter names (the loop is shared)."""

    def __init__(self, cfg: LMConfig):
        super().__init__(cfg)
        self.core = _PlainBlock(cfg)
        self.norm = _Norm(cfg.hidden_size)

    def inject(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + e

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return _rms(h, self.norm.weight, self.cfg.eps)


def step_flops(cfg: LMConfig, batch: int) -> float:
    """Matrix FLOPs of a training step (forward + backward = 3x forward; causal attention counts
    the full square, as the kernels compute whole tiles)."""
    tokens, d, s = batch * cfg.seq_len, cfg.hidden_size, cfg.seq_len
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    block = 2 * tokens * d * (qkv + cfg.num_heads * cfg.head_dim + 3 * cfg.intermediate_size)
    attention = 4 * batch * cfg.num_heads * s * s * cfg.head_dim
    return 3 * (cfg.loops * (block + attention) + 2 * tokens * d * cfg.vocab_size)


def training_step(model: nn.Module, tokens: torch.Tensor, key_mask: torch.Tensor, backend: str) -> Callable:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        with K.use_backend(backend), torch.autocast(tokens.device.type, torch.bfloat16,
                                                     enabled=tokens.device.type == "cuda"):  # fmt: skip
            logits = model(tokens[:, :-1], key_mask[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def rows(device: torch.device, quick: bool, compile_ok: bool, gemm_tflops: float) -> list[Row]:
    """A training step of the recurrent-depth LM per provider: plain PyTorch (eager, and
    torch.compile where it can run), and trm_kernels.nn (the backend picked automatically)."""
    cfg = QUICK if quick else LMConfig()
    batch = 2 if quick else 32
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), device=device)
    key_mask = torch.ones(batch, cfg.seq_len + 1, dtype=torch.bool, device=device)
    key_mask[0, -cfg.seq_len // 4 :] = False  # one padded sequence
    providers = [("plain PyTorch", PlainRecurrentDepthLM, "reference", False)]
    if compile_ok:
        providers.append(("plain PyTorch + torch.compile", PlainRecurrentDepthLM, "reference", True))
    if "triton" in K.available("swiglu") and (device.type == "cuda" or quick):
        providers.append(("trm_kernels.nn", RecurrentDepthLM, "auto" if device.type == "cuda" else "triton", False))
    out = []
    for name, cls, backend, compiled in providers:
        torch.manual_seed(0)
        model = cls(cfg).to(device)
        forward = torch.compile(model) if compiled else model
        step = training_step(forward, tokens, key_mask, backend)
        for _ in range(3):
            step()
        ms = bench(step, device, reps=3 if quick else 20)
        tflops = step_flops(cfg, batch) / ms / 1e9
        out.append(Row("training step", f"recurrent-depth LM B={batch} S={cfg.seq_len} x{cfg.loops} loops", name, ms,
                       tflops=tflops, extra={"batch": batch, "tokens_per_s": batch * cfg.seq_len / ms * 1e3,
                                             "mfu": tflops / gemm_tflops}))  # fmt: skip
        print(f"{out[-1].case:40s} {name:32s} {ms:10.3f} ms", flush=True)
    return out


__all__ = ["LMConfig", "PlainRecurrentDepthLM", "QUICK", "RecurrentDepthLM", "rows", "step_flops", "training_step"]
