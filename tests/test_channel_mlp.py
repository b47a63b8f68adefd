"""The channel MLP with SwiGLU inside the GEMMs (trm_kernels.swiglu_mlp): the Triton kernels
(under the interpreter on CPU) against the reference and float64, what backward keeps, the
custom ops' registration, and the measured choice between the fused kernels and cuBLAS."""

import pytest
import torch
import trm_kernels as K
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import DEVICE, DTYPES, OpLog, compare, on_device  # noqa: F401  (on_device: a fixture)
from trm_kernels import reference as R
from trm_kernels import tune, verify

pytestmark = [
    pytest.mark.skipif("triton" not in K.available("swiglu_mlp"), reason="triton is not installed"),
    pytest.mark.usefixtures("on_device", "fresh_choices"),
]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Small tiles under the interpreter, so that the odd sizes here cross tile edges (the
    package runs wide ones there, which cost fewer interpreted operations)."""
    from trm_kernels import channel_mlp

    monkeypatch.setattr(channel_mlp, "INTERPRETER_CONFIG", (32, 32, 32, 4, 1))
    monkeypatch.setattr(channel_mlp, "NORM_INTERPRETER_CONFIG", (16, 32, 4, 1))
    monkeypatch.setattr(channel_mlp, "ONE_KERNEL_INTERPRETER_CONFIG", (16, 16, 16, 4, 1))


@pytest.fixture
def tuning(monkeypatch):
    """Candidates timed (TRM_TUNE=on), by a stand-in timer the test sets."""
    monkeypatch.setenv("TRM_TUNE", "on")


def _inputs(rows: tuple[int, ...], hidden: int, inter: int, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, hidden, generator=gen)
    w_gate_up = torch.randn(2 * inter, hidden, generator=gen) * hidden**-0.5
    w_down = torch.randn(hidden, inter, generator=gen) * inter**-0.5
    return [t.to(DEVICE, dtype) for t in (x, w_gate_up, w_down)]


def _fused(*args):
    return K.swiglu_mlp(*args, backend="triton")


def _check(rows, hidden, inter, dtype, seed=0):
    compare(_fused, R.swiglu_mlp, _inputs(rows, hidden, inter, dtype, seed), f"swiglu_mlp{rows} D={hidden} I={inter}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows, hidden, inter",
    [((1,), 16, 16), ((5,), 40, 24), ((2, 97), 48, 40), ((70,), 96, 80), ((3, 7), 33, 17), ((1, 916), 24, 40)],
)
def test_forward_and_backward_against_the_reference_and_float64(dtype, rows, hidden, inter):
    _check(rows, hidden, inter, dtype)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 80),
    hidden=st.integers(1, 70),
    inter=st.integers(1, 70),
    half=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_on_random_shapes(rows, hidden, inter, half, seed):
    _check((rows,), hidden, inter, DTYPES[1] if half else DTYPES[0], seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_grad_it_equals_the_training_forward(dtype):
    """The no-grad kernel (no gate|up written) and the training one compute the same output."""
    inputs = _inputs((9,), 40, 24, dtype)
    with torch.no_grad():
        plain = _fused(*inputs)
    trained = _fused(inputs[0].requires_grad_(), *inputs[1:])
    assert torch.equal(plain, trained.detach())


def _configs():
    from trm_kernels import channel_mlp

    return channel_mlp.CONFIGS


@pytest.mark.parametrize("config", _configs())
def test_every_autotuner_config(monkeypatch, config):
    from trm_kernels import channel_mlp

    monkeypatch.setattr(channel_mlp, "FIXED_CONFIG", config)
    for dtype in DTYPES[1:]:  # fp16, and bf16 on a GPU
        _check((config[0] + 3,), config[2] + 5, config[1] + 7, dtype)


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


def test_backward_keeps_gate_up_but_not_the_activation():
    """The composition with the SwiGLU kernel keeps gate|up [M, 2I] and the activation [M, I]
    (eager PyTorch's also silu(gate)); the fused op only gate|up."""
    from trm_kernels import channel_mlp

    rows, hidden, inter = 12, 32, 24
    x, w_gate_up, w_down = (t.requires_grad_() for t in _inputs((rows,), hidden, inter, torch.float32))
    fused = _saved_bytes(_fused, (x, w_gate_up, w_down))
    composed = _saved_bytes(channel_mlp.composed, (x, w_gate_up, w_down))
    eager = _saved_bytes(R.swiglu_mlp, (x, w_gate_up, w_down))
    assert fused == rows * 2 * inter * 4
    assert composed - fused == rows * inter * 4 and eager - fused == 2 * rows * inter * 4


def test_kernels_launched_forward_and_backward():
    """Forward: the fused op (its GEMM kernel and cuBLAS's down GEMM inside); backward: the
    fused dgrad op and three GEMMs, no separate SwiGLU."""
    x, w_gate_up, w_down = (t.requires_grad_() for t in _inputs((6,), 16, 16, torch.float32))
    with OpLog() as log:
        _fused(x, w_gate_up, w_down).sum().backward()
    ops = torch.ops.trm
    assert log.count(ops.swiglu_mlp_train) == 1 and log.count(ops.swiglu_mlp_backward) == 1
    assert log.count(ops.swiglu, ops.swiglu_backward) == 0
    assert log.count(torch.ops.aten.mm) == 3


def test_opcheck():
    x, w_gate_up, w_down = _inputs((6,), 16, 8, torch.float32)
    torch.library.opcheck(torch.ops.trm.swiglu_mlp, (x, w_gate_up, w_down))
    torch.library.opcheck(torch.ops.trm.swiglu_mlp_train, (x.requires_grad_(), w_gate_up.requires_grad_(), w_down))
    torch.library.opcheck(torch.ops.trm.swiglu_mlp_backward, (torch.randn(6, 16), torch.randn(6, 16), w_down))


def test_compiles_without_graph_breaks():
    fn = torch.compile(_fused, fullgraph=True, backend="aot_eager")
    inputs = _inputs((2, 5), 16, 8, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fn(*inputs), R.swiglu_mlp(*inputs))
    x = inputs[0].clone().requires_grad_()
    fn(x, *inputs[1:]).sum().backward()
    x_ref = inputs[0].clone().requires_grad_()
    R.swiglu_mlp(x_ref, *inputs[1:]).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_arguments_are_named():
    x, w_gate_up, w_down = _inputs((4,), 16, 8, torch.float32)
    with pytest.raises(ValueError, match=r"w_gate_up must be \[2\*inter, hidden=16\]"):
        K.swiglu_mlp(x, w_gate_up[:, :8], w_down)
    with pytest.raises(ValueError, match=r"w_down must be \[hidden, inter\] = \(16, 8\)"):
        K.swiglu_mlp(x, w_gate_up, w_down.t())
    with pytest.raises(TypeError, match="w_down has dtype torch.float16 but x has dtype torch.float32"):
        K.swiglu_mlp(x, w_gate_up, w_down.half())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        K.swiglu_mlp([1.0], w_gate_up, w_down)


class _Timer:
    """Stand-in for do_bench: runs the candidate once and reports the time given for it."""

    def __init__(self, times: dict[str, float]):
        self.times, self.calls = list(times.values()), []

    def __call__(self, fn):
        fn()
        self.calls.append(len(self.calls))
        return self.times[(len(self.calls) - 1) % len(self.times)]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("faster", ["fused", "cuBLAS + swiglu"])
def test_the_faster_candidate_is_timed_once_and_kept(tuning, monkeypatch, grad, faster):
    """The first call of a signature times both candidates (forward and backward with grad),
    runs the faster and keeps it; the next call times nothing; another shape is timed again."""
    times = {"fused": 1.0, "cuBLAS + swiglu": 2.0} if faster == "fused" else {"fused": 2.0, "cuBLAS + swiglu": 1.0}
    timer = _Timer(times)
    tune.set_timer(timer)
    _, w_gate_up, w_down = _inputs((6,), 16, 8, torch.float32)
    for rows in (6, 6, 7):
        xs = _inputs((rows,), 16, 8, torch.float32)[0].requires_grad_(grad)
        torch.testing.assert_close(_fused(xs, w_gate_up, w_down), R.swiglu_mlp(xs, w_gate_up, w_down))
    assert len(timer.calls) == 4  # two signatures, two candidates each
    (first, *_), choices = tune.report(), {d["choice"] for d in tune.report()}
    assert choices == {faster} and first["times_ms"] == times and first["op"] == "swiglu_mlp"
    assert ("grad" in first["signature"]) == grad
    with OpLog() as log:
        _fused(_inputs((6,), 16, 8, torch.float32)[0].requires_grad_(grad), w_gate_up, w_down)
    ran = log.count(torch.ops.trm.swiglu_mlp, torch.ops.trm.swiglu_mlp_train)
    assert (ran > 0) == (faster == "fused") and len(timer.calls) == 4


def test_tuning_off_runs_the_fused_kernels_untimed_and_composed_the_composition(tuning, monkeypatch):
    timer = _Timer({"fused": 2.0, "cuBLAS + swiglu": 1.0})
    tune.set_timer(timer)
    monkeypatch.setenv("TRM_TUNE", "off")
    inputs = _inputs((6,), 16, 8, torch.float32)
    with OpLog() as log:
        _fused(*inputs)
    assert log.count(torch.ops.trm.swiglu_mlp) == 1 and not timer.calls and not tune.report()
    monkeypatch.setenv("TRM_TUNE", "composed")
    with OpLog() as log:
        _fused(*inputs)
    assert log.count(torch.ops.trm.swiglu_mlp) == 0 and log.count(torch.ops.trm.swiglu) == 1 and not timer.calls
    monkeypatch.setenv("TRM_TUNE", "sometimes")
    with pytest.raises(ValueError, match="TRM_TUNE='sometimes'"):
        _fused(*inputs)


def test_nothing_is_timed_during_cuda_graph_capture_or_compilation(tuning, monkeypatch):
    """Inside a capture (or a torch.compile trace) an untimed signature runs the fused kernels
    and records no choice: timing would synchronise and allocate inside the graph."""
    timer = _Timer({"fused": 2.0, "cuBLAS + swiglu": 1.0})
    tune.set_timer(timer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    inputs = _inputs((6,), 16, 8, torch.float32)
    with OpLog() as log:
        _fused(*inputs)
    assert log.count(torch.ops.trm.swiglu_mlp) == 1 and not timer.calls and not tune.report()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    _fused(*inputs)  # outside: timed once, then kept
    assert len(timer.calls) == 2 and [d["choice"] for d in tune.report()] == ["cuBLAS + swiglu"]


def test_the_parity_guard_checks_the_candidate_the_call_ran(tuning, monkeypatch):
    """The guard's slice of the inputs (a new signature) runs what the full call chose,
    untimed: with cuBLAS chosen, no fused kernel runs inside the check either."""
    tune.set_timer(_Timer({"fused": 2.0, "cuBLAS + swiglu": 1.0}))
    inputs = _inputs((6,), 16, 8, torch.float32)
    verify.reset()
    with OpLog() as log:
        with verify.use_verify("always"):
            out = verify.guarded("swiglu_mlp", "triton", _fused, R.swiglu_mlp, tuple(inputs))
    torch.testing.assert_close(out, R.swiglu_mlp(*inputs))
    assert [d["choice"] for d in tune.report()] == ["cuBLAS + swiglu"]  # the slice was not timed
    assert log.count(torch.ops.trm.swiglu_mlp) == 1  # only while timing the full call
    assert all(r.ok for r in verify.verified.values())


def test_a_device_with_no_fitting_config_runs_the_composition(monkeypatch):
    from trm_kernels import channel_mlp

    monkeypatch.setattr(channel_mlp, "device_budget", lambda device: (89, 10 * 1024))
    channel_mlp._HAS_TILES.clear()
    try:
        inputs = _inputs((6,), 16, 8, torch.float32)
        with OpLog() as log:
            out = _fused(*inputs)
        assert log.count(torch.ops.trm.swiglu_mlp) == 0 and log.count(torch.ops.trm.swiglu) == 1
        torch.testing.assert_close(out, R.swiglu_mlp(*inputs))
    finally:
        channel_mlp._HAS_TILES.clear()


# ---- the whole sub-layer: rmsnorm(h + swiglu_mlp(h)) ------------------------------------------


def _sublayer(h, w_gate_up, w_down):
    return K.swiglu_mlp_rmsnorm(h, w_gate_up, w_down, 1e-5, backend="triton")


def _reference_sublayer(h, w_gate_up, w_down):
    return R.swiglu_mlp_rmsnorm(h, w_gate_up, w_down, 1e-5)


def _check_sublayer(rows, hidden, inter, dtype, seed=0):
    inputs = _inputs(rows, hidden, inter, dtype, seed)
    compare(_sublayer, _reference_sublayer, inputs, f"swiglu_mlp_rmsnorm{rows} D={hidden} I={inter}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows, hidden, inter",
    [((1,), 16, 16), ((5,), 40, 24), ((2, 97), 48, 40), ((3, 11), 512, 32), ((3, 7), 33, 17), ((4,), 520, 16)],
)
def test_sublayer_against_the_reference_and_float64(dtype, rows, hidden, inter):
    """Hidden 520 is above the norm epilogue's 512: the SwiGLU epilogue and add_rmsnorm run."""
    _check_sublayer(rows, hidden, inter, dtype)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 70), hidden=st.integers(1, 80), inter=st.integers(1, 50), half=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_sublayer_on_random_shapes(rows, hidden, inter, half, seed):
    _check_sublayer((rows,), hidden, inter, DTYPES[1] if half else DTYPES[0], seed)


def _norm_configs():
    from trm_kernels import channel_mlp

    return channel_mlp.NORM_CONFIGS


@pytest.mark.parametrize("config", _norm_configs())
def test_every_norm_epilogue_config(monkeypatch, config):
    from trm_kernels import channel_mlp

    monkeypatch.setattr(channel_mlp, "NORM_FIXED_CONFIG", config)
    for dtype in DTYPES[1:]:
        _check_sublayer((config[0] + 3,), 72, config[1] + 5, dtype)


def test_sublayer_kernels_and_what_backward_keeps():
    """Forward: one op (two kernels); backward: the norm's backward kernel, the dgrad epilogue
    kernel, and three GEMMs (the residual's gradient added by cuBLAS's addmm). Kept: gate|up,
    the pre-norm sum and rstd (h is the caller's)."""
    rows, hidden, inter = 12, 32, 24
    h, w_gate_up, w_down = (t.requires_grad_() for t in _inputs((rows,), hidden, inter, torch.float32))
    with OpLog() as log:
        _sublayer(h, w_gate_up, w_down).sum().backward()
    ops = torch.ops.trm
    assert log.count(ops.swiglu_mlp_rmsnorm_train) == 1 and log.count(ops.add_rmsnorm) == 0
    assert log.count(ops.add_rmsnorm_backward) == 1 and log.count(ops.swiglu_mlp_backward) == 1
    assert log.count(torch.ops.aten.mm) == 2 and log.count(torch.ops.aten.addmm) == 1
    kept = _saved_bytes(_sublayer, (h, w_gate_up, w_down))
    assert kept == rows * 2 * inter * 4 + rows * hidden * 4 + rows * 4


def test_sublayer_opcheck_and_compile():
    h, w_gate_up, w_down = _inputs((6,), 16, 8, torch.float32)
    torch.library.opcheck(torch.ops.trm.swiglu_mlp_rmsnorm, (h, w_gate_up, w_down, 1e-5))
    torch.library.opcheck(torch.ops.trm.swiglu_mlp_rmsnorm_train,
                          (h.clone().requires_grad_(), w_gate_up.requires_grad_(), w_down, 1e-5))  # fmt: skip
    fn = torch.compile(_sublayer, fullgraph=True, backend="aot_eager")
    x = h.clone().requires_grad_()
    torch.testing.assert_close(fn(x, w_gate_up, w_down), _reference_sublayer(h, w_gate_up, w_down))


@pytest.mark.parametrize("hidden, grad, timed", [(16, True, 3), (16, False, 4), (520, False, 2)])
def test_sublayer_times_every_candidate_it_can_run(tuning, hidden, grad, timed):
    """Three candidates where the norm epilogue fits the hidden size, four without grad (the
    one-kernel sub-layer), two above it."""
    timer = _Timer({"a": 3.0, "b": 1.0, "c": 2.0, "d": 2.5})
    tune.set_timer(timer)
    inputs = _inputs((4,), hidden, 8, torch.float32)
    inputs[0].requires_grad_(grad)
    torch.testing.assert_close(_sublayer(*inputs), _reference_sublayer(*inputs))
    (decision,) = tune.report()
    assert len(timer.calls) == timed == len(decision["times_ms"])
    assert decision["choice"] == list(decision["times_ms"])[1]  # the one timed at 1.0
    assert ("one kernel" in decision["times_ms"]) == (timed == 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows, hidden, inter",
    [((1,), 16, 16), ((5,), 40, 24), ((2, 97), 48, 40), ((3, 11), 512, 32), ((3, 7), 33, 17), ((1, 916), 24, 20)],
)
def test_the_one_kernel_sublayer_against_the_reference_and_float64(dtype, rows, hidden, inter):
    """No grad: gate|up, SwiGLU, the down GEMM, the residual and the norm in one kernel,
    against the composed reference ops and float64; one op dispatched."""
    from trm_kernels import channel_mlp
    from trm_kernels.verify import tolerance_problem

    h, w_gate_up, w_down = _inputs(rows, hidden, inter, dtype)
    with torch.no_grad(), OpLog() as log:
        out = channel_mlp.sublayer_one_kernel(h, w_gate_up, w_down, 1e-5)
        ref = R.swiglu_mlp_rmsnorm(h, w_gate_up, w_down, 1e-5)
        oracle = R.swiglu_mlp_rmsnorm(h.double(), w_gate_up.double(), w_down.double(), 1e-5)
    assert log.count(torch.ops.trm.swiglu_mlp_rmsnorm_one_kernel) == 1
    assert tolerance_problem(out, ref, oracle, f"one kernel {rows} D={hidden} I={inter}") is None


def test_the_one_kernel_sublayer_in_the_gpu_tile_and_its_registration(monkeypatch):
    """The GPU's config under the interpreter (32 rows, I by 32, K by 64), opcheck, and
    torch.compile without graph breaks."""
    from trm_kernels import channel_mlp
    from trm_kernels.verify import tolerance_problem

    monkeypatch.setattr(channel_mlp, "ONE_KERNEL_INTERPRETER_CONFIG", channel_mlp.ONE_KERNEL_CONFIG)
    h, w_gate_up, w_down = _inputs((37,), 72, 70, DTYPES[-1])
    with torch.no_grad():
        out = channel_mlp.sublayer_one_kernel(h, w_gate_up, w_down, 1e-5)
        ref = R.swiglu_mlp_rmsnorm(h, w_gate_up, w_down, 1e-5)
        oracle = R.swiglu_mlp_rmsnorm(h.double(), w_gate_up.double(), w_down.double(), 1e-5)
    assert tolerance_problem(out, ref, oracle, "one kernel, GPU tile") is None
    torch.library.opcheck(torch.ops.trm.swiglu_mlp_rmsnorm_one_kernel, (h, w_gate_up, w_down, 1e-5))
    fn = torch.compile(channel_mlp.sublayer_one_kernel, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(fn(h, w_gate_up, w_down, 1e-5), out)


def test_sublayer_arguments_are_named():
    h, w_gate_up, w_down = _inputs((4,), 16, 8, torch.float32)
    with pytest.raises(TypeError, match="w_down has dtype torch.float16 but h has dtype torch.float32"):
        K.swiglu_mlp_rmsnorm(h, w_gate_up, w_down.half())
    with pytest.raises(ValueError, match="eps must be a number >= 0, got -1"):
        K.swiglu_mlp_rmsnorm(h, w_gate_up, w_down, eps=-1)
    with pytest.raises(ValueError, match=r"w_gate_up must be \[2\*inter, hidden=16\]"):
        K.swiglu_mlp_rmsnorm(h, w_down, w_down)


# ---- any linear layer, the residual add and the post-norm: rmsnorm(h + a @ w^T) ---------------


def _linear_inputs(rows: tuple[int, ...], k: int, n: int, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(*rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    h = torch.randn(*rows, n, generator=gen)
    return [t.to(DEVICE, dtype) for t in (a, w, h)]


def _linear_norm(a, w, h):
    return K.linear_add_rmsnorm(a, w, h, 1e-5, backend="triton")


def _reference_linear_norm(a, w, h):
    return R.linear_add_rmsnorm(a, w, h, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, k, n", [((1,), 16, 16), ((5,), 24, 40), ((2, 97), 64, 48), ((3, 11), 32, 512),
                                        ((3, 7), 33, 17), ((4,), 16, 520)])  # fmt: skip
def test_linear_add_rmsnorm_against_the_reference_and_float64(dtype, rows, k, n):
    """Every gradient (a, w, h) too; N = 520 is above the epilogue's 512: cuBLAS + add_rmsnorm."""
    inputs = _linear_inputs(rows, k, n, dtype)
    compare(_linear_norm, _reference_linear_norm, inputs, f"linear_add_rmsnorm{rows} K={k} N={n}")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 70), k=st.integers(1, 80), n=st.integers(2, 80), half=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_linear_add_rmsnorm_on_random_shapes(rows, k, n, half, seed):
    """N >= 2: over a length-one axis the norm's gradient is a near-cancelling difference that
    no implementation computes to the rule's bound (test_ops_triton's length-one test)."""
    inputs = _linear_inputs((rows,), k, n, DTYPES[1] if half else DTYPES[0], seed)
    compare(_linear_norm, _reference_linear_norm, inputs, f"linear_add_rmsnorm {rows}x{k} N={n}")


def test_linear_add_rmsnorm_kernels_and_what_backward_keeps(monkeypatch):
    """No grad: one kernel. With grad: its training form, then the norm's backward kernel and
    two cuBLAS GEMMs; kept: the pre-norm sum and rstd (a and w are the caller's).
    TRM_TUNE=composed: cuBLAS's GEMM and the add + RMSNorm kernel."""
    rows, k, n = 12, 32, 24
    a, w, h = _linear_inputs((rows,), k, n, torch.float32)
    with torch.no_grad(), OpLog() as log:
        _linear_norm(a, w, h)
    ops = torch.ops.trm
    assert log.count(ops.linear_add_rmsnorm) == 1 and log.count(ops.add_rmsnorm, torch.ops.aten.mm) == 0
    leaves = [t.clone().requires_grad_() for t in (a, w, h)]
    with OpLog() as log:
        _linear_norm(*leaves).sum().backward()
    assert log.count(ops.linear_add_rmsnorm_train) == 1 and log.count(ops.add_rmsnorm_backward) == 1
    assert log.count(torch.ops.aten.mm) == 2 and log.count(torch.ops.aten.zeros) == 0
    assert _saved_bytes(_linear_norm, leaves) == rows * n * 4 + rows * 4
    monkeypatch.setenv("TRM_TUNE", "composed")
    with OpLog() as log:
        _linear_norm(*leaves)
    assert log.count(ops.linear_add_rmsnorm_train) == 0 and log.count(ops.add_rmsnorm) == 1


def test_linear_add_rmsnorm_opcheck_and_compile():
    a, w, h = _linear_inputs((6,), 16, 8, torch.float32)
    torch.library.opcheck(torch.ops.trm.linear_add_rmsnorm, (a, w, h, 1e-5))
    leaves = [t.clone().requires_grad_() for t in (a, w, h)]
    torch.library.opcheck(torch.ops.trm.linear_add_rmsnorm_train, (*leaves, 1e-5))
    fn = torch.compile(_linear_norm, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (a, w, h)]
    out = fn(*leaves)
    torch.testing.assert_close(out, _reference_linear_norm(a, w, h))
    out.sum().backward()
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("n, timed", [(16, 2), (520, 0)])
def test_linear_add_rmsnorm_times_both_candidates_where_the_epilogue_fits(tuning, n, timed):
    timer = _Timer({"fused": 2.0, "composed": 1.0})
    tune.set_timer(timer)
    inputs = _linear_inputs((4,), 8, n, torch.float32)
    torch.testing.assert_close(_linear_norm(*inputs), _reference_linear_norm(*inputs))
    assert len(timer.calls) == timed
    if timed:
        (decision,) = tune.report()
        assert decision["op"] == "linear_add_rmsnorm" and decision["choice"] == "cuBLAS + add_rmsnorm"


def test_linear_add_rmsnorm_arguments_are_named():
    a, w, h = _linear_inputs((4,), 16, 8, torch.float32)
    with pytest.raises(TypeError, match="w has dtype torch.float16 but a has dtype torch.float32"):
        K.linear_add_rmsnorm(a, w.half(), h)
    with pytest.raises(ValueError, match=r"w must be \[out_features, in_features=16\], got shape \(16, 8\)"):
        K.linear_add_rmsnorm(a, w.t(), h)
    with pytest.raises(ValueError, match=r"h must be \(4, 8\) \(a's leading shape, w's out_features\)"):
        K.linear_add_rmsnorm(a, w, h[:3])
    with pytest.raises(ValueError, match="eps must be a number >= 0, got -1"):
        K.linear_add_rmsnorm(a, w, h, eps=-1)
    with pytest.raises(TypeError, match="h must be a torch.Tensor"):
        K.linear_add_rmsnorm(a, w, [1.0])


# ---- a learnable norm weight (language models' post-norms) and hidden sizes up to 8192 --------


def _norm_weight(n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return (1 + 0.5 * torch.randn(n, generator=gen)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, k, n, weight_dtype", [((3,), 16, 512, None), ((2,), 8, 2048, None),
                                                      ((1, 3), 8, 4096, None), ((5,), 24, 40, "same")])  # fmt: skip
def test_linear_add_rmsnorm_with_a_weight_against_the_reference_and_float64(dtype, rows, k, n, weight_dtype):
    """Forward and the gradients of a, w, h and the norm weight (fp32, or the activations'
    dtype), eps 1e-6: N = 512 in the norm epilogue, 2048 and 4096 through cuBLAS + the add +
    RMSNorm kernel."""
    inputs = [*_linear_inputs(rows, k, n, dtype), _norm_weight(n, dtype if weight_dtype else torch.float32)]
    compare(lambda a, w, h, g: K.linear_add_rmsnorm(a, w, h, 1e-6, backend="triton", weight=g),
            lambda a, w, h, g: R.linear_add_rmsnorm(a, w, h, 1e-6, g), inputs,
            f"linear_add_rmsnorm{rows} K={k} N={n}, weight")  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden, inter", [((3,), 512, 16), ((2,), 2048, 8), ((1, 3), 4096, 8), ((5,), 40, 24)])
def test_sublayer_with_a_weight_against_the_reference_and_float64(dtype, rows, hidden, inter):
    """Every gradient (h, both projections, the fp32 norm weight), eps 1e-6; hidden 512 in the
    norm epilogue, 2048 and 4096 through the SwiGLU epilogue and the add + RMSNorm kernel."""
    inputs = [*_inputs(rows, hidden, inter, dtype), _norm_weight(hidden)]
    compare(lambda h, gu, d, g: K.swiglu_mlp_rmsnorm(h, gu, d, 1e-6, backend="triton", weight=g),
            lambda h, gu, d, g: R.swiglu_mlp_rmsnorm(h, gu, d, 1e-6, g), inputs,
            f"swiglu_mlp_rmsnorm{rows} D={hidden} I={inter}, weight")  # fmt: skip


def test_the_weight_is_applied_in_the_epilogues_and_its_gradient_by_the_norms_backward():
    """No grad: one op each (the weight inside the norm epilogue, the one-kernel sub-layer
    too); with grad the norm's backward kernel gives the weight's gradient (no extra ops)."""
    from trm_kernels import channel_mlp

    a, w, h = _linear_inputs((6,), 16, 24, torch.float32)
    weight = _norm_weight(24)
    with torch.no_grad(), OpLog() as log:
        out = K.linear_add_rmsnorm(a, w, h, backend="triton", weight=weight)
    assert log.count(torch.ops.trm.linear_add_rmsnorm) == 1
    assert log.count(torch.ops.trm.add_rmsnorm, torch.ops.aten.mul, torch.ops.aten.mm) == 0
    torch.testing.assert_close(out, R.linear_add_rmsnorm(a, w, h, 1e-5, weight))
    hh, gu, d = _inputs((6,), 24, 8, torch.float32)
    with torch.no_grad():
        one = channel_mlp.sublayer_one_kernel(hh, gu, d, 1e-5, weight)
    torch.testing.assert_close(one, R.swiglu_mlp_rmsnorm(hh, gu, d, 1e-5, weight))
    leaves = [t.clone().requires_grad_() for t in (a, w, h, weight)]
    with OpLog() as log:
        K.linear_add_rmsnorm(*leaves[:3], backend="triton", weight=leaves[3]).sum().backward()
    assert log.count(torch.ops.trm.add_rmsnorm_backward) == 1 and log.count(torch.ops.aten.mm) == 2
    assert leaves[3].grad is not None and leaves[3].grad.dtype == torch.float32
    torch.library.opcheck(torch.ops.trm.linear_add_rmsnorm_train, (*leaves[:3], 1e-6, leaves[3]))
    torch.library.opcheck(torch.ops.trm.swiglu_mlp_rmsnorm_train,
                          (hh.requires_grad_(), gu, d, 1e-6, weight.clone().requires_grad_()))  # fmt: skip


@pytest.mark.parametrize("op", ["linear_add_rmsnorm", "swiglu_mlp_rmsnorm"])
def test_eps_reaches_the_kernels(op):
    """A large eps changes the result: the triton backend's equals the reference's at each."""
    if op == "linear_add_rmsnorm":
        inputs, ref = _linear_inputs((4,), 8, 16, torch.float32), R.linear_add_rmsnorm
    else:
        inputs, ref = _inputs((4,), 16, 8, torch.float32), R.swiglu_mlp_rmsnorm
    for eps in (1e-6, 0.5):
        out = getattr(K, op)(*inputs, eps, backend="triton", weight=_norm_weight(16))
        torch.testing.assert_close(out, ref(*inputs, eps, _norm_weight(16)))
    assert not torch.allclose(ref(*inputs, 1e-6), ref(*inputs, 0.5))


@pytest.mark.parametrize("op", ["linear_add_rmsnorm", "swiglu_mlp_rmsnorm"])
def test_above_the_epilogues_hidden_the_composition_runs_and_the_reason_is_reported(op):
    """Hidden 2048: no error, the add + RMSNorm kernel normalises, and tune.report() says why
    the norm epilogue did not run (TRM_TUNE=off: nothing is timed, the reason is still kept)."""
    if op == "linear_add_rmsnorm":
        inputs = _linear_inputs((2,), 8, 2048, torch.float32)
    else:
        inputs = _inputs((2,), 2048, 8, torch.float32)
    with torch.no_grad(), OpLog() as log:
        getattr(K, op)(*inputs, 1e-6, backend="triton", weight=_norm_weight(2048))
    assert log.count(torch.ops.trm.add_rmsnorm) == 1
    (decision,) = tune.report()
    assert decision["op"] == op and decision["times_ms"] == {}
    assert "hidden 2048 > 512" in decision["skipped"]["fused"] and decision["choice"] != "fused"


def test_weight_arguments_are_named():
    a, w, h = _linear_inputs((4,), 16, 8, torch.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\) = h.shape\[-1\], got \(16,\)"):
        K.linear_add_rmsnorm(a, w, h, weight=torch.ones(16))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        K.linear_add_rmsnorm(a, w, h, weight=[1.0] * 8)
    with pytest.raises(TypeError, match="weight must be float64/float32/float16/bfloat16"):
        K.swiglu_mlp_rmsnorm(*_inputs((4,), 16, 8, torch.float32), weight=torch.ones(16, dtype=torch.int32))
    with pytest.raises(ValueError, match="weight is on meta but h is on"):
        K.swiglu_mlp_rmsnorm(*_inputs((4,), 16, 8, torch.float32), weight=torch.ones(16, device="meta"))
