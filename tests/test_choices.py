"""Choices that cannot go wrong quietly: a timing candidate that raises is skipped, not fatal;
ranks of a distributed run make one choice (timing, autotuner config, parity verdict); the
parity guard sees the last rows of the batch; an evaluation's last partial batch keeps the
shape every other batch had."""

import json
import socket
import warnings

import numpy as np
import pytest
import torch
import trm_kernels as K
from trm_kernels import backend, ranks, reference, tune, verify


@pytest.fixture
def timing(monkeypatch):
    """Candidates timed on CPU with a stand-in timer (fn -> milliseconds), forgotten after."""
    monkeypatch.setattr(tune, "decisions", {})
    with tune.use_mode("on"):
        yield
    tune.set_timer(None)


def _candidates(failing: set[str] = frozenset()):
    def candidate(name):
        def run(x):
            if name in failing:
                raise RuntimeError(f"out of resource: shared memory ({name})")
            return x * 2

        return run

    return {name: candidate(name) for name in ("fused", "one kernel", "composed")}


def test_a_candidate_that_raises_is_skipped_and_reported_and_the_choice_still_made(timing):
    tune.set_timer(_timer({"fused": 1.0, "one kernel": 3.0, "composed": 2.0}))
    x = torch.randn(3, 4)
    with pytest.warns(tune.TuneWarning, match=r"fused raised RuntimeError: out of resource: shared memory \(fused\)"):
        choice = tune.choose("op", _timed(_candidates({"fused"})), (x,))
    assert choice == "composed"  # the faster of the two that ran
    (decision,) = tune.report()
    assert decision["failed"] == {"fused": "RuntimeError: out of resource: shared memory (fused)"}
    assert decision["times_ms"] == {"one kernel": 3.0, "composed": 2.0}
    assert tune.choose("op", _timed(_candidates({"fused"})), (x,)) == "composed"  # kept, not timed again


def test_where_every_candidate_raises_the_default_is_chosen_for_the_parity_guard_to_check(timing):
    tune.set_timer(_timer({}))
    with pytest.warns(tune.TuneWarning):
        assert tune.choose("op", _candidates({"fused", "one kernel", "composed"}), (torch.randn(2),)) == "fused"


_named = [""]  # the candidate that ran last


def _timer(times: dict[str, float]):
    """A stand-in for do_bench: runs the candidate once, reports the time given for it."""

    def timer(fn):
        fn()
        return times[_named[0]]

    return timer


def _timed(candidates):
    """Each candidate notes its name when it runs (the stand-in timer reads it)."""

    def wrap(name, fn):
        def run(*args):
            _named[0] = name
            return fn(*args)

        return run

    return {name: wrap(name, fn) for name, fn in candidates.items()}


# ---- the parity guard: the last rows -----------------------------------------------------------


def _wrong_last_row(x, *rest):
    """add_rmsnorm, wrong in the last batch row only (as the last programs' tiles of a kernel
    with a fault that depends on the batch size would be)."""
    out = reference.add_rmsnorm(x, *rest)
    return torch.cat([out[:-1], out[-1:] * 1.01])


