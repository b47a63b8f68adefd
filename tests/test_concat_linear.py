"""A linear layer on a concatenation without making it (trm_kernels.concat_linear, a recurrent-depth
LM's adapter): the Triton GEMM (under the interpreter on CPU) against the reference and float64,
what runs and what backward keeps, the custom op's registration, the measured choice between
the fused GEMM and torch.cat + cuBLAS, the argument checks, and the ConcatLinear module."""

import pytest
import torch
import torch.nn.functional as F
import trm_kernels as K
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import DEVICE, DTYPES, OpLog, compare, on_device  # noqa: F401  (on_device: a fixture)
from torch import nn
from trm_kernels import reference as R
from trm_kernels import tune, verify

# the op's module (trm_kernels.concat_linear is the public op, as trm_kernels.inject is)
concat_linear = pytest.importorskip("trm_kernels.concat_linear")

pytestmark = [
    pytest.mark.skipif("triton" not in K.available("concat_linear"), reason="triton is not installed"),
    pytest.mark.usefixtures("on_device", "fresh_choices"),
]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Small tiles under the interpreter, so that the odd sizes here cross tile edges in M, N
    and both K loops (the package runs wide ones there, which cost fewer interpreted operations)."""
    monkeypatch.setattr(concat_linear, "INTERPRETER_CONFIG", (32, 32, 16, 4, 1))


def _inputs(rows: tuple[int, ...], kx: int, ke: int, n: int, dtype, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, e = torch.randn(*rows, kx, generator=gen), torch.randn(*rows, ke, generator=gen)
    weight = torch.randn(n, kx + ke, generator=gen) * (kx + ke) ** -0.5
    tensors = [x, e, weight] + ([torch.randn(n, generator=gen)] if bias else [])
    return [t.to(DEVICE, dtype) for t in tensors]


def _fused(x, e, weight, bias=None):
    return K.concat_linear(x, e, weight, bias, backend="triton")


def _check(rows, kx, ke, n, dtype, bias=True, seed=0):
    inputs = _inputs(rows, kx, ke, n, dtype, bias, seed)
    compare(_fused, R.concat_linear, inputs, f"concat_linear{rows} Kx={kx} Ke={ke} N={n} bias={bias}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "rows, kx, ke, n",
    [((1,), 16, 16, 16), ((5,), 21, 13, 37), ((2, 9), 40, 24, 33), ((3, 7), 33, 17, 20), ((70,), 5, 70, 3),
     ((2, 3, 4), 48, 7, 64)],
)  # fmt: skip
def test_forward_and_every_gradient_against_the_reference_and_float64(dtype, bias, rows, kx, ke, n):
    """Kx, Ke and N multiples of 16, of the 16-wide K tile and of neither; 2-D to 4-D inputs."""
    _check(rows, kx, ke, n, dtype, bias)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 70),
    kx=st.integers(1, 50),
    ke=st.integers(1, 50),
    n=st.integers(1, 50),
    bias=st.booleans(),
    half=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_on_random_shapes(rows, kx, ke, n, bias, half, seed):
    _check((rows,), kx, ke, n, DTYPES[1] if half else DTYPES[0], bias, seed)


@pytest.mark.parametrize("config", concat_linear.CONFIGS)
def test_every_autotuner_config(monkeypatch, config):
    """Each GPU tile, with sizes past it: M, N one tile and a bit, Kx ending inside a K tile."""
    monkeypatch.setattr(concat_linear, "FIXED_CONFIG", config)
    bm, bn, bk = config[:3]
    for dtype in DTYPES[1:]:  # fp16, and bf16 on a GPU
        _check((bm + 3,), bk + 5, bk // 2 + 3, bn + 7, dtype)


def _saved_bytes(fn, inputs) -> int:
    """Bytes of the tensors autograd keeps for backward (each storage once, leaves excluded)."""
    leaves = {t.untyped_storage().data_ptr() for t in inputs}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in leaves:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(kept.values())


def test_no_concatenation_is_made_or_kept():
    """Forward: the one op, no aten.cat; backward: four GEMMs (dx, de, dW's two blocks) and the
    bias's row sum, no cat either. Autograd keeps only the inputs themselves, where the
    composition keeps the [M, Kx + Ke] concatenation."""
    inputs = [t.requires_grad_() for t in _inputs((4, 3), 24, 8, 20, torch.float32)]
    with OpLog() as log:
        _fused(*inputs).sum().backward()
    assert log.count(torch.ops.trm.concat_linear) == 1 and log.count(torch.ops.aten.cat) == 0
    assert log.count(torch.ops.aten.mm) == 4 and log.count(torch.ops.aten.sum) == 2  # the loss's and db's
    assert _saved_bytes(_fused, inputs) == 0
    assert _saved_bytes(concat_linear.composed, inputs) == 12 * 32 * 4


def test_the_weight_gradient_is_one_buffer_and_gradients_only_where_asked():
    x, e, weight, bias = _inputs((6,), 24, 8, 20, torch.float32)
    weight.requires_grad_()
    _fused(x, e, weight, bias).sum().backward()
    assert weight.grad.is_contiguous() and weight.grad.shape == weight.shape
    x.requires_grad_()
    (dx,) = torch.autograd.grad(_fused(x, e, weight, bias).sum(), (x,))
    torch.testing.assert_close(dx, weight.detach()[:, :24].sum(0).expand(6, 24))


def test_opcheck():
    x, e, weight, bias = _inputs((6,), 24, 8, 20, torch.float32)
    torch.library.opcheck(torch.ops.trm.concat_linear, (x, e, weight, bias))
    torch.library.opcheck(torch.ops.trm.concat_linear, (x, e, weight, None))
    grads = [t.clone().requires_grad_() for t in (x, e, weight, bias)]
    torch.library.opcheck(torch.ops.trm.concat_linear, tuple(grads))
    torch.library.opcheck(torch.ops.trm.concat_linear, (*grads[:3], None))


def test_compiles_without_graph_breaks():
    fn = torch.compile(_fused, fullgraph=True, backend="aot_eager")
    inputs = _inputs((2, 5), 24, 8, 20, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fn(*inputs), R.concat_linear(*inputs))
    leaves = [t.clone().requires_grad_() for t in inputs]
    fn(*leaves).sum().backward()
    refs = [t.clone().requires_grad_() for t in inputs]
    R.concat_linear(*refs).sum().backward()
    for got, want in zip(leaves, refs, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_the_parity_guard_checks_it():
    """verify's tables know the op: x and e sliced by rows, weight and bias checked as weights."""
    inputs = [t.requires_grad_() for t in _inputs((9,), 24, 8, 20, torch.float32)]
    verify.reset()
    with verify.use_verify("always"):
        out = verify.guarded("concat_linear", "triton", _fused, R.concat_linear, tuple(inputs))
    torch.testing.assert_close(out, R.concat_linear(*inputs))
    assert verify.verified and all(r.ok for r in verify.verified.values())
    verify.reset()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "e": a["e"][:-1]}, ValueError, r"e has shape \(3, 8\) but must have x's leading shape \(4,\)"),
        (lambda a: {**a, "weight": a["weight"][:, :-1]}, ValueError,
         r"weight must be \[out_features, Kx \+ Ke = 24 \+ 8 = 32\], got shape \(20, 31\)"),
        (lambda a: {**a, "weight": a["weight"][0]}, ValueError, r"weight must be \[out_features"),
        (lambda a: {**a, "bias": a["bias"][:-1]}, ValueError, r"bias must have shape \(20,\)"),
        (lambda a: {**a, "e": a["e"].half()}, TypeError, "e has dtype torch.float16 but x has dtype torch.float32"),
        (lambda a: {**a, "weight": a["weight"].double()}, TypeError, "weight has dtype torch.float64"),
        (lambda a: {**a, "bias": a["bias"].half()}, TypeError, "bias has dtype torch.float16"),
        (lambda a: {**a, "e": a["e"].to("meta")}, ValueError, "e is on meta but x is on"),
        (lambda a: {**a, "bias": a["bias"].to("meta")}, ValueError, "bias is on meta but x is on"),
        (lambda a: {**a, "x": [1.0]}, TypeError, "x must be a torch.Tensor"),
        (lambda a: {**a, "e": a["e"].long()}, TypeError, "e must be float64/float32/float16/bfloat16"),
        (lambda a: {**a, "x": a["x"][:0], "e": a["e"][:0]}, ValueError, "x is empty"),
        (lambda a: {**a, "x": a["x"][0, 0], "e": a["e"][0, 0]}, ValueError, "x must be \\[..., features\\]"),
    ],
)  # fmt: skip
def test_arguments_are_named(change, error, match):
    x, e, weight, bias = _inputs((4,), 24, 8, 20, torch.float32)
    args = change({"x": x, "e": e, "weight": weight, "bias": bias})
    for backend in ("reference", "triton"):
        with pytest.raises(error, match=match):
            K.concat_linear(**args, backend=backend)


