"""The sandwich norm (trm_kernels.sandwich_rmsnorm): the Triton kernels (under the interpreter on
CPU) against the reference's two add_rmsnorm calls and float64, forward and every gradient; the
custom ops' registration; the module; the argument checks."""

import pytest
import torch
import trm_kernels as K
from oracle import DEVICE, DTYPES, OpLog, compare, on_device  # noqa: F401  (on_device: a fixture)
from trm_kernels import reference as R

pytestmark = [
    pytest.mark.skipif("triton" not in K.available("sandwich_rmsnorm"), reason="triton is not installed"),
    pytest.mark.usefixtures("on_device"),
]


def _inputs(rows: tuple[int, ...], n: int, dtype, residual_dtype=None, weight_dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, residual = torch.randn(*rows, n, generator=gen), 3 * torch.randn(*rows, n, generator=gen)
    weight, next_weight = (1 + 0.5 * torch.randn(n, generator=gen) for _ in range(2))
    return [x.to(DEVICE, dtype), residual.to(DEVICE, residual_dtype or dtype), weight.to(DEVICE, weight_dtype),
            next_weight.to(DEVICE, weight_dtype)]  # fmt: skip


def _fused(eps=1e-6):
    return lambda x, r, w, w2: K.sandwich_rmsnorm(x, r, w, w2, eps, backend="triton")


def _reference(eps=1e-6):
    return lambda x, r, w, w2: R.sandwich_rmsnorm(x, r, w, w2, eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n", [((1,), 16), ((5,), 40), ((3, 7), 33), ((2, 3), 512), ((3,), 2048), ((1,), 100),
                                     ((7,), 3), ((), 24), ((3,), 5280), ((2,), 8192)])  # fmt: skip
def test_forward_and_every_gradient_against_the_reference_and_float64(dtype, rows, n):
    """Both outputs and the gradients of x, residual, weight and next_weight; odd row counts,
    widths not a power of two (Huginn's 5280 too), up to the kernel's 8192, a 1-D input."""
    compare(_fused(), _reference(), _inputs(rows, n, dtype), f"sandwich_rmsnorm{rows} N={n}")


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_a_half_branch_on_an_fp32_stream_and_half_weights(dtype):
    """x in half, residual (the stream) fp32: the sum and both outputs in fp32; weights in x's dtype."""
    compare(_fused(), _reference(), _inputs((5,), 72, dtype, torch.float32, dtype), "sandwich_rmsnorm mixed")
    stream, following = _fused()(*_inputs((5,), 72, dtype, torch.float32, dtype))
    assert stream.dtype == following.dtype == torch.float32


def test_it_is_what_two_add_rmsnorm_calls_compute():
    """The stream equals the triton add_rmsnorm's bit for bit (the same operations in the same
    order); the next input, the norm of that rounded stream."""
    x, r, w, w2 = _inputs((9,), 96, torch.float16)
    stream, following = _fused(1e-5)(x, r, w, w2)
    s = K.add_rmsnorm(x, r, weight=w, backend="triton")
    assert torch.equal(stream, s)
    torch.testing.assert_close(following, K.add_rmsnorm(s, weight=w2, backend="triton"), atol=1e-3, rtol=1e-3)


def test_one_kernel_forward_one_backward_and_what_backward_keeps():
    x, r, w, w2 = (t.requires_grad_() for t in _inputs((6,), 40, torch.float32))
    with OpLog() as log:
        stream, following = _fused()(x, r, w, w2)
        (stream.sum() + (following * 2).sum()).backward()
    ops = torch.ops.trm
    assert log.count(ops.sandwich_rmsnorm) == 1 and log.count(ops.sandwich_rmsnorm_backward) == 1
    assert log.count(ops.add_rmsnorm, ops.add_rmsnorm_backward) == 0
    assert all(t.grad is not None for t in (x, r, w, w2))
    with OpLog() as log:  # only one output used: the other's gradient is zeros, one backward still
        _fused()(x, r, w, w2)[1].sum().backward()
    assert log.count(ops.sandwich_rmsnorm_backward) == 1


def test_opcheck_and_compile():
    x, r, w, w2 = _inputs((6,), 24, torch.float32)
    torch.library.opcheck(torch.ops.trm.sandwich_rmsnorm, (x, r, w, w2, 1e-6))
    leaves = [t.clone().requires_grad_() for t in (x, r, w, w2)]
    torch.library.opcheck(torch.ops.trm.sandwich_rmsnorm, (*leaves, 1e-6))
    fn = torch.compile(_fused(), fullgraph=True, backend="aot_eager")
    stream, following = fn(*leaves)
    for got, want in zip((stream, following), _reference()(x, r, w, w2), strict=True):
        torch.testing.assert_close(got, want)
    (stream.sum() + following.sum()).backward()
    assert all(t.grad is not None for t in leaves)


def test_eps_reaches_the_kernel():
    x, r, w, w2 = _inputs((3,), 16, torch.float32)
    for eps in (1e-6, 0.5):
        for got, want in zip(_fused(eps)(x, r, w, w2), _reference(eps)(x, r, w, w2), strict=True):
            torch.testing.assert_close(got, want)


def test_auto_takes_rows_up_to_8192_and_runs_the_reference_beyond():
    from trm_kernels import sandwich

    x, r, w, w2 = _inputs((2,), 8, torch.float32)
    assert sandwich.supports(x, r, w, w2, 1e-5)
    wide = torch.empty(1, sandwich.MAX_N + 1)
    assert not sandwich.supports(wide, wide, None, None, 1e-5)
    with pytest.raises(ValueError, match="sandwich_rmsnorm: rows of 8193 elements"):
        sandwich._grid(wide.shape)
    x, r, w, w2 = _inputs((2,), 8193, torch.float32)
    with OpLog() as log:
        stream, _ = K.sandwich_rmsnorm(x, r, w, w2)
    assert log.count(torch.ops.trm.sandwich_rmsnorm) == 0
    torch.testing.assert_close(stream, R.sandwich_rmsnorm(x, r, w, w2)[0])


def test_the_module():
    norm = K.nn.SandwichRMSNorm(40, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5)
        norm.next_weight.normal_(1, 0.5)
    x, r, _, _ = _inputs((3, 5), 40, torch.float32)
    with K.use_backend("triton"):
        stream, following = norm(x, r)
    want = R.sandwich_rmsnorm(x, r, norm.weight, norm.next_weight, 1e-6)
    torch.testing.assert_close(stream, want[0])
    torch.testing.assert_close(following, want[1])
    assert "40, eps=1e-06" in repr(norm)


def test_arguments_are_named():
    x, r, w, w2 = _inputs((4,), 8, torch.float32)
    with pytest.raises(ValueError, match=r"residual has shape \(3, 8\) but x has shape \(4, 8\)"):
        K.sandwich_rmsnorm(x, r[:3], w, w2)
    with pytest.raises(ValueError, match=r"next_weight must have shape \(8,\) = x.shape\[-1\], got \(4,\)"):
        K.sandwich_rmsnorm(x, r, w, w2[:4])
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got NoneType"):
        K.sandwich_rmsnorm(x, r, None, w2)
    with pytest.raises(ValueError, match="eps must be a number >= 0, got -1"):
        K.sandwich_rmsnorm(x, r, w, w2, eps=-1)
    with pytest.raises(TypeError, match="x must be float64/float32/float16/bfloat16"):
        K.sandwich_rmsnorm(x.int(), r, w, w2)
