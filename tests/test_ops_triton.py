"""Triton kernels (under the interpreter on CPU) against the reference and float64 (see oracle.py)."""

import pytest
import torch
import trm_kernels as K
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import DEVICE, DTYPES, OpLog, check, compare, on_device, run_op  # noqa: F401  (on_device: a fixture)
from trm_kernels import reference as R

pytestmark = [
    pytest.mark.skipif("triton" not in K.available("add_rmsnorm"), reason="triton is not installed"),
    pytest.mark.usefixtures("on_device"),
]


RMS_SHAPES = [((1, 512), -1), ((3, 97, 48), -1), ((3, 97, 48), -2), ((2, 5, 37), -1), ((2, 5, 37), 1), ((7, 3), -1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", RMS_SHAPES)
@pytest.mark.parametrize("residual", [True, False])
def test_add_rmsnorm(dtype, shape, dim, residual):
    x, r = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    if residual:
        compare(
            lambda a, b: K.add_rmsnorm(a, b, dim, backend="triton"),
            lambda a, b: R.add_rmsnorm(a, b, dim),
            [x, r],
            f"add_rmsnorm{shape}",
        )
    else:
        compare(
            lambda a: K.add_rmsnorm(a, dim=dim, backend="triton"),
            lambda a: R.add_rmsnorm(a, dim=dim),
            [x],
            f"rmsnorm{shape}",
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rmsnorm_on_a_length_one_axis(dtype):
    """y = h / sqrt(h^2 + eps): the gradient is a difference of two terms of size |dy * rstd|
    that nearly cancel, so both implementations are only accurate relative to that size."""
    x, r = torch.randn(64, 1).to(dtype), torch.randn(64, 1).to(dtype)
    (y, (gx, _)), g = run_op(lambda a, b: K.add_rmsnorm(a, b, backend="triton"), [x, r]), torch.randn(64, 1)
    (y64, (gx64, _)) = run_op(R.add_rmsnorm, [x.double(), r.double()])
    h = (x + r).double()
    terms = (g.double() / (h.square() + 1e-5).sqrt()).abs().max().item()
    assert (y.double() - y64).abs().max().item() <= 2 * torch.finfo(dtype).eps
    assert (gx.double() - gx64).abs().max().item() <= 8 * torch.finfo(dtype).eps * terms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", [((1, 2), -1), ((3, 17, 2 * 77), -1), ((2, 2 * 13, 24), -2), ((6, 5, 4), 0)])
def test_swiglu(dtype, shape, dim):
    gu = (torch.randn(shape) * 3).to(dtype)
    compare(lambda t: K.swiglu(t, dim, backend="triton"), lambda t: R.swiglu(t, dim), [gu], f"swiglu{shape}")


def _token_mlp_inputs(batch, seq, hidden, inter, dtype):
    h = torch.randn(batch, seq, hidden).to(dtype)
    w_gu = (torch.randn(2 * inter, seq) * seq**-0.5).to(dtype)
    w_down = (torch.randn(seq, inter) * inter**-0.5).to(dtype)
    return h, w_gu, w_down


def _check_fused_token_mlp(h, w_gu, w_down, what):
    """No grad: the one-kernel path, against the composed reference ops and float64."""
    with torch.no_grad():
        fused = K.token_mlp_rmsnorm(h, w_gu, w_down, backend="triton")
        ref = K.token_mlp_rmsnorm(h, w_gu, w_down, backend="reference")
        oracle = R.token_mlp_rmsnorm(h.double(), w_gu.double(), w_down.double())
    check(fused, ref, oracle, what)


TOKEN_MLP_SHAPES = [(1, 1, 1, 1), (2, 97, 48, 80), (1, 16, 130, 64), (3, 5, 7, 3), (1, 200, 20, 30)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TOKEN_MLP_SHAPES)
def test_token_mlp_rmsnorm(dtype, shape):
    """Without grad the fused kernel; with grad the composed Triton ops (forward and backward)."""
    h, w_gu, w_down = _token_mlp_inputs(*shape, dtype)
    _check_fused_token_mlp(h, w_gu, w_down, f"token_mlp{shape} fused")
    compare(lambda *a: K.token_mlp_rmsnorm(*a, backend="triton"), R.token_mlp_rmsnorm, [h, w_gu, w_down],
            f"token_mlp{shape} with grad")  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 97, 48, 80), (1, 150, 20, 30), (3, 5, 7, 3), (2, 16, 130, 64)])
