"""A run never loses work: SIGINT/SIGTERM stop with a checkpoint that resumes exactly, checkpoints by
wall time, metrics not logged twice after a crash, plain progress lines in a pipe, runs that find
their data from any directory, and runs/<preset>-latest."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from trm import checkpoint
from trm.cli import app
from trm.train import StopSignals, Trainer, fit

runner = CliRunner()
TINY = ["--set", "model.hidden_size=32", "--set", "model.n_sup=2", "--set", "train.global_batch_size=32",
        "--set", "train.log_interval=1", "--set", "train.lr_warmup_steps=2"]  # fmt: skip


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def train_losses(run_dir) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["lm_loss"]) for r in records if r["split"] == "train"]


@pytest.fixture
def data(sudoku4_data, tmp_path):
    return sudoku4_data


def test_sigint_stops_with_a_checkpoint_that_resumes_to_the_same_losses(data, tmp_path, monkeypatch):
    code, out = run("train", "--data", data, "--out", tmp_path / "straight", *TINY, "--set", "train.steps=6")
    assert code == 0, out

    step = Trainer.train_step

    def interrupted_at_3(self):
        metrics = step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the run
        return metrics

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_3)
    code, out = run("train", "--data", data, "--out", tmp_path / "cut", *TINY, "--set", "train.steps=6")
    assert code == 130, out
    assert f"trm train --resume --out {tmp_path / 'cut'}" in out
    assert checkpoint.load(tmp_path / "cut" / "checkpoint.safetensors")[1]["step"] == 3
    monkeypatch.setattr(Trainer, "train_step", step)
    code, out = run("train", "--resume", "--out", tmp_path / "cut")
    assert code == 0, out
    assert "resuming" in out and "at step 3 of 6" in out
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "straight")


def test_a_real_sigterm_in_a_pipe_stops_with_a_checkpoint_and_progress_lines(data, tmp_path):
    """The CLI in its own process, stdout a pipe: plain progress lines, then SIGTERM."""
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trm", "train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY,
         "--set", "train.steps=100000"],  # fmt: skip
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/100000"):
            proc.send_signal(signal.SIGTERM)  # once: a second one aborts
    assert proc.wait(timeout=120) == 143, "".join(lines)
    text = "".join(lines)
    # a step where no example halted says so (its accuracy is not 0, it is unknown)
    assert re.search(r"^step 1/100000  loss \d+\.\d+  (acc .*|\(none halted\))  elapsed .* left ~", text, re.M), text
    assert re.search(r"^step \d/100000  loss \d+\.\d+  acc \d\.\d+  exact .* elapsed .* left ~", text, re.M), text
    assert "stopped by SIGTERM" in text and "trm train --resume --out" in text
    assert max(len(line) for line in lines) > 80  # not wrapped at 80 columns
    step = checkpoint.load(tmp_path / "run" / "checkpoint.safetensors")[1]["step"]
    assert step >= 3 and train_losses(tmp_path / "run")[-1][0] == step


def test_checkpoints_are_also_written_by_wall_time(data, tmp_path, monkeypatch):
    from trm.config import apply_overrides, preset

    saved = []
    save = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self: saved.append(self.step) or save(self))
    overrides = ["model.hidden_size=32", "model.n_sup=2", "train.global_batch_size=32", "train.steps=3",
                 "train.checkpoint_interval=1000", "train.eval_interval=1000"]  # fmt: skip
    for minutes, want in ((0.0, [3]), (1e-9, [1, 2, 3])):
        cfg = apply_overrides(preset("sudoku4"), [*overrides, f"train.checkpoint_minutes={minutes}"])
        saved.clear()
        fit(Trainer(cfg, data, tmp_path / f"run-{minutes}", __import__("torch").device("cpu")), show_progress=False)
        assert saved == want


def test_a_resume_after_a_crash_does_not_log_steps_twice(data, tmp_path, monkeypatch):
    save, kept = Trainer.save, tmp_path / "step2.safetensors"

    def save_and_keep(self):
        path = save(self)
        if self.step == 2:
            shutil.copy(path, kept)
        return path

    monkeypatch.setattr(Trainer, "save", save_and_keep)
    args = ["--set", "train.checkpoint_interval=2", "--set", "train.steps=4"]
    code, out = run("train", "--data", data, "--out", tmp_path / "run", *TINY, *args)
    assert code == 0, out
    shutil.copy(kept, tmp_path / "run" / "checkpoint.safetensors")  # died after step 4 was logged, saved at 2
    code, out = run("train", "--resume", "--out", tmp_path / "run")
    assert code == 0, out
    assert "dropped" in out
    assert [s for s, _ in train_losses(tmp_path / "run")] == [1, 2, 3, 4]


def test_a_run_finds_its_data_from_any_directory_and_latest_points_at_the_newest(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    small = ["--set", "data.num_train=64", "--set", "data.num_test=8", "--set", "train.steps=1"]
    code, out = run("train", *TINY, *small, "--no-progress")  # data/sudoku4 built, runs/sudoku4-<stamp>
    assert code == 0, out
    first = os.path.realpath("runs/sudoku4-latest")
    code, out = run("train", *TINY, *small, "--no-progress")
    assert code == 0, out
    second = os.path.realpath("runs/sudoku4-latest")
    assert first != second and os.path.isdir(second) and len(os.listdir("runs")) == 3
    monkeypatch.chdir(tmp_path)
    code, out = run("eval", work / "runs" / "sudoku4-latest")
    assert code == 0 and "on 8 puzzles" in out, out


def double_sigint(cwd, trigger: str, delay_ms: float, data=None) -> tuple[int, str, "os.PathLike"]:
    """A real `trm train` (stdout a pipe) sent two SIGINTs `delay_ms` apart once `trigger` happens:
    "dir" (the run directory exists) or the start of an output line. Returns (exit status, output,
    run directory)."""
    out = cwd / "run"
    args = [sys.executable, "-m", "trm", "train", "--out", str(out), *TINY, "--set", "train.checkpoint_interval=2",
            "--set", "train.steps=100000"]  # fmt: skip
    args += ["--data", str(data)] if data else ["--set", "data.num_train=300", "--set", "data.num_test=64"]
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    if trigger == "dir":
        while not out.exists() and proc.poll() is None:
            time.sleep(0.001)
    else:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(trigger):
                break
    proc.send_signal(signal.SIGINT)
    time.sleep(delay_ms / 1000)
    proc.send_signal(signal.SIGINT)
    lines.append(proc.communicate(timeout=120)[0])
    return proc.returncode, "".join(lines), out


def resumable_or_gone(out) -> str:
    """'gone', or 'resumable' once `trm train --resume` has continued the run by one step."""
    if not out.exists():
        return "gone"
    step = checkpoint.load(out / "checkpoint.safetensors")[1]["step"]  # (no checkpoint: CheckpointError)
    code, text = run("train", "--resume", "--out", out, "--set", f"train.steps={step + 1}", "--no-progress")
    assert code == 0 and f"resuming {out} at step {step}" in text, text
    return "resumable"


@pytest.mark.parametrize(
    "trigger, delay_ms",
    [
        ("dir", 5),  # the run directory just made
        ("building dataset in", 50),  # the default dataset being built
        ("TRM ", 15),  # the model built, training about to start
        ("step 1/", 0),  # the first step, no checkpoint yet (the two signals in one C call)
        ("step 2/", 25),  # the first checkpoint being written
        ("step 3/", 40),  # mid-run, a checkpoint written at step 2
    ],
)
def test_a_fast_double_sigint_leaves_the_run_resumable_or_gone_and_answers_each(trigger, delay_ms, data, tmp_path):
    """Before: a directory holding only metrics.jsonl, which neither --resume nor a new run took."""
    code, text, out = double_sigint(tmp_path, trigger, delay_ms, None if trigger.startswith("building") else data)
    assert code in (130, -signal.SIGINT), text  # -2: the second came as Python was exiting, its handlers gone
    assert "Traceback" not in text and re.search(r"^SIGINT: stopping ", text, re.M), text
    if code == 130:  # the second signal is answered too (it may come after the run has stopped)
        assert re.search(r"^aborted: (stopping at once|the run had stopped already)", text, re.M), text
    state = resumable_or_gone(out)
    assert state == ("resumable" if trigger == "step 3/" else state), text
    if state == "gone":
        assert f"the run directory {out} is removed" in text or "half-built dataset" in text, text
    built = list((tmp_path / "data").glob("*"))
    assert all((d / "metadata.json").exists() for d in built)  # no half-built dataset either


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_two_signals_during_one_c_call_are_two_and_the_second_aborts(capfd):
    """Python runs its handler once for the signals that arrive while the main thread is in one C
    call (a long torch op): before, a fast double Ctrl-C was one, the second neither answered nor
    acted on."""
    import ctypes
    import threading

    def twice():  # two deliveries, 20 ms apart, each to this thread: the main thread blocks them
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    with StopSignals() as stop:
        stop.stage = "training"
        sender = threading.Timer(0.05, twice)
        sender.start()  # before the mask: it takes signals, the main thread does not
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            with pytest.raises(KeyboardInterrupt):
                ctypes.CDLL(None).usleep(300_000)  # one C call, in which both signals arrive
                time.sleep(1)  # (not reached: the handler runs, once, as the call returns)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            sender.join()
    assert capfd.readouterr().err.splitlines() == [
        "SIGINT: stopping after this step with a checkpoint (again to abort at once)",
        "aborted: stopping at once; the run keeps its last checkpoint, if it wrote one",
    ]


def test_a_run_stopped_before_its_first_checkpoint_leaves_nothing_and_latest_where_it_was(data, tmp_path, monkeypatch):
    """A failed or aborted run without a checkpoint: its directory removed (or, given empty with --out,
    emptied again), runs/<preset>-latest pointing back at the run before; one with a checkpoint kept."""
    monkeypatch.chdir(tmp_path)
    code, out = run("train", "--data", data, *TINY, "--set", "train.steps=1", "--no-progress")
    assert code == 0, out
    before = os.readlink("runs/sudoku4-latest")
    step = Trainer.train_step

    def interrupted_at(at):
        def train_step(self):
            metrics = step(self)  # the step is logged (metrics.jsonl), and then the abort
            if self.step == at:
                raise KeyboardInterrupt
            return metrics

        return train_step

    monkeypatch.setattr(Trainer, "train_step", interrupted_at(1))
    code, out = run("train", "--data", data, *TINY, "--set", "train.steps=4", "--no-progress")
    assert code == 130 and "aborted: no checkpoint had been written, so the run directory runs/sudoku4-" in out, out
    assert (
        sorted(os.listdir("runs")) == sorted([before, "sudoku4-latest"])
        and os.readlink("runs/sudoku4-latest") == before
    )
    (tmp_path / "mine").mkdir()
    code, out = run("train", "--data", data, "--out", tmp_path / "mine", *TINY, "--set", "train.steps=4")
    assert code == 130 and "is emptied again" in out and os.listdir(tmp_path / "mine") == [], out
    monkeypatch.setattr(Trainer, "train_step", interrupted_at(3))
    code, out = run("train", "--data", data, "--out", tmp_path / "mine", *TINY, "--set", "train.steps=4",
                    "--set", "train.checkpoint_interval=2")  # fmt: skip
    assert code == 130 and f"aborted: {tmp_path / 'mine'} keeps its last checkpoint; continue with: trm train" in out
    assert checkpoint.load(tmp_path / "mine" / "checkpoint.safetensors")[1]["step"] == 2
