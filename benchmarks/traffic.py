"""Activation traffic of one TRM supervision step, op by op, by the byte model; no GPU needed.

    python -m trm_benchmarks.traffic --config sudoku-mlp            # training step (forward, ACT loss, backward)
    python -m trm_benchmarks.traffic --config sudoku-mlp --eval     # evaluation step (no grad)

Every op the step dispatches is counted as reading its tensor inputs and writing its
outputs once (views move nothing); an op of several kernels whose intermediate crosses
memory (PARTS) is counted kernel by kernel. The step runs at batch 1 and 2 and the difference is
reported, so what is left is the traffic per batch element (weights, read once per call
whatever the batch, cancel). On CPU the Triton kernels run in the interpreter: set
TRITON_INTERPRET=1 (fp16 stands in for bf16, which it cannot run; the bytes are the same).
This says where the bytes go and what a fusion removes; it is not a timing.
"""

from __future__ import annotations

import argparse
import collections
import math

import torch
import trm_kernels as K
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trm.config import preset
from trm.losses import act_loss
from trm.model import TRM

UNTAGGED_VIEWS = {"aten._unsafe_view"}  # a view that is not tagged as one (func.is_view covers the rest)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements `t` addresses: a dimension of stride 0 (a broadcast, such
    as a weight expanded over the batch) is read once, not once per index."""
    return math.prod(n for n, stride in zip(t.shape, t.stride(), strict=True) if stride != 0) * t.element_size()


def nbytes(tree) -> int:
    return sum(tensor_bytes(t) for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


# Ops made of more than one kernel whose intermediate crosses memory: counted per kernel
# (parts(args, out) -> [(name, bytes, flops)]), not as one op reading its inputs once.


def _gate_up_weights(args, at: int) -> tuple:
    """The gate|up weight, and the up weight where the op was given two (args[at]: activation, w_up)."""
    return (args[1], args[at + 1]) if len(args) > at + 1 and args[at + 1] is not None else (args[1],)


def _gate_up_flops(args, at: int, rows: int, hidden: int, inter: int) -> int:
    """The gate|up GEMM's FLOPs: two [rows, hidden] @ [hidden, inter] products, one for relu2."""
    return (2 if len(args) > at and args[at] == "relu2" else 4) * rows * hidden * inter


def _swiglu_mlp_parts(args, out) -> list[tuple[str, int, int]]:
    """trm::swiglu_mlp(_train): the gate|up GEMM with SwiGLU in its epilogue (writing the
    activation, and gate|up for backward when training), then cuBLAS's down GEMM."""
    x, w_gate_up, w_down = args[:3]
    rows, hidden, inter = x.shape[0], x.shape[1], w_down.shape[1]
    act = rows * inter * x.element_size()
    kept = nbytes(out[1]) if isinstance(out, tuple | list) else 0
    y = out[0] if isinstance(out, tuple | list) else out
    up = ("trm.swiglu_mlp: gate|up GEMM + SwiGLU", nbytes((x, *_gate_up_weights(args, 3))) + act + kept,
          _gate_up_flops(args, 3, rows, hidden, inter))  # fmt: skip
    return [up, ("trm.swiglu_mlp: down GEMM (cuBLAS)", act + nbytes((w_down, y)), 2 * rows * inter * hidden)]


def _swiglu_mlp_rmsnorm_parts(args, out) -> list[tuple[str, int, int]]:
    """trm::swiglu_mlp_rmsnorm(_train): the gate|up GEMM with SwiGLU in its epilogue, then the
    down GEMM with the residual add and RMSNorm in its (reading h, writing the output, rstd
    and, when training, gate|up and the pre-norm sum)."""
    h, w_gate_up, w_down = args[:3]
    rows, hidden, inter = h.shape[0], h.shape[1], w_down.shape[1]
    act = rows * inter * h.element_size()
    training = isinstance(out, tuple | list)
    gate_up, rest = (nbytes(out[1]), nbytes((out[0], *out[2:]))) if training else (0, nbytes(out) + rows * 4)
    up = ("trm.swiglu_mlp: gate|up GEMM + SwiGLU", nbytes((h, *_gate_up_weights(args, 5))) + act + gate_up,
          _gate_up_flops(args, 5, rows, hidden, inter))  # fmt: skip
    down = ("trm.swiglu_mlp_rmsnorm: down GEMM + residual + RMSNorm", act + nbytes((w_down, h)) + rest,
            2 * rows * inter * hidden)  # fmt: skip
    return [up, down]


