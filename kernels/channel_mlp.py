"""The channel MLP ``down(silu(gate) * up)`` with SwiGLU inside the GEMMs (Triton).

Composed, the MLP is a gate|up GEMM writing [M, 2I], a SwiGLU kernel reading it and writing
the activation [M, I], and the down GEMM; autograd keeps x, gate|up and the activation
for backward, and the backward runs the down projection's dgrad GEMM, a SwiGLU backward
kernel re-reading gate|up and d(act), then the gate|up GEMMs. Here:

- forward: one kernel computes the gate and up tiles of x @ W_gate_up^T together (one read
  of each x tile for both products) and writes only the activation silu(g) * u, [M, I];
  with grad it also writes gate|up, the one tensor backward needs besides x (the
  activation is not kept: backward recomputes it). The down projection is a cuBLAS GEMM.
- backward: one kernel computes d(act) = dy @ W_down tile by tile and, in its epilogue,
  d(gate|up) from the saved gate|up (written straight into the packed [M, 2I] gradient)
  and the activation again (for W_down's gradient). dx and the weight gradients are cuBLAS
  GEMMs (dx = d(gate|up) @ W_gate_up, dW_gate_up = d(gate|up)^T x, dW_down = dy^T act):
  plain GEMMs with nothing to fuse, where cuBLAS is the fastest there is.

Saved for backward: x [M, D] and gate|up [M, 2I] (the composition also keeps the
activation [M, I]: 1536 of 5120 values per token at TRM's D = 512, I = 1536).

Roundings are those of the composition: the GEMM results are rounded to the storage dtype
before SwiGLU (as the gate|up tensor and d(act) are stored there), SwiGLU is computed in
fp32 and rounded once; only the GEMMs' accumulation order differs.

Whether this beats cuBLAS + the SwiGLU kernel depends on how close our Triton GEMM gets to
cuBLAS on the GPU at hand: ``trm_kernels.swiglu_mlp`` times both on the first call of each
signature and keeps the faster (:mod:`trm_kernels.tune`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import rmsnorm as _rmsnorm
from . import swiglu as _swiglu
from . import tune
from ._triton import check_input, device_budget, fits, interpreting, launch, needed_on, needs_grad, next_pow2, precision


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Rows and columns of this program's output tile, programs grouped GROUP_M row-tiles at
    a time so that neighbours share weight tiles in L2."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _gemm(A, B, rows, m_ok, cols, n_ok, K, ld_b, acc,
          B_T: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """acc + A[rows, :] @ B[:, cols] over K in BLOCK_K steps, A [M, K] row-major; B [K, N] with
    leading dimension ld_b, or stored transposed ([N, K], B_T) as nn.Linear weights are."""
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(A + rows[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if B_T:
            b_offs = cols[None, :].to(tl.int64) * ld_b + k[:, None]
        else:
            b_offs = k[:, None].to(tl.int64) * ld_b + cols[None, :]
        b = tl.load(B + b_offs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _linear_swiglu_fwd(
    X, W, ACT, GU, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STORE_GU: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """act = swiglu(x @ W^T) for x [M, K], W [2I, K] (gate rows first); gate|up to GU [M, 2I]."""
    dtype = X.dtype.element_ty
    rm, rn = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K)
    rows = rm.to(tl.int64)
    m_ok, n_ok = rm < M, rn < N
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(X + rows[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_offs = rn[None, :].to(tl.int64) * K + k[:, None]  # [BLOCK_K, BLOCK_N]: W^T
        w_mask = k_ok[:, None] & n_ok[None, :]
        acc_g = tl.dot(a, tl.load(W + w_offs, mask=w_mask, other=0.0), acc_g, input_precision=PREC)
        acc_u = tl.dot(a, tl.load(W + N * K + w_offs, mask=w_mask, other=0.0), acc_u, input_precision=PREC)
    g, u = acc_g.to(dtype), acc_u.to(dtype)  # stored values, as the gate|up tensor holds them
    gf = g.to(tl.float32)
    act = gf * tl.sigmoid(gf) * u.to(tl.float32)
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(ACT + rows[:, None] * N + rn[None, :], act.to(dtype), mask=mask)
    if STORE_GU:
        gu_offs = rows[:, None] * (2 * N) + rn[None, :]
        tl.store(GU + gu_offs, g, mask=mask)
        tl.store(GU + gu_offs + N, u, mask=mask)


@triton.jit
def _swiglu_mlp_bwd(
    DY, WD, GU, DGU, ACT, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """d(act) = dy @ W_down (dy [M, K], W_down [K, N]) and, in the epilogue, d(gate|up) into
    DGU [M, 2I] and the activation recomputed into ACT [M, N], from gate|up GU [M, 2I]."""
    dtype = DY.dtype.element_ty
    rm, rn = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = rm.to(tl.int64)
    m_ok, n_ok = rm < M, rn < N
    acc = _gemm(DY, WD, rows, m_ok, rn, n_ok, K, N, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), False, BLOCK_K, PREC)
    mask = m_ok[:, None] & n_ok[None, :]
    d = acc.to(dtype).to(tl.float32)  # d(act) as the composition stores it
    gu_offs = rows[:, None] * (2 * N) + rn[None, :]
    g = tl.load(GU + gu_offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + gu_offs + N, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    tl.store(DGU + gu_offs, (d * u * (s + silu * (1 - s))).to(dtype), mask=mask)
    tl.store(DGU + gu_offs + N, (d * silu).to(dtype), mask=mask)
    tl.store(ACT + rows[:, None] * N + rn[None, :], (silu * u).to(dtype), mask=mask)


@triton.jit
def _down_add_rmsnorm_fwd(
    A, WD, H, OUT, SUM, RSTD, M, N, K, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STORE_SUM: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """out = rmsnorm(h + a @ W_down^T) for a [M, K], W_down [N, K], h [M, N]: a program owns
    BLOCK_M whole rows (BLOCK_N >= N), so the norm's statistics are taken in the epilogue.
    Writes rstd [M] (fp32) and, when STORE_SUM, the rounded sum h + mix for backward."""
    dtype = A.dtype.element_ty
    rm, rn = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    rows = rm.to(tl.int64)
    m_ok, n_ok = rm < M, rn < N
    acc = _gemm(A, WD, rows, m_ok, rn, n_ok, K, K, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), True, BLOCK_K, PREC)
    y, rstd = _residual_rmsnorm(acc, H, OUT, rows, m_ok, rn, n_ok, N, eps, dtype)
    tl.store(RSTD + rows, rstd, mask=m_ok)
    if STORE_SUM:
        tl.store(SUM + rows[:, None] * N + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _residual_rmsnorm(acc, H, OUT, rows, m_ok, cols, n_ok, N, eps, dtype: tl.constexpr):
    """The norm epilogue of whole rows: out = rmsnorm(h + acc) stored to OUT, the product and
    the sum rounded to `dtype` as the composition stores them; returns (the rounded sum, rstd)."""
    mask = m_ok[:, None] & n_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    y = (h + acc.to(dtype).to(tl.float32)).to(dtype)
    yf = tl.where(mask, y.to(tl.float32), 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(yf * yf, axis=1) / N + eps))  # as trm::add_rmsnorm
    tl.store(OUT + offs, (yf * rstd[:, None]).to(dtype), mask=mask)
    return y, rstd


@triton.jit
def _mlp_add_rmsnorm_fwd(
    H, WGU, WD, OUT, M, N, INTER, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """The whole sub-layer without grad, one kernel: out = rmsnorm(h + swiglu(h @ W_gu^T) @
    W_down^T) for h [M, N], W_gu [2I, N] (gate rows first), W_down [N, I]. A program owns
    BLOCK_M whole rows and walks the intermediate axis in BLOCK_I chunks: the gate|up chunk
    (a GEMM over N in BLOCK_K steps), SwiGLU, and the chunk's share of the down GEMM added to
    a [BLOCK_M, N] accumulator; the activation never leaves the chip. Every program reads
    all of both weights (from L2), which is what this trades for the activation's round trip."""
    dtype = H.dtype.element_ty
    rm, rn, ri = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_I)
    rows = rm.to(tl.int64)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i0 in range(0, INTER, BLOCK_I):
        inter = i0 + ri
        i_ok = inter < INTER
        g = _gemm(H, WGU, rows, m_ok, inter, i_ok, N, N, tl.zeros([BLOCK_M, BLOCK_I], tl.float32), True, BLOCK_K, PREC)
        u = _gemm(H, WGU + INTER * N, rows, m_ok, inter, i_ok, N, N, tl.zeros([BLOCK_M, BLOCK_I], tl.float32), True,
                  BLOCK_K, PREC)  # fmt: skip
        gf, uf = g.to(dtype).to(tl.float32), u.to(dtype).to(tl.float32)  # rounded as gate|up is stored
        act = (gf * tl.sigmoid(gf) * uf).to(dtype)
        wd = tl.load(WD + rn[None, :].to(tl.int64) * INTER + inter[:, None], mask=i_ok[:, None] & n_ok[None, :],
                     other=0.0)  # [BLOCK_I, BLOCK_N]: W_down^T's rows of this chunk  # fmt: skip
        acc = tl.dot(act, wd, acc, input_precision=PREC)
    _residual_rmsnorm(acc, H, OUT, rows, m_ok, rn, n_ok, N, eps, dtype)