def test_the_triton_backend_refuses_float64_by_name():
    x, e, weight, bias = _inputs((4,), 24, 8, 20, torch.float64)
    with pytest.raises(TypeError, match="x is torch.float64: the triton backend"):
        _fused(x, e, weight, bias)
    out = K.concat_linear(x, e, weight, bias, backend="reference")
    torch.testing.assert_close(out, R.concat_linear(x, e, weight, bias))


class _Timer:
    """Stand-in for do_bench: runs the candidate once and reports the time given for it."""

    def __init__(self, times: dict[str, float]):
        self.times, self.calls = list(times.values()), 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return self.times[(self.calls - 1) % len(self.times)]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("faster", ["fused", "torch.cat + F.linear"])
def test_the_faster_candidate_is_timed_once_and_kept(monkeypatch, grad, faster):
    monkeypatch.setenv("TRM_TUNE", "on")
    times = {"fused": 1.0, "torch.cat + F.linear": 2.0}
    if faster != "fused":
        times = {"fused": 2.0, "torch.cat + F.linear": 1.0}
    timer = _Timer(times)
    tune.set_timer(timer)
    _, e, weight, bias = _inputs((6,), 24, 8, 20, torch.float32)
    for rows in (6, 6):
        x = _inputs((rows,), 24, 8, 20, torch.float32)[0].requires_grad_(grad)
        torch.testing.assert_close(_fused(x, e, weight, bias), R.concat_linear(x, e, weight, bias))
    assert timer.calls == 2  # one signature, two candidates
    (decision,) = tune.report()
    assert decision["choice"] == faster and decision["op"] == "concat_linear" and decision["times_ms"] == times
    with OpLog() as log:
        _fused(x, e, weight, bias)
    assert (log.count(torch.ops.trm.concat_linear) > 0) == (faster == "fused")
    assert (log.count(torch.ops.aten.cat) > 0) == (faster != "fused") and timer.calls == 2


