"""Adaptive evaluation with continuous batching, against each puzzle solved alone step by step."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from trm import adaptive
from trm.arch import build_model
from trm.config import ModelConfig


def model_and_puzzles(arch="trm", n=20, seed=0):
    cfg = ModelConfig(arch=arch, vocab_size=7, seq_len=9, hidden_size=32, num_heads=2, num_layers=1,
                      puzzle_emb_len=1, T=2, n=1, n_sup=3, forward_dtype="float64")  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # a live halting head, so that puzzles halt at different steps
        model.q_head.weight.normal_(0, 0.5)
        model.q_head.bias.zero_()
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randint(1, 7, (n, 9), generator=g), torch.zeros(n, dtype=torch.long)


def alone(model, inputs, ids, max_steps, threshold):
    """The oracle: each puzzle in a batch of its own, halting at the first step past the threshold."""
    answers, steps = [], []
    for i in range(len(inputs)):
        batch = {"inputs": inputs[i : i + 1], "puzzle_identifiers": ids[i : i + 1]}
        for step, (logits, _) in enumerate(model.solve(batch, max_steps), 1):
            if adaptive.halting_logit(model, model.last_q)[0] > threshold or step == max_steps:
                answers.append(logits.argmax(-1)[0].numpy())
                steps.append(step)
                break
    return np.stack(answers), np.array(steps)


@pytest.fixture(autouse=True)
def record_q(monkeypatch):
    """model.solve yields q_halt only; keep the whole q of each evaluation step for the oracle."""
    from trm.model import RecursiveReasoningModel

    real = RecursiveReasoningModel._eval_step

    def eval_step(self, x, y, z):
        out = real(self, x, y, z)
        self.last_q = out[3]
        return out

    monkeypatch.setattr(RecursiveReasoningModel, "_eval_step", eval_step)


@pytest.mark.parametrize("arch", ["trm", "hrm"])
@pytest.mark.parametrize("batch_size, sync_every", [(3, 1), (7, 2), (64, 1)])
def test_each_puzzle_gets_the_answer_of_its_own_halting_step(arch, batch_size, sync_every, monkeypatch):
    model, inputs, ids = model_and_puzzles(arch)
    want_answers, want_steps = alone(model, inputs, ids, max_steps=6, threshold=0.0)
    assert 1 < len(set(want_steps.tolist())), "the oracle should halt puzzles at different steps"
    loaded = []
    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda tokens, ids: loaded.extend(map(bytes, tokens.numpy().astype(np.uint8)))
                        or embed(tokens, ids))  # fmt: skip
    solved = adaptive.solve(model, inputs, ids, batch_size, max_steps=6, threshold=0.0, sync_every=sync_every)
    np.testing.assert_array_equal(solved.steps, want_steps)
    np.testing.assert_array_equal(solved.answers, want_answers)
    # every puzzle was loaded exactly once (the first embed is the empty batch's), in any order
    width = min(batch_size, len(inputs))
    assert Counter(loaded[width:]) == Counter(map(bytes, inputs.numpy().astype(np.uint8)))


@pytest.mark.parametrize("batch_size", [6, 20, 50])
def test_an_infinite_threshold_is_fixed_step_evaluation(batch_size):
    model, inputs, ids = model_and_puzzles()
    solved = adaptive.solve(model, inputs, ids, batch_size, max_steps=5, threshold=float("inf"))
    *_, (logits, _) = model.solve({"inputs": inputs, "puzzle_identifiers": ids}, 5)
    np.testing.assert_array_equal(solved.answers, logits.argmax(-1).numpy())
    assert (solved.steps == 5).all()


def test_summary_counts_accuracy_and_steps():
    solved = adaptive.Solved(answers=np.array([[1, 2], [3, 4], [5, 6]]), steps=np.array([1, 2, 4]),
                             halt_logit=np.zeros(3), seconds=0.5, model_steps=4)  # fmt: skip
    labels = np.array([[1, 2], [3, -100], [5, 0]])
    s = adaptive.summary(solved, labels)
    assert s["exact_accuracy"] == pytest.approx(2 / 3) and s["accuracy"] == pytest.approx(4 / 5)
    assert (s["steps_mean"], s["steps_median"], s["steps_max"]) == (pytest.approx(7 / 3), 2.0, 4)
    assert s["steps_histogram"] == {1: 1, 2: 1, 4: 1} and s["puzzles_per_second"] == 6.0


def test_eval_halt_compare_sweep_and_json_through_the_cli(tmp_path, sudoku4_data):
    from typer.testing import CliRunner

    from trm.cli import app

    runner = CliRunner()
    args = ["train", "--data", str(sudoku4_data), "--out", str(tmp_path / "run"), "--set", "model.hidden_size=32",
            "--set", "train.steps=2", "--set", "train.global_batch_size=32", "--no-progress"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    out = runner.invoke(app, ["eval", str(tmp_path / "run"), "--halt", "--compare", "--json", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    assert "halting runs" in out.output and "the puzzles/s of fixed steps" in out.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["mode"] for r in report["results"]] == ["halting", "fixed"]
    for r in report["results"]:
        assert r["count"] == 64 and {"exact_accuracy", "accuracy", "steps_mean", "steps_median", "steps_p90",
                                     "steps_max", "steps_histogram", "puzzles_per_second"} <= set(r)  # fmt: skip
    out = runner.invoke(app, ["eval", str(tmp_path / "run"), "--halt", "--steps", "2,8", "--threshold", "inf",
                              "--plot", str(tmp_path / "sweep.png")])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert "halting          8" in out.output
    for bad, message in ((["--steps", "2,4"], "goes with --halt"), (["--compare"], "go with --halt"),
                         (["--halt", "--steps", "2,x"], "expected a whole number"),
                         (["--halt", "--sync-every", "0"], "--sync-every 0: must be >= 1")):  # fmt: skip
        out = runner.invoke(app, ["eval", str(tmp_path / "run"), *bad])
        assert out.exit_code == 2 and message in out.output, out.output


def test_training_evaluates_adaptively_when_asked(sudoku4_data, tmp_path):
    from trm.config import apply_overrides, preset
    from trm.train import Trainer

    base = ["model.hidden_size=32", "train.global_batch_size=32", "train.eval_batch_size=16"]
    fixed = Trainer(apply_overrides(preset("sudoku4"), base), sudoku4_data, tmp_path / "a", torch.device("cpu"))
    fixed.train_step()
    halting = Trainer(apply_overrides(preset("sudoku4"), [*base, "train.eval_halt=true",
                                                          "train.eval_halt_threshold=inf"]),
                      sudoku4_data, tmp_path / "b", torch.device("cpu"))  # fmt: skip
    halting.train_step()
    want, got = fixed.evaluate(), halting.evaluate()
    assert got["steps_mean"] == 4 and got["count"] == want["count"] == 64
    assert (got["exact_accuracy"], got["accuracy"]) == pytest.approx((want["exact_accuracy"], want["accuracy"]))


def _ddp_adaptive_worker(rank, world, port, out):
    import torch.distributed as dist

    from trm.data.store import Split
    from trm.evaluate import evaluate_adaptive

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, inputs, ids = model_and_puzzles(n=23)
        labels = torch.randint(1, 7, inputs.shape, generator=torch.Generator().manual_seed(5)).numpy()
        split = Split(inputs.numpy(), labels, ids.numpy())
        result = evaluate_adaptive(model, split, batch_size=4, steps=5)
        if rank == 0:
            (out / "ddp.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ddp_processes_each_solve_a_share_and_gather_the_same_result_as_one(tmp_path):
    """Two gloo processes, each a strided half of 23 puzzles: the gathered accuracy and step
    counts equal one process solving all of them."""
    import socket

    import torch.multiprocessing as mp

    from trm.data.store import Split
    from trm.evaluate import evaluate_adaptive

    model, inputs, ids = model_and_puzzles(n=23)
    labels = torch.randint(1, 7, inputs.shape, generator=torch.Generator().manual_seed(5)).numpy()
    want = evaluate_adaptive(model, Split(inputs.numpy(), labels, ids.numpy()), batch_size=4, steps=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_adaptive_worker, args=(2, port, tmp_path), nprocs=2, start_method="spawn")
    got = json.loads((tmp_path / "ddp.json").read_text())
    assert got["count"] == want["count"] == 23
    for key in ("exact_accuracy", "accuracy", "steps_mean", "steps_median", "steps_max"):
        assert got[key] == pytest.approx(want[key]), key
    assert {int(k): v for k, v in got["steps_histogram"].items()} == want["steps_histogram"]
    assert len(set(want["steps_histogram"])) > 1  # puzzles halted at different steps
