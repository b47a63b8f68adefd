"""The `trm` command line end to end on a tiny run, and its errors on bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

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
    return result.exit_code, result.output


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


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
        (["train", "--set", "train.steps=0"], "train.steps=0: must be >= 1"),
        (["train", "--set", "train.log_interval=0"], "train.log_interval=0: must be >= 1"),
        (["train", "--set", "train.eval_interval=-5"], "train.eval_interval=-5: must be >= 1"),
        (["train", "--set", "train.checkpoint_interval=0"], "train.checkpoint_interval=0: must be >= 1"),
        (["train", "--set", "train.checkpoint_minutes=-1"], "train.checkpoint_minutes=-1.0: must be >= 0"),
        (["train", "--set", "train.global_batch_size=0"], "train.global_batch_size=0: must be >= 1"),
        (["train", "--set", "train.eval_batch_size=0"], "train.eval_batch_size=0: must be >= 1"),
        (["train", "--set", "train.global_batch_size=100000"], "would hold only 2000 training examples"),
        (["train", "--set", "train.loss=mse"], "train.loss='mse': must be one of stablemax, softmax"),
        (["train", "--set", "train.ema_rate=1"], "train.ema_rate=1.0: must be in [0, 1)"),
        (["train", "--set", "train.lr=0"], "train.lr=0.0: must be > 0"),
        (["train", "--set", "model.n_sup=0"], "model.n_sup=0: must be >= 1"),
        (["train", "--set", "model.T=0"], "model.T=0: must be >= 1"),
        (["train", "--set", "model.num_heads=3"], "model.hidden_size=64: must be divisible by model.num_heads=3"),
        (["train", "--set", "model.arch=gpt"], "model.arch='gpt': must be one of trm, hrm"),
        (["train", "--set", "model.forward_dtype=int8"], "model.forward_dtype='int8': must be one of"),
        (["train", "--set", "model.halt_exploration_prob=2"], "must be in [0, 1]"),
        (["train", "--set", "data.size=5"], "data.size=5: must be one of 4, 6, 9"),
        (["train", "--set", "data.task=chess"], "data.task='chess': must be one of"),
        (["train", "--preset", "maze7", "--set", "data.size=3"], "data.size=3: must be >= 5"),
        (["train", "--set", "data.num_train=0"], "data.num_train=0: must be >= 1"),
        (["train", "--data", "no-such-dir"], "--data no-such-dir: no dataset there"),
        (["train", "--resume"], "--resume needs --out"),
        (["train", "--resume", "--out", "no-such-run"], "no checkpoint at no-such-run"),
        (["build", "--out", "d", "--test-csv", "t.csv"], "--test-csv needs --csv"),
        (["build", "--out", "d", "--csv", "no.csv"], "--csv no.csv: no such file"),
        (["build", "--out", "d", "--set", "data.augmentations=-1"], "data.augmentations=-1: must be >= 0"),
        (["eval", "/nonexistent"], "no checkpoint at /nonexistent"),
        (["eval", "x", "--steps", "-1"], "--steps -1: must be >= 0"),
        (["eval", "x", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["solve", "x", "1...", "--steps", "-2"], "--steps -2: must be >= 0"),
        (["train", "--set", "model.pos_encodings=alibi"], "model.pos_encodings='alibi': must be one of rope, learned"),
        (["build", "--out", "d", "--set", "train.lr=1"], "--set train.lr=1: trm build takes data.* settings only"),
        (["eval", "x", "--json", "no/such/dir/r.json"], "--json no/such/dir/r.json: the directory"),
        (["solve", "x", "1...", "--png", "no/such/dir/s.png"], "--png no/such/dir/s.png: the directory"),
    ],
)
def test_bad_arguments_exit_with_one_line_and_create_nothing(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run(*args)
    assert code == 2 and message in out, out
    assert out.strip().count("\n") == 0 and out.startswith("error: "), out  # one line, no traceback
    assert list(tmp_path.iterdir()) == [], "something was created"


def test_settings_of_a_run_on_resume(trained, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained / "run", copy)
    before = (copy / "checkpoint.safetensors").read_bytes()
    code, out = run("train", "--resume", "--out", copy, "--preset", "sudoku4")
    assert code == 2 and "--preset cannot be combined with --resume" in out
    code, out = run("train", "--resume", "--out", copy, "--set", "model.hidden_size=64")
    assert code == 2 and "model.hidden_size cannot change on --resume" in out
    code, out = run("train", "--resume", "--out", copy)
    finished = re.search(r"is finished \(step (\d+) of \1\)", out)
    assert code == 0 and finished and "--set train.steps=N" in out, out
    assert (copy / "checkpoint.safetensors").read_bytes() == before
    more = f"train.steps={int(finished.group(1)) + 1}"
    code, out = run("train", "--resume", "--out", copy, "--set", more, "--set",
                    "train.global_batch_size=16", "--no-progress")  # fmt: skip
    assert code == 0, out
    assert "train.global_batch_size changed from 32 to 16: the resumed run is no longer an exact continuation" in out


def test_a_new_run_never_reuses_a_directory_that_holds_anything(trained, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, out = run("train", "--data", trained / "data", "--out", tmp_path, *TINY)
    assert code == 2 and "already holds files" in out
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_build_from_a_training_csv_alone_holds_out_a_test_split(tmp_path, rng):
    from trm.data import dataset, sudoku

    rows = ["source,question,answer,rating"]
    seen = set()
    while len(rows) < 41:
        q, a = sudoku.generate(4, rng)
        if q.tobytes() not in seen:
            seen.add(q.tobytes())
            rows.append("gen," + "".join(str(v) if v else "." for v in q.ravel()) + ","
                        + "".join(map(str, a.ravel())) + ",0")  # fmt: skip
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    code, out = run("build", "--out", tmp_path / "d", "--csv", tmp_path / "train.csv", "--set", "data.size=4",
                    "--set", "data.num_test=10", "--set", "data.augmentations=0")  # fmt: skip
    assert code == 0, out
    assert "held out 10 of the CSV's puzzles as the test split" in out
    assert "train: 30 examples" in out and "test:  10 examples (held out from" in out
    train, test = dataset.load_split(tmp_path / "d", "train"), dataset.load_split(tmp_path / "d", "test")
    assert not {r.tobytes() for r in train.inputs} & {r.tobytes() for r in test.inputs}


def test_help_renders_as_plain_text():
    code, out = run("--help")
    assert code == 0 and "Commands:" in out and "``" not in out and "╭" not in out


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


def test_changed_data_settings_get_their_own_default_dataset_named_for_what_it_holds(tmp_path, monkeypatch):
    """Before: `--preset sudoku4 --set data.size=6` built its 6x6 Sudoku into data/sudoku4-<digest>."""
    from trm.cli.data import default_data
    from trm.config import apply_overrides, preset

    monkeypatch.chdir(tmp_path)
    assert default_data(preset("sudoku4"), "sudoku4").as_posix() == "data/sudoku4"
    six = default_data(apply_overrides(preset("sudoku4"), ["data.size=6"]), "sudoku4").as_posix()
    assert re.fullmatch(r"data/sudoku6-[0-9a-f]{8}", six)
    assert default_data(apply_overrides(preset("sudoku4"), ["data.size=6"]), "sudoku4").as_posix() == six
    maze = default_data(apply_overrides(preset("maze7"), ["data.size=9"]), "maze7").as_posix()
    assert re.fullmatch(r"data/maze9-[0-9a-f]{8}", maze)
    more = default_data(apply_overrides(preset("sudoku-mlp"), ["data.num_train=500"]), "sudoku-mlp").as_posix()
    assert re.fullmatch(r"data/sudoku9-[0-9a-f]{8}", more)
    trained_only = apply_overrides(preset("sudoku4"), ["train.lr=1e-2", "model.hidden_size=32"])
    assert default_data(trained_only, "sudoku4").as_posix() == "data/sudoku4"
    # a dataset already built under the earlier name is still used
    earlier = tmp_path / "data" / ("sudoku4-" + six.rsplit("-", 1)[1])
    earlier.mkdir(parents=True)
    (earlier / "metadata.json").write_text("{}")
    assert default_data(apply_overrides(preset("sudoku4"), ["data.size=6"]), "sudoku4") == earlier.relative_to(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--out", "/proc/trm-run"], "--out /proc/trm-run: cannot create anything in /proc"),
        (["train", "--out", "notes.txt/run"], "--out notes.txt/run: "),
        (["doctor", "--quick", "--out", "/proc/doctor"], "--out /proc/doctor: cannot create anything in /proc"),
        (["import-reference", "ref.pt", "--out", "/proc/imported"], "--out /proc/imported: cannot create"),
    ],
)
def test_unwritable_outputs_stop_before_any_work(args, message, tmp_path, monkeypatch):
    """Before: the dataset was built (or every doctor check run), then a traceback, exit 1."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    code, out = run(*args)
    assert code == 2 and out.startswith("error: ") and message in out and out.count("\n") == 1, out
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # no data/, no runs/


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_eval_checks_every_output_and_the_dataset_before_evaluating(trained, tmp_path):
    for args, message in (
        (["--png", "/proc/x.png"], "--png /proc/x.png: cannot create anything in /proc"),
        (["--json", trained / "run"], "is a directory"),
        (["--halt", "--plot", "/proc/p.png"], "--plot /proc/p.png: cannot create"),
    ):
        code, out = run("eval", trained / "run", *args)
        assert code == 2 and message in out and "accuracy" not in out, out
    code, out = run("build", "--out", tmp_path / "six", "--set", "data.size=6", "--set", "data.num_train=4",
                    "--set", "data.num_test=4", "--set", "data.augmentations=0")  # fmt: skip
    assert code == 0, out
    code, out = run("eval", trained / "run", "--data", tmp_path / "six")
    assert code == 2 and out.count("\n") == 1, out
    assert "holds 6x6 sudoku (sequence length 36, vocabulary 8), but the model was trained on 4x4 sudoku " \
           "(sequence length 16, vocabulary 6)" in flat(out)  # fmt: skip


