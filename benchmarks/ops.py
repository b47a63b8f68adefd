"""Op-level benchmarks: every fused op against eager PyTorch, torch.compile and SDPA.

Shapes are TRM's: rows = B*S with B = 768, S = 97 and 916, hidden 512;
attention with B*H = 768*8, d = 64. ``quick`` shrinks everything for a CPU smoke run.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
import trm_kernels as K
from trm_kernels import reference as R
from trm_kernels._triton import interpreting

from .common import Row, bench
from .targets import AUTO_MLP, TOKEN_COMPOSED, TOKEN_FUSED

Provider = tuple[str, Callable]


def fused_runs_on(device: torch.device) -> bool:
    """Fused kernels run on a GPU, or on the CPU under the Triton interpreter."""
    return device.type == "cuda" or interpreting()


def _providers(op: str, ref: Callable, compile_ok: bool, device: torch.device) -> list[Provider]:
    out: list[Provider] = [("eager", ref)]
    if compile_ok:
        out.append(("torch.compile", torch.compile(ref)))
    for backend in ("triton", "cuda"):
        if backend in K.available(op) and fused_runs_on(device):
            out.append((backend, lambda *a, _b=backend, **k: getattr(K, op)(*a, backend=_b, **k)))
    return out


def _fwd_bwd(fn: Callable, inputs: list[torch.Tensor]) -> tuple[Callable, Callable]:
    """Callables timing the forward, and the backward alone (the graph is built once)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grad = torch.randn_like(out)

    def backward():
        torch.autograd.grad(out, leaves, grad, retain_graph=True)

    return (lambda: fn(*inputs)), backward


def _timed_fwd_bwd(op: str, case: str, name: str, fn: Callable, inputs, device, fwd_bytes: int, bwd_bytes: int):
    """The forward and the backward rows of one op and provider, as GB/s by the byte model."""
    fwd, bwd = _fwd_bwd(fn, inputs)
    for direction, run, nbytes in (("forward", fwd, fwd_bytes), ("backward", bwd, bwd_bytes)):
        ms = bench(run, device)
        yield Row(f"{op} {direction}", case, name, ms, gbps=nbytes / ms / 1e6)


def _norm_cases(rows_list, hidden, dtype, device, compile_ok) -> Iterator[Row]:
    for batch, seq in rows_list:
        for dim, label in ((-1, "hidden"), (-2, "sequence")):
            x, r = (torch.randn(batch, seq, hidden, device=device, dtype=dtype) for _ in range(2))
            nbytes = x.numel() * x.element_size()
            case = f"add_rmsnorm {label} {batch}x{seq}x{hidden}"
            for name, fn in _providers("add_rmsnorm", lambda a, b, _d=dim: R.add_rmsnorm(a, b, _d), compile_ok, device):
                op = (lambda a, b, _f=fn, _d=dim: _f(a, b, dim=_d)) if name in ("triton", "cuda") else fn
                yield from _timed_fwd_bwd("add+rmsnorm", case, name, op, [x, r], device, 3 * nbytes, 4 * nbytes)


def _swiglu_cases(rows_list, inter, dtype, device, compile_ok) -> Iterator[Row]:
    for batch, seq in rows_list:
        gu = torch.randn(batch * seq, 2 * inter, device=device, dtype=dtype)
        half = gu.numel() // 2 * gu.element_size()
        case = f"swiglu {batch * seq}x{2 * inter}"
        for name, fn in _providers("swiglu", R.swiglu, compile_ok, device):
            yield from _timed_fwd_bwd("swiglu", case, name, fn, [gu], device, 3 * half, 5 * half)


