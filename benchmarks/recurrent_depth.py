"""Another recursive model on trm_kernels: a small causal recurrent-depth language model.

One pre-norm transformer block (grouped-query attention with RoPE, causal, a key mask for
padding; SwiGLU MLP; RMSNorm with learnable weights; an fp32 residual stream) is looped
``loops`` times over the sequence, the token embedding injected into the stream before every
loop, as looped / recurrent-depth transformers do; then a final norm and the output head.

``LMConfig(core="sandwich")`` loops Huginn's sandwich block instead (``SandwichBlock``: a norm
after each residual add as well as before each sub-layer), and ``injection="adapter"``
injects through Huginn's adapter, a linear layer on cat([h, e]) (``KN.ConcatLinear``).

``RecurrentDepthLM`` is built from ``trm_kernels.nn`` (fused ops); ``PlainRecurrentDepthLM``
is the same model in plain PyTorch (``nn.Linear``, SDPA, RMSNorm written out) with the same
parameter names, so one loads the other's state dict: the oracle of the tests and the
eager provider of the benchmark. ``generate`` is greedy generation with a key/value cache per
loop (each loop attends its own keys and values): through ``trm_kernels.kv_cache_attention``
for the fused model, by indexing and SDPA for the plain one. ``rows`` times a training step,
a prefill and a decode step of both (and ``torch.compile`` of the plain one) for the model
benchmark; ``trm_benchmarks.roofline`` counts the training and decode steps.

A complete training example, on CPU in seconds (``train_copy_task``, or from a shell)::

    python -m trm_benchmarks.recurrent_depth --steps 200

trains ``QUICK`` on the copy task (random tokens, a separator, the same tokens again, right-
padded): a batch is tokens [B, seq_len + 1] and a key mask [B, seq_len + 1] (False: padding),
and ``training_step`` makes one optimizer step of ``lm_loss``, the next-token cross-entropy of
the real positions. After training it prints the greedy generation of a few fresh prompts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import trm_kernels as K
import trm_kernels.nn as KN
from torch import nn

from .common import Row, bench
from .model import backend_label, fused_backend


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
    core: str = "prenorm"  # the looped block: "prenorm" (Block) or "sandwich" (SandwichBlock, Huginn's)
    injection: str = "add"  # the embedding into each loop: "add" (h + e) or "adapter" (Huginn's, on cat([h, e]))

    def __post_init__(self):
        if self.core not in CORES:
            raise ValueError(f"core must be one of {', '.join(map(repr, CORES))}, got {self.core!r}")
        if self.injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {', '.join(map(repr, INJECTIONS))}, got {self.injection!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


CORES = ("prenorm", "sandwich")
INJECTIONS = ("add", "adapter")


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

    def forward(self, h, cos, sin, key_mask=None, cache=None):
        h, n = self.mlp_norm(self.self_attn(self.attn_norm(h), cos, sin, key_mask, cache), h)
        return h + self.mlp(n)


class SandwichBlock(nn.Module):
    """Huginn's sandwich: h = norm_2(h + attn(norm_1(h))); h = norm_4(h + mlp(norm_3(h))), with
    norm_2 and norm_3 one op (SandwichRMSNorm) and norm_4 fused with its residual add."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        d = cfg.hidden_size
        self.attn_norm = KN.RMSNorm(d, cfg.eps)  # norm_1
        self.self_attn = KN.RoPEAttention(d, cfg.num_heads, cfg.num_kv_heads, causal=True)
        self.attn_out_norm = KN.SandwichRMSNorm(d, cfg.eps)  # norm_2 (weight) and norm_3 (next_weight)
        self.mlp = KN.SwiGLUMLP(d, cfg.intermediate_size)
        self.mlp_out_norm = KN.AddRMSNorm(d, cfg.eps)  # norm_4

    def forward(self, h, cos, sin, key_mask=None, cache=None):
        h, n = self.attn_out_norm(self.self_attn(self.attn_norm(h), cos, sin, key_mask, cache), h)
        return self.mlp_out_norm(self.mlp(n), h)


