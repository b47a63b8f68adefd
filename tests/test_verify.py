"""The parity guard by fault injection through the package's own registration API: a fused
implementation that raises, one that is wrong (forward or backward), one that is right; and a
CUDA-graph capture that fails."""

import json
import warnings

import pytest
import torch
import trm_kernels as K
from trm_kernels import backend, reference, verify

from trm.graphs import GraphWarning, StaticGraph


class Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def raising(*args):
    raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")


def parity_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, verify.ParityWarning)]


def test_a_raising_a_wrong_and_a_right_implementation(fused_on_cpu):
    broken, wrong = (
        Counted(raising),
        Counted(lambda x, r, dim, eps, *rest: reference.add_rmsnorm(x, r, dim, eps, *rest) * 1.01),
    )
    right = Counted(reference.inject)
    backend.register("swiglu", "triton", broken)
    backend.register("add_rmsnorm", "triton", wrong)
    backend.register("inject", "triton", right)
    x, r = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(K.swiglu(x), reference.swiglu(x), rtol=0, atol=0)
            torch.testing.assert_close(K.add_rmsnorm(x, r), reference.add_rmsnorm(x, r), rtol=0, atol=0)
            torch.testing.assert_close(K.inject(x, r), reference.inject(x, r), rtol=0, atol=0)
    messages = parity_warnings(record)
    assert len(messages) == 2  # one per disabled signature, not one per call
    assert "triton swiglu" in messages[0] and "out of resource" in messages[0] and "float32[4, 6, 8]" in messages[0]
    assert "triton add_rmsnorm" in messages[1] and "relative error" in messages[1] and "trm doctor" in messages[1]
    assert broken.calls == 1 and wrong.calls == 1  # disabled after their first call
    assert right.calls == 3  # checked once, then trusted
    assert [r.ok for r in verify.verified.values()] == [False, False, True]
    with warnings.catch_warnings(record=True) as record:  # another signature is checked on its own
        warnings.simplefilter("always")
        K.swiglu(torch.randn(2, 8))
    assert len(parity_warnings(record)) == 1 and broken.calls == 2


def test_off_lets_a_wrong_result_through_and_always_checks_every_call(fused_on_cpu):
    wrong = Counted(lambda x, r, dim, eps, *rest: reference.add_rmsnorm(x, r, dim, eps, *rest) * 1.01)
    backend.register("add_rmsnorm", "triton", wrong)
    x = torch.randn(3, 16)
    with K.use_verify("off"):
        assert not torch.equal(K.add_rmsnorm(x), reference.add_rmsnorm(x))  # so the guard tests can fail
    right = Counted(reference.add_rmsnorm)
    backend.register("add_rmsnorm", "triton", right)
    with K.use_verify("always"), warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            K.add_rmsnorm(x)
    assert len(verify.verified) == 1 and right.calls == 3


class _WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, dim, activation="swiglu"):
        ctx.save_for_backward(gate_up)
        ctx.dim = dim
        return reference.swiglu(gate_up, dim, activation)

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        with torch.enable_grad():
            x = gate_up.detach().requires_grad_()
            (g,) = torch.autograd.grad(reference.swiglu(x, ctx.dim), x, grad)
        return 2 * g, None, None


def test_a_wrong_backward_is_caught_where_a_gradient_is_needed(fused_on_cpu):
    backend.register("swiglu", "triton", _WrongBackward.apply)
    x = torch.randn(4, 10)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        K.swiglu(x)  # no grad needed: the forward is right
        assert parity_warnings(record) == []
        leaf = x.clone().requires_grad_()
        K.swiglu(leaf).sum().backward()
    messages = parity_warnings(record)
    assert len(messages) == 1 and "backward" in messages[0]
    want = x.clone().requires_grad_()
    reference.swiglu(want).sum().backward()
    torch.testing.assert_close(leaf.grad, want.grad, rtol=0, atol=0)  # the reference's gradient