def _channel_mlp_cases(rows_list, hidden, inter, dtype, device, compile_ok) -> Iterator[Row]:
    """The SwiGLU MLP, forward and backward: eager, torch.compile, cuBLAS GEMMs around the
    Triton SwiGLU kernel, our GEMMs with SwiGLU in their epilogues, and what ``auto`` keeps
    after timing both (trm_kernels.tune). TFLOP/s counts the three GEMMs (six backward)."""
    from trm_kernels import channel_mlp

    for batch, seq in rows_list:
        x = torch.randn(batch * seq, hidden, device=device, dtype=dtype)
        w_gu = torch.randn(2 * inter, hidden, device=device, dtype=dtype) * hidden**-0.5
        w_down = torch.randn(hidden, inter, device=device, dtype=dtype) * inter**-0.5
        flops = 2 * batch * seq * hidden * 3 * inter
        case = f"swiglu_mlp {batch * seq}x{hidden}, I={inter}"
        providers = _providers("swiglu_mlp", R.swiglu_mlp, compile_ok, device)
        if "triton" in K.available("swiglu_mlp") and fused_runs_on(device):
            providers[-1] = (AUTO_MLP, providers[-1][1])
            providers += [("cuBLAS + triton swiglu", channel_mlp.composed),
                          ("triton GEMM epilogues", channel_mlp.fused)]  # fmt: skip
        for name, fn in providers:
            fwd, bwd = _fwd_bwd(fn, [x, w_gu, w_down])
            for direction, run, work in (("forward", fwd, flops), ("backward", bwd, 2 * flops)):
                ms = bench(run, device)
                yield Row(f"swiglu_mlp {direction}", case, name, ms, tflops=work / ms / 1e9)


def _inject_cases(rows_list, hidden, dtype, device, compile_ok) -> Iterator[Row]:
    for batch, seq in rows_list:
        h, a, b = (torch.randn(batch, seq, hidden, device=device, dtype=dtype) for _ in range(3))
        nbytes = h.numel() * h.element_size()
        for name, fn in _providers("inject", R.inject, compile_ok, device):
            ms = bench(functools.partial(fn, h, a, b), device)
            yield Row("injection add", f"inject {batch}x{seq}x{hidden}", name, ms, gbps=4 * nbytes / ms / 1e6)


def _ce_cases(rows_list, vocab, dtype, device, compile_ok) -> Iterator[Row]:
    for batch, seq in rows_list:
        logits = torch.randn(batch, seq, vocab, device=device, dtype=dtype)
        labels = torch.randint(0, vocab, (batch, seq), device=device)
        nbytes = 2 * logits.numel() * logits.element_size() + labels.numel() * (8 + 4)
        for name, fn in _providers("stablemax_cross_entropy", R.stablemax_cross_entropy, compile_ok, device):
            fwd, bwd = _fwd_bwd(lambda t, _f=fn, _y=labels: _f(t, _y), [logits])
            ms = bench(lambda _fw=fwd, _bw=bwd: (_fw(), _bw()), device)
            yield Row("stablemax CE forward+backward", f"CE {batch}x{seq}x{vocab}", name, ms, gbps=nbytes / ms / 1e6)