@pytest.mark.parametrize("grad_of", ["all", "h", "weights"])
def test_token_mlp_rmsnorm_fused_backward(monkeypatch, dtype, shape, grad_of):
    """The training form and its recomputing backward kernels (dh; the weight gradients) in
    the GPU's tiles, each gradient against the composed reference ops and float64; either
    kernel alone where only h or only the weights need a gradient. S = 150 takes the 256-row
    sequence tile."""
    from trm_kernels import token_mlp

    monkeypatch.setattr(token_mlp, "WIDE_TILES_ON_INTERPRETER", False)
    inputs = _token_mlp_inputs(*shape, dtype)
    wants = {"all": [True, True, True], "h": [True, False, False], "weights": [False, True, True]}[grad_of]
    with OpLog() as log:
        out_f, grads_f = run_op(lambda *a: K.token_mlp_rmsnorm(*a, backend="triton"), inputs, wants)
    (backward,) = [args for op, args in log.calls if op == torch.ops.trm.token_mlp_rmsnorm_backward]
    assert backward[-2:] == (wants[0], wants[1])  # the kernels launched: dh; the weight gradients
    assert log.count(torch.ops.trm.swiglu_backward, torch.ops.aten.bmm) == 0  # nothing of the composition's
    out_r, grads_r = run_op(R.token_mlp_rmsnorm, inputs, wants)
    out_o, grads_o = run_op(R.token_mlp_rmsnorm, [t.double() for t in inputs], wants)
    check(out_f, out_r, out_o, f"token_mlp{shape} forward")
    names = [name for name, want in zip(["dh", "dW_gate_up", "dW_down"], wants, strict=True) if want]
    for name, f, r, o in zip(names, grads_f, grads_r, grads_o, strict=True):
        check(f, r, o, f"token_mlp{shape} {name}")


def test_token_mlp_rmsnorm_past_the_tile_trains_by_the_composition():
    """S = 916 (the maze) is over the 256 positions a tile holds: with and without grad the
    composed ops run (their Triton SwiGLU and norm kernels), against the reference and float64."""
    inputs = list(_token_mlp_inputs(1, 916, 8, 16, torch.float32))
    with OpLog() as log:
        compare(lambda *a: K.token_mlp_rmsnorm(*a, backend="triton"), R.token_mlp_rmsnorm, inputs, "token_mlp S=916")
    assert log.count(torch.ops.trm.token_mlp_rmsnorm_train, torch.ops.trm.token_mlp_rmsnorm) == 0
    assert log.count(torch.ops.trm.swiglu_backward) == 1


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3), seq=st.integers(1, 256), hidden=st.integers(1, 70), inter=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
)  # fmt: skip
def test_token_mlp_rmsnorm_fused_backward_any_shape(batch, seq, hidden, inter, dtype):
    inputs = list(_token_mlp_inputs(batch, seq, hidden, inter, dtype))
    compare(lambda *a: K.token_mlp_rmsnorm(*a, backend="triton"), R.token_mlp_rmsnorm, inputs,
            f"token_mlp{(batch, seq, hidden, inter)}")  # fmt: skip