GROUP_M = 8
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner tries on a GPU, for both
# kernels. Each compiles for every architecture in trm_kernels.arch with no spills
# (trm_benchmarks.ptx; tests/test_ptx.py checks it). Wider tiles were tried and left out:
# 128x128x32 (8 warps) and 64x128x64 (4 warps) spill 64-120 B forward on mma.sync
# architectures and 1.1-2.6 KB backward everywhere but Blackwell (the epilogue holds
# d(act), gate, up and the activation for the whole tile). The interpreter runs
# INTERPRETER_CONFIG: wide tiles, as its cost is per operation whatever the tile's size (the
# kernel tests set small ones, so that odd sizes cross tile edges); FIXED_CONFIG, where set,
# runs everywhere (tests run each config).
CONFIGS = [(128, 64, 64, 8, 3), (64, 64, 64, 4, 3)]
INTERPRETER_CONFIG = (128, 128, 64, 4, 1)
# Shared memory each config's forward kernel takes (two weight tiles per step: more than the
# backward's) per architecture, bf16 and fp16, as `python -m trm_benchmarks.ptx` reports with
# triton 3.9; the autotuner drops a config the device cannot launch. tests/test_ptx.py fails
# if a compiled kernel needs more than is written here.
SHARED_BYTES = {
    (128, 64, 64, 8, 3): {80: 65536, 86: 65536, 89: 65536, 90: 98304, 100: 98336, 120: 65536},
    (64, 64, 64, 4, 3): {80: 49152, 86: 49152, 89: 49152, 90: 73728, 100: 73760, 120: 49152},
}
FIXED_CONFIG: tuple[int, int, int, int, int] | None = None


