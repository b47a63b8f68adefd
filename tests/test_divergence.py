"""A run that diverges (its loss or gradients turn NaN or infinite) stops with exit status 1 within the
log window where it happened, keeps its last good checkpoint and says how to resume with a lower
learning rate; healthy runs are unchanged and read the device-side flag only at log steps and
checkpoints; under DDP every process stops together."""

import datetime
import json
import math
import re
import socket

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from trm import checkpoint
from trm.cli import app
from trm.config import apply_overrides, preset
from trm.train import Trainer, fit

runner = CliRunner()
TINY = ["model.hidden_size=32", "model.n_sup=2", "train.global_batch_size=32", "train.checkpoint_minutes=0",
        "train.eval_interval=1000"]  # fmt: skip


def sets(*overrides: str) -> list[str]:
    return [a for o in (*TINY, *overrides) for a in ("--set", o)]


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def records(run_dir, split: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def all_finite(path) -> bool:
    tensors, _ = checkpoint.load(path)
    return all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_a_diverging_run_stops_in_its_first_nonfinite_window_keeping_the_last_good_checkpoint(sudoku4_data, tmp_path):
    # lr 1e4 reached over 1000 warm-up steps: finite for some steps, then NaN (around step 10)
    out = tmp_path / "run dir"  # a space: the resume hint quotes it
    args = sets("train.lr=1e4", "train.lr_warmup_steps=1000", "train.steps=40", "train.log_interval=4",
                "train.checkpoint_interval=4")  # fmt: skip
    code, text = run("train", "--data", sudoku4_data, "--out", out, "--no-progress", *args)
    assert code == 1, text
    assert "Traceback" not in text and text.count("error:") == 1, text
    window = re.search(r"the loss or gradient norm became non-finite between steps (\d+) and (\d+) "
                       r"\(first at step (\d+)\)", text)  # fmt: skip
    assert window, text
    start, end, first = map(int, window.groups())
    assert start <= first <= end and end - start < 4 and end % 4 == 0  # the log window it happened in
    _, meta = checkpoint.load(out / "checkpoint.safetensors")
    assert meta["step"] == start - 1 and all_finite(out / "checkpoint.safetensors")
    assert f"the last good checkpoint, {out / 'checkpoint.safetensors'} (step {start - 1}), is kept" in text
    assert f"trm train --resume --out '{out}' --set train.lr=0.0001" in text
    # the metrics: finite windows before, then the marked window and the event record
    train = records(out)
    assert [r["step"] for r in train] == list(range(4, end + 1, 4))
    assert all(math.isfinite(r["lm_loss"]) and "nonfinite" not in r for r in train[:-1])
    assert train[-1]["nonfinite"] is True
    (event,) = records(out, "nonfinite")
    assert (event["from_step"], event["step"], event["first_step"], event["checkpoint_step"]) == (
        start, end, first, start - 1)  # fmt: skip
    assert (out / "metrics.png").stat().st_size > 0

    more = start - 1 + 4  # one more log window
    code, text = run("train", "--resume", "--out", out, "--set", "train.lr=1e-4", "--set", f"train.steps={more}",
                     "--no-progress")  # fmt: skip
    assert code == 0, text
    assert "train.lr changed from 10000.0 to 0.0001" in text and f"at step {start - 1} of {more}" in text
    assert "test exact accuracy" in text
    assert checkpoint.load(out / "checkpoint.safetensors")[1]["step"] == more
    assert [r["step"] for r in records(out)] == list(range(4, more + 1, 4)) and not records(out, "nonfinite")


def test_a_run_diverging_before_its_first_checkpoint_restarts_from_its_initial_state(sudoku4_data, tmp_path):
    out, straight = tmp_path / "diverged", tmp_path / "straight"
    args = ["--data", sudoku4_data, "--no-progress", *sets("train.lr_warmup_steps=2", "train.log_interval=2")]
    code, text = run("train", "--out", out, *args, "--set", "train.lr=1e4", "--set", "train.steps=100")
    assert code == 1, text
    assert "no checkpoint had been written, so" in text and "now holds the run's initial state (step 0)" in text
    assert checkpoint.load(out / "checkpoint.safetensors")[1]["step"] == 0 and all_finite(
        out / "checkpoint.safetensors"
    )
    # resuming from it with a healthy learning rate is a new run with that learning rate, exactly
    code, text = run("train", "--resume", "--out", out, "--set", "train.lr=1e-3", "--set", "train.steps=6")
    assert code == 0, text
    code, text = run("train", "--out", straight, *args, "--set", "train.lr=1e-3", "--set", "train.steps=6")
    assert code == 0, text
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(records(out)) == strip(records(straight)) and len(records(out)) == 3


def test_a_checkpoint_with_nonfinite_tensors_is_refused_and_the_one_on_disk_kept(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, {"model.w": torch.ones(3)}, {"step": 1})
    before = path.read_bytes()
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensors = {"model.w": torch.tensor([1.0, bad]), "rng.cpu": torch.zeros(2, dtype=torch.uint8)}
        with pytest.raises(
            checkpoint.NonFiniteError, match=r"c.safetensors not written: NaN or infinite values in model.w"
        ):
            checkpoint.save(path, tensors, {"step": 2})
        assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("part", ["model", "ema", "optim"])
def test_the_trainer_refuses_a_checkpoint_with_nonfinite_weights_ema_or_optimizer_state(sudoku4_data, tmp_path, part):
    trainer = Trainer(apply_overrides(preset("sudoku4"), TINY), sudoku4_data, tmp_path, torch.device("cpu"))
    trainer.train_step()
    saved = trainer.save().read_bytes()
    trainer.train_step()
    tensor = {"model": lambda: next(trainer.model.parameters()).data,
              "ema": lambda: next(iter(trainer.ema.shadow.values())),
              "optim": lambda: next(iter(trainer.optimizer.state.values()))["exp_avg_sq"]}[part]()  # fmt: skip
    tensor.view(-1)[0] = float("inf")
    with pytest.raises(checkpoint.NonFiniteError, match=rf"NaN or infinite values in {part}\."):
        trainer.save()
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == saved and trainer.saved_step == 1


def test_a_state_that_turns_nonfinite_without_a_nonfinite_loss_is_caught_at_the_checkpoint(sudoku4_data, tmp_path):
    cfg = apply_overrides(preset("sudoku4"), [*TINY, "train.steps=6", "train.log_interval=1",
                                              "train.checkpoint_interval=3"])  # fmt: skip
    trainer = Trainer(cfg, sudoku4_data, tmp_path, torch.device("cpu"))
    step = trainer.optimizer_step

    def overflowing_optimizer_state():  # e.g. exp_avg_sq overflowing: the loss stays finite
        step()
        if trainer.step == 5:
            next(iter(trainer.optimizer.state.values()))["exp_avg_sq"].view(-1)[0] = float("inf")

    trainer.optimizer_step = overflowing_optimizer_state
    fit(trainer, show_progress=False)
    d = trainer.diverged
    assert (d.what, d.from_step, d.to_step, d.first_step, d.checkpoint_step, d.initial) == (
        "state",
        4,
        6,
        None,
        3,
        False,
    )
    assert checkpoint.load(tmp_path / "checkpoint.safetensors")[1]["step"] == 3
    assert records(tmp_path, "nonfinite")[0]["what"] == "state"


def _healthy_run(data, out, check: bool, monkeypatch) -> tuple[list[dict], dict[str, torch.Tensor], int]:
    reads = []
    read = Trainer.first_nonfinite_step
    monkeypatch.setattr(Trainer, "check_finite", check)
    monkeypatch.setattr(Trainer, "first_nonfinite_step", lambda self: reads.append(self.step) or read(self))
    cfg = apply_overrides(preset("sudoku4"), [*TINY, "train.steps=6", "train.log_interval=2",
                                              "train.checkpoint_interval=3"])  # fmt: skip
    trainer = Trainer(cfg, data, out, torch.device("cpu"))
    fit(trainer, show_progress=False)
    assert trainer.diverged is None and trainer.stopped_by is None
    return (
        [{k: v for k, v in r.items() if k != "time"} for r in records(out)],
        checkpoint.load(out / "checkpoint.safetensors")[0],
        reads,
    )


def test_a_healthy_run_is_unchanged_and_reads_the_flag_only_at_log_steps_and_checkpoints(sudoku4_data, tmp_path,
                                                                                          monkeypatch):  # fmt: skip
    want, want_tensors, _ = _healthy_run(sudoku4_data, tmp_path / "unchecked", False, monkeypatch)
    got, got_tensors, reads = _healthy_run(sudoku4_data, tmp_path / "checked", True, monkeypatch)
    assert got == want and len(got) == 3
    assert got_tensors.keys() == want_tensors.keys()
    assert all(torch.equal(got_tensors[k], want_tensors[k]) for k in want_tensors)
    assert reads == [2, 3, 4, 6]  # log steps 2, 4, 6; checkpoints 3 and 6 (read once with the log)


def test_the_per_step_check_adds_no_host_sync(sudoku4_data, tmp_path, monkeypatch):
    """No .item(), .tolist(), bool(), int() or float() of a tensor per step (each a sync on a GPU)."""
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _real=real, _n=name: calls.append(_n) or _real(self, *a)
        )
    counts = []
    for check in (False, True):
        monkeypatch.setattr(Trainer, "check_finite", check)
        trainer = Trainer(
            apply_overrides(preset("sudoku4"), TINY), sudoku4_data, tmp_path / str(check), torch.device("cpu")
        )
        calls.clear()
        for _ in range(3):
            trainer.train_step()
        counts.append(list(calls))
    assert counts[0] == counts[1]
    calls.clear()
    assert trainer.first_nonfinite_step() is None and calls == ["item"]  # the read, at log steps and checkpoints


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, data, out):
    """Rank 1's loss alone turns NaN at step 5 (its gradients and rank 0's stay finite): both stop at step 8."""
    import gc

    import torch.distributed as dist

    import trm.train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        cfg = apply_overrides(preset("sudoku4"), [*TINY, "train.steps=40", "train.log_interval=4"])
        trainer = Trainer(cfg, data, out, torch.device("cpu"), rank, world)
        real, steps = trm.train.act_loss, []

        def loss_nan_on_rank_1_at_step_5(*args):  # the loss only: the gradients stay finite
            loss, metrics = real(*args)
            steps.append(None)
            return (loss + float("nan") if rank == 1 and len(steps) == 5 else loss), metrics

        trm.train.act_loss = loss_nan_on_rank_1_at_step_5
        fit(trainer, show_progress=False)
        d = trainer.diverged
        result = {"step": trainer.step, "diverged": d and [d.what, d.from_step, d.to_step, d.first_step, d.initial]}
        dist.barrier()  # rank 0 has written the checkpoint
        trainer.load(out / "checkpoint.safetensors")  # as each process resumes: its own random stream
        restored = torch.get_rng_state()
        torch.manual_seed(cfg.train.seed + 1 + rank)
        result["rng"] = torch.equal(restored, torch.get_rng_state())
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
        del trainer
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_ddp_every_process_stops_when_one_goes_nonfinite(sudoku4_data, tmp_path):
    context = mp.start_processes(_ddp_worker, args=(2, _free_port(), sudoku4_data, tmp_path), nprocs=2,
                                 start_method="spawn", join=False)  # fmt: skip
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=120)
    while not context.join(timeout=5):
        if datetime.datetime.now() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("a process hung")
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"step": 0, "diverged": ["loss_or_gradients", 5, 8, 5, True], "rng": True}, rank
    assert checkpoint.load(tmp_path / "checkpoint.safetensors")[1]["step"] == 0
    (event,) = records(tmp_path, "nonfinite")
    assert event["step"] == 8 and event["first_step"] == 5