class _WrongLastRowBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, dim, eps, weight, prenorm):
        ctx.save_for_backward(x, r)
        ctx.args = (dim, eps)
        return reference.add_rmsnorm(x, r, dim, eps)

    @staticmethod
    def backward(ctx, grad):
        x, r = ctx.saved_tensors
        with torch.enable_grad():
            leaves = x.detach().requires_grad_(), r.detach().requires_grad_()
            gx, gr = torch.autograd.grad(reference.add_rmsnorm(*leaves, *ctx.args), leaves, grad)
        gx = torch.cat([gx[:-1], gx[-1:] * 1.01])
        return gx, gr, None, None, None, None


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_fault_in_the_last_rows_is_caught_by_the_parity_guard(fused_on_cpu, where):
    """Rows 0 and 1 are right, row 63 is not: the guard compares the last rows too (forward:
    the call's own output; backward: the fused backward over the whole batch)."""
    backend.register("add_rmsnorm", "triton", _wrong_last_row if where == "forward" else _WrongLastRowBackward.apply)
    x, r = torch.randn(64, 5, 8), torch.randn(64, 5, 8)
    if where == "backward":
        x.requires_grad_()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = K.add_rmsnorm(x, r)
        if where == "backward":
            out.sum().backward()
    messages = [str(w.message) for w in record if issubclass(w.category, verify.ParityWarning)]
    assert len(messages) == 1 and f"{where}" in messages[0] and "rows 62..63" in messages[0], messages
    torch.testing.assert_close(out, reference.add_rmsnorm(x, r), rtol=0, atol=0)  # the reference ran instead


def test_the_guard_compares_the_first_and_the_last_rows():
    x = torch.randn(64, 3)
    assert verify.parts("add_rmsnorm", (x, x, -1, 1e-5)) == [slice(0, 2), slice(62, 64)]
    assert verify.parts("add_rmsnorm", (x[:3], x[:3], -1, 1e-5)) == [slice(0, 2), slice(2, 3)]
    assert verify.parts("add_rmsnorm", (x[:1], x[:1], -1, 1e-5)) == [slice(0, 1)]
    assert verify.parts("add_rmsnorm", (x, x, 0, 1e-5)) == [slice(0, 64)]  # normalised along the rows: all of them


# ---- ranks: one decision for every process -----------------------------------------------------