def config_name(which: str, block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> str:
    return f"swiglu_mlp {which} {block_m}x{block_n}x{block_k} {warps} warps {stages} stages"


def shared_needed(config: tuple[int, ...], capability: int) -> int:
    return needed_on(SHARED_BYTES[config], capability)


def launchable(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[tuple[int, int, int, int, int]]:
    """The configs this device can launch in this dtype (all where no limit applies; none in
    fp32 on a GPU, see _triton.fits). The shared memory figures are bf16's and fp16's."""
    budget = device_budget(device)
    if budget is None:
        return CONFIGS
    return [c for c in CONFIGS if fits(budget, dtype, shared_needed(c, budget[0]))]


def _prune(configs, named_args, **_):
    """The configs this launch's device can launch (see launchable)."""
    t = named_args["X" if "X" in named_args else "DY"]
    tiles = launchable(t.device, t.dtype)
    return [c for c in configs if (*(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), c.num_warps,
                                   c.num_stages) in tiles]  # fmt: skip


def _autotuned(kernel, do_bench=None):
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in CONFIGS
    ]
    return tune.shared_autotuner(triton.autotune(configs, key=["M", "N", "K"], do_bench=do_bench,
                                                 prune_configs_by={"early_config_prune": _prune})(kernel))  # fmt: skip


_FWD = _linear_swiglu_fwd if interpreting() else _autotuned(_linear_swiglu_fwd)
_BWD = _swiglu_mlp_bwd if interpreting() else _autotuned(_swiglu_mlp_bwd)


def _launch(plain, tuned, args: tuple, M: int, N: int, t: torch.Tensor, **meta) -> None:  # noqa: N803
    config = FIXED_CONFIG or (INTERPRETER_CONFIG if tuned is plain else None)
    if config is not None:
        bm, bn, bk, warps, stages = config
        launch(plain, (triton.cdiv(M, bm) * triton.cdiv(N, bn),), *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
               GROUP_M=GROUP_M, PREC=precision(t), num_warps=warps, num_stages=stages, **meta)  # fmt: skip
        return
    launch(tuned, lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),), *args, GROUP_M=GROUP_M,
           PREC=precision(t), **meta)  # fmt: skip