def _sdpa(backend) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def fn(qkv, cos, sin, heads):  # SDPA alone on pre-split q, k, v: no RoPE, the target to beat
        b, s, w = qkv.shape
        q, k, v = qkv.view(b, s, 3, heads, w // (3 * heads)).permute(2, 0, 3, 1, 4)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return fn


def _attention_cases(shapes, dtype, device, compile_ok) -> Iterator[Row]:
    from torch.nn.attention import SDPBackend

    for batch, seq, heads, head_dim in shapes:
        qkv = torch.randn(batch, seq, 3 * heads * head_dim, device=device, dtype=dtype)
        cos, sin = (t.to(device) for t in K.rope_cos_sin(seq, head_dim))
        flops = 4 * batch * heads * seq * seq * head_dim
        case = f"attention B={batch} H={heads} S={seq} d={head_dim}"
        providers = _providers("rope_attention", R.rope_attention, compile_ok, device)
        if device.type == "cuda":
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                providers.append((f"sdpa-{backend.name.lower()} (no rope)", _sdpa(backend)))
        for name, fn in providers:
            try:
                fwd, bwd = _fwd_bwd(lambda t, _f=fn, _c=cos, _s=sin, _h=heads: _f(t, _c, _s, _h), [qkv])
                ms_f = bench(fwd, device)
                ms_b = bench(bwd, device)
            except RuntimeError as e:  # an SDPA backend that does not take this shape/dtype
                print(f"skipped {name} on {case}: {str(e).splitlines()[0]}")
                continue
            yield Row("attention forward", case, name, ms_f, tflops=flops / ms_f / 1e9)
            yield Row("attention forward+backward", case, name, ms_f + ms_b, tflops=3.5 * flops / (ms_f + ms_b) / 1e9)


def _qk_norm_cases(shape, dtype, device, compile_ok) -> Iterator[Row]:
    """Causal GQA attention with Qwen3's QK-norm (before RoPE, weights [d]), forward and
    forward+backward: eager and ``torch.compile`` of the reference, the triton op with its
    norm pass, and the triton op without QK-norm (the floor: what the norm pass adds)."""
    batch, seq, heads, kv, d = shape
    qkv = torch.randn(batch, seq, (heads + 2 * kv) * d, device=device, dtype=dtype)
    cos, sin = (t.to(device) for t in K.rope_cos_sin(seq, d))
    weights = [1 + 0.1 * torch.randn(d, device=device) for _ in range(2)]
    flops = 4 * batch * heads * seq * seq * d / 2  # causal: half the scores
    case = f"attention + QK-norm B={batch} H={heads}/{kv} S={seq} d={d}"

    def reference(t, wq, wk):
        return R.rope_attention(t, cos, sin, heads, kv, True, None, "rotate_half", 0, wq, wk, "before")

    providers = [("eager", reference, [qkv, *weights])]
    if compile_ok:
        providers.append(("torch.compile", torch.compile(reference), [qkv, *weights]))
    if "triton" in K.available("rope_attention") and fused_runs_on(device):
        fused = functools.partial(K.rope_attention, num_kv_heads=kv, causal=True, backend="triton")
        providers += [
            ("triton", lambda t, wq, wk: fused(t, cos, sin, heads, qk_norm="before", q_norm_weight=wq,
                                               k_norm_weight=wk), [qkv, *weights]),
            ("triton, no QK-norm (the floor)", lambda t: fused(t, cos, sin, heads), [qkv]),
        ]  # fmt: skip
    for name, fn, inputs in providers:
        fwd, bwd = _fwd_bwd(fn, inputs)
        ms_f, ms_b = bench(fwd, device), bench(bwd, device)
        yield Row("attention + QK-norm forward", case, name, ms_f, tflops=flops / ms_f / 1e9)
        yield Row("attention + QK-norm forward+backward", case, name, ms_f + ms_b,
                  tflops=3.5 * flops / (ms_f + ms_b) / 1e9)  # fmt: skip


def _kv_cache_cases(shapes, dtype, device, compile_ok) -> Iterator[Row]:
    """A generation step against a KV cache (decode: 1 new token; chunked prefill: Sq), each
    sequence with `cached` tokens before the step; GB/s by the bytes the step must read (the
    cached keys and values up to the new positions, the new tokens) and write (the output,
    the new keys and values). SDPA on keys and values already cut to length and rotated, no
    cache write (``F.scaled_dot_product_attention``, ``enable_gqa``): the target to beat."""
    for batch, seq, cached, heads, kv, d in shapes:
        capacity = cached + seq
        qkv = torch.randn(batch, seq, (heads + 2 * kv) * d, device=device, dtype=dtype)
        caches = [torch.randn(batch, capacity, kv, d, device=device, dtype=dtype) for _ in range(2)]
        lens = torch.full((batch,), cached, dtype=torch.int32, device=device)
        cos, sin = (t.to(device) for t in K.rope_cos_sin(capacity, d))
        size = torch.finfo(dtype).bits // 8
        moved = 2 * capacity * kv * d + seq * (heads + 2 * kv) * d + seq * heads * d + 2 * seq * kv * d
        nbytes = size * batch * moved
        case = f"{'decode' if seq == 1 else f'prefill chunk {seq}'} B={batch} cache {cached} H={heads}/{kv} d={d}"
        providers = [("eager", R.kv_cache_attention)]
        if compile_ok:
            providers.append(("torch.compile", torch.compile(R.kv_cache_attention)))
        if fused_runs_on(device):
            providers.append(("triton", functools.partial(K.kv_cache_attention, backend="triton")))
        with torch.no_grad():
            for name, fn in providers:
                if name == "triton":
                    step = functools.partial(fn, qkv, *caches, lens, cos, sin, heads, num_kv_heads=kv)
                else:
                    step = functools.partial(fn, qkv, *caches, lens, cos, sin, heads, kv, True)
                ms = bench(step, device)
                yield Row("kv-cache attention", case, name, ms, gbps=nbytes / ms / 1e6)
            q = torch.randn(batch, heads, seq, d, device=device, dtype=dtype)
            k, v = (c.transpose(1, 2) for c in caches)  # [B, KVH, C, d] views
            mask = torch.ones(seq, capacity, dtype=torch.bool, device=device).tril(cached)
            sdpa = functools.partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, enable_gqa=True)
            ms = bench(sdpa, device)
            yield Row("kv-cache attention", case, "sdpa (no rope, no cache write)", ms, gbps=nbytes / ms / 1e6)


