"""The whole ``mlp_t`` sub-layer in one kernel, where no gradient is needed (Triton).

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

Only the forward exists: with grad the composed ops run, which keep what their backward
needs (``trm_kernels.token_mlp_rmsnorm`` chooses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from . import rmsnorm as _rmsnorm
from . import swiglu as _swiglu
from ._triton import check_input, interpreting, next_pow2

MAX_SEQ = 256  # the whole sequence of a tile is held in registers


@triton.jit
def _token_mlp_rmsnorm_fwd(
    H, WGU, WD, OUT, B, S, D, I_PAD, eps,  # B only keys the autotuner: the best tile differs at batch 1
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, PREC: tl.constexpr,
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


# (BLOCK_D, BLOCK_I, num_warps) tried by the autotuner on a GPU, per sequence tile. All of
# them compile for sm_90 with wgmma and without spills (trm_benchmarks.ptx); registers, shared
# memory and so CTAs per SM differ, and which is fastest is measured, not guessed. The
# interpreter runs the first; FIXED_CONFIG, where set, runs everywhere (tests check each).
CONFIGS = {
    128: [(128, 64, 8), (128, 32, 8), (64, 64, 8), (64, 32, 4)],
    256: [(64, 32, 8)],
}
I_ALIGN = 64  # the intermediate axis is padded to a multiple of every BLOCK_I
FIXED_CONFIG: tuple[int, int, int] | None = None


def _block_s(seq: int) -> int:
    return max(16, next_pow2(seq))


def _tiles(seq: int) -> list[tuple[int, int, int]]:
    return CONFIGS[max(128, _block_s(seq))]


def _prune(configs, named_args, **_):
    """The configs built for this sequence's tile (see _autotuned)."""
    block_s = _block_s(named_args["S"])
    return [c for c in configs if c.kwargs["BLOCK_S"] == block_s]


def _autotuned(do_bench=None):
    """The kernel behind Triton's autotuner (`do_bench`: the timing function, for tests)."""
    configs = [
        triton.Config({"BLOCK_S": bs, "BLOCK_D": bd, "BLOCK_I": bi}, num_warps=w, num_stages=2)
        for bs in (16, 32, 64, 128, 256)
        for bd, bi, w in CONFIGS[max(128, bs)]
    ]
    prune = {"early_config_prune": _prune}
    return triton.autotune(configs, key=["B", "S", "D", "I_PAD"], prune_configs_by=prune, do_bench=do_bench)(
        _token_mlp_rmsnorm_fwd
    )


_KERNEL = _token_mlp_rmsnorm_fwd if interpreting() else _autotuned()


def padded_weights(w_gate_up: torch.Tensor, w_down: torch.Tensor, block_s: int, i_align: int):
    """W_gate_up as [2, I_pad, BLOCK_S] and W_down as [BLOCK_S, I_pad], zero-padded."""
    two_i, seq = w_gate_up.shape
    inter = two_i // 2
    i_pad = triton.cdiv(inter, i_align) * i_align
    wgu = F.pad(w_gate_up.reshape(2, inter, seq), (0, block_s - seq, 0, i_pad - inter))
    wd = F.pad(w_down, (0, i_pad - inter, 0, block_s - seq))
    return wgu.contiguous(), wd.contiguous(), i_pad


@torch.library.custom_op("trm::token_mlp_rmsnorm", mutates_args=())
def token_mlp_rmsnorm_fwd(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> torch.Tensor:
    batch, seq, hidden = h.shape
    if seq > MAX_SEQ:
        raise ValueError(f"token_mlp_rmsnorm: sequence length {seq} > {MAX_SEQ}, the most the fused kernel holds")
    block_s = _block_s(seq)
    wgu, wd, i_pad = padded_weights(w_gate_up, w_down, block_s, I_ALIGN)
    h = h.contiguous()
    out = torch.empty_like(h)
    prec = "ieee" if h.dtype == torch.float32 else "tf32"  # fp32 gets IEEE products, as torch.bmm
    args = (h, wgu, wd, out, batch, seq, hidden, i_pad, eps)
    if FIXED_CONFIG is not None or _KERNEL is _token_mlp_rmsnorm_fwd:  # one config, chosen here
        block_d, block_i, warps = FIXED_CONFIG or _tiles(seq)[0]
        _token_mlp_rmsnorm_fwd[(triton.cdiv(hidden, block_d), batch)](
            *args, BLOCK_S=block_s, BLOCK_D=block_d, BLOCK_I=block_i, PREC=prec, num_warps=warps, num_stages=2
        )
    else:
        _KERNEL[lambda meta: (triton.cdiv(hidden, meta["BLOCK_D"]), batch)](*args, PREC=prec)
    return out


@token_mlp_rmsnorm_fwd.register_fake
def _(h, w_gate_up, w_down, eps):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def token_mlp_rmsnorm(h: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float) -> torch.Tensor:
    """The fused kernel where no gradient is needed and the sequence fits a tile; the
    composition of the Triton SwiGLU and add + RMSNorm kernels otherwise."""
    for name, t in (("h", h), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_input(name, t)
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or w_gate_up.requires_grad or w_down.requires_grad)
    if needs_grad or h.shape[1] > MAX_SEQ:
        return reference.token_mlp_rmsnorm(
            h, w_gate_up, w_down, eps, swiglu=_swiglu.swiglu, add_rmsnorm=_rmsnorm.add_rmsnorm
        )
    return token_mlp_rmsnorm_fwd(h, w_gate_up, w_down, eps)
