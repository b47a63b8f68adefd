"""Stablemax and softmax cross-entropy with ignore-label (Triton), one pass over the logits.

The forward computes, per token, the loss and the gradient of the loss w.r.t. the logits
(stored in the logits' dtype). The backward scales that gradient by the upstream
per-token gradient, so the logits are read once in total. Everything is computed in
fp32. The reference computes stablemax in float64, and the two agree to fp32 precision;
the stablemax loss is returned in float64 as the reference's is (softmax in fp32).

stablemax: s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0); loss = log(sum_j s_j / s_y), computed as
log1p(sum_{j != y} s_j / s_y) so that small losses keep their relative precision;
d loss / d x_j = s'(x_j) / sum s - [j = y] s'(x_y) / s_y.
An out-of-range label (neither ignore_index nor in [0, V)) gives a NaN loss rather than a
silent wrong value: checking it on the host would cost a device synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import check_input, launch, next_pow2, takes

# A row of logits is one tile (held in registers): up to 8192 classes it compiles without
# spills on every architecture (trm_benchmarks.ptx compiles TRM's tile and the widest);
# larger vocabularies run the reference. Programs hold at most 2048 elements below that (the
# 4096-element [64, 64] and [32, 128] tiles spill), over 8 warps (with 4, TRM's [64, 16]
# stablemax tile spilled 4 B on sm_86/89; with 8 no tile of 16 to 8192 classes spills).
MAX_VOCAB = 8192
TILE_ELEMENTS = 2048


def tile(vocab: int) -> tuple[int, int, int]:
    """(BLOCK_R rows, BLOCK_V classes, num_warps) of the kernel's tile for `vocab` classes."""
    block_v = next_pow2(vocab)
    return max(1, min(64, TILE_ELEMENTS // block_v)), block_v, 8


def supports(logits: torch.Tensor, labels, ignore_index) -> bool:
    return takes(logits) and logits.shape[-1] <= MAX_VOCAB


@triton.jit
def _log1p(u):
    """log(1 + u) accurate for small u (Goldberg's trick; libdevice is not in the interpreter)."""
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _ce_fwd(
    LOGITS, LABELS, LOSS, DLOGITS, n_rows, V, ignore_index,
    STABLEMAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    v = tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (v[None, :] < V)
    offs = rows[:, None] * V + v[None, :]
    x = tl.load(LOGITS + offs, mask=mask, other=0.0).to(tl.float32)
    label = tl.load(LABELS + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)
    onehot = (v[None, :] == label[:, None]) & mask
    if STABLEMAX:
        neg = x < 0
        inv = 1.0 / (1.0 - tl.minimum(x, 0.0))
        s = tl.where(mask, tl.where(neg, inv, x + 1.0), 0.0)
        ds = tl.where(mask, tl.where(neg, inv * inv, 1.0), 0.0)
        total = tl.where(row_ok, tl.sum(s, axis=1), 1.0)  # padding rows: avoid 0 / 0
        s_y = tl.sum(tl.where(onehot, s, 0.0), axis=1)
        s_y = tl.where(valid & in_range, s_y, 1.0)  # ignored rows: a harmless stand-in, masked below
        others = tl.sum(tl.where(onehot, 0.0, s), axis=1)
        ds_y = tl.sum(tl.where(onehot, ds, 0.0), axis=1)
        loss = _log1p(others / s_y)  # = log(total / s_y) without cancelling when the loss is small
        # at the label, ds_y / total - ds_y / s_y written without the cancellation
        grad = tl.where(onehot, (-ds_y * others / (total * s_y))[:, None], ds / total[:, None])
    else:
        m = tl.where(row_ok, tl.max(tl.where(mask, x, float("-inf")), axis=1), 0.0)
        e = tl.where(mask, tl.exp(x - m[:, None]), 0.0)
        total = tl.where(row_ok, tl.sum(e, axis=1), 1.0)
        x_y = tl.sum(tl.where(onehot, x, 0.0), axis=1)
        others = tl.sum(tl.where(onehot, 0.0, e), axis=1)
        # label at the maximum: loss = log(1 + others) exactly, which may be tiny
        loss = tl.where(x_y == m, _log1p(others), tl.log(total) + m - x_y)
        grad = tl.where(onehot, (-others / total)[:, None], e / total[:, None])  # e_y / total - 1, uncancelled
    loss = tl.where(valid, tl.where(in_range, loss, float("nan")), 0.0)
    grad = tl.where(valid[:, None], grad, 0.0)
    tl.store(LOSS + rows, loss.to(LOSS.dtype.element_ty), mask=row_ok)
    tl.store(DLOGITS + offs, grad.to(DLOGITS.dtype.element_ty), mask=mask)


def _loss_dtype(stablemax: bool) -> torch.dtype:
    """The reference implementation's: stablemax in float64, softmax in fp32."""
    return torch.float64 if stablemax else torch.float32


@torch.library.custom_op("trm::cross_entropy", mutates_args=())
def cross_entropy_fwd(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, stablemax: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = logits.contiguous(), labels.contiguous()
    vocab = logits.shape[-1]
    loss = torch.empty(labels.shape, dtype=_loss_dtype(stablemax), device=logits.device)
    dlogits = torch.empty_like(logits)
    n_rows = labels.numel()
    if vocab > MAX_VOCAB:
        raise ValueError(f"cross_entropy: {vocab} classes; the triton kernel holds a row in registers, at most "
                         f"{MAX_VOCAB} (backend='reference' takes any)")  # fmt: skip
    block_r, block_v, warps = tile(vocab)
    launch(_ce_fwd, (triton.cdiv(n_rows, block_r),), logits, labels, loss, dlogits, n_rows, vocab, ignore_index,
           STABLEMAX=stablemax, BLOCK_R=block_r, BLOCK_V=block_v,
           num_warps=warps)  # fmt: skip
    return loss, dlogits


@cross_entropy_fwd.register_fake
def _(logits, labels, ignore_index, stablemax):
    loss = logits.new_empty(labels.shape, dtype=_loss_dtype(stablemax))
    return loss, torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs backward ignores


def _backward(ctx, dloss, _ddlogits):
    if dloss is None:  # the loss is unused
        return None, None, None, None
    (dlogits,) = ctx.saved_tensors
    return (dlogits * dloss.unsqueeze(-1)).to(dlogits.dtype), None, None, None


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup)


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    check_input("logits", logits)
    return cross_entropy_fwd(logits, labels, ignore_index, True)[0]


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    check_input("logits", logits)
    return cross_entropy_fwd(logits, labels, ignore_index, False)[0]
