"""Speed-of-light model of TRM's steps: what each step asks of a GPU, counted on any machine,
and the fastest it could then run on each GPU (predicted, not measured).

    python -m trm_benchmarks.roofline                          # markdown on stdout
    python -m trm_benchmarks.roofline --out DIR                # DIR/roofline.json and DIR/roofline.md
    python -m trm_benchmarks.roofline --configs sudoku-mlp --gpus h100-measured --batches 768
    python -m trm_benchmarks.roofline --measured RESULTS_DIR   # with measured / predicted columns

**Counted** (a measurement of our code; tests check it): one training step (forward, ACT
loss, backward, optimizer step) and one evaluation step (a whole supervision step without
grad, what evaluation repeats n_sup times) of each paper config run on the meta device,
shapes only, with the ops each provider dispatches on a GPU: eager (the reference ops; the
attention of ``F.scaled_dot_product_attention`` as PyTorch's flash kernel), fused (our
Triton ops, as ``auto`` picks them on CUDA), and fused + CUDA graphs (the same ops, with
the regions ``trm/graphs.py`` captures replayed as one graph). Per dispatched op: bytes read
and written (the byte model: each tensor input read once, each output written once; views
move nothing), matrix FLOPs (GEMMs via ``torch.utils.flop_counter``, attention and the fused
``mlp_t`` kernel by the formulas below; elementwise arithmetic is not counted), and kernel
launches (one per dispatched aten op that is not a view or an allocation; our ops as many as
their implementations launch, ``LAUNCHES``).

**Predicted** (not measured): each op's lower-bound time is the largest of bytes over memory
bandwidth, FLOPs over the dense bf16 tensor rate, and a launch floor per kernel; the step's
is their sum. The floors are assumptions, not measurements (``LAUNCH_US``): in eager mode the
host's dispatch and launch of an op, inside a replayed graph the gap between two kernel
nodes. ``trm doctor`` and ``trm_benchmarks.run`` on a GPU measure what this predicts; give
their results with ``--measured`` to print measured / predicted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import pathlib
import sys
import types

import torch
import torch.nn.functional as F
import trm_kernels as K
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from trm.adaptive import Slots
from trm.arch import build_model
from trm.config import preset
from trm.losses import act_loss
from trm.optim import AdamATan2

from .recurrent_depth import LMConfig
from .traffic import PARTS, UNTAGGED_VIEWS, nbytes

TRM_CONFIGS = ("sudoku-mlp", "sudoku-att", "maze", "hrm-sudoku")
LM = "recurrent-depth"  # trm_benchmarks.recurrent_depth's language model: its training step, no CUDA graphs
CONFIGS = (*TRM_CONFIGS, LM)
PROVIDERS = ("eager", "fused", "fused + CUDA graphs")  # the model benchmark's names
STEPS = ("train", "eval", "adaptive")
# Adaptive evaluation (trm/adaptive.py) refills the slots that halted before each step: with
# puzzles taking MEAN_STEPS steps on average, batch / MEAN_STEPS slots per step. An
# assumption: no paper-size model has been measured. On CPU the 6x6 Sudoku model of the
# README took 3.3 steps on average with at most 16 and 4.3 with at most 32 (threshold 4);
# sudoku4 takes 1.0 of its 4. --mean-steps changes it.
MEAN_STEPS = 4.0
BATCHES = (768, 1)
LM_BATCHES = (32, 1)  # sequences of LMConfig.seq_len tokens
LM_DECODE = "decode"  # the LM's decode step: one token per sequence, its caches full to the last position

# Kernels each of our ops launches on a GPU, read from its implementation in kernels/.
LAUNCHES = {
    "trm.add_rmsnorm": 1,
    "trm.add_rmsnorm_backward": 1,
    "trm.swiglu": 1,
    "trm.swiglu_backward": 1,
    "trm.inject": 1,
    "trm.cross_entropy": 1,
    "trm.rope_attention": 1,
    "trm.rope_attention_backward": 3,  # delta = rowsum(dO * O), dK/dV, dQ
    "trm.token_mlp_rmsnorm": 5,  # two zero-padded weight copies (fill + copy each), the fused kernel
    "trm.token_mlp_rmsnorm_train": 5,  # the same, writing the pre-norm sum and rstd too
    # with both gradients: the norm's backward, the weight padding (4), the dh kernel, the
    # weight-gradient kernel, the sum of its slices, two rounding copies (PARTS)
    "trm.token_mlp_rmsnorm_backward": 10,
    "trm.swiglu_mlp": 2,  # the gate|up GEMM with SwiGLU in its epilogue, cuBLAS's down GEMM (PARTS)
    "trm.swiglu_mlp_train": 2,
    "trm.swiglu_mlp_rmsnorm": 2,  # the two GEMMs with their epilogues (PARTS)
    "trm.swiglu_mlp_rmsnorm_train": 2,
    "trm.swiglu_mlp_backward": 1,  # d(act) GEMM with d(gate|up) and the activation in its epilogue
    "trm.linear_add_rmsnorm": 1,  # the GEMM with the residual add and RMSNorm in its epilogue
    "trm.linear_add_rmsnorm_train": 1,
    "trm.sandwich_rmsnorm": 1,  # both norms in one pass over each row
    "trm.sandwich_rmsnorm_backward": 3,  # the kernel, then the sums of the two weights' per-program partials
    # the cache write, the attention, the merge of its key chunks (split-K: a decode step of
    # LMConfig at batch 32 or 1 has too few row tiles to fill the GPU, so its keys are cut)
    "trm.kv_cache_attention": 3,
}
# Ops that launch no kernel: allocations, views not tagged as views, and the 0-dim tensor a
# Python number becomes in torch.where(mask, 0, t) (a CPU wrapped number on CUDA).
NO_LAUNCH = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
             "aten.lift_fresh", "aten.scalar_tensor"} | UNTAGGED_VIEWS  # fmt: skip

# Launch floors in microseconds: assumptions, not measurements (the host's CPU sets the eager
# one); what a GPU run measures replaces them.
LAUNCH_US = {"eager": 5.0, "graph node": 1.0, "graph replay": 10.0}


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes/s
    bf16: float  # dense bf16 tensor-core FLOP/s
    source: str


GPUS = {
    "h100-measured": GPU("H100 SXM 80GB, measured ceilings", 3.0e12, 798e12,
                         "measured on one H100 SXM, 2026-11-13: device-to-device copy 3.0 TB/s (bytes read + written), "
                         "8192^3 bf16 GEMM on random data 798 TFLOP/s; not yet measured by this project's benchmarks"),
    "h100": GPU("H100 SXM 80GB", 3.35e12, 989e12, "NVIDIA H100 Tensor Core GPU datasheet: 3.35 TB/s; BF16 1,979 "
                "TFLOPS with sparsity, 989 dense"),
    "h200": GPU("H200 SXM 141GB", 4.8e12, 989e12, "NVIDIA H200 datasheet: 4.8 TB/s; BF16 as H100"),
    "a100": GPU("A100 SXM 80GB", 2.039e12, 312e12, "NVIDIA A100 datasheet: 2,039 GB/s; BF16 312 TFLOPS dense"),
    "l40s": GPU("L40S", 0.864e12, 362e12, "NVIDIA L40S datasheet: 864 GB/s; BF16 362 TFLOPS dense (733 sparse)"),
    "rtx4090": GPU("RTX 4090", 1.008e12, 165e12, "NVIDIA Ada Lovelace architecture whitepaper: 1,008 GB/s; BF16 "
                   "165.2 TFLOPS dense with FP32 accumulate"),
}  # fmt: skip


@dataclasses.dataclass
class Op:
    """One dispatched op of a step."""

    name: str
    bytes: int
    flops: int
    launches: int
    graphed: bool  # inside a region the graphs provider replays


def _attention_pairs(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, causal: bool) -> int:
    """B * H * d times the (query, key) pairs attended, of a packed qkv [B, S, (H + 2 KVH) d]:
    S^2, or S (S + 1) / 2 causal (the kernels skip the blocks above the diagonal)."""
    batch, seq, width = qkv.shape
    head_dim = width // (num_heads + 2 * num_kv_heads)
    pairs = seq * (seq + 1) // 2 if causal else seq * seq
    return batch * num_heads * head_dim * pairs


def trm_flops(name: str, args: tuple) -> int:
    """Matrix FLOPs of one of our ops, by what its kernels compute."""
    if name == "trm.rope_attention":  # q k^T and p v: 2 * 2 * pairs * d per head
        qkv, _, _, heads, kv_heads, causal = args[:6]
        return 4 * _attention_pairs(qkv, heads, kv_heads, causal)
    if name == "trm.rope_attention_backward":  # dK/dV: q k^T, p^T dO, dO v^T, dS^T q; dQ: q k^T, dO v^T, dS k
        _, qkv, _, _, _, _, heads, kv_heads, causal = args[:9]
        return 14 * _attention_pairs(qkv, heads, kv_heads, causal)
    if name in ("trm.token_mlp_rmsnorm", "trm.token_mlp_rmsnorm_train"):  # gate|up [2I, S] @ h, down [S, I] @ act
        h, w_gate_up = args[0], args[1]
        batch, seq, hidden = h.shape
        return 2 * batch * hidden * seq * w_gate_up.shape[0] + 2 * batch * hidden * seq * w_gate_up.shape[0] // 2
    if name in ("trm.linear_add_rmsnorm", "trm.linear_add_rmsnorm_train"):  # a [M, K] @ w [N, K]^T
        a, w = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * w.shape[0]
    # q k^T and p v of each new token against all C positions of the cache: what a decode step with the cache
    # full attends (cache_len's values are not known on the meta device; a prefill attends fewer)
    if name == "trm.kv_cache_attention":
        qkv, k_cache, _, _, _, _, heads = args[:7]
        batch, seq, _ = qkv.shape
        return 4 * batch * seq * heads * k_cache.shape[3] * k_cache.shape[1]
    if name == "trm.swiglu_mlp_backward":  # d(act) = dy [M, D] @ W_down [D, I]
        dy, _, w_down = args[:3]  # (and the activation, where not swiglu)
        return 2 * dy.shape[0] * dy.shape[1] * w_down.shape[1]
    return 0


def _rows_written(target: torch.Tensor, indices) -> int:
    """Bytes index_put_ writes into `target`: the rows its leading axes' integer indices select
    (one index: rows of the first axis; two, as a KV cache's [batch, position]: its entries)."""
    if any(i is None or i.dtype == torch.bool for i in indices):
        return nbytes(target)
    rows = torch.broadcast_shapes(*(i.shape for i in indices)).numel()
    return rows * target.shape[len(indices) :].numel() * target.element_size()


class Counter(TorchDispatchMode):
    """Every dispatched op that moves memory, with its bytes, FLOPs and launches."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self.graphed = False
        self.paused = False  # while a stand-in for one GPU kernel computes its shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = str(func.overloadpacket)
        # what stays on the host (a Python number wrapped as a CPU scalar tensor) launches nothing
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
        if func.is_view or name in NO_LAUNCH or not outputs:
            return out
        if name in PARTS:
            for part, moved, flops in PARTS[name](args, out):
                self.ops.append(Op(part, moved, flops, 1, self.graphed))
            return out
        if name.startswith("trm."):
            flops, launches = trm_flops(name, args), LAUNCHES[name]
        else:
            formula = flop_registry.get(func.overloadpacket)
            operands = args[:2] if name in ("aten.mm", "aten.bmm") else args  # bmm.dtype: (a, b, out_dtype)
            flops = formula(*operands, **kwargs, out_val=out) if formula is not None else 0
            launches = 1
        if name == "aten.index_put_":  # writes only the indexed rows: reads values and indices, writes rows
            moved = nbytes(args[2]) + nbytes(args[1]) + _rows_written(args[0], args[1])
        elif name == "aten.copy_":  # reads the source, writes the destination
            moved = 2 * nbytes(args[1])
        else:
            moved = nbytes((args, kwargs)) + nbytes(out)
        self.ops.append(Op(name, moved, int(flops), launches, self.graphed))
        return out


class _FusedAttention(torch.autograd.Function):
    """One fused attention kernel forward and one backward, as PyTorch's memory-efficient
    kernel runs SDPA with a mask, causal or grouped-query heads on a GPU: q, k, v (and the
    mask) read once, the output written once; FLOPs of the (query, key) pairs attended
    (4 products' worth forward, 10 backward, as flash attention's). The meta device would
    otherwise count the unfused math path."""

    @staticmethod
    def forward(ctx, counter, q, k, v, mask, causal):
        b, h, s, d = q.shape
        pairs = s * (s + 1) // 2 if causal else s * k.shape[2]  # a decode step: its queries against every key
        counter.paused = True
        out = torch.empty_like(q)
        counter.paused = False
        moved = nbytes((q, k, v, mask, out)) + b * h * s * 4  # + the fp32 log-sum-exp it saves
        counter.ops.append(Op("aten._fused_attention", moved, 4 * b * h * pairs * d, 1, counter.graphed))
        ctx.counter, ctx.moved, ctx.flops = counter, moved, 10 * b * h * pairs * d
        ctx.save_for_backward(q, k, v)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        counter = ctx.counter
        counter.paused = True
        grads = [torch.empty_like(t) for t in (q, k, v)]
        counter.paused = False
        counter.ops.append(Op("aten._fused_attention_backward", ctx.moved + nbytes((dout, *grads)), ctx.flops, 1,
                              counter.graphed))  # fmt: skip
        return None, *grads, None, None


class _FlashAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as PyTorch dispatches it on a GPU: for TRM's shapes
    (bf16, head_dim 64, no mask) the flash kernel, forward and backward; with a mask, causal
    or grouped-query heads one fused kernel (_FusedAttention), where the meta device would
    otherwise take the unfused math path."""

    def __init__(self, counter: Counter | None = None):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            plain = kwargs.get("attn_mask") is None and not kwargs.get("is_causal") and k.shape[1] == q.shape[1]
            if plain:
                return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=kwargs.get("scale"))[0]
            if self.counter is not None:
                return _FusedAttention.apply(self.counter, q, k, v, kwargs.get("attn_mask"), kwargs.get("is_causal"))
        return func(*args, **kwargs)


