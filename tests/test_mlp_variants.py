"""The channel MLP's other activations (geglu, relu2) and separate gate/up weights in the
GEMM-epilogue kernels (trm_kernels.swiglu_mlp and swiglu_mlp_rmsnorm, ``activation=`` and a
``(w_gate, w_up)`` pair): the Triton kernels (under the interpreter on CPU) against the
reference and float64, the registered ops, torch.compile and the argument errors."""

import functools

import pytest
import torch
import trm_kernels as K
from oracle import DEVICE, DTYPES, OpLog, check, compare, on_device  # noqa: F401  (on_device: a fixture)
from trm_kernels import reference as R

pytestmark = [
    pytest.mark.skipif("triton" not in K.available("swiglu_mlp"), reason="triton is not installed"),
    pytest.mark.usefixtures("on_device", "fresh_choices"),
]

# (activation, the gate and up weights given as a pair)
VARIANTS = [("geglu", False), ("relu2", False), ("swiglu", True), ("geglu", True)]
IDS = [f"{a}{' pair' if pair else ''}" for a, pair in VARIANTS]
SHAPES = [((5,), 40, 24), ((2, 37), 33, 17), ((70,), 48, 40)]  # I, D not multiples of the 32 tiles


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Small tiles under the interpreter, so that the odd sizes here cross tile edges."""
    from trm_kernels import channel_mlp

    monkeypatch.setattr(channel_mlp, "INTERPRETER_CONFIG", (32, 32, 32, 4, 1))
    monkeypatch.setattr(channel_mlp, "NORM_INTERPRETER_CONFIG", (16, 32, 4, 1))
    monkeypatch.setattr(channel_mlp, "ONE_KERNEL_INTERPRETER_CONFIG", (16, 16, 16, 4, 1))


def _inputs(rows, hidden, inter, dtype, activation, pair, seed=0):
    """[x, w_gate_up] + ([w_up] for a pair) + [w_down]; w_gate_up [2I, D], or [I, D] (relu2, pair)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, hidden, generator=gen)
    gate_rows = inter if pair or activation == "relu2" else 2 * inter
    ws = [torch.randn(gate_rows, hidden, generator=gen) * hidden**-0.5]
    ws += [torch.randn(inter, hidden, generator=gen) * hidden**-0.5] if pair else []
    w_down = torch.randn(hidden, inter, generator=gen) * inter**-0.5
    return [t.to(DEVICE, dtype) for t in (x, *ws, w_down)]


def _mlp(activation, pair, backend):
    """swiglu_mlp on (x, w_gate_up[, w_up], w_down) as flat tensors (what compare differentiates)."""
    if pair:
        return lambda x, wg, wu, wd: K.swiglu_mlp(x, (wg, wu), wd, backend, activation=activation)
    return lambda x, w, wd: K.swiglu_mlp(x, w, wd, backend, activation=activation)