def test_a_second_run_on_a_directory_in_use_stops_naming_the_first(trained, tmp_path):
    """Two real `trm train --out D` processes: the second exits 2 naming the first, which goes on."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "trm", "train", "--data", str(trained / "data"), "--out", str(run_dir),
            *[a for a in TINY if a != "--no-progress"], "--set", "train.steps=100000"]  # fmt: skip
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step 2/"):
                break
        second = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"is in use by process {first.pid}" in second.stderr and "one run per directory" in second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGINT)
        rest = first.communicate(timeout=120)[0]
    assert first.returncode == 130 and "checkpoint written" in rest
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer: no step logged twice
    assert not (run_dir / ".trm.lock").exists()


def test_a_first_run_waits_for_a_dataset_another_process_is_building(tmp_path, monkeypatch):
    """Two first-time `trm train` in a fresh directory: the second waits and uses the first's data."""
    monkeypatch.chdir(tmp_path)
    overrides = ["data.num_train=64", "data.num_test=16"]
    from trm.cli.data import default_data
    from trm.config import apply_overrides, preset

    data = default_data(apply_overrides(preset("sudoku4"), overrides), "sudoku4")
    builder = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from trm import paths
        from trm.config import apply_overrides, preset
        from trm.data import dataset
        cfg = apply_overrides(preset("sudoku4"), {overrides!r})
        data = Path({str(data)!r})
        data.mkdir(parents=True)
        with paths.exclusive(data, "building"):
            print("building", flush=True)
            time.sleep(2)
            dataset.build(cfg.data, data)
    """)
    proc = subprocess.Popen([sys.executable, "-c", builder], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "building"
    before = None
    try:
        code, out = run("train", *[x for o in overrides for x in ("--set", o)], "--out", tmp_path / "run", *TINY)
        before = (data / "metadata.json").stat().st_mtime
    finally:
        proc.wait(timeout=60)
    assert code == 0, out
    assert f"waiting for process {proc.pid}" in flat(out) and f"using {data}, built meanwhile" in out
    assert "building dataset in" not in out and (data / "metadata.json").stat().st_mtime == before


def test_resume_hints_quote_paths_with_spaces(trained, tmp_path):
    import shutil

    copy = tmp_path / "my runs" / "run 1"
    shutil.copytree(trained / "run", copy)
    code, out = run("train", "--resume", "--out", copy)
    assert code == 0 and f"trm train --resume --out '{copy}' --set train.steps=N" in flat(out), out


def test_import_reference_names_what_it_was_given(trained, tmp_path):
    (tmp_path / "notes.txt").write_text("hello world")
    code, out = run("import-reference", tmp_path / "notes.txt", "--out", tmp_path / "a", "--preset", "sudoku4")
    assert code == 2 and "is not a PyTorch checkpoint" in out and "KeyError" in out, out
    ours = trained / "run" / "checkpoint.safetensors"
    code, out = run("import-reference", ours, "--out", tmp_path / "b", "--preset", "sudoku4")
    assert code == 2 and out.count("\n") == 1 and "is already a trm checkpoint: use it as it is" in flat(out), out
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_solve_piped_into_head_prints_its_first_line_and_exits_0(trained):
    args = [sys.executable, "-m", "trm", "solve", str(trained / "run"), ".......43...1..2", "--no-halt", "--steps", "8"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does after one line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert first.startswith("step 1: P(halt)") and "Traceback" not in err and "Broken pipe" not in err


def test_help_texts_show_what_the_commands_take():
    code, out = run("eval", "--help")
    assert code == 0 and "[default: 0]" not in out and "n_sup" in out
    code, out = run("build", "--help")
    assert code == 0 and "data.num_train" in out and "train.lr" not in out


def test_training_hrm_from_a_trm_preset_says_hrm_and_what_it_changed(trained, tmp_path):
    code, out = run("train", "--data", trained / "data", "--out", tmp_path / "hrm", *TINY, "--set", "model.arch=hrm")
    assert code == 0, out
    assert "note: model.arch=hrm takes HRM's structure: num_layers 2 -> 4, mlp_t True -> False" in flat(out)
    assert re.search(r"^HRM [\d,]+ parameters", out, re.M) and not re.search(r"^TRM ", out, re.M)


def test_build_reports_progress_in_a_pipe(tmp_path):
    code, out = run("build", "--out", tmp_path / "d", "--set", "data.num_train=30", "--set", "data.num_test=10",
                    "--set", "data.augmentations=2")  # fmt: skip
    assert code == 0, out
    assert "generating 4x4 sudoku: 40/40" in out and "augmenting 4x4 sudoku: 30/30" in out


def test_ctrl_c_during_a_first_runs_data_build_keeps_nothing_and_says_so(tmp_path, monkeypatch):
    from trm.data import dataset

    def interrupted(cfg, out, progress=None):
        (out / "train").mkdir(parents=True)
        (out / "train" / "inputs.npy").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dataset, "build", interrupted)
    code, out = run("train", *TINY)
    assert code == 130 and "interrupted: the half-built dataset data/sudoku4" in out, out
    assert list(tmp_path.iterdir()) == []  # no data/, no runs/


def test_a_paper_preset_on_a_cpu_warns_that_it_is_sized_for_a_gpu(tmp_path, monkeypatch):
    from trm.cli import train as train_cmd

    def stop(*args, **kwargs):
        raise SystemExit(0)  # the warning is printed before anything is created

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_cmd, "_run_directory", stop)
    code, out = run("train", "--preset", "sudoku-mlp")
    assert "sized for a GPU (batch 768, hidden 512)" in flat(out) and "sudoku4 and maze7" in out
    code, out = run("train", *TINY)
    assert "sized for a GPU" not in out


def test_eval_png_draws_the_wrong_puzzles_first_with_fixed_and_halting_steps(trained, tmp_path, monkeypatch):
    from trm import render

    drawn = []
    monkeypatch.setattr(render, "save_png", lambda path, rows, task: drawn.append(rows) or path)
    for extra in ([], ["--halt"]):
        code, out = run("eval", trained / "run", "--png", tmp_path / "p.png", "--show", "3", *extra)
        assert code == 0, out
    for rows, how in zip(drawn, ("2 steps", "after"), strict=True):
        titles = [r[2][0] for r in rows]
        verdicts = ["wrong" in t for t in titles]
        assert len(rows) == 3 and verdicts == sorted(verdicts, reverse=True)  # the wrong ones first
        assert all(how in t for t in titles)
        for (_, _, (_, answer, marks)), title in zip(rows, titles, strict=True):
            assert ("right" in title) == bool((answer == marks["target"]).all())  # the title tells the truth


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU reports")
def test_doctor_in_a_pipe_names_whole_cases_and_says_no_graph_was_captured_on_a_cpu(monkeypatch):
    """Before: `checking add_rmsnorm [2,` (each shape cut at its first space), and `graphs 2/2`
    passed on a CPU, where no CUDA graph is captured."""
    from trm import doctor

    monkeypatch.setattr(doctor, "_dtypes", lambda device: [torch.float32])  # the lines are per case, not dtype
    result = CliRunner().invoke(app, ["doctor", "--quick"])
    lines = result.output.splitlines()
    assert "checking add_rmsnorm [2, 97, 64], hidden" in lines, result.output
    assert "checking rope_attention [2, 40, 4x96], 2 kv heads, causal, key mask, RoPE" in lines
    checking = [line for line in lines if line.startswith("checking ")]
    assert len(checking) == len(set(checking)) and all(line.count("[") == line.count("]") for line in checking)
    assert "checking the static-buffer path of the CUDA graphs" in lines
    assert "skipped: CUDA graphs: need a GPU; nothing was captured" in result.output
    assert "graphs 2/2" not in result.output and "static buffers, no graph captured 2/2" in result.output
