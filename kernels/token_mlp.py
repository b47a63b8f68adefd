"""The whole ``mlp_t`` sub-layer in one kernel (Triton).

out = rmsnorm over the sequence of (h + W_down @ swiglu(W_gate_up @ h)), for h [B, S, D],
W_gate_up [2I, S], W_down [S, I]. Composed of separate ops this is four kernels that write
and re-read the [B, 2I, D] gate|up product and the [B, I, D] activation (about 3.5 MB per
batch element at Sudoku's S=97, I=512, D=512 in bf16). Here a program owns BLOCK_D hidden
units of one batch element with the whole sequence: it loads h once, runs the gate|up
GEMM, the SwiGLU and the down GEMM over the intermediate axis in BLOCK_I chunks (the
intermediate never leaves registers and shared memory), adds the residual, normalises each
hidden unit over the sequence and writes the output once: 2 x B*S*D elements of traffic
besides the weights, which every program re-reads from L2.

The tile is held transposed ([hidden, sequence]) so that the activation, computed in
registers, is the A operand of the down GEMM, which MMA instructions take from registers.
The weights are zero-padded once per call to BLOCK_S columns and a BLOCK_I multiple of
rows (S=97 rows of bf16 are not 16-byte aligned, which would rule out vector and async
copies); the padding contributes exact zeros.

The intermediate values are rounded to the storage dtype where the composed ops store
them (gate|up product, activation, down product, the residual sum), so both paths make
the same roundings; only the GEMMs' accumulation order differs.

Training: the same kernel also writes the rounded pre-norm sum and one fp32 rstd per
hidden unit, all its backward keeps besides h and the weights (the composition keeps the
[B, 2I, D] gate|up, the [B, I, D] activation and the [B, S, D] down product: 16x the bytes
at Sudoku's sizes). Backward is three kernels that never write gate|up, the activation or
their gradients ([B, 2I, D] each) to memory:

1. the norm's backward (trm::add_rmsnorm's): dsum = d(h + mix), [B, S, D];
2. dh (`_token_mlp_bwd_dh`, one program per BLOCK_D hidden units of one batch element, the
   forward's tile): over the intermediate axis in BLOCK_I chunks it recomputes gate|up and
   the activation's gradient d(act) = W_down^T dsum, applies the SwiGLU backward in
   registers and accumulates dh = dsum + W_gate_up^T d(gate|up) in fp32, rounded once;
3. the weight gradients (`_token_mlp_bwd_dw`, one program per BLOCK_I intermediate rows and
   one of at most DW_SPLITS slices of the (batch element, hidden block) tiles): it
   recomputes the same chunk's gate|up, activation and d(gate|up) for each tile of its slice
   and accumulates d(W_gate_up) = sum d(gate|up) h^T and d(W_down) = sum dsum act^T in fp32
   registers; each slice writes its fp32 partial sums, which are then added in a fixed order
   and rounded once (no atomics: the result does not depend on scheduling or the device).

The recomputation costs FLOPs (the backward's GEMMs do 22 I*S*D per batch element where
the composition's do 12 and a gate|up recomputation 4) and saves the [B, 2I, D]
round trips, which dominate at TRM's sizes. Each intermediate is rounded to the storage
dtype where the composition stores it, so both paths make the same roundings; dh is rounded
once where the composition adds two rounded terms. With grad ``trm_kernels.token_mlp_rmsnorm``
times the fused pair against the composition on a GPU and keeps the faster (trm_kernels.tune).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference, tune
from . import rmsnorm as _rmsnorm
from . import swiglu as _swiglu
from ._triton import (
    GRID_LIMITS,
    check_input,
    device_budget,
    fits,
    interpreting,
    launch,
    needed_on,
    needs_grad,
    next_pow2,
    precision,
    takes,
)

MAX_SEQ = 256  # the whole sequence of a tile is held in registers


@triton.jit
def _token_mlp_rmsnorm_fwd(
    H, WGU, WD, OUT, SUM, RSTD, B, S, D, I_PAD, eps,  # B only keys the autotuner: the best tile differs at batch 1
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, PREC: tl.constexpr, STORE: tl.constexpr,
):  # fmt: skip
    dtype = H.dtype.element_ty
    d_block, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.arange(0, BLOCK_S)
    i = tl.arange(0, BLOCK_I)
    mask = (d[:, None] < D) & (s[None, :] < S)
    offs = b * S * D + s[None, :] * D + d[:, None]  # the [BLOCK_D, BLOCK_S] tile of h, transposed
    h = tl.load(H + offs, mask=mask, other=0.0)
    acc = tl.zeros([BLOCK_D, BLOCK_S], tl.float32)
    for i0 in range(0, I_PAD, BLOCK_I):
        rows = i0 + i
        w_offs = rows[None, :] * BLOCK_S + s[:, None]  # [BLOCK_S, BLOCK_I]: W_gate_up^T
        g = tl.dot(h, tl.load(WGU + w_offs), input_precision=PREC).to(dtype).to(tl.float32)
        u = tl.dot(h, tl.load(WGU + I_PAD * BLOCK_S + w_offs), input_precision=PREC).to(dtype).to(tl.float32)
        a = (g * tl.sigmoid(g) * u).to(dtype)  # [BLOCK_D, BLOCK_I]
        wd = tl.load(WD + s[None, :] * I_PAD + rows[:, None])  # [BLOCK_I, BLOCK_S]: W_down^T
        acc = tl.dot(a, wd, acc, input_precision=PREC)
    y = (h.to(tl.float32) + acc.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    y = tl.where(mask, y, 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(y * y, axis=1) / S + eps))  # as trm::add_rmsnorm
    tl.store(OUT + offs, (y * rstd[:, None]).to(dtype), mask=mask)
    if STORE:  # for backward (training): the rounded pre-norm sum and one fp32 rstd per hidden unit
        tl.store(SUM + offs, y.to(dtype), mask=mask)
        tl.store(RSTD + b * D + d, rstd, mask=d < D)


@triton.jit
def _swiglu_grads(g, u, da, dtype: tl.constexpr):
    """(d gate, d up, act) from fp32 gate, up and d(act), each rounded to `dtype` as the
    SwiGLU kernels round them (trm::swiglu_backward's formula)."""
    sg = tl.sigmoid(g)
    silu = g * sg
    return (da * u * (sg + silu * (1 - sg))).to(dtype), (da * silu).to(dtype), (silu * u).to(dtype)


@triton.jit
def _token_mlp_bwd_dh(
    DSUM, H, WGU, WD, DH, S, D, I_PAD,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    dtype = H.dtype.element_ty
    d_block, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.arange(0, BLOCK_S)
    i = tl.arange(0, BLOCK_I)
    mask = (d[:, None] < D) & (s[None, :] < S)
    offs = b * S * D + s[None, :] * D + d[:, None]  # [BLOCK_D, BLOCK_S] tiles, transposed as the forward's
    h = tl.load(H + offs, mask=mask, other=0.0)
    ds = tl.load(DSUM + offs, mask=mask, other=0.0)
    acc = ds.to(tl.float32)  # dh = dsum + W_gate_up^T d(gate|up): the residual's gradient first
    for i0 in range(0, I_PAD, BLOCK_I):
        rows = i0 + i
        w_offs = rows[None, :] * BLOCK_S + s[:, None]  # [BLOCK_S, BLOCK_I]: W_gate_up^T
        wg = tl.load(WGU + w_offs)
        wu = tl.load(WGU + I_PAD * BLOCK_S + w_offs)
        g = tl.dot(h, wg, input_precision=PREC).to(dtype).to(tl.float32)
        u = tl.dot(h, wu, input_precision=PREC).to(dtype).to(tl.float32)
        wd = tl.load(WD + s[:, None] * I_PAD + rows[None, :])  # [BLOCK_S, BLOCK_I]: W_down
        da = tl.dot(ds, wd, input_precision=PREC).to(dtype).to(tl.float32)
        dg, du, _ = _swiglu_grads(g, u, da, dtype)
        acc = tl.dot(dg, tl.trans(wg), acc, input_precision=PREC)
        acc = tl.dot(du, tl.trans(wu), acc, input_precision=PREC)
    tl.store(DH + offs, acc.to(dtype), mask=mask)


@triton.jit
def _token_mlp_bwd_dw(
    DSUM, H, WGU, WD, PARTIAL, S, D, I_PAD, TILES, PER_SPLIT,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    dtype = H.dtype.element_ty
    i_block, split = tl.program_id(0), tl.program_id(1)
    rows = i_block * BLOCK_I + tl.arange(0, BLOCK_I)
    s = tl.arange(0, BLOCK_S)
    dd = tl.arange(0, BLOCK_D)
    w_offs = rows[:, None] * BLOCK_S + s[None, :]  # [BLOCK_I, BLOCK_S]
    wg = tl.load(WGU + w_offs)  # this program's rows of W_gate_up, read once
    wu = tl.load(WGU + I_PAD * BLOCK_S + w_offs)
    wdt = tl.load(WD + s[None, :] * I_PAD + rows[:, None])  # W_down^T
    acc_g = tl.zeros([BLOCK_I, BLOCK_S], tl.float32)
    acc_u = tl.zeros([BLOCK_I, BLOCK_S], tl.float32)
    acc_d = tl.zeros([BLOCK_I, BLOCK_S], tl.float32)  # d(W_down)^T
    d_blocks = tl.cdiv(D, BLOCK_D)
    for tile in range(split * PER_SPLIT, tl.minimum((split + 1) * PER_SPLIT, TILES)):
        b = (tile // d_blocks).to(tl.int64)
        d = (tile % d_blocks) * BLOCK_D + dd
        mask = (s[:, None] < S) & (d[None, :] < D)
        offs = b * S * D + s[:, None] * D + d[None, :]  # [BLOCK_S, BLOCK_D]
        h = tl.load(H + offs, mask=mask, other=0.0)
        ds = tl.load(DSUM + offs, mask=mask, other=0.0)
        g = tl.dot(wg, h, input_precision=PREC).to(dtype).to(tl.float32)  # [BLOCK_I, BLOCK_D]
        u = tl.dot(wu, h, input_precision=PREC).to(dtype).to(tl.float32)
        da = tl.dot(wdt, ds, input_precision=PREC).to(dtype).to(tl.float32)
        dg, du, a = _swiglu_grads(g, u, da, dtype)
        acc_g = tl.dot(dg, tl.trans(h), acc_g, input_precision=PREC)
        acc_u = tl.dot(du, tl.trans(h), acc_u, input_precision=PREC)
        acc_d = tl.dot(a, tl.trans(ds), acc_d, input_precision=PREC)
    out = PARTIAL + split.to(tl.int64) * 3 * I_PAD * BLOCK_S + w_offs
    tl.store(out, acc_g)
    tl.store(out + I_PAD * BLOCK_S, acc_u)
    tl.store(out + 2 * I_PAD * BLOCK_S, acc_d)


# (BLOCK_D, BLOCK_I, num_warps) tried by the autotuner on a GPU, per sequence tile, for each
# tensor-core family: every one compiles without register spills on every architecture of
# its family (trm_benchmarks.ptx; tests/test_ptx.py). On Hopper and B200 (wgmma, tcgen05) the
# MMA operands are staged in shared memory; on the mma.sync architectures (Ampere, Ada,
# consumer Blackwell) they are held in registers, where the 128-row tiles spilled 4-288 B:
# those take 64- and 32-row tiles (and 128x32, which triton 3.6 spilled 16 B on sm_100, is in
# neither). Registers, shared memory and so CTAs per SM differ, and
# which is fastest is measured, not guessed. The interpreter runs the wgmma family's first;
# FIXED_CONFIG, where set, runs everywhere (tests check each).
FAMILY_CONFIGS = {
    "wgmma": {128: [(128, 64, 8), (64, 64, 8), (64, 32, 4)], 256: [(32, 32, 8)]},
    "mma.sync": {128: [(64, 64, 8), (64, 32, 8), (32, 64, 8), (32, 32, 4)], 256: [(32, 32, 8)]},
}


def family(capability: int | None) -> str:
    """The tensor-core family whose configs a GPU of this compute capability (10 * major +
    minor) takes: "wgmma" on Hopper and B200 (sm_90, sm_100), "mma.sync" elsewhere; the
    interpreter (None) runs the wgmma family's."""
    return "wgmma" if capability is None or capability // 10 in (9, 10) else "mma.sync"


def configs(capability: int | None) -> dict[int, list[tuple[int, int, int]]]:
    """{sequence tile: configs} a GPU of this compute capability takes (see FAMILY_CONFIGS)."""
    return FAMILY_CONFIGS[family(capability)]


# Shared memory each config's compiled kernel takes on each architecture of its family (bf16
# and fp16 alike), as `python -m trm_benchmarks.ptx` reports it with triton 3.9 (3.6 gives the
# same). A smaller sequence tile takes less than its class's row. On Hopper and Blackwell the
# MMA operands are staged in shared memory and the same tiles need more. tests/test_ptx.py
# fails if a compiled kernel needs more than is written here.
SHARED_BYTES = {
    (128, 128, 64, 8): {90: 131072, 100: 131120},
    (128, 64, 64, 8): {80: 73728, 86: 73728, 89: 73728, 90: 114688, 100: 114736, 120: 73728},
    (128, 64, 32, 4): {90: 65536, 100: 65584},
    (128, 64, 32, 8): {80: 45056, 86: 45056, 89: 45056, 120: 45056},
    (128, 32, 64, 8): {80: 61440, 86: 61440, 89: 61440, 120: 61440},
    (128, 32, 32, 4): {80: 34816, 86: 34816, 89: 34816, 120: 34816},
    (256, 32, 32, 8): {80: 67584, 86: 67584, 89: 67584, 90: 67584, 100: 67584, 120: 67584},
}


# Backward tiles per sequence tile: (BLOCK_D, BLOCK_I, num_warps) of the dh kernel and of
# the weight-gradient kernel. One each, not autotuned: the pair as a whole is timed against
# the composition on a GPU (trm_kernels.tune). Compiled for every architecture in the static
# report (trm_benchmarks.ptx), which checks spills and shared memory.
BWD_CONFIGS = {128: {"dh": (64, 32, 8), "dw": (64, 32, 8)}, 256: {"dh": (32, 32, 8), "dw": (64, 16, 8)}}
# Shared memory of each backward kernel per architecture, as `python -m trm_benchmarks.ptx`
# reports it with triton 3.9 (bf16 and fp16 alike); tests/test_ptx.py fails if a compiled
# kernel needs more. The fused path is taken with grad only where both fit (backward_fits).
BWD_SHARED_BYTES = {
    (128, "dh"): {80: 61440, 86: 61440, 89: 61440, 90: 86016, 100: 98384, 120: 61440},
    (128, "dw"): {80: 69632, 86: 69632, 89: 69632, 90: 69632, 100: 69632, 120: 69632},
    (256, "dh"): {80: 86016, 86: 86016, 89: 86016, 90: 86016, 100: 86016, 120: 86016},
    (256, "dw"): {80: 96256, 86: 96256, 89: 96256, 90: 96256, 100: 96256, 120: 96256},
}
DW_SPLITS = 64  # slices of the (batch element, hidden block) tiles: fixed, so results do not depend on the device


def dw_splits(batch: int, seq: int, hidden: int) -> tuple[int, int]:
    """(slices the weight-gradient kernel divides its tiles into, tiles per slice)."""
    tiles = batch * triton.cdiv(hidden, BWD_CONFIGS[max(128, _block_s(seq))]["dw"][0])
    per_split = triton.cdiv(tiles, min(DW_SPLITS, tiles))
    return triton.cdiv(tiles, per_split), per_split


def bwd_config_name(which: str, block_s: int) -> str:
    block_d, block_i, warps = BWD_CONFIGS[block_s][which]
    return f"token_mlp_bwd_{which} S<={block_s} {block_d}x{block_i}" + (f" {warps} warps" if warps != 8 else "")


def config_name(block_s: int, block_d: int, block_i: int, warps: int) -> str:
    return f"token_mlp_rmsnorm_fwd S<={block_s} {block_d}x{block_i}" + (f" {warps} warps" if warps != 8 else "")


I_ALIGN = 64  # the intermediate axis is padded to a multiple of every BLOCK_I
FIXED_CONFIG: tuple[int, int, int] | None = None
# The interpreter runs a program's operations one by one in NumPy, at a cost per operation
# nearly independent of the tile's size: there the kernels take the widest intermediate
# chunk (fewer programs and loop trips). Tests set this False (or FIXED_CONFIG) to run the
# GPU's tiles.
WIDE_TILES_ON_INTERPRETER = True


def _interpreter_chunk(i_pad: int) -> int:
    return min(256, i_pad & -i_pad)  # the largest power of two dividing i_pad (a multiple of 64), at most 256


def _block_s(seq: int) -> int:
    return max(16, next_pow2(seq))


def shared_needed(seq_class: int, tile: tuple[int, int, int], capability: int) -> int:
    """Shared memory of a config on `capability` (see _triton.needed_on)."""
    return needed_on(SHARED_BYTES[(seq_class, *tile)], capability)


def backward_fits(seq: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the device can launch both backward kernels at this sequence length and dtype
    (always where no limit applies); where not, training takes the composition."""
    seq_class, budget = max(128, _block_s(seq)), device_budget(device)
    if budget is None:
        return True
    needed = [needed_on(row, budget[0]) for (block_s, _), row in BWD_SHARED_BYTES.items() if block_s == seq_class]
    return fits(budget, dtype, max(needed))


def launchable_tiles(seq: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[tuple[int, int, int]]:
    """The configs for this sequence length and dtype that the device can launch (all of them
    where no limit applies); empty when none can (fp32 on a GPU: see _triton.fits), and the
    composed ops then run instead. The shared memory figures are bf16's and fp16's."""
    seq_class, budget = max(128, _block_s(seq)), device_budget(device)
    if budget is None:
        return configs(None)[seq_class]
    return [t for t in configs(budget[0])[seq_class] if fits(budget, dtype, shared_needed(seq_class, t, budget[0]))]


def _prune(configs, named_args, **_):
    """The configs built for this sequence's tile that this device can launch (see _autotuned)."""
    seq = named_args["S"]
    block_s, tiles = _block_s(seq), launchable_tiles(seq, named_args["H"].device, named_args["H"].dtype)
    return [
        c
        for c in configs
        if c.kwargs["BLOCK_S"] == block_s and (c.kwargs["BLOCK_D"], c.kwargs["BLOCK_I"], c.num_warps) in tiles
    ]


def _autotuned(do_bench=None):
    """The kernel behind Triton's autotuner (`do_bench`: the timing function, for tests)."""
    tiles = {
        seq_class: list(dict.fromkeys(t for c in FAMILY_CONFIGS.values() for t in c[seq_class]))
        for seq_class in (128, 256)
    }
    every = [triton.Config({"BLOCK_S": bs, "BLOCK_D": bd, "BLOCK_I": bi}, num_warps=w, num_stages=2)
             for bs in (16, 32, 64, 128, 256) for bd, bi, w in tiles[max(128, bs)]]  # fmt: skip
    prune = {"early_config_prune": _prune}  # each device's family, what fits its shared memory
    tuned = triton.autotune(every, key=["B", "S", "D", "I_PAD"], prune_configs_by=prune, do_bench=do_bench)
    return tune.shared_autotuner(tuned(_token_mlp_rmsnorm_fwd))


_KERNEL = _token_mlp_rmsnorm_fwd if interpreting() else _autotuned()


def padded_weights(w_gate_up: torch.Tensor, w_down: torch.Tensor, block_s: int, i_align: int):
    """W_gate_up as [2, I_pad, BLOCK_S] and W_down as [BLOCK_S, I_pad], zero-padded."""
    two_i, seq = w_gate_up.shape
    inter = two_i // 2
    i_pad = triton.cdiv(inter, i_align) * i_align
    wgu = F.pad(w_gate_up.reshape(2, inter, seq), (0, block_s - seq, 0, i_pad - inter))
    wd = F.pad(w_down, (0, i_pad - inter, 0, block_s - seq))
    return wgu.contiguous(), wd.contiguous(), i_pad


def _launch(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float, store: bool):
    """(out, the rounded pre-norm sum and rstd [B, D] fp32 if store, else empty tensors)."""
    batch, seq, hidden = h.shape
    if seq > MAX_SEQ:
        raise ValueError(f"token_mlp_rmsnorm: sequence length {seq} > {MAX_SEQ}, the most the fused kernel holds")
    block_s, tiles = _block_s(seq), launchable_tiles(seq, h.device, h.dtype)
    if not tiles:
        raise ValueError(f"token_mlp_rmsnorm: no config of the fused kernel can launch on {h.device} in {h.dtype} "
                         "(shared memory; fp32 on a GPU takes the composition)")  # fmt: skip
    wgu, wd, i_pad = padded_weights(w_gate_up, w_down, block_s, I_ALIGN)
    h = h.contiguous()
    out = torch.empty_like(h)
    total = torch.empty_like(h) if store else h.new_empty(0)
    rstd = torch.empty(batch, hidden, dtype=torch.float32, device=h.device) if store else h.new_empty(0)
    prec = precision(h)
    args = (h, wgu, wd, out, total, rstd, batch, seq, hidden, i_pad, eps)
    if FIXED_CONFIG is not None or _KERNEL is _token_mlp_rmsnorm_fwd:  # one config, chosen here
        block_d, block_i, warps = FIXED_CONFIG or tiles[0]
        if FIXED_CONFIG is None and WIDE_TILES_ON_INTERPRETER and interpreting():
            block_i = _interpreter_chunk(i_pad)
        launch(_token_mlp_rmsnorm_fwd, (triton.cdiv(hidden, block_d), batch), *args, BLOCK_S=block_s,
               BLOCK_D=block_d, BLOCK_I=block_i, PREC=prec, STORE=store, num_warps=warps, num_stages=2)  # fmt: skip
    else:
        launch(_KERNEL, lambda meta: (triton.cdiv(hidden, meta["BLOCK_D"]), batch), *args, PREC=prec, STORE=store)
    return out, total, rstd


@torch.library.custom_op("trm::token_mlp_rmsnorm", mutates_args=())
def token_mlp_rmsnorm_fwd(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(h, w_gate_up, w_down, eps, store=False)[0]


@token_mlp_rmsnorm_fwd.register_fake
def _(h, w_gate_up, w_down, eps):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("trm::token_mlp_rmsnorm_train", mutates_args=())
def token_mlp_rmsnorm_train(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> Triple:
    """(out, the rounded pre-norm sum h + mix, rstd [B, D] fp32): the fused kernel, keeping
    for backward what the norm's backward needs; the MLP's intermediates are not kept."""
    return _launch(h, w_gate_up, w_down, eps, store=True)


@token_mlp_rmsnorm_train.register_fake
def _(h, w_gate_up, w_down, eps):
    like = torch.empty_like(h, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like), h.new_empty(h.shape[0], h.shape[2], dtype=torch.float32)


def _bwd_meta(h: torch.Tensor, block_s: int, which: str, i_pad: int) -> dict:
    block_d, block_i, warps = BWD_CONFIGS[max(128, block_s)][which]
    if WIDE_TILES_ON_INTERPRETER and interpreting():
        block_i = _interpreter_chunk(i_pad)
    return {"BLOCK_S": block_s, "BLOCK_D": block_d, "BLOCK_I": block_i, "PREC": precision(h), "num_warps": warps,
            "num_stages": 2}  # fmt: skip


@torch.library.custom_op("trm::token_mlp_rmsnorm_backward", mutates_args=())
def token_mlp_rmsnorm_backward(
    dout: torch.Tensor, h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, total: torch.Tensor,
    rstd: torch.Tensor, need_dh: bool, need_dweights: bool,
) -> Triple:  # fmt: skip
    """(dh [B, S, D], d W_gate_up [2I, S], d W_down [S, I]), each in h's dtype, from the
    output's gradient and what the training form kept (the pre-norm sum, rstd [B, D] fp32).
    A gradient not asked for (need_dh, need_dweights) is an empty tensor and its kernel is
    not launched. The weight gradients are sums over the batch in fp32, rounded once."""
    batch, seq, hidden = h.shape
    inter = w_down.shape[1]
    dsum, _ = _rmsnorm.add_rmsnorm_bwd(dout, None, total, None, None, rstd, 1, "triton")
    block_s = _block_s(seq)
    wgu, wd, i_pad = padded_weights(w_gate_up, w_down, block_s, I_ALIGN)
    h = h.contiguous()
    dh, dw_gate_up, dw_down = h.new_empty(0), h.new_empty(0), h.new_empty(0)
    if need_dh:
        dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        meta = _bwd_meta(h, block_s, "dh", i_pad)
        launch(_token_mlp_bwd_dh, (triton.cdiv(hidden, meta["BLOCK_D"]), batch), dsum, h, wgu, wd, dh, seq, hidden,
               i_pad, **meta)  # fmt: skip
    if need_dweights:
        splits, per_split = dw_splits(batch, seq, hidden)
        partial = torch.empty(splits, 3, i_pad, block_s, dtype=torch.float32, device=h.device)
        meta = _bwd_meta(h, block_s, "dw", i_pad)
        tiles = batch * triton.cdiv(hidden, meta["BLOCK_D"])
        # splits <= DW_SPLITS on axis y
        launch(_token_mlp_bwd_dw, (i_pad // meta["BLOCK_I"], splits), dsum, h, wgu, wd, partial, seq, hidden, i_pad,
               tiles, per_split, **meta)  # fmt: skip
        summed = partial.sum(0)  # the slices in a fixed order, in fp32
        dw_gate_up, dw_down = h.new_empty(2 * inter, seq), h.new_empty(seq, inter)
        dw_gate_up.view(2, inter, seq).copy_(summed[:2, :inter, :seq])  # rounded once, here
        dw_down.copy_(summed[2, :inter, :seq].t())
    return dh, dw_gate_up, dw_down


@token_mlp_rmsnorm_backward.register_fake
def _(dout, h, w_gate_up, w_down, total, rstd, need_dh, need_dweights):
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_dh else h.new_empty(0)
    weights = (torch.empty_like(w_gate_up, memory_format=torch.contiguous_format),
               torch.empty_like(w_down, memory_format=torch.contiguous_format))  # fmt: skip
    return dh, *(weights if need_dweights else (h.new_empty(0), h.new_empty(0)))


def _setup(ctx, inputs, output):
    h, w_gate_up, w_down, _ = inputs
    ctx.save_for_backward(h, w_gate_up, w_down, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs backward ignores


def _backward(ctx, dout, *_):
    """The two recomputing kernels (see the module's docstring), each where its gradient is needed."""
    if dout is None:  # the output is unused
        return None, None, None, None
    h, w_gate_up, w_down, total, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    dh, dw_gate_up, dw_down = token_mlp_rmsnorm_backward(dout, h, w_gate_up, w_down, total, rstd, need[0],
                                                         need[1] or need[2])  # fmt: skip
    return dh if need[0] else None, dw_gate_up if need[1] else None, dw_down if need[2] else None, None


token_mlp_rmsnorm_train.register_autograd(_backward, setup_context=_setup)


def composed(h, w_gate_up, w_down, eps):
    """The Triton SwiGLU and add + RMSNorm kernels around batched GEMMs, keeping every
    intermediate for backward (reference.token_mlp_rmsnorm with the fused element-wise ops)."""
    ops = {"swiglu": _swiglu.swiglu, "add_rmsnorm": _rmsnorm.add_rmsnorm}
    return reference.token_mlp_rmsnorm(h, w_gate_up, w_down, eps, **ops)


def fused(h, w_gate_up, w_down, eps):
    """The one-kernel forward; with grad its training form (backward recomputes gate|up)."""
    if needs_grad(h, w_gate_up, w_down):
        return token_mlp_rmsnorm_train(h, w_gate_up, w_down, eps)[0]
    return token_mlp_rmsnorm_fwd(h, w_gate_up, w_down, eps)


CANDIDATES = {"fused": fused, "composed": composed}


def supports(h: torch.Tensor, w_gate_up, w_down, eps) -> bool:
    """Whether the triton backend takes `h`: the fused kernel and the composition's
    sequence-axis norm put the batch on grid axis y, at most 65,535 elements."""
    return takes(h) and h.shape[0] <= GRID_LIMITS[1]


def token_mlp_rmsnorm(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> torch.Tensor:
    """The fused kernel where the sequence fits a tile and the device can launch one of its
    configs (the composition otherwise). Without grad it is always faster (it moves a
    fraction of the bytes); with grad (where the device can launch the backward kernels too)
    its backward recomputes gate|up twice, so on a GPU the first call of each signature
    times it against the composition and keeps the faster (trm_kernels.tune)."""
    for name, t in (("h", h), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_input(name, t)
    if h.shape[1] > MAX_SEQ or not launchable_tiles(h.shape[1], h.device, h.dtype):
        return composed(h, w_gate_up, w_down, eps)
    if not needs_grad(h, w_gate_up, w_down):
        return token_mlp_rmsnorm_fwd(h, w_gate_up, w_down, eps)
    if not backward_fits(h.shape[1], h.device, h.dtype):
        return composed(h, w_gate_up, w_down, eps)
    return CANDIDATES[tune.choose("token_mlp_rmsnorm", CANDIDATES, (h, w_gate_up, w_down, eps))](
        h, w_gate_up, w_down, eps
    )