def _sublayer(activation, pair, backend, eps=1e-5):
    if pair:
        return lambda h, wg, wu, wd: K.swiglu_mlp_rmsnorm(h, (wg, wu), wd, eps, backend, activation=activation)
    return lambda h, w, wd: K.swiglu_mlp_rmsnorm(h, w, wd, eps, backend, activation=activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden, inter", SHAPES)
@pytest.mark.parametrize("activation, pair", VARIANTS, ids=IDS)
def test_mlp_against_the_reference_and_float64(dtype, rows, hidden, inter, activation, pair):
    """Forward and the gradients of x and every weight."""
    inputs = _inputs(rows, hidden, inter, dtype, activation, pair)
    compare(_mlp(activation, pair, "triton"), _mlp(activation, pair, "reference"), inputs,
            f"{activation}{' pair' if pair else ''} {rows} D={hidden} I={inter}")  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden, inter", SHAPES[:2])
@pytest.mark.parametrize("activation, pair", VARIANTS, ids=IDS)
def test_sublayer_against_the_reference_and_float64(dtype, rows, hidden, inter, activation, pair):
    """swiglu_mlp_rmsnorm: both GEMM epilogues, forward and backward."""
    inputs = _inputs(rows, hidden, inter, dtype, activation, pair)
    compare(_sublayer(activation, pair, "triton"), _sublayer(activation, pair, "reference"), inputs,
            f"sublayer {activation}{' pair' if pair else ''} {rows}")  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation, pair", VARIANTS, ids=IDS)
def test_the_one_kernel_sublayer_against_the_reference_and_float64(dtype, activation, pair):
    from trm_kernels import channel_mlp

    inputs = _inputs((3, 11), 40, 24, dtype, activation, pair)
    extra = (activation, inputs[2] if pair else None)
    w_down = inputs[-1]
    ref = functools.partial(R.swiglu_mlp_rmsnorm, eps=1e-5, activation=activation)
    one = channel_mlp.sublayer_one_kernel(inputs[0], inputs[1], w_down, 1e-5, None, *extra)
    oracle = ref(*(t.double() for t in inputs[:2]), w_down.double(), w_up=inputs[2].double() if pair else None)
    expected = ref(*inputs[:2], w_down, w_up=extra[1])
    check(one, expected, oracle, f"one kernel {activation}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation, pair", VARIANTS, ids=IDS)
def test_every_autotuner_config(monkeypatch, dtype, activation, pair):
    from trm_kernels import channel_mlp

    for config in channel_mlp.CONFIGS:
        monkeypatch.setattr(channel_mlp, "FIXED_CONFIG", config)
        inputs = _inputs((config[0] + 3,), config[2] + 5, config[1] + 7, dtype, activation, pair)
        compare(_mlp(activation, pair, "triton"), _mlp(activation, pair, "reference"), inputs, f"{config}")


@pytest.mark.parametrize("activation, pair", VARIANTS, ids=IDS)
def test_without_grad_it_equals_the_training_forward(activation, pair):
    inputs = _inputs((9,), 40, 24, torch.float16, activation, pair)
    fn = _mlp(activation, pair, "triton")
    with torch.no_grad():
        plain = fn(*inputs)
    trained = fn(inputs[0].requires_grad_(), *inputs[1:])
    assert torch.equal(plain, trained.detach())


@pytest.mark.parametrize("activation, pair", VARIANTS, ids=IDS)
def test_the_fused_kernels_run_with_no_concatenation_and_keep_only_gate_up(activation, pair):
    """Forward and backward are the fused ops (no separate activation, no torch.cat of the
    pair); backward keeps gate|up [M, 2I] for the gated MLPs, the pre-activation [M, I] for relu2."""
    inputs = [t.requires_grad_() for t in _inputs((6,), 16, 24, torch.float32, activation, pair)]
    ops, aten = torch.ops.trm, torch.ops.aten
    with OpLog() as log:
        _mlp(activation, pair, "triton")(*inputs).sum().backward()
    assert log.count(ops.swiglu_mlp_train) == 1 and log.count(ops.swiglu_mlp_backward) == 1
    assert log.count(ops.swiglu, aten.cat, aten.gelu, aten.relu, aten.silu) == 0
    kept = next(args for op, args in log.calls if op == ops.swiglu_mlp_backward)[1]
    assert kept.shape == (6, 24 if activation == "relu2" else 48)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in inputs)


def test_swiglu_with_a_pair_equals_the_packed_weight_forward():
    """The two pointers read what the packed weight's halves hold: the same forward, bit for bit."""
    x, w_gate, w_up, w_down = _inputs((7,), 40, 24, torch.float16, "swiglu", True)
    with torch.no_grad():
        packed = K.swiglu_mlp(x, torch.cat([w_gate, w_up]), w_down, "triton")
        pair = K.swiglu_mlp(x, (w_gate, w_up), w_down, "triton")
    assert torch.equal(packed, pair)


@pytest.mark.parametrize("activation", ["geglu", "relu2"])
def test_opcheck(activation):
    x, w, w_down = _inputs((6,), 16, 8, torch.float32, activation, False)
    _, w_gate, w_up, _ = _inputs((6,), 16, 8, torch.float32, activation, True)
    trm = torch.ops.trm
    for args in ((x, w, w_down, activation), (x, w_gate, w_down, "swiglu", w_up)):
        grads = [args[0].clone().requires_grad_(), args[1].clone().requires_grad_(), *args[2:]]
        torch.library.opcheck(trm.swiglu_mlp, args)
        torch.library.opcheck(trm.swiglu_mlp_train, tuple(grads))
        torch.library.opcheck(trm.swiglu_mlp_rmsnorm, (x, args[1], w_down, 1e-5, None, *args[3:]))
        torch.library.opcheck(trm.swiglu_mlp_rmsnorm_train, (grads[0], grads[1], w_down, 1e-5, None, *args[3:]))
        torch.library.opcheck(trm.swiglu_mlp_rmsnorm_one_kernel, (x, args[1], w_down, 1e-5, None, *args[3:]))
    kept = torch.randn(6, 8 if activation == "relu2" else 16)
    torch.library.opcheck(trm.swiglu_mlp_backward, (torch.randn(6, 16), kept, w_down, activation))


@pytest.mark.parametrize("activation, pair", VARIANTS, ids=IDS)
def test_compiles_without_graph_breaks(activation, pair):
    inputs = _inputs((2, 5), 16, 8, torch.float32, activation, pair)
    for make in (_mlp, _sublayer):
        fn = torch.compile(make(activation, pair, "triton"), fullgraph=True, backend="aot_eager")
        ref = make(activation, pair, "reference")
        with torch.no_grad():
            torch.testing.assert_close(fn(*inputs), ref(*inputs))
        x, x_ref = inputs[0].clone().requires_grad_(), inputs[0].clone().requires_grad_()
        fn(x, *inputs[1:]).sum().backward()
        ref(x_ref, *inputs[1:]).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)