def test_fp32_on_a_gpu_runs_the_composition(monkeypatch):
    """Planned as on an sm_89 GPU: fp32 takes torch.cat + cuBLAS (no tensor cores for IEEE
    products, see _triton.fits), fp16 the fused GEMM."""
    monkeypatch.setattr(concat_linear, "device_budget", lambda device: (89, 99 * 1024))
    monkeypatch.setattr(concat_linear, "_HAS_TILES", {})
    for dtype, fused in ((torch.float32, False), (torch.float16, True)):
        inputs = _inputs((6,), 24, 8, 20, dtype)
        with OpLog() as log:
            out = _fused(*inputs)
        assert (log.count(torch.ops.trm.concat_linear) == 1) == fused and (log.count(torch.ops.aten.cat) == 1) != fused
        torch.testing.assert_close(out, R.concat_linear(*inputs))


# ---- the module ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_module_is_an_nn_linear_on_the_concatenation(bias, backend):
    torch.manual_seed(0)
    module = K.nn.ConcatLinear(24, 8, 20, bias=bias, device=DEVICE)
    linear = nn.Linear(32, 20, bias=bias, device=DEVICE)
    assert set(module.state_dict()) == set(linear.state_dict()) == ({"weight", "bias"} if bias else {"weight"})
    linear.load_state_dict(module.state_dict())
    x, e = torch.randn(2, 5, 24), torch.randn(2, 5, 8)
    with K.use_backend(backend):
        torch.testing.assert_close(module(x, e), linear(torch.cat([x, e], -1)))
        module.load_state_dict(nn.Linear(32, 20, bias=bias, device=DEVICE).state_dict())
        linear.load_state_dict(module.state_dict())
        torch.testing.assert_close(module(x, e), linear(torch.cat([x, e], -1)))
    assert "in_x=24, in_e=8, out_features=20" in repr(module)


def test_the_module_trains_its_parameters_in_the_inputs_dtype():
    """fp32 parameters, fp16 inputs: the weight and bias are used in fp16 and their gradients
    come back to the fp32 parameters."""
    module = K.nn.ConcatLinear(24, 8, 20, device=DEVICE)
    x, e = torch.randn(3, 24, dtype=torch.float16), torch.randn(3, 8, dtype=torch.float16)
    out = module(x, e)
    assert out.dtype == torch.float16
    ref = F.linear(torch.cat([x, e], -1), module.weight.half(), module.bias.half())
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    out.float().sum().backward()
    assert module.weight.grad.dtype == torch.float32 and module.bias.grad.shape == (20,)
