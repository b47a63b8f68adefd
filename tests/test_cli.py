"""The `trm` command line end to end on a tiny run, and its errors on bad input."""

import re

import pytest
import torch
from typer.testing import CliRunner

from trm.cli import app

runner = CliRunner()
TINY = [
    "--set",
    "model.hidden_size=32",
    "--set",
    "model.n_sup=2",
    "--set",
    "train.steps=4",
    "--set",
    "train.global_batch_size=32",
    "--set",
    "train.log_interval=2",
    "--no-progress",
]


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, re.sub(r"\s+", " ", result.output)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    code, out = run("build", "--out", root / "data", "--set", "data.num_train=64", "--set", "data.num_test=16")
    assert code == 0, out
    code, out = run("train", "--data", root / "data", "--out", root / "run", *TINY)
    assert code == 0, out
    assert "test exact accuracy" in out
    return root


def test_train_writes_run_directory(trained):
    run_dir = trained / "run"
    assert {"checkpoint.safetensors", "metrics.jsonl", "metrics.png"} <= {p.name for p in run_dir.iterdir()}


def test_eval_and_test_time_recursion(trained):
    code, out = run("eval", trained / "run", "--steps", "5")
    assert code == 0, out
    assert "on 16 puzzles (5 supervision steps)" in out


def test_solve_prints_every_step(trained):
    code, out = run("solve", trained / "run", "1...", "--steps", "3")
    assert code == 2 and "puzzle has 4 characters, expected 16" in out
    code, out = run("solve", trained / "run", ".......43...1..2")
    assert code == 0, out
    assert "step 1:" in out and "step 2:" in out and "P(halt)" in out
    code, out = run("solve", trained / "run", "1.3..4.12..3.1..")  # column 2 can hold neither 1 nor 4
    assert code == 2 and "has no solution" in out


def test_existing_run_is_not_overwritten_and_resume_continues(trained):
    ckpt = trained / "run" / "checkpoint.safetensors"
    before = ckpt.read_bytes()
    code, out = run("train", "--data", trained / "data", "--out", trained / "run", *TINY)
    assert code == 2 and "already holds a run" in out
    assert ckpt.read_bytes() == before
    code, out = run("train", "--out", trained / "run", "--resume", "--set", "train.steps=6", "--no-progress")
    assert code == 0, out
    from trm import checkpoint

    assert checkpoint.load(ckpt)[1]["step"] == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--set", "train.lr"], "must look like section.field=value"),
        (["train", "--set", "train.nope=1"], "no field 'train.nope'"),
        (["train", "--set", "train.steps=many"], "expected a int"),
        (["eval", "/nonexistent"], "no checkpoint at /nonexistent"),
    ],
)
def test_bad_arguments_exit_with_a_message(args, message):
    code, out = run(*args)
    assert code == 2 and message in out


def test_corrupt_checkpoint_is_reported(tmp_path):
    (tmp_path / "checkpoint.safetensors").write_bytes(b"not a checkpoint at all")
    code, out = run("eval", tmp_path)
    assert code == 2 and "corrupt" in out


def test_import_reference_then_eval(trained, tmp_path):
    from test_checkpoint import reference_state_dict

    from trm import checkpoint
    from trm.evaluate import model_from_checkpoint

    model, _ = model_from_checkpoint(trained / "run" / "checkpoint.safetensors", torch.device("cpu"), ema=False)
    torch.save(reference_state_dict(model, True, "_orig_mod."), tmp_path / "ref.pt")
    code, out = run(
        "import-reference",
        tmp_path / "ref.pt",
        "--out",
        tmp_path / "imported",
        "--data",
        trained / "data",
        "--preset",
        "sudoku4",
        "--set",
        "model.hidden_size=32",
        "--set",
        "model.n_sup=2",
    )
    assert code == 0, out
    imported, _ = model_from_checkpoint(tmp_path / "imported" / "checkpoint.safetensors", torch.device("cpu"))
    for (name, a), (_, b) in zip(model.state_dict().items(), imported.state_dict().items(), strict=False):
        assert torch.allclose(a, b, atol=1e-2 if name.endswith("_init") else 0), name
    code, out = run("eval", tmp_path / "imported")
    assert code == 0 and "exact accuracy" in out
    assert checkpoint.load(tmp_path / "imported" / "checkpoint.safetensors")[1]["step"] == 0