@contextlib.contextmanager
def _graph_regions(model, marks):
    """Mark the ops of the regions trm/graphs.py captures (the no-grad cycles, the evaluation step)."""
    originals = {name: getattr(model, name) for name in ("_no_grad_part", "_eval_step")}

    def marked(fn):
        def run(*args):
            marks.graphed = True
            try:
                return fn(*args)
            finally:
                marks.graphed = False

        return run

    for name, fn in originals.items():
        setattr(model, name, marked(fn))
    try:
        yield
    finally:
        for name in originals:
            delattr(model, name)  # the class's methods again


def _meta_model(config: str):
    cfg = dataclasses.replace(preset(config).model, forward_dtype="bfloat16", cuda_graphs=False)
    return cfg, build_model(cfg).to("meta")


def _batch(cfg, size: int) -> dict[str, torch.Tensor]:
    shape, meta = (size, cfg.seq_len), torch.device("meta")
    return {
        "inputs": torch.ones(shape, dtype=torch.long, device=meta),
        "labels": torch.ones(shape, dtype=torch.long, device=meta),
        "puzzle_identifiers": torch.zeros(size, dtype=torch.long, device=meta),
    }


def count_step(config: str, provider: str, step: str, batch: int, mean_steps: float = MEAN_STEPS) -> list[Op]:
    """The ops of one step of `config` as `provider` runs it on a GPU, counted on the meta device.

    train: what the model benchmark times (forward with ACT from a fresh carry, loss / batch,
    backward, AdamATan2 step); eval: one whole supervision step without grad; adaptive: one
    step of adaptive evaluation (the refill of batch / mean_steps slots, the evaluation step,
    the halting bookkeeping, and the host's read of which slots halted)."""
    counter = Counter()
    if config == LM:
        run_lm_step(provider, step, batch, counter)
        return counter.ops
    run_step(config, provider, step, batch, counter, counter, mean_steps)
    if step == "adaptive":  # the device-to-host copy of the live flags, one byte per slot
        counter.ops.append(Op("host read of halted slots", 2 * batch, 0, 1, False))
    return counter.ops