def test_arguments_are_named():
    x, w_gate_up, w_down = _inputs((4,), 16, 8, torch.float32, "swiglu", False)
    w_gate, w_up = w_gate_up.chunk(2)
    for op in (K.swiglu_mlp, functools.partial(K.swiglu_mlp_rmsnorm, eps=1e-5)):
        with pytest.raises(ValueError, match="activation must be one of 'swiglu', 'geglu', 'relu2', got 'gelu'"):
            op(x, w_gate_up, w_down, activation="gelu")
        with pytest.raises(ValueError, match="w_gate_up must be one .inter, hidden. weight for activation='relu2'"):
            op(x, (w_gate, w_up), w_down, activation="relu2")
        with pytest.raises(ValueError, match=r"w_gate_up must be \[inter, hidden\] = \(16, 16\), got \(16, 8\)"):
            op(x, w_gate_up[:, :8], w_down, activation="relu2")
        with pytest.raises(ValueError, match=r"w_down must be \[hidden, inter\] = \(16, 16\)"):
            op(x, w_gate_up, w_down, activation="relu2")
        with pytest.raises(ValueError, match="w_gate_up as a pair must be .w_gate, w_up., got 3 items"):
            op(x, (w_gate, w_up, w_up), w_down)
        with pytest.raises(ValueError, match=r"w_gate_up\[1\] \(up\) must be \[inter, hidden\] = \(8, 16\)"):
            op(x, (w_gate, w_up[:4]), w_down)
        with pytest.raises(TypeError, match=r"w_gate_up\[1\] \(up\) has dtype torch.float16 but"):
            op(x, (w_gate, w_up.half()), w_down)
        with pytest.raises(TypeError, match=r"w_gate_up\[0\] \(gate\) must be a torch.Tensor"):
            op(x, ([1.0], w_up), w_down)
        with pytest.raises(ValueError, match=r"w_down must be \[hidden, inter\] = \(16, 8\)"):
            op(x, (w_gate, w_up), w_down.t())


@pytest.mark.parametrize("activation, pair", VARIANTS, ids=IDS)
def test_the_parity_guard_checks_every_gradient(activation, pair):
    """The registry's positional form (x, w_gate, w_down, activation, w_up) through the guard:
    the output and the gradients of x and every weight, the pair's second weight included."""
    from trm_kernels import channel_mlp, verify

    x, *ws = (t.requires_grad_() for t in _inputs((6,), 16, 8, torch.float32, activation, pair))
    args = (x, ws[0], ws[-1], activation, ws[1] if pair else None)
    verify.reset()
    with verify.use_verify("always"):
        out = verify.guarded("swiglu_mlp", "triton", channel_mlp.swiglu_mlp, R.swiglu_mlp, args)
        out.sum().backward()
    assert [r.ok for r in verify.verified.values()] == [True], [r.detail for r in verify.verified.values()]
    assert all(t.grad is not None for t in (x, *ws))


# ---- GeGLU in the element-wise op (what cuBLAS + the activation kernel runs) ----------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", [((3, 17, 2 * 77), -1), ((2, 2 * 13, 24), -2)])
def test_geglu_elementwise_against_the_reference_and_float64(dtype, shape, dim):
    gu = (torch.randn(shape) * 3).to(DEVICE, dtype)
    compare(lambda t: K.swiglu(t, dim, "triton", activation="geglu"),
            lambda t: R.swiglu(t, dim, "geglu"), [gu], f"geglu{shape}")  # fmt: skip
    gate, up = gu.double().chunk(2, dim)  # an oracle of its own: gelu_tanh written out
    want = 0.5 * gate * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate**3))) * up
    check(K.swiglu(gu, dim, "triton", activation="geglu"), R.swiglu(gu, dim, "geglu"), want, f"geglu{shape} oracle")


def test_composed_geglu_runs_the_elementwise_kernel_and_its_errors_are_named():
    x, w_gate_up, w_down = _inputs((4, 3), 16, 8, torch.float32, "geglu", False)
    from trm_kernels import channel_mlp

    with OpLog() as log:
        got = channel_mlp.composed(x, w_gate_up, w_down, "geglu")
    assert log.count(torch.ops.trm.swiglu) == 1
    check(got, R.swiglu_mlp(x, w_gate_up, w_down, "geglu"),
          R.swiglu_mlp(x.double(), w_gate_up.double(), w_down.double(), "geglu"), "composed geglu")  # fmt: skip
    torch.library.opcheck(torch.ops.trm.swiglu, (torch.randn(4, 10, requires_grad=True), 1, "geglu"))
    torch.library.opcheck(torch.ops.trm.swiglu_backward, (torch.randn(4, 5), torch.randn(4, 10), 1, "geglu"))
    with pytest.raises(ValueError, match="activation must be 'swiglu' or 'geglu' .gated; relu2 is swiglu_mlp's."):
        K.swiglu(torch.randn(2, 4), activation="relu2")