def _folded(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.matmul(w, h)


def _batched(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.bmm(w.expand(h.shape[0], -1, -1), h)


def _token_mix_cases(batch, seq, hidden, inter, dtype, device) -> Iterator[Row]:
    """The mlp_t gate_up product W [2I, S] @ h [B, S, D], forward and backward, three ways:
    eager ``torch.matmul`` (folds the batch into rows, copying h, the product and the gradients to
    transposed layouts; the model did this until 2026-11-23), the batched GEMM with W at batch
    stride 0 that the model runs now, and the same with W's rows padded to a multiple of 8
    elements: at S = 97 a contiguous W's leading dimension (194 bytes) is not 16-byte aligned,
    which cuBLAS's fastest kernels need."""
    h = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    w = torch.randn(2 * inter, seq, device=device, dtype=dtype)
    padded = torch.zeros(2 * inter, -(-seq // 8) * 8, device=device, dtype=dtype)[:, :seq]
    padded.copy_(w)
    flops = 2 * batch * 2 * inter * seq * hidden
    case = f"W {2 * inter}x{seq} @ h {batch}x{seq}x{hidden}"
    for name, fn, weight in (
        ("eager", _folded, w),  # torch.matmul(W, h), as one writes it in PyTorch
        ("bmm, W batch stride 0 (model)", _batched, w),
        (f"bmm, W leading dim padded to {padded.stride(0)}", _batched, padded),
    ):
        fwd, bwd = _fwd_bwd(fn, [weight, h])
        for direction, run, work in (("forward", fwd, flops), ("backward", bwd, 2 * flops)):
            ms = bench(run, device)
            yield Row(f"mlp_t gate_up GEMM {direction}", case, name, ms, tflops=work / ms / 1e9)


def _token_mlp_cases(batch, seq, hidden, inter, dtype, device, compile_ok) -> Iterator[Row]:
    """The whole mlp_t sub-layer without grad (the no-grad recursion and evaluation):
    the one-kernel path against eager, torch.compile and the composed Triton ops that run
    with grad. TFLOP/s counts the two GEMMs unpadded; GB/s counts h read and the output
    written once, the floor the fusion reaches (the composed ops also move the [B, 2I, D]
    product and the [B, I, D] activation)."""
    h = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    w_gu = torch.randn(2 * inter, seq, device=device, dtype=dtype) * seq**-0.5
    w_down = torch.randn(seq, inter, device=device, dtype=dtype) * inter**-0.5
    flops = 2 * batch * hidden * 3 * inter * seq
    nbytes = 2 * h.numel() * h.element_size()
    case = f"h {batch}x{seq}x{hidden}, I={inter}"

    composed = functools.partial(R.token_mlp_rmsnorm, swiglu=functools.partial(K.swiglu, backend="triton"),
                                 add_rmsnorm=functools.partial(K.add_rmsnorm, backend="triton"))  # fmt: skip
    providers = _providers("token_mlp_rmsnorm", R.token_mlp_rmsnorm, compile_ok, device)
    if fused_runs_on(device) and "triton" in K.available("token_mlp_rmsnorm"):
        providers.append(("triton, composed ops (the grad path)", composed))
    for name, fn in providers:
        with torch.no_grad():
            ms = bench(lambda _f=fn: _f(h, w_gu, w_down), device)
        yield Row("mlp_t sub-layer forward, no grad", case, name, ms, gbps=nbytes / ms / 1e6, tflops=flops / ms / 1e9)


def _token_mlp_training_cases(batch, seq, hidden, inter, dtype, device, compile_ok) -> Iterator[Row]:
    """The mlp_t sub-layer with grad, forward and backward together: eager, torch.compile,
    the composition (batched GEMMs around the Triton SwiGLU and norm kernels, keeping every
    intermediate), the fused training kernels (the one-kernel forward writing the pre-norm
    sum and rstd, then dh and the weight gradients by the two recomputing kernels), and
    what ``auto`` keeps after timing both (trm_kernels.tune). TFLOP/s counts the eager
    step's GEMMs (3 forward, 6 backward) whatever a provider recomputes."""
    from trm_kernels import token_mlp

    h = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    w_gu = torch.randn(2 * inter, seq, device=device, dtype=dtype) * seq**-0.5
    w_down = torch.randn(seq, inter, device=device, dtype=dtype) * inter**-0.5
    flops = 3 * 2 * batch * hidden * 3 * inter * seq
    case = f"h {batch}x{seq}x{hidden}, I={inter}"
    providers = _providers("token_mlp_rmsnorm", R.token_mlp_rmsnorm, compile_ok, device)
    if fused_runs_on(device) and "triton" in K.available("token_mlp_rmsnorm"):
        providers[-1] = (AUTO_MLP, providers[-1][1])
        providers += [(TOKEN_COMPOSED, token_mlp.composed), (TOKEN_FUSED, token_mlp.fused)]
    leaves = [t.detach().requires_grad_() for t in (h, w_gu, w_down)]
    grad = torch.randn_like(h)
    for name, fn in providers:

        def step(_f=fn):
            out = _f(*leaves, 1e-5)
            torch.autograd.grad(out, leaves, grad)

        ms = bench(step, device)
        yield Row("mlp_t sub-layer forward+backward", case, name, ms, tflops=flops / ms / 1e9)


def _norm_epilogue_cases(rows, hidden, inter, dtype, device, compile_ok) -> Iterator[Row]:
    """The GEMMs ending in the residual add and RMSNorm, without grad and with grad (forward
    and backward together): the channel MLP sub-layer (eager, torch.compile, the
    compositions, both GEMM epilogues, the one-kernel sub-layer without grad, ``auto``'s
    choice) and o_proj + norm (``linear_add_rmsnorm``: eager, torch.compile, cuBLAS + the
    add + RMSNorm kernel, the epilogue, ``auto``). TFLOP/s counts the eager GEMMs."""
    from trm_kernels import channel_mlp

    h = torch.randn(rows, hidden, device=device, dtype=dtype)
    w_gu = torch.randn(2 * inter, hidden, device=device, dtype=dtype) * hidden**-0.5
    w_down = torch.randn(hidden, inter, device=device, dtype=dtype) * inter**-0.5
    w_o = torch.randn(hidden, hidden, device=device, dtype=dtype) * hidden**-0.5
    ours = fused_runs_on(device) and "triton" in K.available("swiglu_mlp_rmsnorm")
    for op, inputs, flops, named in (
        ("swiglu_mlp_rmsnorm", (h, w_gu, w_down), 6 * rows * hidden * inter,
         {**channel_mlp.SUBLAYER_CANDIDATES, "one kernel": channel_mlp.sublayer_one_kernel}),
        ("linear_add_rmsnorm", (h, w_o, h), 2 * rows * hidden * hidden, channel_mlp.LINEAR_NORM_CANDIDATES),
    ):  # fmt: skip
        case = f"{op} {rows}x{hidden}" + (f", I={inter}" if op == "swiglu_mlp_rmsnorm" else "")
        providers = _providers(op, getattr(R, op), compile_ok, device)
        if ours:
            providers[-1] = (AUTO_MLP, providers[-1][1])
            providers += [(f"triton {name}", fn) for name, fn in named.items()]
        for name, fn in providers:
            with torch.no_grad():
                ms = bench(lambda _f=fn, _in=inputs: _f(*_in, 1e-5), device)
            yield Row(f"{op} forward, no grad", case, name, ms, tflops=flops / ms / 1e9)
            if name == "triton one kernel":
                continue  # no backward
            leaves = [t.detach().requires_grad_() for t in inputs]
            grad = torch.randn_like(h)

            def step(_f=fn, _leaves=leaves, _grad=grad):
                torch.autograd.grad(_f(*_leaves, 1e-5), _leaves, _grad)

            ms = bench(step, device)
            yield Row(f"{op} forward+backward", case, name, ms, tflops=3 * flops / ms / 1e9)


def _shapes(quick: bool):
    if quick:
        return [(2, 17)], 64, 96, [(2, 17, 2, 32)]
    return [(768, 97), (768, 916)], 512, 1536, [(768, 97, 8, 64), (768, 916, 8, 64)]


def _cache_shapes(quick: bool) -> list[tuple[int, int, int, int, int, int]]:
    """(batch, new tokens, cached tokens, heads, kv heads, head_dim): a language model's decode
    steps (batch 1 and 64 at 4096 cached tokens: split-K and many tiles) and a prefill chunk."""
    if quick:
        return [(2, 1, 40, 4, 2, 32), (2, 5, 20, 4, 2, 32)]
    return [(1, 1, 4096, 32, 8, 128), (64, 1, 4096, 32, 8, 128), (8, 512, 3584, 32, 8, 128)]


def _printed(cases: Iterator[Row]) -> list[Row]:
    out = []
    for row in cases:
        print(f"{row.group:32s} {row.case:40s} {row.provider:28s} {row.ms:9.4f} ms", flush=True)
        out.append(row)
    return out


def channel_mlp(device: torch.device, quick: bool, compile_ok: bool) -> list[Row]:
    """The SwiGLU MLP's rows alone (``trm_benchmarks.run --only mlp``)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows_list, hidden, inter, _ = _shapes(quick)
    token = _token_mlp_training_cases(*rows_list[0], hidden, 512 if not quick else 32, dtype, device, compile_ok)
    rows = rows_list[0][0] * rows_list[0][1]
    return _printed(
        itertools.chain(
            _channel_mlp_cases(rows_list[:1], hidden, inter, dtype, device, compile_ok),
            _norm_epilogue_cases(rows, hidden, inter, dtype, device, compile_ok),
            token,
        )
    )


def run(device: torch.device, quick: bool, compile_ok: bool) -> list[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows_list, hidden, inter, attn = _shapes(quick)
    out: list[Row] = []
    for cases in (
        _norm_cases(rows_list, hidden, dtype, device, compile_ok),
        _swiglu_cases(rows_list, inter, dtype, device, compile_ok),
        _channel_mlp_cases(rows_list[:1], hidden, inter, dtype, device, compile_ok),
        _inject_cases(rows_list, hidden, dtype, device, compile_ok),
        _ce_cases([(768, 81)] if not quick else [(2, 16)], 11, dtype, device, compile_ok),
        _attention_cases(attn, dtype, device, compile_ok),
        _kv_cache_cases(_cache_shapes(quick), dtype, device, compile_ok),
        _qk_norm_cases((1, 16, 2, 1, 32) if quick else (8, 2048, 32, 8, 128), dtype, device, compile_ok),
        _token_mix_cases(*rows_list[0], hidden, 512 if not quick else 32, dtype, device),
        _token_mlp_cases(*rows_list[0], hidden, 512 if not quick else 32, dtype, device, compile_ok),
        _token_mlp_training_cases(*rows_list[0], hidden, 512 if not quick else 32, dtype, device, compile_ok),
    ):
        out += _printed(cases)
    return out