class RecurrentDepthLM(nn.Module):
    """tokens [B, S] (and a key mask [B, S], False for padding) -> logits [B, S, V] fp32.

    With ``caches`` (``new_caches``: one key/value cache per loop, as each loop attends its
    own keys and values) tokens are the next S tokens of each sequence, at positions
    ``caches[i].lengths[b]`` on; they are cached and the lengths advance by S (generation,
    no gradient: see ``generate``)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.core = (SandwichBlock if cfg.core == "sandwich" else Block)(cfg)
        if cfg.injection == "adapter":  # Huginn's adapter(cat([state, embeds])), without the concatenation
            self.adapter = KN.ConcatLinear(cfg.hidden_size, cfg.hidden_size, cfg.hidden_size, bias=False)
        self.norm = KN.RMSNorm(cfg.hidden_size, cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = K.rope_cos_sin(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(
        self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None, caches: list[KN.KVCache] | None = None
    ) -> torch.Tensor:
        s = tokens.shape[1]
        if caches is None:
            if s > self.cfg.seq_len:  # the RoPE tables end there
                raise ValueError(f"input has {s} tokens but the model was built with seq_len={self.cfg.seq_len}")
            cos, sin = self.cos[:s], self.sin[:s]
        elif len(caches) != self.cfg.loops:
            raise ValueError(f"{len(caches)} caches for {self.cfg.loops} loops: one per loop (new_caches)")
        else:
            cos, sin = self.cos, self.sin  # positions up to seq_len >= the caches' capacity
        e = self.embed(tokens)
        h = torch.zeros_like(e)
        for i in range(self.cfg.loops):
            h = self.core(self.inject(h, e), cos, sin, key_mask, None if caches is None else caches[i])
        return self.lm_head(self.final_norm(h)).float()

    def new_caches(self, batch: int, capacity: int, dtype: torch.dtype | None = None) -> list[KN.KVCache]:
        """One empty KVCache per loop: k, v [batch, capacity, num_kv_heads, head_dim] (dtype: the
        embedding's unless given; under autocast, its dtype), capacity <= seq_len (the RoPE tables')."""
        cfg = self.cfg
        if capacity > cfg.seq_len:
            raise ValueError(f"a cache of {capacity} positions but the model was built with seq_len={cfg.seq_len}")
        weight = self.embed.weight
        return [KN.KVCache(batch, capacity, cfg.num_kv_heads, cfg.head_dim, dtype or weight.dtype, weight.device)
                for _ in range(cfg.loops)]  # fmt: skip

    def inject(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.adapter(h, e) if self.cfg.injection == "adapter" else K.inject(h, e)

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

    def forward(self, h, cos, sin, key_mask, cache=None):
        cfg, (b, s, _) = self.cfg, h.shape
        q, k, v = self.qkv_proj(h).view(b, s, -1, cfg.head_dim).split([cfg.num_heads, cfg.num_kv_heads,
                                                                        cfg.num_kv_heads], 2)  # fmt: skip
        if cache is not None:  # the new tokens sit at positions lengths[b] + i
            pos = cache.lengths[:, None].long() + torch.arange(s, device=h.device)
            cos, sin = cos[pos][:, :, None], sin[pos][:, :, None]
        else:
            cos, sin = cos[:, None], sin[:, None]

        def rope(x):
            x1, x2 = x.float().chunk(2, -1)
            return (x.float() * cos + torch.cat((-x2, x1), -1) * sin).to(x.dtype)

        q, k = rope(q), rope(k)
        if cache is not None:  # write the rotated keys and the values, attend every cached position up to one's own
            rows = torch.arange(b, device=h.device)[:, None]
            cache.k[rows, pos], cache.v[rows, pos] = k, v
            cache.lengths += s
            k, v = cache.k, cache.v
            allowed = (torch.arange(cache.capacity, device=h.device) <= pos[:, :, None])[:, None]
        else:
            causal = torch.ones(s, s, dtype=torch.bool, device=h.device).tril()
            allowed = causal if key_mask is None else causal & key_mask[:, None, None, :]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
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

    def forward(self, h, cos, sin, key_mask=None, cache=None):
        branch = self.self_attn(_rms(h, self.attn_norm.weight, self.eps), cos, sin, key_mask, cache)
        h = h + branch
        return h + self.mlp(_rms(h, self.mlp_norm.weight, self.eps).to(branch.dtype))


class _PlainSandwichNorm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight, self.next_weight = nn.Parameter(torch.ones(size)), nn.Parameter(torch.ones(size))


class _PlainSandwichBlock(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn_norm, self.mlp_out_norm = _Norm(cfg.hidden_size), _Norm(cfg.hidden_size)
        self.attn_out_norm = _PlainSandwichNorm(cfg.hidden_size)
        self.self_attn, self.mlp = _Attention(cfg), _MLP(cfg)

    def forward(self, h, cos, sin, key_mask=None, cache=None):
        branch = self.self_attn(_rms(h, self.attn_norm.weight, self.eps), cos, sin, key_mask, cache)
        h = _rms(h + branch, self.attn_out_norm.weight, self.eps)
        out = self.mlp(_rms(h, self.attn_out_norm.next_weight, self.eps))
        return _rms(h + out, self.mlp_out_norm.weight, self.eps)


class PlainRecurrentDepthLM(RecurrentDepthLM):
    """The same model in plain PyTorch, with the same parameter names (the loop is shared); its
    caches are written and read by indexing, and attended by SDPA."""

    def __init__(self, cfg: LMConfig):
        super().__init__(cfg)
        self.core = (_PlainSandwichBlock if cfg.core == "sandwich" else _PlainBlock)(cfg)
        if cfg.injection == "adapter":
            self.adapter = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.norm = _Norm(cfg.hidden_size)

    def inject(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.adapter(torch.cat([h, e], -1)) if self.cfg.injection == "adapter" else h + e

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return _rms(h, self.norm.weight, self.cfg.eps)


def step_flops(cfg: LMConfig, batch: int) -> float:
    """Matrix FLOPs of a training step (forward + backward = 3x forward; causal attention counts
    the full square, as the kernels compute whole tiles)."""
    tokens, d, s = batch * cfg.seq_len, cfg.hidden_size, cfg.seq_len
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    adapter = 2 * d if cfg.injection == "adapter" else 0  # [2D -> D] on cat([h, e])
    block = 2 * tokens * d * (qkv + cfg.num_heads * cfg.head_dim + 3 * cfg.intermediate_size + adapter)
    attention = 4 * batch * cfg.num_heads * s * s * cfg.head_dim
    return 3 * (cfg.loops * (block + attention) + 2 * tokens * d * cfg.vocab_size)


@torch.no_grad()
def generate(
    model: RecurrentDepthLM, prompt: torch.Tensor, max_new_tokens: int, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation through a key/value cache per loop: the prompt in one call (prefill),
    then one token per sequence per call (decode). Either model: RecurrentDepthLM attends with
    trm_kernels.kv_cache_attention, PlainRecurrentDepthLM indexes its caches and runs SDPA.

    prompt [B, P] int64, right-padded where `lengths` [B] (1..P; None: all P) says the
    sequences are shorter. Returns (tokens [B, P + n], scores [B, n, V]) with n =
    max_new_tokens: row b holds its lengths[b] prompt tokens, its n new ones, then PAD;
    scores[b, i] are the fp32 logits token i was the argmax of. The caches hold
    max(P, max(lengths) + n - 1) positions, which must be <= the model's seq_len. Runs in the
    model's dtype, or the autocast dtype where autocast is on."""
    batch, p = prompt.shape
    device = prompt.device
    lengths = torch.full((batch,), p, device=device) if lengths is None else lengths.to(device).long()
    if max_new_tokens < 1 or lengths.shape != (batch,) or not bool(((lengths >= 1) & (lengths <= p)).all()):
        raise ValueError(f"max_new_tokens must be >= 1 ({max_new_tokens}) and lengths [B={batch}] in 1..P={p}")
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    caches = model.new_caches(batch, max(p, int(lengths.max()) + max_new_tokens - 1), dtype)
    logits = model(prompt, caches=caches)  # [B, P, V]
    for cache in caches:  # the padding's entries are overwritten by the next tokens before they are attended
        cache.lengths.copy_(lengths)
    scores = [logits[torch.arange(batch, device=device), lengths - 1]]
    new = [scores[-1].argmax(-1)]
    for _ in range(max_new_tokens - 1):
        scores.append(model(new[-1][:, None], caches=caches)[:, 0])
        new.append(scores[-1].argmax(-1))
    tokens = torch.where(torch.arange(p, device=device) < lengths[:, None], prompt, PAD)
    tokens = torch.cat((tokens, torch.full((batch, max_new_tokens), PAD, device=device)), 1)
    tokens.scatter_(1, lengths[:, None] + torch.arange(max_new_tokens, device=device), torch.stack(new, 1))
    return tokens, torch.stack(scores, 1)