def test_the_check_runs_on_a_few_rows(fused_on_cpu, monkeypatch):
    seen = []
    real = verify._rows
    monkeypatch.setattr(verify, "_rows", lambda args, op, n: seen.append(n) or real(args, op, n))
    backend.register("add_rmsnorm", "triton", reference.add_rmsnorm)
    K.add_rmsnorm(torch.randn(64, 5, 8))
    assert seen == [slice(0, verify.ROWS), slice(64 - verify.ROWS, 64)]  # the first and the last rows


def _train_sudoku4(data, out, overrides=()):
    """(fit's result, every metrics.jsonl record without its time) of the sudoku4 preset."""
    from trm.config import apply_overrides, preset
    from trm.train import Trainer, fit

    trainer = Trainer(apply_overrides(preset("sudoku4"), list(overrides)), data, out, torch.device("cpu"))
    result = fit(trainer, show_progress=False)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return result, [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def test_the_tiny_trm_of_the_quick_start_learns_4x4_sudoku(tmp_path):
    """The sudoku4 preset end to end on the reference path (about 70 s on 2 cores): held-out
    exact accuracy >= 80% (the quick start's model solves all 200)."""
    from trm.config import preset
    from trm.data.dataset import build

    cfg = preset("sudoku4")
    build(cfg.data, tmp_path / "data")
    with K.use_backend("reference"):
        result, _ = _train_sudoku4(tmp_path / "data", tmp_path / "run")
    assert result["count"] == cfg.data.num_test and result["exact_accuracy"] >= 0.8, result
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0


def test_a_broken_fused_op_leaves_the_training_run_the_reference_paths(fused_on_cpu, tmp_path):
    """40 steps of the sudoku4 preset with a deliberately broken fused MLP sub-layer: the run
    is the reference path's, loss for loss and in its evaluation, with one warning per
    signature the broken op took."""
    from trm.config import preset
    from trm.data.dataset import build

    build(preset("sudoku4").data, tmp_path / "data")
    short = ["train.steps=40", "train.eval_interval=40", "train.checkpoint_interval=40"]
    backend.AUTO_ORDER["cpu"] = ("reference",)
    want, want_log = _train_sudoku4(tmp_path / "data", tmp_path / "reference", short)
    backend.AUTO_ORDER["cpu"] = ("triton", "reference")

    def broken(h, w_gate_up, w_down, eps):  # the MLP sub-layer every block runs
        return reference.swiglu_mlp_rmsnorm(h, w_gate_up, w_down, eps) + 0.5

    backend.register("swiglu_mlp_rmsnorm", "triton", broken)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, got_log = _train_sudoku4(tmp_path / "data", tmp_path / "broken", short)
    assert want["count"] > 0 and len(want_log) >= 4
    assert got == want
    assert got_log == want_log  # every logged loss and accuracy, bit for bit
    # one signature per distinct call shape (training and evaluation batches), one warning each
    messages = parity_warnings(record)
    assert 1 <= len(messages) == sum(not r.ok for r in verify.verified.values()) <= 4
    assert all("triton swiglu_mlp_rmsnorm failed its check" in m for m in messages)


def test_a_failing_cuda_graph_capture_falls_back_to_the_eager_path(monkeypatch):
    def step(x):
        return (x * 2,)

    graph = StaticGraph(step)
    monkeypatch.setattr(StaticGraph, "_can_capture", lambda self, t: True)
    monkeypatch.setattr(StaticGraph, "_captured", lambda self, static: raising())
    with pytest.warns(GraphWarning, match="capture of step failed.*out of resource"):
        (out,) = graph(torch.ones(3))
    torch.testing.assert_close(out, torch.full((3,), 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls reuse the eager entry
        (out,) = graph(torch.full((3,), 5.0))
    torch.testing.assert_close(out, torch.full((3,), 10.0))


def test_doctor_quick_on_a_cpu_reports_every_op_and_exits_0(tmp_path):
    from typer.testing import CliRunner

    from trm.cli import app

    result = CliRunner().invoke(app, ["doctor", "--quick", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d" / "doctor.json").read_text())
    assert (tmp_path / "d" / "doctor.md").read_text().startswith("# trm doctor on ")
    env = report["environment"]
    for key in ("device", "torch", "cuda", "triton", "numpy", "cuda_extension", "auto_order", "settings", "verify"):
        assert key in env, key
    parity = [c for c in report["checks"] if c["kind"] == "parity"]
    ops = {op for op in backend._REGISTRY}
    assert {c["name"] for c in parity} == ops
    expected_backends = {"reference", "triton"} if "triton" in K.available("swiglu") else {"reference"}
    for op in ops:
        assert {c["backend"] for c in parity if c["name"] == op} == expected_backends, op
    assert {c["dtype"] for c in parity} == {"float32", "float16"}
    assert all(c["passed"] and c["numbers"]["forward_error"] >= 0 for c in parity)
    assert [c["name"] for c in report["checks"] if c["kind"] == "graphs"] == [
        "training step, no-grad cycles",
        "evaluation step",
    ]
    assert report["failed"] == 0 and any("speed: not measured" in s for s in report["skipped"])


def test_doctor_lists_a_failing_op_first_and_exits_1(fused_on_cpu, tmp_path):
    from typer.testing import CliRunner

    from trm.cli import app

    backend.register("inject", "triton", lambda h, a, b: reference.inject(h, a, b) * 1.5)
    result = CliRunner().invoke(app, ["doctor", "--quick", "--out", str(tmp_path / "d")])
    assert result.exit_code == 1, result.output
    checks = json.loads((tmp_path / "d" / "doctor.json").read_text())["checks"]
    failed = [c for c in checks if c["passed"] is False]
    assert failed and checks[: len(failed)] == failed  # failures first
    assert {(c["name"], c["backend"]) for c in failed} == {("inject", "triton")}
    assert "relative error" in failed[0]["detail"]


def test_doctor_times_a_small_training_step_per_backend(monkeypatch):
    """The GPU-only timing path, run once on a CPU with a stand-in timer."""
    from trm import doctor

    calls = []
    monkeypatch.setattr(doctor, "_time", lambda fn, reps=20: calls.append(fn()) or 1.5)
    checks = doctor._step_speed(torch.device("cpu"), lambda what: None, batch=2)
    assert [(c.name, c.backend, c.passed) for c in checks] == [
        ("sudoku-mlp training step", "reference", None),
        ("sudoku-mlp training step", "auto", None),
        ("sudoku-att training step", "reference", None),
        ("sudoku-att training step", "auto", None),
    ]
    assert len(calls) == 4 and checks[0].detail == "1.5 ms"


def test_doctor_on_a_terminal_or_in_a_log_ends_with_its_verdict_and_where_it_wrote(tmp_path):
    from rich.console import Console

    from trm import doctor

    checks = [doctor.Check("parity", "swiglu", "triton", "float16", "(2, 8)", False, "relative error 1 > bound 0"),
              doctor.Check("parity", "inject", "triton", "float16", "(2, 8)", True, "fine")]  # fmt: skip
    report = {"environment": {"device": "cpu", "torch": "2", "triton": "3", "cuda_extension": "not built"},
              "skipped": ["speed: not measured on a CPU"], "seconds": 1.0, "failed": 1,
              "checks": [c.__dict__ for c in checks]}  # fmt: skip
    console = Console(record=True, width=200)
    doctor.present(report, tmp_path, console)
    lines = console.export_text().strip().splitlines()
    assert lines[-2].startswith("1 of 2 checks failed (parity 1/2 passed")
    assert lines[-1] == f"wrote {tmp_path / 'doctor.json'} and {tmp_path / 'doctor.md'} (every check)"
    assert any("swiglu" in line and "relative error" in line for line in lines) and not any("#" in x for x in lines)