def _token_mlp_backward_parts(args, out) -> list[tuple[str, int, int]]:
    """trm::token_mlp_rmsnorm_backward, launch by launch: the norm's backward (writing dsum),
    the two zero-padded weight copies (fill + copy each), the dh kernel, the weight-gradient
    kernel writing its fp32 partial sums per slice, their sum, and the two rounding copies.
    FLOPs by what the kernels compute on the unpadded shapes: dh recomputes gate|up (4 I*S*D
    per batch element) and d(act) (2), then W_gate_up^T d(gate|up) (4); the weight gradients
    recompute the same (6) and add d(W_gate_up) (4) and d(W_down) (2)."""
    from trm_kernels import token_mlp

    dout, h, w_gate_up, w_down, total, rstd, need_dh, need_dweights = args
    batch, seq, hidden = h.shape
    inter, elt = w_down.shape[1], h.element_size()
    block_s = token_mlp._block_s(seq)  # the padded shapes the kernels run on
    i_pad = -(-inter // token_mlp.I_ALIGN) * token_mlp.I_ALIGN
    padded = (2 * i_pad * block_s * elt, block_s * i_pad * elt)
    dsum, product = nbytes(h), batch * seq * hidden * inter
    parts = [("trm.token_mlp_rmsnorm_backward: norm backward", nbytes((dout, total, rstd)) + dsum, 0)]
    for weight, size in zip((w_gate_up, w_down), padded, strict=True):
        parts += [("trm.token_mlp_rmsnorm_backward: weight padding", size, 0),
                  ("trm.token_mlp_rmsnorm_backward: weight padding", nbytes(weight) + size, 0)]  # fmt: skip
    if need_dh:
        parts.append(("trm.token_mlp_rmsnorm_backward: dh kernel", dsum + nbytes(h) + sum(padded) + nbytes(out[0]),
                      10 * product))  # fmt: skip
    if need_dweights:
        splits, _ = token_mlp.dw_splits(batch, seq, hidden)
        partial, summed = splits * 3 * i_pad * block_s * 4, 3 * i_pad * block_s * 4
        parts += [
            ("trm.token_mlp_rmsnorm_backward: weight-gradient kernel", dsum + nbytes(h) + sum(padded) + partial,
             12 * product),
            ("trm.token_mlp_rmsnorm_backward: weight-gradient sum", partial + summed, 0),
            ("trm.token_mlp_rmsnorm_backward: weight-gradient rounding", nbytes(out[1]) * (1 + 4 // elt), 0),
            ("trm.token_mlp_rmsnorm_backward: weight-gradient rounding", nbytes(out[2]) * (1 + 4 // elt), 0),
        ]  # fmt: skip
    return parts


PARTS = {
    "trm.token_mlp_rmsnorm_backward": _token_mlp_backward_parts,
    "trm.swiglu_mlp": _swiglu_mlp_parts,
    "trm.swiglu_mlp_train": _swiglu_mlp_parts,
    "trm.swiglu_mlp_rmsnorm": _swiglu_mlp_rmsnorm_parts,
    "trm.swiglu_mlp_rmsnorm_train": _swiglu_mlp_rmsnorm_parts,
}


class Traffic(TorchDispatchMode):
    """Bytes read plus written, per op name (views excluded)."""

    def __init__(self):
        super().__init__()
        self.bytes: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name in PARTS:  # its kernels one by one: their intermediates cross memory
            for part, moved, _ in PARTS[name](args, out):
                self.bytes[part] += moved
        elif not (func.is_view or name in UNTAGGED_VIEWS):
            self.bytes[name] += nbytes((args, kwargs)) + nbytes(out)
        return out


def step_traffic(model: TRM, batch_size: int, evaluate: bool, device: torch.device) -> collections.Counter[str]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    batch = {
        "inputs": torch.randint(1, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g),
        "labels": torch.randint(1, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g),
        "puzzle_identifiers": torch.zeros(batch_size, dtype=torch.long),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    model.train(not evaluate)
    carry = model.initial_carry(batch)
    with Traffic() as traffic:
        if evaluate:
            with torch.no_grad():
                model(carry, batch)
        else:
            carry, outputs = model(carry, batch)
            act_loss(outputs, carry)[0].backward()
    return traffic.bytes


def per_element(model: TRM, evaluate: bool, device: torch.device) -> dict[str, int]:
    one, two = step_traffic(model, 1, evaluate, device), step_traffic(model, 2, evaluate, device)
    diff = {name: two[name] - one[name] for name in two}
    return dict(sorted(((k, v) for k, v in diff.items() if v > 0), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sudoku-mlp", help="a preset name (trm.config)")
    parser.add_argument("--eval", action="store_true", help="the no-grad evaluation step instead of training")
    parser.add_argument("--backend", default="triton", choices=("reference", "triton"))
    parser.add_argument("--dtype", default=None, help="forward dtype (default: bfloat16 on CUDA, float16 on CPU)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset(args.config).model
    cfg.forward_dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float16")
    torch.manual_seed(0)
    model = TRM(cfg).to(device)
    with K.use_backend(args.backend):
        table = per_element(model, args.eval, device)
    total = sum(table.values())
    what = "evaluation" if args.eval else "training"
    print(f"{args.config}, {what} step, {args.backend}, {cfg.forward_dtype}: {total / 1e6:.1f} MB per batch element")
    for name, nbytes in table.items():
        print(f"  {name:32s} {nbytes / 1e6:9.2f} MB {100 * nbytes / total:5.1f}%")


if __name__ == "__main__":
    main()
