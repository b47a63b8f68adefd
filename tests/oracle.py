"""The kernel tests' oracle: the package's tolerance rule (trm_kernels.verify, which the parity
guard applies at run time too) as an assertion, and OpLog, a record of dispatched ops.

The fused result's error against a float64 oracle may be at most 2x the error the
reference op makes in the same dtype, plus two units of rounding of the output dtype: a
kernel's handful of roundings per element (exp, divide, multiply) is ~1-2 ulps, while on
a tiny tensor the reference can happen to land far closer. Error is the relative norm
||out - oracle|| / ||oracle||: at the ulp level a max-abs error mostly measures which
element got unlucky in a reduction order, the norm what the op computes.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from trm_kernels.verify import outputs, run_op, tolerance_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 only on a GPU: the interpreter's bf16 conversions truncate instead of rounding
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.fixture
def on_device():
    """New tensors of a kernel test go to DEVICE (import it with ``pytestmark`` or use it by name)."""
    with torch.device(DEVICE):
        yield


def rope_partner(t: torch.Tensor, rope: str) -> torch.Tensor:
    """RoPE's partner of each column, written out for the tests' float64 oracles: the pair
    (a, b) turns to (a cos - b sin, b cos + a sin) as ``t * cos + rope_partner(t) * sin``."""
    d = t.shape[-1]
    if rope == "interleaved":
        return torch.stack((-t[..., 1::2], t[..., 0::2]), -1).flatten(-2)
    return torch.cat((-t[..., d // 2 :], t[..., : d // 2]), -1)


def check(fused: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor, what: str) -> None:
    problem = tolerance_problem(fused, ref, oracle, what)
    assert problem is None, problem


def compare(op_triton, op_ref, inputs, what):
    out_f, grads_f = run_op(op_triton, inputs)
    out_r, grads_r = run_op(op_ref, inputs)
    out_o, grads_o = run_op(op_ref, [t.double() if t.is_floating_point() else t for t in inputs])
    for i, (f, r, o) in enumerate(zip(outputs(out_f), outputs(out_r), outputs(out_o), strict=True)):
        check(f, r, o, f"{what} forward" + (f" output {i}" if i else ""))
    for i, (f, r, o) in enumerate(zip(grads_f, grads_r, grads_o, strict=True)):
        check(f, r, o, f"{what} grad {i}")


class OpLog(TorchDispatchMode):
    """Records the ops (overload packets, aten and trm) dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.ops: list = []
        self.calls: list = []  # (overload packet, args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket)
        self.calls.append((func.overloadpacket, args))
        return func(*args, **(kwargs or {}))

    def count(self, *packets) -> int:
        return sum(op in packets for op in self.ops)