def test_token_mlp_weight_gradients_sum_every_slice(monkeypatch):
    """More tiles than slices: each slice sums several (batch element, hidden block) tiles,
    the last slice fewer; the result is the one-slice-per-tile result to fp32 rounding."""
    from trm_kernels import token_mlp

    inputs = _token_mlp_inputs(5, 20, 70, 24, torch.float32)
    grads = {}
    for splits in (64, 3):  # 5 * 2 = 10 tiles: 10 slices of 1, then 3 slices of 4, 4, 2
        monkeypatch.setattr(token_mlp, "DW_SPLITS", splits)
        assert token_mlp.dw_splits(5, 20, 70) == ((10, 1) if splits == 64 else (3, 4))
        grads[splits] = run_op(lambda *a: K.token_mlp_rmsnorm(*a, backend="triton"), inputs, [False, True, True])[1]
    for a, b in zip(grads[64], grads[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    oracle = run_op(R.token_mlp_rmsnorm, [t.double() for t in inputs], [False, True, True])[1]
    ref = run_op(R.token_mlp_rmsnorm, inputs, [False, True, True])[1]
    for f, r, o, name in zip(grads[3], ref, oracle, ["dW_gate_up", "dW_down"], strict=True):
        check(f, r, o, f"{name}, 3 slices")


def _token_mlp_configs():
    if "triton" not in K.available("token_mlp_rmsnorm"):
        return []
    from trm_kernels import token_mlp

    return list(dict.fromkeys(c for family in token_mlp.FAMILY_CONFIGS.values() for tiles in family.values()
                              for c in tiles))  # fmt: skip


@pytest.mark.parametrize("config", _token_mlp_configs())
def test_token_mlp_rmsnorm_every_autotuner_config(monkeypatch, config):
    from trm_kernels import token_mlp

    monkeypatch.setattr(token_mlp, "FIXED_CONFIG", config)
    seq = 97 if any(config in family[128] for family in token_mlp.FAMILY_CONFIGS.values()) else 150
    for shape in ((2, seq, 150, 80), (1, seq, 64, 64)):
        for dtype in DTYPES[1:]:  # fp16, and bf16 on a GPU
            _check_fused_token_mlp(*_token_mlp_inputs(*shape, dtype), f"token_mlp{shape} {dtype} config {config}")


@pytest.fixture
def timed_configs(monkeypatch):
    """The fused mlp_t kernel behind Triton's autotuner with a stand-in timer that runs each
    config once, each faster than the last (so the last is kept); the list grows by one per run."""
    from trm_kernels import token_mlp

    runs = []

    def do_bench(kernel_call, quantiles):
        kernel_call()
        runs.append(1)
        return [1.0 / len(runs)] * len(quantiles)

    monkeypatch.setattr(token_mlp, "_KERNEL", token_mlp._autotuned(do_bench=do_bench))
    return runs


@pytest.mark.parametrize("seq", [97, 150])
def test_token_mlp_rmsnorm_through_the_autotuner(timed_configs, seq):
    """The GPU's launch path (pruning by sequence tile, grid from the chosen config)."""
    from trm_kernels import token_mlp

    runs = timed_configs
    for batch in (2, 1):  # a new batch size is tuned again
        _check_fused_token_mlp(*_token_mlp_inputs(batch, seq, 150, 80, DTYPES[-1]), f"autotuned S={seq} B={batch}")
    configs = len(token_mlp.configs(None)[128 if seq <= 128 else 256])
    if configs > 1:  # (a lone config is timed by some Triton versions, not by others)
        assert len(runs) == 2 * configs


@pytest.mark.parametrize("seq", [97, 150])
def test_token_mlp_rmsnorm_autotuner_prunes_what_the_device_cannot_launch(monkeypatch, timed_configs, seq):
    """On a device that says it is an sm_89 with 60 KB of shared memory per block, the
    autotuner times only the configs whose sm_89 kernels fit; with 10 KB none fits, and the
    op runs the composed Triton ops instead (same answer, no fused kernel)."""
    from trm_kernels import token_mlp

    runs = timed_configs
    monkeypatch.setattr(token_mlp, "device_budget", lambda device: (89, 60 * 1024))
    seq_class = 128 if seq <= 128 else 256
    fits = [t for t in token_mlp.configs(89)[seq_class] if token_mlp.SHARED_BYTES[(seq_class, *t)][89] <= 60 * 1024]
    assert token_mlp.launchable_tiles(seq, torch.device("cpu")) == fits
    inputs = _token_mlp_inputs(2, seq, 150, 80, DTYPES[-1])
    if fits:
        _check_fused_token_mlp(*inputs, f"pruned S={seq}")
        if len(fits) > 1:  # (a lone config is timed by some Triton versions, not by others)
            assert len(runs) == len(fits)
    runs.clear()
    monkeypatch.setattr(token_mlp, "device_budget", lambda device: (89, 10 * 1024))
    assert token_mlp.launchable_tiles(seq, torch.device("cpu")) == []
    with OpLog() as log:
        _check_fused_token_mlp(*inputs, f"no config fits S={seq}")
    assert runs == [] and log.count(torch.ops.trm.token_mlp_rmsnorm) == 0 and log.count(torch.ops.trm.swiglu) > 0
    with pytest.raises(ValueError, match="no config of the fused kernel can launch"):
        torch.ops.trm.token_mlp_rmsnorm(*inputs, 1e-5)


def test_token_mlp_rmsnorm_trains_by_the_composition_where_the_backward_cannot_launch(monkeypatch):
    """A device whose shared memory holds a forward config but not the backward kernels (an
    sm_100 with 90 KB per block): no grad runs the one kernel, with grad the composition."""
    from trm_kernels import token_mlp

    monkeypatch.setattr(token_mlp, "device_budget", lambda device: (100, 90 * 1024))
    inputs = _token_mlp_inputs(2, 9, 16, 8, torch.float16)  # fp32 on a GPU never takes the fused kernels
    assert token_mlp.launchable_tiles(9, torch.device("cpu")) and not token_mlp.backward_fits(9, torch.device("cpu"))
    with OpLog() as log:
        compare(lambda *a: K.token_mlp_rmsnorm(*a, backend="triton"), R.token_mlp_rmsnorm, list(inputs), "composed")
    assert log.count(torch.ops.trm.token_mlp_rmsnorm_train, torch.ops.trm.token_mlp_rmsnorm_backward) == 0
    assert log.count(torch.ops.trm.swiglu_backward) == 1
    with torch.no_grad(), OpLog() as log:
        K.token_mlp_rmsnorm(*inputs, backend="triton")
    assert log.count(torch.ops.trm.token_mlp_rmsnorm) == 1


def test_backward_fills_no_zero_gradients_for_outputs_it_ignores():
    """The training forms return what backward needs besides the output (gate|up, the
    pre-norm sum, rstd, the log-sum-exp, dlogits); autograd would hand backward a
    zero-filled gradient for each (a memory-bound fill per call, [rows, 2I] for gate|up),
    which backward ignores. None is filled."""
    from trm_kernels import channel_mlp

    h, w_gu, w_down = _token_mlp_inputs(2, 9, 16, 8, torch.float32)
    rows = torch.randn(6, 16)
    mlp = (torch.randn(16, 16) * 0.25, torch.randn(16, 8) * 0.35)  # W_gate_up [2I, D], W_down [D, I]
    qkv, labels = torch.randn(2, 9, 3 * 2 * 32), torch.randint(0, 5, (2, 9))
    steps = {
        "token_mlp_rmsnorm": (lambda a, b, c: K.token_mlp_rmsnorm(a, b, c, backend="triton"), [h, w_gu, w_down]),
        "swiglu_mlp_rmsnorm": (lambda a, b, c: channel_mlp.sublayer_fused(a, b, c, 1e-5), [rows, *mlp]),
        "swiglu_mlp": (channel_mlp.fused, [rows, *mlp]),
        "rope_attention": (lambda q: K.rope_attention(q, *K.rope_cos_sin(9, 32), 2, backend="triton"), [qkv]),
        "stablemax_cross_entropy": (
            lambda z: K.stablemax_cross_entropy(z, labels, backend="triton"),
            [torch.randn(2, 9, 5)],
        ),  # fmt: skip
        "add_rmsnorm": (lambda a, b: K.add_rmsnorm(a, b, backend="triton"), [rows, rows.clone()]),
    }
    for name, (fn, inputs) in steps.items():
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        with OpLog() as log:
            out.sum().backward()
        assert log.count(torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.fill_) == 0, name
        assert all(t.grad is not None for t in leaves), name


def _saved_bytes(fn, inputs) -> int:
    kept: dict[int, int] = {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad) and t.data_ptr() not in {i.data_ptr() for i in inputs}:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(kept.values())


def test_token_mlp_rmsnorm_kernels_with_and_without_grad(monkeypatch):
    """No grad: the one kernel. With grad: its training form (writing the pre-norm sum and
    rstd, all backward keeps besides the inputs) and a backward of the norm's kernel and the
    two recomputing kernels (no GEMM of the composition); TRM_TUNE=composed: the composition,
    which keeps the [B, 2I, D] gate|up and the down product (and the activation where W_down
    needs a gradient)."""
    batch, seq, hidden, inter = 2, 9, 16, 8
    h, w_gu, w_down = _token_mlp_inputs(batch, seq, hidden, inter, torch.float32)
    with torch.no_grad(), OpLog() as no_grad:
        K.token_mlp_rmsnorm(h, w_gu, w_down, backend="triton")
    w_gu.requires_grad_()
    with OpLog() as with_grad:
        K.token_mlp_rmsnorm(h, w_gu, w_down, backend="triton").sum().backward()
    trm = torch.ops.trm
    assert no_grad.count(trm.token_mlp_rmsnorm) == 1 and no_grad.count(trm.swiglu) == 0
    assert with_grad.count(trm.token_mlp_rmsnorm_train) == 1 and with_grad.count(trm.add_rmsnorm) == 0
    (backward,) = [args for op, args in with_grad.calls if op == trm.token_mlp_rmsnorm_backward]
    assert backward[-2:] == (False, True)  # h needs no gradient: the weight-gradient kernel alone
    assert with_grad.count(trm.swiglu_backward, trm.swiglu) == 0
    assert with_grad.count(torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.mm) == 0
    fused = _saved_bytes(lambda *a: K.token_mlp_rmsnorm(*a, backend="triton"), (h, w_gu, w_down))
    assert fused == batch * seq * hidden * 4 + batch * hidden * 4  # the sum, rstd
    monkeypatch.setenv("TRM_TUNE", "composed")  # (the suite runs with TRM_TUNE=off: the fused kernel)
    with OpLog() as composed:
        K.token_mlp_rmsnorm(h, w_gu, w_down, backend="triton").sum().backward()
    assert composed.count(trm.token_mlp_rmsnorm_train) == 0 and composed.count(trm.add_rmsnorm) == 1
    kept = _saved_bytes(lambda *a: K.token_mlp_rmsnorm(*a, backend="triton"), (h, w_gu, w_down))
    assert kept >= batch * 2 * inter * hidden * 4 + fused  # gate|up at least (w_down needs no grad here)


def test_token_mlp_rmsnorm_longer_sequences_than_a_tile_take_the_composed_ops():
    from trm_kernels import token_mlp

    h, w_gu, w_down = _token_mlp_inputs(1, token_mlp.MAX_SEQ + 3, 8, 4, torch.float32)
    _check_fused_token_mlp(h, w_gu, w_down, "token_mlp S > MAX_SEQ")
    with pytest.raises(ValueError, match="sequence length 259 > 256"):
        torch.ops.trm.token_mlp_rmsnorm(h, w_gu, w_down, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inject_is_bitwise_the_reference(dtype):
    h, a, b = (torch.randn(3, 33, 5).to(dtype) * 10 for _ in range(3))
    assert torch.equal(K.inject(h, a, b, backend="triton"), R.inject(h, a, b))
    assert torch.equal(K.inject(h, a, a, backend="triton"), R.inject(h, a, a))
    assert torch.equal(K.inject(h, a, backend="triton"), R.inject(h, a))
    _, grads = run_op(lambda x, y, z: K.inject(x, y, z, backend="triton"), [h, a, b])
    _, want = run_op(R.inject, [h, a, b])
    for g, w in zip(grads, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["stablemax", "softmax"])
@pytest.mark.parametrize("shape, vocab", [((1, 1), 2), ((4, 81), 11), ((3, 7), 6), ((2, 33), 130)])
def test_cross_entropy(dtype, kind, shape, vocab):
    logits = (torch.randn(*shape, vocab) * 4).to(dtype)
    labels = torch.randint(0, vocab, shape)
    labels.view(-1)[::3] = -100
    name = f"{kind}_cross_entropy"
    compare(
        lambda t: getattr(K, name)(t, labels, backend="triton"),
        lambda t: getattr(R, name)(t, labels),
        [logits],
        f"{name}{shape}x{vocab}",
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, seq, heads, head_dim", [(1, 1, 1, 32), (2, 70, 2, 64), (1, 97, 1, 32), (1, 130, 2, 128)]
)
def test_rope_attention(dtype, batch, seq, heads, head_dim):
    qkv = torch.randn(batch, seq, 3 * heads * head_dim).to(dtype)
    cos, sin = (t.to(DEVICE) for t in K.rope_cos_sin(seq, head_dim))

    def ref(t):
        return R.rope_attention(t, cos.to(t.dtype) if t.dtype == torch.float64 else cos,
                                sin.to(t.dtype) if t.dtype == torch.float64 else sin, heads)  # fmt: skip

    compare(lambda t: K.rope_attention(t, cos, sin, heads, backend="triton"), ref, [qkv], f"attention S={seq}")


def test_rope_attention_rejects_unsupported_head_dim():
    cos, sin = (t.to(DEVICE) for t in K.rope_cos_sin(4, 24))
    with pytest.raises(ValueError, match="head_dim 24 is not supported by the triton backend"):
        K.rope_attention(torch.randn(1, 4, 72), cos, sin, 1, backend="triton")


def test_cross_entropy_out_of_range_label_is_loud():
    loss = K.stablemax_cross_entropy(torch.randn(2, 5), torch.tensor([1, 7]), backend="triton")
    assert loss[0].isfinite() and loss[1].isnan()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 9),
    n=st.integers(1, 300),
    inner=st.integers(1, 5),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31),
)
def test_random_shapes(rows, n, inner, dtype, seed):
    torch.manual_seed(seed)
    x, r = torch.randn(rows, n, inner).to(dtype), torch.randn(rows, n, inner).to(dtype)
    compare(lambda a, b: K.add_rmsnorm(a, b, 1, backend="triton"), lambda a, b: R.add_rmsnorm(a, b, 1), [x, r], "norm")
    gu = torch.randn(rows, 2 * n, inner).to(dtype)
    compare(lambda t: K.swiglu(t, 1, backend="triton"), lambda t: R.swiglu(t, 1), [gu], "swiglu")
    if n <= 256:  # the fused mlp_t sub-layer: a tile holds the whole sequence
        _check_fused_token_mlp(*_token_mlp_inputs(rows % 3 + 1, n, inner * 7, rows * 5, dtype), "token_mlp")
    logits, labels = torch.randn(rows, n + 1).to(dtype), torch.randint(-1, n + 1, (rows,))
    compare(
        lambda t: K.stablemax_cross_entropy(t, labels, -1, backend="triton"),
        lambda t: R.stablemax_cross_entropy(t, labels, -1),
        [logits],
        "stablemax",
    )


