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

The same kernels run GeGLU (gelu_tanh(gate) * up) and the non-gated relu(x @ W^T)^2 (one [I, D]
weight, [M, I] kept) as epilogue variants (the ACTIVATION constexpr), and read gate and up
weights given as two tensors in place (the up weight at a scalar offset from the gate's).

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

from . import reference as _reference
from . import rmsnorm as _rmsnorm
from . import swiglu as _swiglu
from . import tune
from ._triton import (
    check_input,
    device_budget,
    fits,
    has_configs,
    interpreting,
    launch,
    needed_on,
    needs_grad,
    next_pow2,
    precision,
    takes,
)
from .swiglu import _gate, _gelu_sigmoid


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
def _activation(g, u, ACTIVATION: tl.constexpr):
    """The activation of fp32 gate (or, for relu2, pre-activation) g and up u, in fp32."""
    if ACTIVATION == "swiglu":
        act = g * tl.sigmoid(g) * u
    elif ACTIVATION == "geglu":
        act = g * _gelu_sigmoid(g) * u
    else:
        r = tl.maximum(g, 0.0)
        act = r * r
    return act


@triton.jit
def _linear_swiglu_fwd(
    X, W, UP, ACT, GU, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STORE_GU: tl.constexpr, ACTIVATION: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """act = activation(x @ W^T) for x [M, K], the gate weight W [I, K] and the up weight [I, K]
    at W + UP (elements: I * K for the halves of one [2I, K] weight, or the distance to a second
    tensor: no concatenation); gate|up to GU [M, 2I]. UP is added to the tile's offsets, not to
    W: a second pointer, or W + UP + offsets, spills 76 B at 128x64x64 on sm_80-89 (ptxas), as
    an i64 UP (a pair 2^31 elements or more apart in memory) still does there.
    relu2: act = relu(x @ W^T)^2, UP unread, the pre-activation to GU [M, I]."""
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
        if ACTIVATION != "relu2":
            acc_u = tl.dot(a, tl.load(W + (UP + w_offs), mask=w_mask, other=0.0), acc_u, input_precision=PREC)
    g, u = acc_g.to(dtype), acc_u.to(dtype)  # stored values, as the gate|up tensor holds them
    act = _activation(g.to(tl.float32), u.to(tl.float32), ACTIVATION)
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(ACT + rows[:, None] * N + rn[None, :], act.to(dtype), mask=mask)
    if STORE_GU:
        if ACTIVATION == "relu2":
            tl.store(GU + rows[:, None] * N + rn[None, :], g, mask=mask)
        else:
            gu_offs = rows[:, None] * (2 * N) + rn[None, :]
            tl.store(GU + gu_offs, g, mask=mask)
            tl.store(GU + gu_offs + N, u, mask=mask)


@triton.jit
def _swiglu_mlp_bwd(
    DY, WD, GU, DGU, ACT, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACTIVATION: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """d(act) = dy @ W_down (dy [M, K], W_down [K, N]) and, in the epilogue, d(gate|up) into
    DGU [M, 2I] and the activation recomputed into ACT [M, N], from gate|up GU [M, 2I] (relu2:
    d(pre-activation) into DGU [M, I] from GU [M, I])."""
    dtype = DY.dtype.element_ty
    rm, rn = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = rm.to(tl.int64)
    m_ok, n_ok = rm < M, rn < N
    acc = _gemm(DY, WD, rows, m_ok, rn, n_ok, K, N, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), False, BLOCK_K, PREC)
    mask = m_ok[:, None] & n_ok[None, :]
    d = acc.to(dtype).to(tl.float32)  # d(act) as the composition stores it
    act_offs = rows[:, None] * N + rn[None, :]
    if ACTIVATION == "relu2":
        r = tl.maximum(tl.load(GU + act_offs, mask=mask, other=0.0).to(tl.float32), 0.0)
        tl.store(DGU + act_offs, (d * 2.0 * r).to(dtype), mask=mask)
        tl.store(ACT + act_offs, (r * r).to(dtype), mask=mask)
    else:
        gu_offs = rows[:, None] * (2 * N) + rn[None, :]
        g = tl.load(GU + gu_offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + gu_offs + N, mask=mask, other=0.0).to(tl.float32)
        f, df = _gate(g, ACTIVATION)  # silu or gelu_tanh, and its derivative
        tl.store(DGU + gu_offs, (d * u * df).to(dtype), mask=mask)
        tl.store(DGU + gu_offs + N, (d * f).to(dtype), mask=mask)
        tl.store(ACT + act_offs, (f * u).to(dtype), mask=mask)


@triton.jit
def _down_add_rmsnorm_fwd(
    A, WD, H, W, OUT, SUM, RSTD, M, N, K, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STORE_SUM: tl.constexpr,
    HAS_W: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """out = rmsnorm(h + a @ W_down^T) [* w] for a [M, K], W_down [N, K], h [M, N], w [N]: a
    program owns BLOCK_M whole rows (BLOCK_N >= N), so the norm's statistics are taken in the
    epilogue. Writes rstd [M] (fp32) and, when STORE_SUM, the rounded sum h + mix for backward."""
    dtype = A.dtype.element_ty
    rm, rn = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    rows = rm.to(tl.int64)
    m_ok, n_ok = rm < M, rn < N
    acc = _gemm(A, WD, rows, m_ok, rn, n_ok, K, K, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), True, BLOCK_K, PREC)
    y, rstd = _residual_rmsnorm(acc, H, W, OUT, rows, m_ok, rn, n_ok, N, eps, dtype, HAS_W)
    tl.store(RSTD + rows, rstd, mask=m_ok)
    if STORE_SUM:
        tl.store(SUM + rows[:, None] * N + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _residual_rmsnorm(acc, H, W, OUT, rows, m_ok, cols, n_ok, N, eps, dtype: tl.constexpr, HAS_W: tl.constexpr):
    """The norm epilogue of whole rows: out = rmsnorm(h + acc) [* w] stored to OUT, the product
    and the sum rounded to `dtype` as the composition stores them, the weight applied in fp32
    before the one rounding of out; returns (the rounded sum, rstd)."""
    mask = m_ok[:, None] & n_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    y = (h + acc.to(dtype).to(tl.float32)).to(dtype)
    yf = tl.where(mask, y.to(tl.float32), 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(yf * yf, axis=1) / N + eps))  # as trm::add_rmsnorm
    out = yf * rstd[:, None]
    if HAS_W:
        out = out * tl.load(W + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs, out.to(dtype), mask=mask)
    return y, rstd


@triton.jit
def _mlp_add_rmsnorm_fwd(
    H, WG, UP, WD, W, OUT, M, N, INTER, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_W: tl.constexpr, ACTIVATION: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """The whole sub-layer without grad, one kernel: out = rmsnorm(h + swiglu(h @ W_gu^T) @
    W_down^T) [* w] for h [M, N], gate and up weights [I, N] at WG and WG + UP (as in
    _linear_swiglu_fwd; relu2: WG only), W_down
    [N, I], w [N], swiglu standing for any ACTIVATION of _activation. A program owns
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
        g = _gemm(H, WG, rows, m_ok, inter, i_ok, N, N, tl.zeros([BLOCK_M, BLOCK_I], tl.float32), True, BLOCK_K, PREC)
        u = tl.zeros([BLOCK_M, BLOCK_I], tl.float32)
        if ACTIVATION != "relu2":
            u = _gemm(H, WG + UP, rows, m_ok, inter, i_ok, N, N, u, True, BLOCK_K, PREC)
        gf, uf = g.to(dtype).to(tl.float32), u.to(dtype).to(tl.float32)  # rounded as gate|up is stored
        act = _activation(gf, uf, ACTIVATION).to(dtype)
        wd = tl.load(WD + rn[None, :].to(tl.int64) * INTER + inter[:, None], mask=i_ok[:, None] & n_ok[None, :],
                     other=0.0)  # [BLOCK_I, BLOCK_N]: W_down^T's rows of this chunk  # fmt: skip
        acc = tl.dot(act, wd, acc, input_precision=PREC)
    _residual_rmsnorm(acc, H, W, OUT, rows, m_ok, rn, n_ok, N, eps, dtype, HAS_W)


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


ACTIVATIONS = _reference.MLP_ACTIVATIONS  # each an epilogue variant of both kernels (the ACTIVATION constexpr)


def config_name(which: str, block_m: int, block_n: int, block_k: int, warps: int, stages: int,
                activation: str = "swiglu") -> str:  # fmt: skip
    name = f"swiglu_mlp {which} {block_m}x{block_n}x{block_k} {warps} warps {stages} stages"
    return name if activation == "swiglu" else f"{name} {activation}"


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


def _weights(w_gate_up: torch.Tensor, w_up: torch.Tensor | None, activation: str) -> tuple[torch.Tensor, int, int]:
    """(the gate weight, where the up weight starts (in elements from the gate's), I) as the
    kernels read them: the packed [2I, D] weight's halves (I * D), two [I, D] weights (the
    distance between their addresses: no concatenation), relu2's one [I, D] weight (0: no up)."""
    w_gate_up = w_gate_up.contiguous()
    if w_up is not None:
        w_up = w_up.contiguous()
        distance = w_up.data_ptr() - w_gate_up.data_ptr()
        assert distance % w_up.element_size() == 0, "tensors are aligned to their element size"
        return w_gate_up, distance // w_up.element_size(), w_up.shape[0]
    if activation == "relu2":
        return w_gate_up, 0, w_gate_up.shape[0]
    return w_gate_up, w_gate_up.numel() // 2, w_gate_up.shape[0] // 2


def _forward(x: torch.Tensor, w_gate_up: torch.Tensor, keep: bool, activation: str = "swiglu",
             w_up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(act [M, I], gate|up [M, 2I] (relu2: the pre-activation [M, I]) if keep else an empty
    tensor) of x [M, K]."""
    w, up, N = _weights(w_gate_up, w_up, activation)  # noqa: N806
    M, K = x.shape  # noqa: N806
    if not launchable(x.device, x.dtype):
        raise ValueError(f"swiglu_mlp: no config of the fused kernel can launch on {x.device} in {x.dtype} "
                         "(shared memory; fp32 on a GPU takes cuBLAS + the SwiGLU kernel)")  # fmt: skip
    act = x.new_empty(M, N)
    kept = N if activation == "relu2" else 2 * N
    gate_up = x.new_empty(M, kept) if keep else x.new_empty(0)
    _launch(_linear_swiglu_fwd, _FWD, (x, w, up, act, gate_up, M, N, K), M, N, x, STORE_GU=keep,
            ACTIVATION=activation)  # fmt: skip
    return act, gate_up


def _kept_width(w_gate_up: torch.Tensor, w_up: torch.Tensor | None) -> int:
    """The width of what the training forward keeps: 2I ([2I, D] or two [I, D] weights), or I (relu2)."""
    return w_gate_up.shape[0] + (w_up.shape[0] if w_up is not None else 0)


@torch.library.custom_op("trm::swiglu_mlp", mutates_args=())
def swiglu_mlp_fwd(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, activation: str = "swiglu",
                   w_up: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    act, _ = _forward(x.contiguous(), w_gate_up, False, activation, w_up)
    return torch.mm(act, w_down.t())


@swiglu_mlp_fwd.register_fake
def _(x, w_gate_up, w_down, activation="swiglu", w_up=None):
    return x.new_empty(x.shape[0], w_down.shape[0])


Pair = tuple[torch.Tensor, torch.Tensor]


@torch.library.custom_op("trm::swiglu_mlp_train", mutates_args=())
def swiglu_mlp_train(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, activation: str = "swiglu",
                     w_up: torch.Tensor | None = None) -> Pair:  # fmt: skip
    act, gate_up = _forward(x.contiguous(), w_gate_up, True, activation, w_up)
    return torch.mm(act, w_down.t()), gate_up


@swiglu_mlp_train.register_fake
def _(x, w_gate_up, w_down, activation="swiglu", w_up=None):
    return x.new_empty(x.shape[0], w_down.shape[0]), x.new_empty(x.shape[0], _kept_width(w_gate_up, w_up))


@torch.library.custom_op("trm::swiglu_mlp_backward", mutates_args=())
def swiglu_mlp_bwd(dy: torch.Tensor, gate_up: torch.Tensor, w_down: torch.Tensor, activation: str = "swiglu") -> Pair:
    """(d(gate|up) like gate_up, the activation [M, I]) from dy [M, D] and what the training
    forward kept (gate|up [M, 2I]; relu2: the pre-activation [M, I])."""
    dy, w_down = dy.contiguous(), w_down.contiguous()
    (M, K), N = dy.shape, w_down.shape[1]  # noqa: N806
    dgu, act = torch.empty_like(gate_up), dy.new_empty(M, N)
    _launch(_swiglu_mlp_bwd, _BWD, (dy, w_down, gate_up, dgu, act, M, N, K), M, N, dy, ACTIVATION=activation)
    return dgu, act


@swiglu_mlp_bwd.register_fake
def _(dy, gate_up, w_down, activation="swiglu"):
    return torch.empty_like(gate_up), dy.new_empty(dy.shape[0], w_down.shape[1])


def _setup(ctx, inputs, output):
    x, w_gate_up, w_down, activation, w_up = inputs
    ctx.save_for_backward(x, w_gate_up, w_down, w_up, output[1])
    ctx.activation = activation
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs backward ignores


def _input_grads(dgu: torch.Tensor, x, w_gate_up, w_up, wanted: tuple[bool, bool, bool]):
    """(dx, d(w_gate_up), d(w_up)), each None where `wanted` (x, w_gate_up, w_up) says so: cuBLAS
    GEMMs, on the halves of d(gate|up) (strided views, no copies) where the weights are two."""
    if w_up is None:
        dx = torch.mm(dgu, w_gate_up) if wanted[0] else None
        return dx, torch.mm(dgu.t(), x) if wanted[1] else None, None
    dg, du = dgu.split(w_gate_up.shape[0], dim=1)
    dx = torch.addmm(torch.mm(dg, w_gate_up), du, w_up) if wanted[0] else None
    return dx, torch.mm(dg.t(), x) if wanted[1] else None, torch.mm(du.t(), x) if wanted[2] else None


def _backward(ctx, dy, _dgate_up):
    if dy is None:  # the output is unused
        return None, None, None, None, None
    x, w_gate_up, w_down, w_up, gate_up = ctx.saved_tensors
    dgu, act = swiglu_mlp_bwd(dy, gate_up, w_down, ctx.activation)
    dx, dw_gate_up, dw_up = _input_grads(dgu, x, w_gate_up, w_up, (_needs(ctx, 0), _needs(ctx, 1), _needs(ctx, 4)))
    dw_down = torch.mm(dy.t(), act) if ctx.needs_input_grad[2] else None
    return dx, dw_gate_up, dw_down, None, dw_up


swiglu_mlp_train.register_autograd(_backward, setup_context=_setup)


def _extra(activation: str, w_up: torch.Tensor | None) -> tuple:
    """The trailing arguments of a non-default MLP (none for the packed SwiGLU, whose calls and
    timed choices stay as they were)."""
    return (activation, w_up) if activation != "swiglu" or w_up is not None else ()


def fused(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, activation: str = "swiglu",
          w_up: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The fused kernels on x [..., D] (one kernel forward, one backward, besides cuBLAS GEMMs)."""
    flat = x.reshape(-1, x.shape[-1])
    extra = _extra(activation, w_up)
    if needs_grad(x, w_gate_up, w_down, w_up):
        out = swiglu_mlp_train(flat, w_gate_up, w_down, *extra)[0]
    else:
        out = swiglu_mlp_fwd(flat, w_gate_up, w_down, *extra)
    return out.view(*x.shape[:-1], w_down.shape[0])


def composed(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, activation: str = "swiglu",
             w_up: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """cuBLAS GEMMs around the separate Triton SwiGLU (or GeGLU) kernel (what ran before the
    fusion); for relu2 and two weights, around eager PyTorch's activation."""
    if activation in _swiglu.GATED and w_up is None:
        return F.linear(_swiglu.swiglu(F.linear(x, w_gate_up), -1, activation), w_down)
    return F.linear(_reference.mlp_activation(x, w_gate_up, activation, w_up), w_down)


CANDIDATES = {"fused": fused, "cuBLAS + swiglu": composed}


_HAS_TILES: dict[tuple[torch.device, torch.dtype], bool] = {}


def _has_tiles(t: torch.Tensor) -> bool:
    return has_configs(_HAS_TILES, launchable, t)


def swiglu_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, activation: str = "swiglu",
               w_up: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The faster of the fused kernels and the composition on this signature, as measured on
    its first call (trm_kernels.tune); the composition where the device fits no config.
    `activation` one of reference.MLP_ACTIVATIONS; `w_up` [I, D] given: w_gate_up is the gate's [I, D]."""
    for name, t in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down), ("w_up", w_up)):
        if t is not None:
            check_input(name, t)
    args = (x, w_gate_up, w_down, *_extra(activation, w_up))
    if not _has_tiles(x):
        return composed(*args)
    return CANDIDATES[tune.choose("swiglu_mlp", CANDIDATES, args)](*args)


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


def sublayer_supports(h: torch.Tensor, w_gate_up, w_down, eps: float, weight=None) -> bool:
    """The triton backend takes rows of up to 16,384 (the add + RMSNorm kernel's limit; the norm
    epilogue itself to MAX_NORM_HIDDEN); `auto` runs the reference beyond."""
    return takes(h) and h.shape[-1] <= _rmsnorm.MAX_N


def linear_norm_supports(a: torch.Tensor, w, h: torch.Tensor, eps: float, weight=None) -> bool:
    return sublayer_supports(h, None, None, eps)


def _norm_skipped(t: torch.Tensor, hidden: int) -> dict[str, str]:
    """{"fused": why the norm epilogue cannot take rows of `hidden` like `t`}, or {} where it can:
    the reason trm_kernels.tune reports for the composition running instead."""
    if hidden > MAX_NORM_HIDDEN:
        return {"fused": f"hidden {hidden} > {MAX_NORM_HIDDEN}: the norm epilogue holds whole rows in one tile; "
                         f"cuBLAS's GEMM and the add + RMSNorm kernel (rows up to {_rmsnorm.MAX_N}) run"}  # fmt: skip
    if not _norm_launchable(t, hidden):
        return {"fused": f"the norm epilogue does not launch on {t.device} in {t.dtype} (see _triton.fits)"}
    return {}


def _norm_prune(configs, named_args, **_):
    return configs if _norm_launchable(named_args["A"], named_args["N"]) else []


def _norm_autotuned(do_bench=None):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bm, bk, w, st in NORM_CONFIGS]  # fmt: skip
    tuned = triton.autotune(configs, key=["M", "N", "K"], prune_configs_by={"early_config_prune": _norm_prune},
                            do_bench=do_bench)(_down_add_rmsnorm_fwd)  # fmt: skip
    return tune.shared_autotuner(tuned)


_NORM = _down_add_rmsnorm_fwd if interpreting() else _norm_autotuned()


def _down_norm(act, w_down, h, eps: float, keep: bool, weight=None):
    """(out, the rounded sum h + act @ W_down^T if keep else an empty tensor, rstd [M, 1] fp32);
    out times `weight` [N] (any float dtype, applied in fp32) where given."""
    (M, K), N = act.shape, w_down.shape[0]  # noqa: N806
    out = torch.empty_like(h)
    total = torch.empty_like(h) if keep else h.new_empty(0)
    rstd = torch.empty(M, 1, dtype=torch.float32, device=h.device)
    w = weight.contiguous() if weight is not None else h
    args = (act, w_down, h, w, out, total, rstd, M, N, K, eps)
    block_n = max(16, next_pow2(N))
    config = NORM_FIXED_CONFIG or (NORM_INTERPRETER_CONFIG if _NORM is _down_add_rmsnorm_fwd else None)
    if config is not None:
        bm, bk, warps, stages = config
        launch(_down_add_rmsnorm_fwd, (triton.cdiv(M, bm),), *args, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=bk,
               STORE_SUM=keep, HAS_W=weight is not None, PREC=precision(h), num_warps=warps,
               num_stages=stages)  # fmt: skip
    else:
        launch(_NORM, lambda c: (triton.cdiv(M, c["BLOCK_M"]),), *args, BLOCK_N=block_n, STORE_SUM=keep,
               HAS_W=weight is not None, PREC=precision(h))  # fmt: skip
    return out, total, rstd


@torch.library.custom_op("trm::swiglu_mlp_rmsnorm", mutates_args=())
def swiglu_mlp_rmsnorm_fwd(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float,
                           weight: torch.Tensor | None = None, activation: str = "swiglu",
                           w_up: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    h = h.contiguous()
    act, _ = _forward(h, w_gate_up, False, activation, w_up)
    return _down_norm(act, w_down.contiguous(), h, eps, keep=False, weight=weight)[0]


@swiglu_mlp_rmsnorm_fwd.register_fake
def _(h, w_gate_up, w_down, eps, weight=None, activation="swiglu", w_up=None):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


Quad = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("trm::swiglu_mlp_rmsnorm_train", mutates_args=())
def swiglu_mlp_rmsnorm_train(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float,
                             weight: torch.Tensor | None = None, activation: str = "swiglu",
                             w_up: torch.Tensor | None = None) -> Quad:  # fmt: skip
    """(out, gate|up, the rounded pre-norm sum, rstd): the last three for backward."""
    h = h.contiguous()
    act, gate_up = _forward(h, w_gate_up, True, activation, w_up)
    out, total, rstd = _down_norm(act, w_down.contiguous(), h, eps, keep=True, weight=weight)
    return out, gate_up, total, rstd


@swiglu_mlp_rmsnorm_train.register_fake
def _(h, w_gate_up, w_down, eps, weight=None, activation="swiglu", w_up=None):
    rows = h.shape[0]
    like = functools.partial(torch.empty_like, h, memory_format=torch.contiguous_format)
    return like(), h.new_empty(rows, _kept_width(w_gate_up, w_up)), like(), h.new_empty(rows, 1, dtype=torch.float32)


def _norm_setup(ctx, inputs, output):
    h, w_gate_up, w_down, _, weight, activation, w_up = inputs
    _, gate_up, total, rstd = output
    ctx.save_for_backward(h, w_gate_up, w_down, weight, gate_up, total, rstd, w_up)
    ctx.activation = activation
    ctx.mark_non_differentiable(gate_up, total, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs backward ignores


def _needs(ctx, i: int) -> bool:
    """Whether input i needs a gradient (an optional input left at its default is not counted)."""
    return i < len(ctx.needs_input_grad) and ctx.needs_input_grad[i]


def _norm_weight_grad(dw: torch.Tensor, weight: torch.Tensor | None, ctx, i: int) -> torch.Tensor | None:
    """The norm weight's gradient, summed over the rows in fp32 by the norm's backward kernel
    and rounded once to the weight's dtype (None where none is wanted)."""
    return dw.to(weight.dtype) if weight is not None and _needs(ctx, i) else None


def _norm_backward(ctx, dout, *_):
    if dout is None:  # the output is unused
        return None, None, None, None, None, None, None
    h, w_gate_up, w_down, weight, gate_up, total, rstd, w_up = ctx.saved_tensors
    dsum, dw = _rmsnorm.add_rmsnorm_bwd(dout, None, total, None, weight, rstd, 1, "triton")  # d(h + mix)
    dgu, act = swiglu_mlp_bwd(dsum, gate_up, w_down, ctx.activation)
    if w_up is None:
        dh = torch.addmm(dsum, dgu, w_gate_up) if ctx.needs_input_grad[0] else None  # the residual's and the MLP's
        dw_gate_up = torch.mm(dgu.t(), h) if ctx.needs_input_grad[1] else None
        dw_up = None
    else:
        dh, dw_gate_up, dw_up = _input_grads(dgu, h, w_gate_up, w_up, (_needs(ctx, 0), _needs(ctx, 1),
                                                                              _needs(ctx, 6)))  # fmt: skip
        dh = dh + dsum if dh is not None else None
    dw_down = torch.mm(dsum.t(), act) if ctx.needs_input_grad[2] else None
    return dh, dw_gate_up, dw_down, None, _norm_weight_grad(dw, weight, ctx, 4), None, dw_up


swiglu_mlp_rmsnorm_train.register_autograd(_norm_backward, setup_context=_norm_setup)


def sublayer_fused(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float,
                   weight: torch.Tensor | None = None, activation: str = "swiglu",
                   w_up: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Both GEMMs with their epilogues: SwiGLU (or `activation`) in the first, residual +
    RMSNorm (and the norm's weight) in the second."""
    flat = h.reshape(-1, h.shape[-1])
    extra = _extra(activation, w_up)
    if needs_grad(h, w_gate_up, w_down, weight, w_up):
        out = swiglu_mlp_rmsnorm_train(flat, w_gate_up, w_down, eps, weight, *extra)[0]
    else:
        out = swiglu_mlp_rmsnorm_fwd(flat, w_gate_up, w_down, eps, weight, *extra)
    return out.view(h.shape)


def sublayer_swiglu_fused(h, w_gate_up, w_down, eps, weight=None, activation="swiglu", w_up=None):
    """The SwiGLU epilogue only; cuBLAS's down GEMM and the add + RMSNorm kernel after it."""
    return _rmsnorm.add_rmsnorm(fused(h, w_gate_up, w_down, activation, w_up), h, -1, eps, weight)


def sublayer_composed(h, w_gate_up, w_down, eps, weight=None, activation="swiglu", w_up=None):
    """cuBLAS GEMMs, the SwiGLU kernel (or eager PyTorch's activation), the add + RMSNorm kernel."""
    return _rmsnorm.add_rmsnorm(composed(h, w_gate_up, w_down, activation, w_up), h, -1, eps, weight)


SUBLAYER_CANDIDATES = {"fused": sublayer_fused, "SwiGLU epilogue + add_rmsnorm": sublayer_swiglu_fused,
                       "cuBLAS + swiglu + add_rmsnorm": sublayer_composed}  # fmt: skip


def swiglu_mlp_rmsnorm(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float,
                       weight: torch.Tensor | None = None, activation: str = "swiglu",
                       w_up: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The fastest of SUBLAYER_CANDIDATES on this signature, as measured on its first call
    (trm_kernels.tune); without grad the one-kernel sub-layer is a candidate too (second, so
    that the two GEMM epilogues stay the default); without the norm epilogue where the hidden
    size exceeds MAX_NORM_HIDDEN or the device fits no config of it (the reason is in
    tune.report()). `weight` [D] (or None) multiplies the norm, in fp32; `activation` and `w_up`
    as swiglu_mlp's."""
    for name, t in (("h", h), ("w_gate_up", w_gate_up), ("w_down", w_down), ("w_up", w_up)):
        if t is not None:
            check_input(name, t)
    args = (h, w_gate_up, w_down, eps, weight, *_extra(activation, w_up))
    if not _has_tiles(h):
        composed_only = {"cuBLAS + swiglu + add_rmsnorm": sublayer_composed}
        skipped = {"fused": f"no config of the GEMM epilogues launches on {h.device} in {h.dtype}"}
        tune.choose("swiglu_mlp_rmsnorm", composed_only, args, skipped)
        return sublayer_composed(*args)
    candidates, skipped = SUBLAYER_CANDIDATES, _norm_skipped(h, h.shape[-1])
    if skipped:
        candidates = dict(list(SUBLAYER_CANDIDATES.items())[1:])
    if not needs_grad(h, w_gate_up, w_down, weight, w_up) and _one_kernel_launchable(h, h.shape[-1]):
        first, *rest = candidates.items()
        candidates = dict([first, ("one kernel", sublayer_one_kernel), *rest])
    choice = tune.choose("swiglu_mlp_rmsnorm", candidates, args, skipped)
    return candidates[choice](*args)


# ---- any linear layer followed by the residual add and RMSNorm: rmsnorm(h + a @ w^T), the
# same GEMM-with-norm-epilogue kernel (TRM's attention sub-layer: o_proj, then the post-norm) ----


@torch.library.custom_op("trm::linear_add_rmsnorm", mutates_args=())
def linear_add_rmsnorm_fwd(a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, eps: float,
                           weight: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    return _down_norm(a.contiguous(), w.contiguous(), h.contiguous(), eps, keep=False, weight=weight)[0]


@linear_add_rmsnorm_fwd.register_fake
def _(a, w, h, eps, weight=None):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("trm::linear_add_rmsnorm_train", mutates_args=())
def linear_add_rmsnorm_train(a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, eps: float,
                             weight: torch.Tensor | None = None) -> Triple:  # fmt: skip
    """(out, the rounded pre-norm sum, rstd [M, 1] fp32): the last two for backward."""
    return _down_norm(a.contiguous(), w.contiguous(), h.contiguous(), eps, keep=True, weight=weight)


@linear_add_rmsnorm_train.register_fake
def _(a, w, h, eps, weight=None):
    like = functools.partial(torch.empty_like, h, memory_format=torch.contiguous_format)
    return like(), like(), h.new_empty(h.shape[0], 1, dtype=torch.float32)


def _linear_norm_setup(ctx, inputs, output):
    a, w, _, _, weight = inputs
    _, total, rstd = output
    ctx.save_for_backward(a, w, weight, total, rstd)
    ctx.mark_non_differentiable(total, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs backward ignores


def _linear_norm_backward(ctx, dout, *_):
    """The norm's backward kernel (with the weight's gradient), then cuBLAS: da = dsum @ w,
    dw = dsum^T @ a; dh = dsum."""
    if dout is None:  # the output is unused
        return None, None, None, None, None
    a, w, weight, total, rstd = ctx.saved_tensors
    dsum, dweight = _rmsnorm.add_rmsnorm_bwd(dout, None, total, None, weight, rstd, 1, "triton")
    da = torch.mm(dsum, w) if ctx.needs_input_grad[0] else None
    dw = torch.mm(dsum.t(), a) if ctx.needs_input_grad[1] else None
    return da, dw, dsum if ctx.needs_input_grad[2] else None, None, _norm_weight_grad(dweight, weight, ctx, 4)


linear_add_rmsnorm_train.register_autograd(_linear_norm_backward, setup_context=_linear_norm_setup)


def linear_norm_fused(a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, eps: float,
                      weight: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The GEMM with the residual add and RMSNorm (and the norm's weight) in its epilogue (its
    training form with grad)."""
    flat_a, flat_h = a.reshape(-1, a.shape[-1]), h.reshape(-1, h.shape[-1])
    if needs_grad(a, w, h, weight):
        out = linear_add_rmsnorm_train(flat_a, w, flat_h, eps, weight)[0]
    else:
        out = linear_add_rmsnorm_fwd(flat_a, w, flat_h, eps, weight)
    return out.view(h.shape)


def linear_norm_composed(a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, eps: float,
                         weight: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """cuBLAS's GEMM, then the add + RMSNorm kernel."""
    return _rmsnorm.add_rmsnorm(F.linear(a, w), h, -1, eps, weight)


LINEAR_NORM_CANDIDATES = {"fused": linear_norm_fused, "cuBLAS + add_rmsnorm": linear_norm_composed}


def linear_add_rmsnorm(a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, eps: float,
                       weight: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The faster of the norm epilogue and cuBLAS + the add + RMSNorm kernel on this
    signature, as measured on its first call (trm_kernels.tune); the composition where the
    output row exceeds MAX_NORM_HIDDEN or the device cannot launch the epilogue kernel (the
    reason is in tune.report()). `weight` [N] (or None) multiplies the norm, in fp32."""
    for name, t in (("a", a), ("w", w), ("h", h)):
        check_input(name, t)
    args = (a, w, h, eps, weight)
    if skipped := _norm_skipped(h, h.shape[-1]):
        tune.choose("linear_add_rmsnorm", {"cuBLAS + add_rmsnorm": linear_norm_composed}, args, skipped)
        return linear_norm_composed(*args)
    choice = tune.choose("linear_add_rmsnorm", LINEAR_NORM_CANDIDATES, args)
    return LINEAR_NORM_CANDIDATES[choice](*args)


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
                                  eps: float, weight: torch.Tensor | None = None, activation: str = "swiglu",
                                  w_up: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """rmsnorm(h + swiglu_mlp(h)) [* weight] for 2-D h [M, N <= 512], no grad: one kernel (the
    activation never written)."""
    h, w_down = h.contiguous(), w_down.contiguous()
    w_gate, up, _ = _weights(w_gate_up, w_up, activation)
    w = weight.contiguous() if weight is not None else h
    (M, N), inter = h.shape, w_down.shape[1]  # noqa: N806
    out = torch.empty_like(h)
    interpreted = interpreting()
    bm, bi, bk, warps, stages = ONE_KERNEL_INTERPRETER_CONFIG if interpreted else ONE_KERNEL_CONFIG
    launch(_mlp_add_rmsnorm_fwd, (triton.cdiv(M, bm),), h, w_gate, up, w_down, w, out, M, N, inter, eps,
           BLOCK_M=bm, BLOCK_N=max(16, next_pow2(N)), BLOCK_I=bi, BLOCK_K=bk, HAS_W=weight is not None,
           ACTIVATION=activation, PREC=precision(h), num_warps=warps, num_stages=stages)  # fmt: skip
    return out


@swiglu_mlp_rmsnorm_one_kernel.register_fake
def _(h, w_gate_up, w_down, eps, weight=None, activation="swiglu", w_up=None):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def sublayer_one_kernel(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float,
                        weight: torch.Tensor | None = None, activation: str = "swiglu",
                        w_up: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The whole sub-layer as one kernel (no grad only)."""
    flat = h.reshape(-1, h.shape[-1])
    extra = _extra(activation, w_up)
    return swiglu_mlp_rmsnorm_one_kernel(flat, w_gate_up, w_down, eps, weight, *extra).view(h.shape)