def run_step(config: str, provider: str, step: str, batch: int, region, marks, mean_steps=MEAN_STEPS) -> None:
    """Run one step on the meta device with `region` (a context manager) around exactly the
    part that is counted; `marks.graphed` is set while a captured region runs."""
    if step not in (*STEPS, DOCTOR_STEP):
        raise ValueError(f"step {step!r}: one of {', '.join(STEPS)}")
    cfg, model = _meta_model(config)
    data = _batch(cfg, batch)
    backend = "reference" if provider == "eager" else "triton"
    with K.use_backend(backend), _FlashAttention(), _graph_regions(model, marks):
        if step in ("train", DOCTOR_STEP):
            model.train()
            opt = AdamATan2(model.parameters(), lr=1e-4, weight_decay=0.1) if step == "train" else None
            carry = model.initial_carry(data)
            with region:
                carry, outputs = model(carry, data)
                loss, _ = act_loss(outputs, carry)
                if step == DOCTOR_STEP:  # as trm doctor times it
                    loss.backward()
                    model.zero_grad()
                else:
                    (loss / batch).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        elif step == "eval":
            model.eval()
            with torch.no_grad():
                x = model.embed(data["inputs"], data["puzzle_identifiers"])
                y, z = (t.contiguous() for t in model.initial_y_z(batch))  # as every step after the first
                with region:
                    model._eval_step(x, y, z)
        else:
            model.eval()
            with torch.no_grad():
                state = Slots.empty(model, batch, cfg.seq_len)
                refills = max(1, min(batch, round(batch / mean_steps)))
                slots = torch.arange(refills, device=data["inputs"].device)
                with region:
                    state.refill(model, slots, data["inputs"][:refills], data["puzzle_identifiers"][:refills])
                    state.advance(model, model._eval_step, cfg.n_sup, 0.0)