IGNORE = -100  # the target of a position the loss skips (F.cross_entropy's ignore_index)


def lm_loss(model: nn.Module, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the real positions of a batch.

    tokens [B, S + 1] int64 (S <= the model's seq_len); key_mask [B, S + 1] bool, False for
    padding (None: no padding). The model reads tokens[:, :-1] and predicts tokens[:, 1:]; a
    prediction counts when the token it reads and the token it predicts are both real, so
    padding, on the right or on the left, does not change the loss. fp32 logits."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if key_mask is None:
        return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    real = key_mask[:, :-1] & key_mask[:, 1:]
    logits = model(inputs, key_mask[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), targets.masked_fill(~real, IGNORE).flatten(), ignore_index=IGNORE)


def training_step(
    model: nn.Module, tokens: torch.Tensor, key_mask: torch.Tensor | None, backend: str = "auto", lr: float = 1e-3
) -> Callable[[], torch.Tensor]:
    """A function that makes one AdamW step on `lm_loss` of the batch (tokens [B, S + 1],
    key_mask [B, S + 1] or None: see lm_loss) and returns that loss, computed before the step.

    The trm_kernels ops run on `backend` ("auto", "reference", "triton", "cuda"); on CUDA
    under bf16 autocast, elsewhere in the model's dtype. The optimizer is made here, once, and
    kept by the function: call it once per step, on the same batch (the benchmark) or after
    filling `tokens` and `key_mask` in place with the next one."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step() -> torch.Tensor:
        with K.use_backend(backend), torch.autocast(tokens.device.type, torch.bfloat16,
                                                     enabled=tokens.device.type == "cuda"):  # fmt: skip
            loss = lm_loss(model, tokens, key_mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


PAD, SEP = 0, 1  # the copy task's padding and separator tokens


def copy_task(cfg: LMConfig, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the copy task: n random tokens, SEP, the same n tokens again (n from 1 to
    seq_len // 2), right-padded with PAD: (tokens [batch, seq_len + 1], key_mask [batch,
    seq_len + 1], False on the padding). The copy half is predictable from what precedes it."""
    width = cfg.seq_len + 1
    lengths = torch.randint(1, cfg.seq_len // 2 + 1, (batch,), generator=generator)
    tokens = torch.full((batch, width), PAD, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        x = torch.randint(SEP + 1, cfg.vocab_size, (n,), generator=generator)
        tokens[row, : 2 * n + 1] = torch.cat((x, torch.tensor([SEP]), x))
    key_mask = torch.arange(width) < (2 * lengths + 1)[:, None]
    return tokens, key_mask


def train_copy_task(
    cfg: LMConfig = QUICK,
    steps: int = 200,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    log: Callable[[int, float], None] | None = None,
) -> tuple[RecurrentDepthLM, list[float]]:
    """Train a RecurrentDepthLM on the copy task, a fresh batch each step; returns the model and
    the loss of every step. `log(step, loss)` is called every 10 steps and at the last."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = RecurrentDepthLM(cfg).to(device)
    tokens, key_mask = (t.to(device) for t in copy_task(cfg, batch, generator))
    step = training_step(model, tokens, key_mask, backend, lr)
    losses = []
    for i in range(1, steps + 1):
        fresh_tokens, fresh_mask = copy_task(cfg, batch, generator)
        tokens.copy_(fresh_tokens)  # in place: the step function holds these tensors
        key_mask.copy_(fresh_mask)
        losses.append(step().item())
        if log is not None and (i % 10 == 0 or i == steps):
            log(i, losses[-1])
    return model, losses


def rows(device: torch.device, quick: bool, compile_ok: bool, gemm_tflops: float) -> list[Row]:
    """The recurrent-depth LM per provider: plain PyTorch (eager, and torch.compile where it can
    run), and trm_kernels.nn (the backend picked automatically). A training step, then
    generation (``generation_rows``)."""
    cfg = QUICK if quick else LMConfig()
    batch = 2 if quick else 32
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), device=device)
    key_mask = torch.ones(batch, cfg.seq_len + 1, dtype=torch.bool, device=device)
    key_mask[0, -cfg.seq_len // 4 :] = False  # one padded sequence
    providers = [("plain PyTorch", PlainRecurrentDepthLM, "reference", False)]
    if compile_ok:
        providers.append(("plain PyTorch + torch.compile", PlainRecurrentDepthLM, "reference", True))
    fused = fused_backend(device)  # a CPU runs the reference, or the Triton interpreter if chosen before import
    label = backend_label(fused, device)
    providers.append(("trm_kernels.nn" + ("" if fused == "auto" else f" ({label})"), RecurrentDepthLM, fused, False))
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
        ran = label if cls is RecurrentDepthLM else "none (plain PyTorch)"
        out.append(Row("training step", f"recurrent-depth LM B={batch} S={cfg.seq_len} x{cfg.loops} loops", name, ms,
                       tflops=tflops, extra={"batch": batch, "tokens_per_s": batch * cfg.seq_len / ms * 1e3,
                                             "mfu": tflops / gemm_tflops, "backend": ran}))  # fmt: skip
        print(f"{out[-1].case:40s} {name:44s} {ms:10.3f} ms  (trm_kernels backend: {ran})", flush=True)
    for name, cls, backend, compiled in providers:
        out += generation_rows(cfg, cls, backend, compiled, name, tokens, device, quick, label)
    return out


def generation_rows(
    cfg: LMConfig, cls: type, backend: str, compiled: bool, name: str, tokens: torch.Tensor, device: torch.device,
    quick: bool, label: str,
) -> list[Row]:  # fmt: skip
    """Prefill and decode of one provider, with a KV cache per loop (kv_cache_attention for
    trm_kernels.nn, indexing and SDPA for the plain twin): prefill tokens/s of the batch's
    prompts of P tokens into empty caches, decode tokens/s of one token per sequence per step,
    the steps filling the caches from P to P + n (timed together, divided by n). No grad; on
    CUDA under bf16 autocast (bf16 caches), elsewhere in fp32."""
    batch = tokens.shape[0]
    p, n = (cfg.seq_len // 2, 2) if quick else (cfg.seq_len - 64, 64)
    torch.manual_seed(0)
    model = cls(cfg).to(device).eval()
    forward = torch.compile(model) if compiled else model
    cuda = device.type == "cuda"
    caches = model.new_caches(batch, p + n, torch.bfloat16 if cuda else None)
    prompt, next_token = tokens[:, :p], tokens[:, p : p + 1]

    def prefill():
        for cache in caches:
            cache.lengths.zero_()
        return forward(prompt, caches=caches)

    def decode():
        for cache in caches:
            cache.lengths.fill_(p)
        for _ in range(n):
            forward(next_token, caches=caches)

    ran = label if cls is RecurrentDepthLM else "none (plain PyTorch)"
    out = []
    with torch.no_grad(), K.use_backend(backend), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
        for group, fn, done in (("prefill", prefill, batch * p), ("decode step", decode, batch * n)):
            fn()  # warm-up (and compilation)
            ms = bench(fn, device, reps=3 if quick else 20)
            case = (f"recurrent-depth LM B={batch} P={p} x{cfg.loops} loops" if group == "prefill" else
                    f"recurrent-depth LM B={batch} cached {p}..{p + n} x{cfg.loops} loops")  # fmt: skip
            out.append(Row(group, case, name, ms / (1 if group == "prefill" else n),
                           extra={"batch": batch, "tokens_per_s": done / ms * 1e3, "backend": ran}))  # fmt: skip
            print(f"{case:40s} {name:44s} {out[-1].extra['tokens_per_s']:12,.0f} tokens/s ({group})", flush=True)
    return out


def main(argv: list[str] | None = None) -> list[float]:
    """``python -m trm_benchmarks.recurrent_depth``: train QUICK on the copy task, printing the loss,
    then greedy generation of a few fresh prompts (``show_copies``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trm_benchmarks.recurrent_depth",
                                     description="Train the recurrent-depth LM (QUICK) on the copy task.")  # fmt: skip
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (%(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step (%(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (%(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backend",
        choices=("auto", "reference", "triton", "cuda"),
        default="auto",
        help="trm_kernels backend (%(default)s: the fused kernels on a GPU, the reference on a CPU)",
    )
    args = parser.parse_args(argv)
    for name in ("steps", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.lr <= 0:
        parser.error(f"--lr {args.lr}: must be > 0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.backend == "cuda" and device.type != "cuda":
        parser.error("--backend cuda: needs a GPU; auto and reference run anywhere")
    if args.backend == "triton" and fused_backend(device) == "reference":
        parser.error("--backend triton: needs triton, and a GPU or TRITON_INTERPRET=1 set (the interpreter, on a "
                     "CPU); auto and reference run anywhere")  # fmt: skip
    print(f"copy task, {QUICK.seq_len + 1} tokens a sequence, batch {args.batch}, on {device}", flush=True)

    def log(step: int, loss: float) -> None:
        print(f"step {step}: loss {loss:.3f}", flush=True)

    try:
        model, losses = train_copy_task(QUICK, args.steps, args.batch, args.lr, args.seed, args.backend, device, log)
        with K.use_backend(args.backend):
            show_copies(model, torch.Generator().manual_seed(args.seed + 1))
    except KeyboardInterrupt:  # the example keeps nothing on disk: nothing to save or lose
        print("interrupted: this example saves nothing, so nothing is lost", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    return losses


def show_copies(model: RecurrentDepthLM, generator: torch.Generator, batch: int = 4) -> int:
    """Print the greedy generation (``generate``, through the KV caches) of `batch` fresh copy-task
    prompts (n tokens and SEP, each its own n) and how many of the copied tokens are right;
    returns that number."""
    tokens, key_mask = copy_task(model.cfg, batch, generator)
    n = (key_mask.sum(1) - 1) // 2
    device = model.embed.weight.device
    width = int(n.max())
    out, _ = generate(model, tokens[:, : width + 1].to(device), width, (n + 1).to(device))
    right = 0
    print("greedy generation after SEP, through a KV cache per loop (x: a wrong token):", flush=True)
    for row, k in zip(out.cpu(), n.tolist(), strict=True):
        want, got = row[:k], row[k + 1 : 2 * k + 1]
        right += int((got == want).sum())
        shown = " ".join(f"{t}" if t == w else f"{t}x" for t, w in zip(got.tolist(), want.tolist(), strict=True))
        print(f"  {' '.join(map(str, want.tolist()))} SEP -> {shown}", flush=True)
    print(f"copied {right} of {int(n.sum())} tokens right", flush=True)
    return right


__all__ = ["CORES", "IGNORE", "INJECTIONS", "LMConfig", "PAD", "PlainRecurrentDepthLM", "QUICK", "RecurrentDepthLM",
           "SEP", "SandwichBlock", "copy_task", "generate", "generation_rows", "lm_loss", "main", "rows", "show_copies",
           "step_flops", "train_copy_task", "training_step"]  # fmt: skip

if __name__ == "__main__":
    main()