def _forward(x: torch.Tensor, w_gate_up: torch.Tensor, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(act [M, I], gate|up [M, 2I] if keep else an empty tensor) of x [M, K]."""
    (M, K), N = x.shape, w_gate_up.shape[0] // 2  # noqa: N806
    if not launchable(x.device, x.dtype):
        raise ValueError(f"swiglu_mlp: no config of the fused kernel can launch on {x.device} in {x.dtype} "
                         "(shared memory; fp32 on a GPU takes cuBLAS + the SwiGLU kernel)")  # fmt: skip
    act = x.new_empty(M, N)
    gate_up = x.new_empty(M, 2 * N) if keep else x.new_empty(0)
    _launch(_linear_swiglu_fwd, _FWD, (x, w_gate_up, act, gate_up, M, N, K), M, N, x, STORE_GU=keep)
    return act, gate_up


@torch.library.custom_op("trm::swiglu_mlp", mutates_args=())
def swiglu_mlp_fwd(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    act, _ = _forward(x.contiguous(), w_gate_up.contiguous(), keep=False)
    return torch.mm(act, w_down.t())


@swiglu_mlp_fwd.register_fake
def _(x, w_gate_up, w_down):
    return x.new_empty(x.shape[0], w_down.shape[0])


Pair = tuple[torch.Tensor, torch.Tensor]


@torch.library.custom_op("trm::swiglu_mlp_train", mutates_args=())
def swiglu_mlp_train(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> Pair:
    act, gate_up = _forward(x.contiguous(), w_gate_up.contiguous(), keep=True)
    return torch.mm(act, w_down.t()), gate_up


@swiglu_mlp_train.register_fake
def _(x, w_gate_up, w_down):
    return x.new_empty(x.shape[0], w_down.shape[0]), x.new_empty(x.shape[0], w_gate_up.shape[0])


@torch.library.custom_op("trm::swiglu_mlp_backward", mutates_args=())
def swiglu_mlp_bwd(dy: torch.Tensor, gate_up: torch.Tensor, w_down: torch.Tensor) -> Pair:
    dy, w_down = dy.contiguous(), w_down.contiguous()
    (M, K), N = dy.shape, w_down.shape[1]  # noqa: N806
    dgu, act = torch.empty_like(gate_up), dy.new_empty(M, N)
    _launch(_swiglu_mlp_bwd, _BWD, (dy, w_down, gate_up, dgu, act, M, N, K), M, N, dy)
    return dgu, act


@swiglu_mlp_bwd.register_fake
def _(dy, gate_up, w_down):
    return torch.empty_like(gate_up), dy.new_empty(dy.shape[0], w_down.shape[1])


def _setup(ctx, inputs, output):
    x, w_gate_up, w_down = inputs
    ctx.save_for_backward(x, w_gate_up, w_down, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs backward ignores


def _backward(ctx, dy, _dgate_up):
    if dy is None:  # the output is unused
        return None, None, None
    x, w_gate_up, w_down, gate_up = ctx.saved_tensors
    dgu, act = swiglu_mlp_bwd(dy, gate_up, w_down)
    dx = torch.mm(dgu, w_gate_up) if ctx.needs_input_grad[0] else None
    dw_gate_up = torch.mm(dgu.t(), x) if ctx.needs_input_grad[1] else None
    dw_down = torch.mm(dy.t(), act) if ctx.needs_input_grad[2] else None
    return dx, dw_gate_up, dw_down


swiglu_mlp_train.register_autograd(_backward, setup_context=_setup)


def fused(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The fused kernels on x [..., D] (one kernel forward, one backward, besides cuBLAS GEMMs)."""
    flat = x.reshape(-1, x.shape[-1])
    if needs_grad(x, w_gate_up, w_down):
        out = swiglu_mlp_train(flat, w_gate_up, w_down)[0]
    else:
        out = swiglu_mlp_fwd(flat, w_gate_up, w_down)
    return out.view(*x.shape[:-1], w_down.shape[0])


def composed(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """cuBLAS GEMMs around the separate Triton SwiGLU kernel (what ran before the fusion)."""
    return F.linear(_swiglu.swiglu(F.linear(x, w_gate_up)), w_down)


CANDIDATES = {"fused": fused, "cuBLAS + swiglu": composed}


_HAS_TILES: dict[tuple[torch.device, torch.dtype], bool] = {}  # a plain dict, which torch.compile traces


def _has_tiles(t: torch.Tensor) -> bool:
    key = (t.device, t.dtype)
    if key not in _HAS_TILES:
        _HAS_TILES[key] = bool(launchable(t.device, t.dtype))
    return _HAS_TILES[key]


def swiglu_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The faster of the fused kernels and the composition on this signature, as measured on
    its first call (trm_kernels.tune); the composition where the device fits no config."""
    for name, t in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_input(name, t)
    if not _has_tiles(x):
        return composed(x, w_gate_up, w_down)
    return CANDIDATES[tune.choose("swiglu_mlp", CANDIDATES, (x, w_gate_up, w_down))](x, w_gate_up, w_down)


# ---- the whole sub-layer: rmsnorm(h + swiglu_mlp(h)), the down GEMM's epilogue adding the
# residual and normalising whole rows -------------------------------------------------------

MAX_NORM_HIDDEN = 512  # a row of the down GEMM's output is one tile: [BLOCK_M, hidden] in registers
# (BLOCK_M, BLOCK_K, num_warps, num_stages) of the down GEMM + residual + RMSNorm kernel at
# hidden 512, autotuned on a GPU. These two compile with no spills on every architecture in
# trm_kernels.arch, with mma.sync everywhere (32 rows is under a warpgroup MMA's 64); the
# 64-row tiles that would take wgmma / tcgen05 spill 4-188 B (trm_benchmarks.ptx), and
# 16x512x64 needs 132 KB of shared memory. Each takes 68 KB (69632 B) on every architecture.
NORM_CONFIGS = [(32, 32, 8, 3), (32, 64, 8, 2)]
NORM_SHARED_BYTES = 69632
NORM_INTERPRETER_CONFIG = (64, 128, 4, 1)  # wide, as INTERPRETER_CONFIG
NORM_FIXED_CONFIG: tuple[int, int, int, int] | None = None


def norm_config_name(block_m: int, block_k: int, warps: int, stages: int) -> str:
    return f"swiglu_mlp_rmsnorm down+norm {block_m}x512x{block_k} {warps} warps {stages} stages"


def _norm_launchable(t: torch.Tensor, hidden: int) -> bool:
    """Whether the norm epilogue kernel can launch for rows of `hidden` like `t` (not in fp32
    on a GPU: see _triton.fits; NORM_SHARED_BYTES is bf16's and fp16's)."""
    return hidden <= MAX_NORM_HIDDEN and fits(device_budget(t.device), t.dtype, NORM_SHARED_BYTES)


def _norm_prune(configs, named_args, **_):
    return configs if _norm_launchable(named_args["A"], named_args["N"]) else []


def _norm_autotuned(do_bench=None):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bm, bk, w, st in NORM_CONFIGS]  # fmt: skip
    tuned = triton.autotune(configs, key=["M", "N", "K"], prune_configs_by={"early_config_prune": _norm_prune},
                            do_bench=do_bench)(_down_add_rmsnorm_fwd)  # fmt: skip
    return tune.shared_autotuner(tuned)


_NORM = _down_add_rmsnorm_fwd if interpreting() else _norm_autotuned()


def _down_norm(act, w_down, h, eps: float, keep: bool):
    """(out, the rounded sum h + act @ W_down^T if keep else an empty tensor, rstd [M, 1] fp32)."""
    (M, K), N = act.shape, w_down.shape[0]  # noqa: N806
    out = torch.empty_like(h)
    total = torch.empty_like(h) if keep else h.new_empty(0)
    rstd = torch.empty(M, 1, dtype=torch.float32, device=h.device)
    args = (act, w_down, h, out, total, rstd, M, N, K, eps)
    block_n = max(16, next_pow2(N))
    config = NORM_FIXED_CONFIG or (NORM_INTERPRETER_CONFIG if _NORM is _down_add_rmsnorm_fwd else None)
    if config is not None:
        bm, bk, warps, stages = config
        launch(_down_add_rmsnorm_fwd, (triton.cdiv(M, bm),), *args, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=bk,
               STORE_SUM=keep, PREC=precision(h), num_warps=warps, num_stages=stages)  # fmt: skip
    else:
        launch(_NORM, lambda c: (triton.cdiv(M, c["BLOCK_M"]),), *args, BLOCK_N=block_n, STORE_SUM=keep,
               PREC=precision(h))  # fmt: skip
    return out, total, rstd


@torch.library.custom_op("trm::swiglu_mlp_rmsnorm", mutates_args=())
def swiglu_mlp_rmsnorm_fwd(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> torch.Tensor:
    h = h.contiguous()
    act, _ = _forward(h, w_gate_up.contiguous(), keep=False)
    return _down_norm(act, w_down.contiguous(), h, eps, keep=False)[0]


@swiglu_mlp_rmsnorm_fwd.register_fake
def _(h, w_gate_up, w_down, eps):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


Quad = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("trm::swiglu_mlp_rmsnorm_train", mutates_args=())
def swiglu_mlp_rmsnorm_train(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> Quad:
    """(out, gate|up, the rounded pre-norm sum, rstd): the last three for backward."""
    h = h.contiguous()
    act, gate_up = _forward(h, w_gate_up.contiguous(), keep=True)
    out, total, rstd = _down_norm(act, w_down.contiguous(), h, eps, keep=True)
    return out, gate_up, total, rstd


@swiglu_mlp_rmsnorm_train.register_fake
def _(h, w_gate_up, w_down, eps):
    rows = h.shape[0]
    like = functools.partial(torch.empty_like, h, memory_format=torch.contiguous_format)
    return like(), h.new_empty(rows, w_gate_up.shape[0]), like(), h.new_empty(rows, 1, dtype=torch.float32)


def _norm_setup(ctx, inputs, output):
    h, w_gate_up, w_down, _ = inputs
    _, gate_up, total, rstd = output
    ctx.save_for_backward(h, w_gate_up, w_down, gate_up, total, rstd)
    ctx.mark_non_differentiable(gate_up, total, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs backward ignores


def _norm_backward(ctx, dout, *_):
    if dout is None:  # the output is unused
        return None, None, None, None
    h, w_gate_up, w_down, gate_up, total, rstd = ctx.saved_tensors
    dsum, _ = _rmsnorm.add_rmsnorm_bwd(dout, None, total, None, None, rstd, 1, "triton")  # d(h + mix)
    dgu, act = swiglu_mlp_bwd(dsum, gate_up, w_down)
    dh = torch.addmm(dsum, dgu, w_gate_up) if ctx.needs_input_grad[0] else None  # the residual's and the MLP's
    dw_gate_up = torch.mm(dgu.t(), h) if ctx.needs_input_grad[1] else None
    dw_down = torch.mm(dsum.t(), act) if ctx.needs_input_grad[2] else None
    return dh, dw_gate_up, dw_down, None


swiglu_mlp_rmsnorm_train.register_autograd(_norm_backward, setup_context=_norm_setup)


def sublayer_fused(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> torch.Tensor:
    """Both GEMMs with their epilogues: SwiGLU in the first, residual + RMSNorm in the second."""
    flat = h.reshape(-1, h.shape[-1])
    if needs_grad(h, w_gate_up, w_down):
        out = swiglu_mlp_rmsnorm_train(flat, w_gate_up, w_down, eps)[0]
    else:
        out = swiglu_mlp_rmsnorm_fwd(flat, w_gate_up, w_down, eps)
    return out.view(h.shape)


def sublayer_swiglu_fused(h, w_gate_up, w_down, eps):
    """The SwiGLU epilogue only; cuBLAS's down GEMM and the add + RMSNorm kernel after it."""
    return _rmsnorm.add_rmsnorm(fused(h, w_gate_up, w_down), h, -1, eps)


def sublayer_composed(h, w_gate_up, w_down, eps):
    """cuBLAS GEMMs, the SwiGLU kernel, the add + RMSNorm kernel."""
    return _rmsnorm.add_rmsnorm(composed(h, w_gate_up, w_down), h, -1, eps)


SUBLAYER_CANDIDATES = {"fused": sublayer_fused, "SwiGLU epilogue + add_rmsnorm": sublayer_swiglu_fused,
                       "cuBLAS + swiglu + add_rmsnorm": sublayer_composed}  # fmt: skip


def swiglu_mlp_rmsnorm(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> torch.Tensor:
    """The fastest of SUBLAYER_CANDIDATES on this signature, as measured on its first call
    (trm_kernels.tune); without grad the one-kernel sub-layer is a candidate too (second, so
    that the two GEMM epilogues stay the default); without the norm epilogue where the hidden
    size exceeds MAX_NORM_HIDDEN or the device fits no config of it."""
    for name, t in (("h", h), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_input(name, t)
    if not _has_tiles(h):
        return sublayer_composed(h, w_gate_up, w_down, eps)
    candidates = SUBLAYER_CANDIDATES
    if not _norm_launchable(h, h.shape[-1]):
        candidates = dict(list(SUBLAYER_CANDIDATES.items())[1:])
    if not needs_grad(h, w_gate_up, w_down) and _one_kernel_launchable(h, h.shape[-1]):
        first, *rest = candidates.items()
        candidates = dict([first, ("one kernel", sublayer_one_kernel), *rest])
    choice = tune.choose("swiglu_mlp_rmsnorm", candidates, (h, w_gate_up, w_down, eps))
    return candidates[choice](h, w_gate_up, w_down, eps)


# ---- any linear layer followed by the residual add and RMSNorm: rmsnorm(h + a @ w^T), the
# same GEMM-with-norm-epilogue kernel (TRM's attention sub-layer: o_proj, then the post-norm) ----


@torch.library.custom_op("trm::linear_add_rmsnorm", mutates_args=())
def linear_add_rmsnorm_fwd(a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, eps: float) -> torch.Tensor:
    return _down_norm(a.contiguous(), w.contiguous(), h.contiguous(), eps, keep=False)[0]


@linear_add_rmsnorm_fwd.register_fake
def _(a, w, h, eps):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("trm::linear_add_rmsnorm_train", mutates_args=())
def linear_add_rmsnorm_train(a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, eps: float) -> Triple:
    """(out, the rounded pre-norm sum, rstd [M, 1] fp32): the last two for backward."""
    return _down_norm(a.contiguous(), w.contiguous(), h.contiguous(), eps, keep=True)


@linear_add_rmsnorm_train.register_fake
def _(a, w, h, eps):
    like = functools.partial(torch.empty_like, h, memory_format=torch.contiguous_format)
    return like(), like(), h.new_empty(h.shape[0], 1, dtype=torch.float32)


def _linear_norm_setup(ctx, inputs, output):
    a, w, _, _ = inputs
    _, total, rstd = output
    ctx.save_for_backward(a, w, total, rstd)
    ctx.mark_non_differentiable(total, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs backward ignores


def _linear_norm_backward(ctx, dout, *_):
    """The norm's backward kernel, then cuBLAS: da = dsum @ w, dw = dsum^T @ a; dh = dsum."""
    if dout is None:  # the output is unused
        return None, None, None, None
    a, w, total, rstd = ctx.saved_tensors
    dsum, _ = _rmsnorm.add_rmsnorm_bwd(dout, None, total, None, None, rstd, 1, "triton")
    da = torch.mm(dsum, w) if ctx.needs_input_grad[0] else None
    dw = torch.mm(dsum.t(), a) if ctx.needs_input_grad[1] else None
    return da, dw, dsum if ctx.needs_input_grad[2] else None, None


linear_add_rmsnorm_train.register_autograd(_linear_norm_backward, setup_context=_linear_norm_setup)


def linear_norm_fused(a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, eps: float) -> torch.Tensor:
    """The GEMM with the residual add and RMSNorm in its epilogue (its training form with grad)."""
    flat_a, flat_h = a.reshape(-1, a.shape[-1]), h.reshape(-1, h.shape[-1])
    if needs_grad(a, w, h):
        out = linear_add_rmsnorm_train(flat_a, w, flat_h, eps)[0]
    else:
        out = linear_add_rmsnorm_fwd(flat_a, w, flat_h, eps)
    return out.view(h.shape)


def linear_norm_composed(a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, eps: float) -> torch.Tensor:
    """cuBLAS's GEMM, then the add + RMSNorm kernel."""
    return _rmsnorm.add_rmsnorm(F.linear(a, w), h, -1, eps)


LINEAR_NORM_CANDIDATES = {"fused": linear_norm_fused, "cuBLAS + add_rmsnorm": linear_norm_composed}


def linear_add_rmsnorm(a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, eps: float) -> torch.Tensor:
    """The faster of the norm epilogue and cuBLAS + the add + RMSNorm kernel on this
    signature, as measured on its first call (trm_kernels.tune); the composition where the
    output row exceeds MAX_NORM_HIDDEN or the device cannot launch the epilogue kernel."""
    for name, t in (("a", a), ("w", w), ("h", h)):
        check_input(name, t)
    if not _norm_launchable(h, h.shape[-1]):
        return linear_norm_composed(a, w, h, eps)
    choice = tune.choose("linear_add_rmsnorm", LINEAR_NORM_CANDIDATES, (a, w, h, eps))
    return LINEAR_NORM_CANDIDATES[choice](a, w, h, eps)


# ---- the whole sub-layer without grad as one kernel: a candidate the timing weighs -------------

# (BLOCK_M, BLOCK_I, BLOCK_K, num_warps, num_stages) at hidden <= 512 (BLOCK_N = the row).
# A [32, 512] fp32 accumulator is 64 registers a thread at 8 warps; 64 rows would spill.
ONE_KERNEL_CONFIG = (32, 32, 64, 8, 2)
ONE_KERNEL_INTERPRETER_CONFIG = (64, 128, 128, 4, 1)  # wide, as INTERPRETER_CONFIG
# It compiles with no spills on every architecture in trm_kernels.arch, mma.sync everywhere (32
# rows), and takes 34 KB (34816 B) of shared memory on each (triton 3.9, bf16 and fp16;
# tests/test_ptx.py fails if it needs more).
ONE_KERNEL_SHARED_BYTES = 34816


def one_kernel_config_name() -> str:
    bm, bi, bk, warps, stages = ONE_KERNEL_CONFIG
    return f"swiglu_mlp_rmsnorm one kernel {bm}x512, I by {bi}, K by {bk}, {warps} warps {stages} stages"


def _one_kernel_launchable(t: torch.Tensor, hidden: int) -> bool:
    return hidden <= MAX_NORM_HIDDEN and fits(device_budget(t.device), t.dtype, ONE_KERNEL_SHARED_BYTES)


@torch.library.custom_op("trm::swiglu_mlp_rmsnorm_one_kernel", mutates_args=())
def swiglu_mlp_rmsnorm_one_kernel(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                                  eps: float) -> torch.Tensor:  # fmt: skip
    """rmsnorm(h + swiglu_mlp(h)) for 2-D h [M, N <= 512], no grad: one kernel (the
    activation never written)."""
    h, w_gate_up, w_down = h.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    (M, N), inter = h.shape, w_down.shape[1]  # noqa: N806
    out = torch.empty_like(h)
    interpreted = interpreting()
    bm, bi, bk, warps, stages = ONE_KERNEL_INTERPRETER_CONFIG if interpreted else ONE_KERNEL_CONFIG
    launch(_mlp_add_rmsnorm_fwd, (triton.cdiv(M, bm),), h, w_gate_up, w_down, out, M, N, inter, eps, BLOCK_M=bm,
           BLOCK_N=max(16, next_pow2(N)), BLOCK_I=bi, BLOCK_K=bk, PREC=precision(h), num_warps=warps,
           num_stages=stages)  # fmt: skip
    return out


@swiglu_mlp_rmsnorm_one_kernel.register_fake
def _(h, w_gate_up, w_down, eps):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def sublayer_one_kernel(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> torch.Tensor:
    """The whole sub-layer as one kernel (no grad only)."""
    flat = h.reshape(-1, h.shape[-1])
    return swiglu_mlp_rmsnorm_one_kernel(flat, w_gate_up, w_down, eps).view(h.shape)