def run_lm_step(
    provider: str, step: str, batch: int, counter: Counter, region=None, cfg: LMConfig | None = None
) -> None:
    """The recurrent-depth LM's training step (forward, cross-entropy, backward, AdamW) or decode
    step in bf16 on the meta device: the plain-PyTorch twin for eager, trm_kernels.nn for fused
    (no CUDA graphs: that provider counts the same), with `region` (default: the counter) around
    it. `cfg`: LMConfig() unless given.

    The decode step (LM_DECODE) is one token per sequence, without grad, through one KV cache
    per loop (``trm_benchmarks.recurrent_depth.generate``'s decode) holding seq_len - 1 tokens:
    the longest step the RoPE tables allow. Its bytes are mostly the weights, read once per
    loop (the byte model: each input read once per op), and each loop's whole cache."""
    from .recurrent_depth import PlainRecurrentDepthLM, RecurrentDepthLM

    if step not in ("train", LM_DECODE):
        raise ValueError(f"{LM}: its training and decode steps are counted, not {step!r}")
    cfg = cfg or LMConfig()
    with torch.device("meta"):
        model = (PlainRecurrentDepthLM if provider == "eager" else RecurrentDepthLM)(cfg).to(torch.bfloat16)
        tokens = torch.ones(batch, cfg.seq_len + 1, dtype=torch.long)
        mask = torch.ones(batch, cfg.seq_len + 1, dtype=torch.bool)
    backend = "reference" if provider == "eager" else "triton"
    region = region if region is not None else counter
    if step == LM_DECODE:
        caches = model.new_caches(batch, cfg.seq_len)
        for cache in caches:
            cache.lengths.fill_(cfg.seq_len - 1)
        with K.use_backend(backend), _FlashAttention(counter), torch.no_grad(), region:
            model(tokens[:, :1], caches=caches)
        return
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with K.use_backend(backend), _FlashAttention(counter), region:
        logits = model(tokens[:, :-1], mask[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Within it, the bytes autograd saves for backward: every saved tensor (activations, the
    compute-dtype casts of weights) counted once per storage; leaves that require grad and
    views of them (parameters, which are kept anyway) excluded. ``.bytes`` after the block."""

    def __init__(self):
        self.storages: dict[int, int] = {}
        super().__init__(self._pack, lambda t: t)

    def __enter__(self) -> SavedBytes:
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t  # a parameter is often saved as a view (w.t())
        if not (base.is_leaf and base.requires_grad):
            self.storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def saved_for_backward(config: str, provider: str, batch: int) -> int:
    """Bytes a training step's forward keeps for its backward (SavedBytes), on the meta device."""
    saved = SavedBytes()
    if config == LM:
        run_lm_step(provider, "train", batch, Counter(), saved)
    else:
        run_step(config, provider, "train", batch, saved, types.SimpleNamespace(graphed=False))
    return saved.bytes


def predict(ops: list[Op], provider: str, gpu: GPU) -> dict:
    """Predicted lower-bound time of a step, and per op name what bounds it."""
    graphs = provider.endswith("CUDA graphs")
    per_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total, replays, launches, in_region = 0.0, 0, 0, False
    for op in ops:
        graphed = graphs and op.graphed
        if graphed and not in_region:
            replays += 1  # a new replay starts where a run of graphed ops begins
        in_region = graphed
        launches += 0 if graphed else op.launches  # a graphed op is launched by its replay
        floor = op.launches * LAUNCH_US["graph node" if graphed else "eager"] * 1e-6
        terms = {"memory": op.bytes / gpu.bandwidth, "compute": op.flops / gpu.bf16, "launch": floor}
        bound = max(terms, key=terms.get)
        seconds = terms[bound]
        total += seconds
        entry = per_op[op.name]
        entry["calls"] += 1
        entry["bytes"] += op.bytes
        entry["flops"] += op.flops
        entry["launches"] += op.launches
        entry["seconds"] += seconds
        entry[f"{bound}_seconds"] += seconds
    total += replays * LAUNCH_US["graph replay"] * 1e-6
    table = {}
    for name, e in sorted(per_op.items(), key=lambda kv: -kv[1]["seconds"]):
        bound = max(("memory", "compute", "launch"), key=lambda b: e[f"{b}_seconds"])
        table[name] = {k: e[k] for k in ("calls", "bytes", "flops", "launches")} | {
            "us": e["seconds"] * 1e6,
            "bound": bound,
        }
    return {
        "us": total * 1e6,
        "launches": launches + replays,
        "bytes": sum(op.bytes for op in ops),
        "flops": sum(op.flops for op in ops),
        "replays": replays,
        "ops": table,
    }


def break_even(gpu: GPU, rows: int, hidden: int, inter: int, elt: int = 2, attention: bool = False) -> list[dict]:
    """Per fused GEMM kernel of the channel MLP (rows tokens, hidden D, intermediate I), and
    with `attention` of o_proj (D x D) + residual + RMSNorm: the fraction of cuBLAS's rate
    (taken as the GPU's dense bf16 rate) our Triton GEMM must reach for the fused kernel to
    beat cuBLAS + the separate kernel it replaces (SwiGLU, its backward, or add + RMSNorm). Predicted:
    each kernel's time is the larger of bytes / bandwidth and FLOPs / rate; the fused kernel
    wins when its GEMM at fraction f of the rate beats both composed kernels together,
    f > (FLOPs / rate) / composed time; never when its own bytes alone take longer."""
    x, gu, act = rows * hidden * elt, rows * 2 * inter * elt, rows * inter * elt
    w_gate_up, w_down = 2 * inter * hidden * elt, inter * hidden * elt

    def seconds(moved: int, flops: int = 0) -> float:
        return max(moved / gpu.bandwidth, flops / gpu.bf16)

    up_flops, down_flops = 2 * rows * hidden * 2 * inter, 2 * rows * hidden * inter
    # the down GEMM (act -> mix [rows, D]) then add + RMSNorm (h, mix -> out, rstd); or one kernel
    norm_composed = seconds(act + w_down + x, down_flops) + seconds(3 * x + rows * 4)
    kernels = (  # (kernel, composed: cuBLAS GEMM + SwiGLU kernel, fused kernel's bytes, its GEMM FLOPs)
        ("gate|up GEMM + SwiGLU, no grad", seconds(x + w_gate_up + gu, up_flops) + seconds(gu + act),
         x + w_gate_up + act, up_flops),
        ("gate|up GEMM + SwiGLU, training (gate|up kept)", seconds(x + w_gate_up + gu, up_flops) + seconds(gu + act),
         x + w_gate_up + act + gu, up_flops),
        ("d(act) GEMM + SwiGLU backward", seconds(x + w_down + act, down_flops) + seconds(act + gu + gu),
         x + w_down + gu + gu + act, down_flops),
        ("down GEMM + residual + RMSNorm, no grad", norm_composed, act + w_down + 2 * x + rows * 4, down_flops),
        ("down GEMM + residual + RMSNorm, training (sum kept)", norm_composed, act + w_down + 3 * x + rows * 4,
         down_flops),
    )  # fmt: skip
    if attention:  # o_proj: the heads' output [rows, D] -> [rows, D], then add + RMSNorm; or one kernel
        o_flops, w_o = 2 * rows * hidden * hidden, hidden * hidden * elt
        o_composed = seconds(x + w_o + x, o_flops) + seconds(3 * x + rows * 4)
        kernels += (("o_proj GEMM + residual + RMSNorm, no grad", o_composed, x + w_o + 2 * x + rows * 4, o_flops),
                    ("o_proj GEMM + residual + RMSNorm, training (sum kept)", o_composed,
                     x + w_o + 3 * x + rows * 4, o_flops))  # fmt: skip
    out = []
    for name, composed, fused_bytes, flops in kernels:
        memory = fused_bytes / gpu.bandwidth
        fraction = None if memory >= composed else flops / gpu.bf16 / composed
        out.append({"kernel": name, "composed_us": composed * 1e6, "fused_memory_us": memory * 1e6,
                    "cublas_gemm_us": flops / gpu.bf16 * 1e6, "break_even": fraction})  # fmt: skip
    return out


def mlp_shapes(config: str, batch: int) -> tuple[int, int, int]:
    """(tokens, hidden, intermediate) of a TRM config's channel MLP at a batch size."""
    from trm.layers import intermediate_size

    m = preset(config).model
    return batch * (m.seq_len + m.puzzle_emb_len), m.hidden_size, intermediate_size(m.hidden_size, m.expansion)


DOCTOR_STEP = "train, no optimizer"  # what trm doctor times: forward with ACT, loss, backward


def gpu_key(device_name: str) -> str | None:
    """The GPUS entry for a device as torch names it ("NVIDIA H100 80GB HBM3" -> h100-measured)."""
    name = device_name.upper()
    for marker, key in (("H100", "h100-measured"), ("H200", "h200"), ("A100", "a100"), ("L40S", "l40s"),
                        ("4090", "rtx4090")):  # fmt: skip
        if marker in name:
            return key
    return None


def measured_steps(path: pathlib.Path | None) -> tuple[str | None, dict]:
    """(the device, {(config, step, provider, batch): ms}) from a model benchmark's results
    (a directory or results.json) or from ``trm doctor``'s doctor.json."""
    if path is None:
        return None, {}
    doctor = path / "doctor.json" if path.is_dir() else path
    if doctor.name == "doctor.json" and doctor.exists():
        report = json.loads(doctor.read_text())
        out = {}
        for c in report["checks"]:
            if c["kind"] == "speed" and c["name"].endswith(" training step") and "ms" in c["numbers"]:
                provider = "eager" if c["backend"] == "reference" else "fused"
                batch = int(c["shape"].removeprefix("batch "))
                out[(c["name"].removesuffix(" training step"), DOCTOR_STEP, provider, batch)] = c["numbers"]["ms"]
        return report["environment"].get("device"), out
    from .common import read_results

    results = read_results(path)
    out = {}
    for row in results.rows:
        config, _, size = row.case.partition(" B=")
        if not size.isdigit() or config not in CONFIGS:
            continue
        if row.group == "training step":
            out[(config, "train", row.provider, int(size))] = row.ms
        elif row.group == "evaluation (full solve)":  # n_sup evaluation steps
            out[(config, "eval", row.provider, int(size))] = row.ms / preset(config).model.n_sup
    return results.environment.get("device"), out


def compare_measured(path: pathlib.Path, mean_steps: float = MEAN_STEPS) -> dict:
    """Measured / predicted for every step a GPU run measured, predicted for that GPU."""
    device, measured = measured_steps(path)
    key = gpu_key(device or "")
    if key is None:
        return {"device": device, "note": "no GPU spec for this device: nothing to compare", "rows": []}
    rows = []
    for (config, step, provider, batch), ms in sorted(measured.items()):
        predicted = predict(count_step(config, provider, step, batch, mean_steps), provider, GPUS[key])["us"]
        rows.append({"config": config, "step": step, "provider": provider, "batch": batch, "measured_ms": ms,
                     "predicted_ms": predicted / 1e3, "measured_over_predicted": ms * 1e3 / predicted})  # fmt: skip
    return {"device": device, "gpu": key, "rows": rows}


def run(
    configs=CONFIGS, gpus=tuple(GPUS), batches=BATCHES, measured_dir=None, log=None, mean_steps: float = MEAN_STEPS
) -> dict:
    report = {
        "header": "PREDICTED, NOT MEASURED: lower bounds from counted bytes, FLOPs and launches; see 'model'",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "model": {
            "launch_us (assumed)": LAUNCH_US,
            "adaptive mean steps (assumed)": mean_steps,
            "gpus": {k: dataclasses.asdict(GPUS[k]) for k in gpus},
        },
        "steps": [],
        "saved_for_backward": [],
        "break_even": [],
    }
    for config in configs:
        lm = config == LM
        seq_len = LMConfig().seq_len if lm else preset(config).model.seq_len
        for step in ("train", LM_DECODE) if lm else STEPS:
            for batch in LM_BATCHES if lm else batches:
                floor_flops = None  # the step's matrix FLOPs as the eager step counts them
                for provider in PROVIDERS:
                    ops = count_step(config, provider, step, batch, mean_steps)
                    if log:
                        log(f"{config} {step} B={batch} {provider}: {len(ops)} ops")
                    floor_flops = floor_flops if floor_flops is not None else sum(op.flops for op in ops)
                    for key in gpus:
                        p = predict(ops, provider, GPUS[key])
                        if key != gpus[0]:  # per-op tables for the first GPU only (the file stays small)
                            del p["ops"]
                        floor_us = floor_flops / GPUS[key].bf16 * 1e6
                        entry = {"config": config, "step": step, "batch": batch, "provider": provider, "gpu": key,
                                 **p, "tokens_per_s": batch * (1 if step == LM_DECODE else seq_len) / (p["us"] * 1e-6),
                                 "floor_us": floor_us,
                                 "x_floor": p["us"] / floor_us if floor_us else None}  # fmt: skip
                        report["steps"].append(entry)
        batch = (LM_BATCHES if lm else batches)[0]
        saved = {p: saved_for_backward(config, p, batch) for p in ("eager", "fused")}
        if log:
            log(f"{config} train B={batch}: saved for backward, eager {saved['eager']:,} B, fused {saved['fused']:,} B")
        report["saved_for_backward"].append({"config": config, "batch": batch, "eager_bytes": saved["eager"],
                                             "fused_bytes": saved["fused"]})  # fmt: skip
        if not lm:
            shapes = mlp_shapes(config, batch)
            for row in break_even(GPUS[gpus[0]], *shapes, attention=not preset(config).model.mlp_t):
                report["break_even"].append({"config": config, "batch": batch, "gpu": gpus[0], "tokens": shapes[0],
                                             "hidden": shapes[1], "intermediate": shapes[2], **row})  # fmt: skip
    if measured_dir is not None:
        report["measured"] = compare_measured(measured_dir, mean_steps)
    return report


def _find(report, **key):
    return next(
        (s for s in report["steps"] if all(s[k] == v for k, v in key.items())),
        None,
    )


def _fmt_us(us: float) -> str:
    return f"{us / 1e3:.2f} ms" if us >= 1e3 else f"{us:.0f} µs"


def markdown(report: dict) -> str:
    gpus = list(report["model"]["gpus"])
    configs = list(dict.fromkeys(s["config"] for s in report["steps"]))
    batches = sorted({s["batch"] for s in report["steps"]}, reverse=True)
    ref = gpus[0]  # the GPU whose per-op tables the report keeps
    lines = [
        "# Speed-of-light model of TRM's steps: PREDICTED, NOT MEASURED",
        "",
        f"{report['date']}; `python -m trm_benchmarks.roofline` (torch {report['torch']}, counted on the meta device).",
        "Bytes, FLOPs and launches are counted from our code (tested); every time below is a lower bound",
        "predicted from them: per op the largest of bytes / bandwidth, FLOPs / dense bf16 rate and an",
        f"assumed launch floor ({LAUNCH_US['eager']:g} µs per eager launch, {LAUNCH_US['graph node']:g} µs per kernel "
        f"inside a CUDA graph, {LAUNCH_US['graph replay']:g} µs per replay),",
        "summed over the step. Training step: forward with ACT, loss, backward, optimizer step. Evaluation step:",
        "one supervision step without grad (evaluation runs n_sup of them). Adaptive evaluation step: the refill",
        f"of batch / {report['model']['adaptive mean steps (assumed)']:g} slots, the evaluation step, the halting "
        "bookkeeping and the host's read of the halted slots (trm/adaptive.py).",
        "",
    ]
    fused_train = _find(report, config=configs[0], step="train", batch=batches[0], provider="fused", gpu=ref)
    if fused_train:
        lines += [f"## Next fusion targets: the ops with most predicted time in the fused training step (batch "
                  f"{batches[0]}, {ref})", ""]  # fmt: skip
        for config in configs:
            s = _find(report, config=config, step="train", batch=batches[0], provider="fused", gpu=ref)
            s = s or _find(report, config=config, step="train", provider="fused", gpu=ref)  # the LM's own batch
            top = list(s["ops"].items())[:3]
            lines.append(f"- **{config}** ({_fmt_us(s['us'])} predicted): " + "; ".join(
                f"`{n}` {_fmt_us(e['us'])} ({100 * e['us'] / s['us']:.0f}%, {e['bound']}-bound: {e['calls']} calls, "
                f"{e['bytes'] / 1e9:.2f} GB, {e['flops'] / 1e12:.2f} TFLOP)" for n, e in top))  # fmt: skip
        lines.append("")
    lines += [f"## Each training step against its FLOP floor ({ref}), and what its forward keeps for backward", "",
              "The floor: the step's matrix FLOPs, as the eager step counts them, at the GPU's dense bf16 rate "
              "(recomputation does not lower it). Saved for backward: what autograd keeps from the forward, "
              "counted with saved-tensor hooks on the meta device (each storage once, parameters excluded).", "",
              "| config | batch | FLOP floor | eager (x floor) | fused + CUDA graphs (x floor) | saved for backward: "
              "eager / fused (ratio) |", "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for saved in report.get("saved_for_backward", []):
        config, batch = saved["config"], saved["batch"]
        e = _find(report, config=config, step="train", batch=batch, provider=PROVIDERS[0], gpu=ref)
        g = _find(report, config=config, step="train", batch=batch, provider=PROVIDERS[2], gpu=ref)
        if e and g:
            ratio = saved["fused_bytes"] / saved["eager_bytes"] if saved["eager_bytes"] else float("nan")
            lines.append(f"| {config} | {batch} | {_fmt_us(e['floor_us'])} | {_fmt_us(e['us'])} "
                         f"({e['x_floor']:.2f}x) | {_fmt_us(g['us'])} ({g['x_floor']:.2f}x) | "
                         f"{saved['eager_bytes'] / 1e9:.1f} GB / {saved['fused_bytes'] / 1e9:.1f} GB "
                         f"({ratio:.2f}x) |")  # fmt: skip
    lines.append("")
    if report.get("break_even"):
        lines += [f"## Break-even of each fused GEMM kernel ({ref})", "",
                  "How fast our Triton GEMM must run, as a fraction of cuBLAS's rate (taken as the dense bf16 rate), "
                  "for the fused kernel to beat cuBLAS + the separate kernel it replaces (predicted). On a GPU "
                  "`trm_kernels.swiglu_mlp`, `swiglu_mlp_rmsnorm`, `linear_add_rmsnorm` and `token_mlp_rmsnorm` "
                  "with grad do not rely on this: they time the candidates on each shape's first call and keep "
                  "the fastest (`trm doctor` lists the choices).", "",
                  "| config | tokens x D x I | kernel | cuBLAS + separate kernel | fused kernel's bytes alone | "
                  "break-even |", "|---|---|---|---:|---:|---:|"]  # fmt: skip
        for r in report["break_even"]:
            even = f"{100 * r['break_even']:.0f}% of cuBLAS" if r["break_even"] is not None else "never"
            kernel = r["kernel"].replace("|", "\\|")  # a table cell
            lines.append(f"| {r['config']} | {r['tokens']:,} x {r['hidden']} x {r['intermediate']} | {kernel} | "
                         f"{_fmt_us(r['composed_us'])} | {_fmt_us(r['fused_memory_us'])} | {even} |")  # fmt: skip
        lines.append("")
    titles = {"train": "training step", "eval": "evaluation step", "adaptive": "adaptive evaluation step",
              LM_DECODE: "decode step (one token per sequence against one KV cache per loop, each full)"}  # fmt: skip
    for config in configs:
        for step in [s for s in (*STEPS, LM_DECODE) if _find(report, config=config, step=s)]:
            lines += [f"## {config}, {titles[step]}", "",
                      "| GPU | batch | eager | fused | fused + CUDA graphs | fused / eager | graphs / eager | "
                      "launches (eager / fused / graphs) | tokens/s, graphs |",
                      "|---|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
            for gpu in gpus:
                for batch in batches:
                    e, f, g = (_find(report, config=config, step=step, batch=batch, provider=p, gpu=gpu)
                               for p in PROVIDERS)  # fmt: skip
                    if not (e and f and g):
                        continue
                    times = " | ".join(_fmt_us(x["us"]) for x in (e, f, g))
                    launches = f"{e['launches']} / {f['launches']} / {g['launches']}"
                    lines.append(f"| {gpu} | {batch} | {times} | {e['us'] / f['us']:.2f}x | {e['us'] / g['us']:.2f}x | "
                                 f"{launches} | {g['tokens_per_s']:,.0f} |")  # fmt: skip
            lines.append("")
    adaptive = [c for c in configs if _find(report, config=c, step="adaptive")]
    if adaptive:
        mean = report["model"]["adaptive mean steps (assumed)"]
        lines += [f"## Adaptive against fixed-step evaluation, fused + CUDA graphs (puzzles taking {mean:g} steps on "
                  "average, assumed; fixed: n_sup steps)", "",
                  "| config | GPU | batch | fixed puzzles/s | adaptive puzzles/s | adaptive / fixed |",
                  "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for config in adaptive:
            n_sup = preset(config).model.n_sup
            for gpu in gpus:
                for batch in batches:
                    fixed = _find(report, config=config, step="eval", batch=batch, provider=PROVIDERS[2], gpu=gpu)
                    step = _find(report, config=config, step="adaptive", batch=batch, provider=PROVIDERS[2], gpu=gpu)
                    if fixed and step:
                        a, f = batch / (mean * step["us"] * 1e-6), batch / (n_sup * fixed["us"] * 1e-6)
                        lines.append(f"| {config} | {gpu} | {batch} | {f:,.0f} | {a:,.0f} | {a / f:.2f}x |")
        lines.append("")
    measured = report.get("measured")
    if measured:
        lines += [f"## Measured / predicted ({measured['device']})", ""]
        if not measured["rows"]:
            lines += [measured.get("note", "no comparable measurement"), ""]
        else:
            lines += [f"Predicted for `{measured['gpu']}`.", "",
                      "| config | step | batch | provider | measured | predicted | measured / predicted |",
                      "|---|---|---:|---|---:|---:|---:|"]  # fmt: skip
            for r in measured["rows"]:
                lines.append(f"| {r['config']} | {r['step']} | {r['batch']} | {r['provider']} | "
                             f"{r['measured_ms']:.2f} ms | {r['predicted_ms']:.2f} ms | "
                             f"{r['measured_over_predicted']:.2f} |")  # fmt: skip
            lines.append("")
    lines += ["## GPUs", "", "| key | GPU | bandwidth | dense bf16 | source |", "|---|---|---:|---:|---|"]
    for key, g in report["model"]["gpus"].items():
        lines.append(f"| {key} | {g['name']} | {g['bandwidth'] / 1e12:.2f} TB/s | {g['bf16'] / 1e12:.0f} TFLOP/s | "
                     f"{g['source']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _names(text: str, allowed, what: str, parser) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        parser.exit(2, f"error: --{what} {text}: choose from {', '.join(map(str, allowed))}\n")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="default: %(default)s")
    parser.add_argument("--gpus", default=",".join(GPUS), help="default: %(default)s")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="default: %(default)s")
    parser.add_argument(
        "--mean-steps",
        type=float,
        default=MEAN_STEPS,
        help="adaptive evaluation: average steps a puzzle takes (default: %(default)s, assumed)",
    )
    parser.add_argument("--measured", type=pathlib.Path,
                        help="a GPU run's results: the model benchmark's results.json or trm doctor's doctor.json "
                             "(or their directory)")  # fmt: skip
    parser.add_argument("--out", type=pathlib.Path, help="write roofline.json and roofline.md here")
    args = parser.parse_args(argv)
    if "triton" not in K.available("inject"):  # the fused providers' ops are Triton's (counted, not run)
        parser.exit(2, 'error: this needs Triton (no GPU needed): pip install -e ".[triton]"\n')
    configs = _names(args.configs, CONFIGS, "configs", parser)
    gpus = _names(args.gpus, GPUS, "gpus", parser)
    if args.measured is not None and not args.measured.exists():
        parser.exit(2, f"error: --measured {args.measured}: no such file or directory\n")
    if not args.mean_steps >= 1:
        parser.exit(2, f"error: --mean-steps {args.mean_steps}: at least 1\n")
    batch_text = _names(args.batches, [t for t in args.batches.split(",") if t.strip().isdigit()
                                       and int(t) > 0], "batches", parser)  # fmt: skip
    try:
        report = run(configs, gpus, [int(b) for b in batch_text], args.measured,
                     log=lambda m: print(m, file=sys.stderr), mean_steps=args.mean_steps)  # fmt: skip
    except (ValueError, OSError, KeyError) as e:
        parser.exit(2, f"error: --measured {args.measured}: {e}\n")
    text = markdown(report)
    if args.out is None:
        print(text)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "roofline.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "roofline.md").write_text(text)
    print(f"wrote {args.out / 'roofline.json'} and {args.out / 'roofline.md'}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: no report written")