def _ranks_worker(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = {}
        with tune.use_mode("on"):
            # rank 0 measures "fused" fastest and "one kernel" raising; rank 1 would measure otherwise
            times = [{"fused": 1.0, "composed": 2.0}, {"fused": 2.0, "one kernel": 0.1, "composed": 1.0}][rank]
            timed = []
            timer = _timer(times)

            def noted(fn):
                ms = timer(fn)
                timed.append(_named[0])
                return ms

            tune.set_timer(noted)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", tune.TuneWarning)
                result["choice"] = tune.choose("op", _timed(_candidates({"one kernel"} if rank == 0 else set())),
                                               (torch.randn(4),))  # fmt: skip
            result["failed"], result["timed"] = tune.report()[0]["failed"], timed
        configs = ["config 0", "config 1"]
        cache = tune._SharedConfigs(configs, "kernel")
        if rank == 0:
            cache[("key",)] = configs[0]  # what rank 0's autotuner timed and kept
        result["config"] = cache[("key",)] if ("key",) in cache else None  # rank 1: taken, not timed
        # a fused op wrong on rank 0 alone, then one wrong on rank 1 alone
        backend.AUTO_ORDER["cpu"] = ("triton", "reference")
        result["verdicts"] = []
        for op, wrong_on in (("inject", 0), ("add_rmsnorm", 1)):
            right = backend._REGISTRY[op]["reference"][0]
            backend._REGISTRY[op]["triton"] = (lambda *a, f=right, w=wrong_on: f(*a) * (1.01 if rank == w else 1.0),
                                               None)  # fmt: skip
            with K.use_backend("auto"), verify.use_verify("first"), warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                h = torch.ones(4, 3)
                fused = K.inject(h, h) if op == "inject" else K.add_rmsnorm(h, h)
            result[op] = (
                fused.tolist() == (reference.inject(h, h) if op == "inject" else reference.add_rmsnorm(h, h)).tolist()
            )
            result["verdicts"] += [str(w.message) for w in record if issubclass(w.category, verify.ParityWarning)]
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # rank 0 holds the store: nobody leaves before everyone is done
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_rank_runs_rank_0s_choices(tmp_path):
    """Two gloo processes with different stand-in timings: rank 0 times and chooses, rank 1
    times nothing and takes its choice (and the candidate that raised on rank 0 is reported
    on both); the autotuner's config is rank 0's; a fused op failing its check on rank 0 is
    disabled on both; one failing on rank 1 alone is disabled there (its kernel is wrong)."""
    import torch.multiprocessing as mp

    mp.start_processes(_ranks_worker, args=(2, _port(), tmp_path), nprocs=2, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["choice"] for g in got] == ["fused", "fused"]  # rank 0's fastest that ran
    assert got[0]["timed"] == ["fused", "composed"] and got[1]["timed"] == []
    assert all("one kernel" in g["failed"] for g in got)
    assert [g["config"] for g in got] == ["config 0", "config 0"]
    assert got[0]["inject"] and got[1]["inject"]  # wrong on rank 0: the reference on both
    assert got[0]["add_rmsnorm"] and got[1]["add_rmsnorm"]  # right on rank 0 (fused); rank 1 falls back alone
    assert len(got[0]["verdicts"]) == 1 and len(got[1]["verdicts"]) == 2  # rank 1: rank 0's inject, its own norm
    assert "on rank 0" in got[1]["verdicts"][0]


def _alone_worker(rank: int, world: int, port: int, out) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["TRM_RANK_TIMEOUT"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with tune.use_mode("on"), warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            tune.set_timer(_timer({"fused": 2.0, "one kernel": 3.0, "composed": 1.0}))
            choice = tune.choose("alone", _timed(_candidates()), (torch.randn(rank + 2),))  # a shape per rank
        messages = [str(w.message) for w in record if issubclass(w.category, ranks.RankWarning)]
        (out / f"alone{rank}.json").write_text(json.dumps({"choice": choice, "warnings": messages}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_call_on_one_rank_alone_does_not_hang():
    """Rank 0 never waits (a model evaluated on the main process alone); another rank waits
    for rank 0's decision at most TRM_RANK_TIMEOUT seconds, then decides alone and says so."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        mp.start_processes(_alone_worker, args=(2, _port(), Path(tmp)), nprocs=2, start_method="spawn")
        got = [json.loads((Path(tmp) / f"alone{r}.json").read_text()) for r in range(2)]
    assert [g["choice"] for g in got] == ["composed", "composed"]
    assert got[0]["warnings"] == [] and "had no decision from rank 0" in got[1]["warnings"][0]


def test_a_single_process_decides_alone():
    assert not ranks.active() and ranks.agree("k", lambda: 3) == 3 and ranks.rank() == 0


# ---- evaluation keeps one batch shape ----------------------------------------------------------


def test_an_evaluation_with_a_partial_last_batch_runs_every_batch_at_one_shape(monkeypatch):
    """23 puzzles in batches of 8: the last batch is padded to 8 (no new signature: no new
    CUDA-graph capture, timing, parity check or autotuning mid-run), and the padding is not
    counted: the result equals that of batches of 1."""
    from test_adaptive import model_and_puzzles

    from trm.data.store import Split
    from trm.evaluate import evaluate

    model, inputs, ids = model_and_puzzles(n=23)
    labels = torch.randint(1, 7, inputs.shape, generator=torch.Generator().manual_seed(5)).numpy()
    split = Split(inputs.numpy(), labels, ids.numpy())
    shapes, solve = [], model.solve

    def recorded(batch, steps=None):
        shapes.append(tuple(batch["inputs"].shape))
        return solve(batch, steps)

    monkeypatch.setattr(model, "solve", recorded)
    wrong: list[int] = []
    got = evaluate(model, split, batch_size=8, steps=2, wrong=wrong)
    assert shapes == [(8, inputs.shape[1])] * 3
    one_by_one_wrong: list[int] = []
    want = evaluate(model, split, batch_size=1, steps=2, wrong=one_by_one_wrong)
    assert got == pytest.approx(want) and got["count"] == 23
    assert wrong == one_by_one_wrong and np.all(np.array(wrong) < 23)