def test_non_contiguous_inputs():
    x = torch.randn(6, 40)[:, ::2]
    torch.testing.assert_close(K.add_rmsnorm(x, backend="triton"), R.add_rmsnorm(x))
    gu = torch.randn(8, 6).t()
    torch.testing.assert_close(K.swiglu(gu, backend="triton"), R.swiglu(gu))
    h, w_gu, w_down = torch.randn(2, 16, 9).transpose(1, 2), torch.randn(9, 8).t(), torch.randn(4, 9).t()
    with torch.no_grad():
        torch.testing.assert_close(K.token_mlp_rmsnorm(h, w_gu, w_down, backend="triton"),
                                   R.token_mlp_rmsnorm(h, w_gu, w_down))  # fmt: skip


def test_triton_backend_refuses_float64_by_name():
    with pytest.raises(TypeError, match="x is torch.float64: the triton backend"):
        K.add_rmsnorm(torch.randn(2, 4, dtype=torch.float64), backend="triton")
    with pytest.raises(TypeError, match="gate_up is torch.float64"):
        K.swiglu(torch.randn(2, 4, dtype=torch.float64), backend="triton")


def _opcheck_cases():
    x, r = torch.randn(3, 5, 8, requires_grad=True), torch.randn(3, 5, 8, requires_grad=True)
    logits, labels = torch.randn(4, 6, requires_grad=True), torch.tensor([0, 5, -100, 2])
    return [
        (torch.ops.trm.add_rmsnorm, (x, r, None, 2, 1e-5, False, "triton")),
        (torch.ops.trm.add_rmsnorm, (x, None, None, 1, 1e-5, False, "triton")),
        (
            torch.ops.trm.add_rmsnorm,
            (
                x,
                r.detach().double().float().requires_grad_(),
                torch.rand(8, requires_grad=True),
                2,
                1e-5,
                True,
                "triton",
            ),
        ),  # fmt: skip
        (
            torch.ops.trm.add_rmsnorm_backward,
            (torch.randn(3, 5, 8), None, x.detach(), r.detach(), None, torch.rand(3, 5), 2, "triton"),
        ),
        (
            torch.ops.trm.add_rmsnorm_backward,
            (torch.randn(3, 5, 8), None, x.detach(), None, None, torch.rand(3, 8), 1, "triton"),
        ),
        (
            torch.ops.trm.add_rmsnorm_backward,
            (
                torch.randn(3, 5, 8),
                torch.randn(3, 5, 8),
                x.detach(),
                r.detach(),
                torch.rand(8),
                torch.rand(3, 5),
                2,
                "triton",
            ),
        ),  # fmt: skip
        (torch.ops.trm.swiglu, (torch.randn(4, 10, requires_grad=True), 1)),
        (torch.ops.trm.swiglu_backward, (torch.randn(4, 5), torch.randn(4, 10), 1)),
        (torch.ops.trm.token_mlp_rmsnorm, (*_token_mlp_inputs(2, 9, 16, 8, torch.float32), 1e-5)),
        (
            torch.ops.trm.token_mlp_rmsnorm_train,
            (*(t.requires_grad_() for t in _token_mlp_inputs(2, 9, 16, 8, torch.float32)), 1e-5),
        ),
        *(
            (
                torch.ops.trm.token_mlp_rmsnorm_backward,
                (
                    torch.randn(2, 9, 16),
                    torch.randn(2, 9, 16),
                    *_token_mlp_inputs(1, 9, 1, 8, torch.float32)[1:],
                    torch.randn(2, 9, 16),
                    torch.rand(2, 16) + 0.5,
                    *need,
                ),
            )
            for need in ((True, True), (True, False), (False, True))
        ),  # fmt: skip
        (torch.ops.trm.inject, (x, r, torch.randn(3, 5, 8, requires_grad=True))),
        (torch.ops.trm.inject, (x, r, None)),
        (torch.ops.trm.inject, (x, torch.randn(3, 1, 8, requires_grad=True), torch.randn(8, requires_grad=True))),
        (
            torch.ops.trm.rope_attention,
            (torch.randn(2, 9, 96, requires_grad=True), *K.rope_cos_sin(9, 32), 1, 1, False, None, False, 0),
        ),
        (
            torch.ops.trm.rope_attention,
            (
                torch.randn(2, 9, 8 * 32, requires_grad=True),
                *K.rope_cos_sin(9, 32),
                4,
                2,
                True,
                torch.arange(9) < torch.tensor([[9], [4]]),
                False,
                3,
            ),
        ),
        (
            torch.ops.trm.rope_attention,
            (
                torch.randn(2, 9, 6 * 32, requires_grad=True),
                *K.rope_cos_sin(9, 32, rope="interleaved"),
                2,
                2,
                True,
                None,
                True,
                0,
            ),
        ),
        (
            torch.ops.trm.rope_attention,
            (torch.randn(2, 9, 6 * 48, requires_grad=True), None, None, 4, 1, True, None, False, 0),
        ),
        (torch.ops.trm.cross_entropy, (logits, labels, -100, True)),
        (torch.ops.trm.cross_entropy, (logits, labels, -100, False)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_ops_compile_without_graph_breaks():
    def block(h, a, gu):
        h = K.inject(h, a, backend="triton")
        return K.add_rmsnorm(h, K.swiglu(gu, backend="triton"), backend="triton")

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    h, a, gu = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 16)
    torch.testing.assert_close(compiled(h, a, gu), R.add_rmsnorm(R.inject(h, a), R.swiglu(gu)))

    mixer = torch.compile(lambda *t: K.token_mlp_rmsnorm(*t, backend="triton"), fullgraph=True, backend="aot_eager")
    inputs = _token_mlp_inputs(2, 9, 16, 8, torch.float32)
    with torch.no_grad():  # the fused kernel
        torch.testing.assert_close(mixer(*inputs), R.token_mlp_rmsnorm(*inputs))
    torch.testing.assert_close(mixer(inputs[0], inputs[1].requires_grad_(), inputs[2]), R.token_mlp_rmsnorm(*inputs))


def test_auto_skips_a_backend_that_does_not_take_the_call(monkeypatch):
    """auto picks the first backend that supports the call; an explicit choice raises."""
    from trm_kernels import backend

    monkeypatch.setitem(backend.AUTO_ORDER, DEVICE, ("triton", "reference"))
    qkv = torch.randn(1, 4, 3 * 2 * 16)  # head_dim 16: not a triton head size
    cos, sin = (t.to(DEVICE) for t in K.rope_cos_sin(4, 16))
    torch.testing.assert_close(K.rope_attention(qkv, cos, sin, 2), R.rope_attention(qkv, cos, sin, 2))
    with pytest.raises(ValueError, match="head_dim 16"):
        K.rope_attention(qkv, cos, sin, 2, backend="triton")
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(K.add_rmsnorm(x), R.add_rmsnorm(x))  # float64: the reference
    calls = []
    monkeypatch.setitem(backend._REGISTRY["swiglu"], "triton", (lambda *a: calls.append(a) or R.swiglu(*a), None))
    K.swiglu(torch.randn(2, 4))
    assert len(calls) == 1  # a supported call does go to triton


def test_cuda_backend_runs_triton_for_ops_the_extension_lacks():
    """TRM_BACKEND=cuda must run a whole model: the extension has add + RMSNorm only."""
    gu, h, a = torch.randn(3, 8), torch.randn(3, 4), torch.randn(3, 4)
    with K.use_backend("cuda"):
        torch.testing.assert_close(K.swiglu(gu), R.swiglu(gu))
        torch.testing.assert_close(K.inject(h, a), R.inject(h, a))
        with pytest.raises(TypeError, match="gate_up is torch.float64: the triton backend"):
            K.swiglu(gu.double())


def test_interpreter_version_check():
    from trm_kernels._triton import interpreter_problem

    assert "numpy<2.4" in interpreter_problem("3.6.0", "2.4.1")  # the pair that fails
    assert interpreter_problem("3.6.0", "2.3.5") is None
    assert interpreter_problem("3.10.0", "2.4.0rc1") is None  # 3.10 > 3.8 as versions, not strings
    assert interpreter_problem("3.9.0+git1234", "2.5.0") is None
