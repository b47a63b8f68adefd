"""trm: build data, train, evaluate, solve, import reference checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import adaptive, checkpoint, paths, render, timing
from . import doctor as doctor_module
from .api import PuzzleError, Solver, load
from .config import PRESETS, RunConfig, apply_overrides, preset, validate
from .data import dataset, sudoku
from .evaluate import (
    evaluate,
    evaluate_adaptive,
    evaluate_arc,
    to_device,
    write_model_checkpoint,
)
from .train import CHECKPOINT, MetricsLog, Trainer, fit, init_distributed

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)
console = Console(soft_wrap=True)  # lines are not wrapped at 80 columns in a pipe or a log file
errors = Console(stderr=True, soft_wrap=True)

PresetOpt = Annotated[
    str | None, typer.Option("--preset", "-p", help=f"one of: {', '.join(PRESETS)} (default: sudoku4)")
]
ImportPresetOpt = Annotated[str | None, typer.Option("--preset", "-p", help="the run's preset (default: sudoku-mlp)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. train.lr=3e-4 (repeatable)")]
DEFAULT_PRESET = "sudoku4"
# train.* fields that change what a run does next, not what it computes: a resume may change them freely
BOOKKEEPING = {"train.steps", "train.eval_interval", "train.eval_steps", "train.eval_batch_size",
               "train.checkpoint_interval", "train.checkpoint_minutes", "train.log_interval",
               "train.eval_halt", "train.eval_halt_threshold", "model.cuda_graphs"}  # fmt: skip


def _fail(message: str) -> NoReturn:
    errors.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    raise typer.Exit(2)


def _warn(message: str) -> None:
    errors.print(f"[yellow]warning:[/yellow] {escape(message)}", markup=True, highlight=False)


def _config(preset_name: str | None, overrides: list[str] | None) -> RunConfig:
    notes: list[str] = []
    try:
        cfg = validate(apply_overrides(preset(preset_name or DEFAULT_PRESET), overrides or [], notes))
    except ValueError as e:
        _fail(str(e))
    for note in notes:
        console.print(f"note: {note}")
    return cfg


def _at_least(option: str, value: int, low: int, meaning: str = "") -> None:
    if value < low:
        _fail(f"{option} {value}: must be >= {low}{meaning}")


def _build(cfg: RunConfig, out: Path) -> Path:
    """Build into `out` (held by the caller) with progress: a bar on a terminal, a line every
    30 s otherwise."""
    what = f"{cfg.data.size}x{cfg.data.size} {cfg.data.task}"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    last_line = [time.monotonic()]
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{stage} {what}", total=total)
            bar.update(tasks[stage], completed=done)
            if not console.is_terminal and (time.monotonic() - last_line[0] >= 30 or done == total):
                last_line[0] = time.monotonic()
                console.print(f"{stage} {what}: {done:,}/{total:,}")

        try:
            return dataset.build(cfg.data, out, progress)
        except (ValueError, OSError) as e:
            _fail(str(e))


def _describe(path: Path) -> str:
    """A readable summary of a dataset directory."""
    meta = dataset.read_metadata(path)
    splits = meta["splits"]
    augmented = meta.get("augmentations") and meta["task"] != "maze"  # mazes: dihedral images only
    lines = [
        f"dataset {path}: {meta['task']} {meta.get('size', '?')}x{meta.get('size', '?')}, from {meta.get('source')}",
        f"  train: {splits.get('train', 0):,} examples"
        + (f" ({meta['augmentations']} augmented copies of each puzzle)" if augmented else "")
        + (" (with the 7 other dihedral images of each maze)" if meta.get("dihedral") else ""),
        f"  test:  {splits.get('test', 0):,} examples"
        + (f" ({meta['test_source']})" if meta.get("test_source") else ""),
        f"  vocabulary {meta['vocab_size']}, sequence length {meta['seq_len']}, "
        f"{meta['num_puzzle_identifiers']:,} puzzle identifier(s)",
    ]
    return "\n".join(lines)


def _expected_train_rows(cfg: RunConfig) -> int | None:
    """Training rows a generated dataset will hold (None where only building tells)."""
    d = cfg.data
    if d.csv or d.task not in ("sudoku", "maze"):
        return None
    return d.num_train * (1 + (d.augmentations if d.task == "sudoku" else 7 * d.dihedral))


def _check_data(cfg: RunConfig, data: Path, implicit: bool) -> None:
    """The dataset at `data` exists (or, at a preset's default location only, is built) and
    matches the config."""
    if not (data / "metadata.json").exists():
        if not implicit:
            _fail(f"--data {data}: no dataset there (no metadata.json); build one with `trm build --out {data}`, "
                  "or leave --data out to use the preset's own")  # fmt: skip
        _build_default(cfg, data)
        return
    try:
        meta = dataset.read_metadata(data)
    except ValueError as e:
        _fail(str(e))
    want = {"task": cfg.data.task, "size": cfg.data.size}
    if implicit:  # a preset's default location: it must hold exactly what the preset builds
        want |= {"seed": cfg.data.seed, "dihedral": cfg.data.dihedral, "augmentations": cfg.data.augmentations,
                 "source": dataset.source_of(cfg.data)}  # fmt: skip
    diff = [f"{k}: data has {meta.get(k)!r}, config wants {v!r}" for k, v in want.items() if meta.get(k) != v]
    if diff:
        _fail(f"{data} was built with other settings ({'; '.join(diff)}); pass another --data or --preset")


def _build_default(cfg: RunConfig, data: Path) -> None:
    """Build the preset's dataset at its default location. Another process building it
    already is waited for, and its dataset used."""
    rows = _expected_train_rows(cfg)
    if rows is not None and rows < cfg.train.global_batch_size:
        _fail(f"train.global_batch_size={cfg.train.global_batch_size}: the dataset would hold only {rows} "
              "training examples; lower the batch or raise data.num_train")  # fmt: skip

    def waiting(holder: str) -> None:
        console.print(f"waiting for {holder}, which is building {data}")

    try:
        with paths.held_directory("--data", data, "a dataset is being built there", discard_partial=True, wait=True,
                                  on_wait=waiting):  # fmt: skip
            if (data / "metadata.json").exists():  # built by the process waited for
                console.print(f"using {data}, built meanwhile")
                _check_data(cfg, data, implicit=True)
                return
            console.print(f"building dataset in {data}")
            _build(cfg, data)
    except paths.PathProblem as e:
        _fail(str(e))
    console.print(_describe(data))


def _default_data(cfg: RunConfig, preset_name: str) -> Path:
    """data/<preset>, or data/<preset>-<digest of the data settings> when --set changed them
    (so that `--set data.size=6` builds its own dataset instead of clashing with the preset's)."""
    if cfg.data == preset(preset_name).data:
        return Path("data") / preset_name
    digest = hashlib.sha1(json.dumps(dataclasses.asdict(cfg.data), sort_keys=True).encode()).hexdigest()[:8]
    return Path("data") / f"{preset_name}-{digest}"


def _new_run_dir(preset_name: str) -> tuple[Path, Path]:
    """runs/<preset>-<date>-<time>, a name no other run has (two runs started in the same
    second get -2, -3, ...), created here so that the name is this run's; and the top-most
    directory made for it (runs/ itself on a first run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{preset_name}-{stamp}"
    try:
        paths.check_dir("--out", base)
    except paths.PathProblem as e:
        _fail(f"{e} (the default run directory; pass --out)")
    top = base if base.parent.exists() else base.parent
    for suffix in range(1, 1000):
        out = base if suffix == 1 else base.with_name(f"{base.name}-{suffix}")
        try:
            out.mkdir(parents=True)
            return out, (out if top == base else top)
        except FileExistsError:
            continue
    _fail(f"{base}: too many runs started in one second")


def _point_latest(out: Path, preset_name: str) -> None:
    latest = out.parent / f"{preset_name}-latest"
    tmp = out.parent / f".{preset_name}-latest.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(out.name, target_is_directory=True)
        os.replace(tmp, latest)
    except OSError:  # no symlinks here (some Windows setups): the dated name still works
        tmp.unlink(missing_ok=True)


def _holds_anything(path: Path) -> bool:
    return paths.holds_anything(path)


@app.command()
def build(
    out: Annotated[Path, typer.Option(help="dataset directory to create")],
    preset_name: PresetOpt = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="data setting, e.g. data.num_train=500 (repeatable)")
    ] = None,
    csv: Annotated[Path | None, typer.Option(help="puzzle CSV for training (Sudoku-Extreme / Maze-Hard style)")] = None,
    test_csv: Annotated[Path | None, typer.Option(help="puzzle CSV for testing (needs --csv)")] = None,
) -> None:
    """Build a dataset: from puzzle CSVs, or generated offline."""
    if test_csv is not None and csv is None:
        _fail("--test-csv needs --csv (the training CSV); without --csv the puzzles are generated")
    for option, path in (("--csv", csv), ("--test-csv", test_csv)):
        if path is not None and not path.is_file():
            _fail(f"{option} {path}: no such file")
    for item in overrides or []:
        if not item.strip().startswith("data."):
            _fail(f"--set {item}: trm build takes data.* settings only (model and train settings go to trm train)")
    cfg = _config(preset_name, [*(overrides or []), *([f"data.csv={csv}"] if csv else []),
                                *([f"data.test_csv={test_csv}"] if test_csv else [])])  # fmt: skip
    try:
        with paths.held_directory("--out", out, "a dataset is being built there", discard_partial=True) as created:
            if not created and _holds_anything(out):
                _fail(f"--out {out} already exists; a dataset is built into a new directory")
            path = _build(cfg, out)
    except (paths.PathProblem, paths.Busy) as e:
        _fail(str(e))
    if cfg.data.csv and not cfg.data.test_csv and cfg.data.task in ("sudoku", "maze"):
        console.print(f"no --test-csv: held out {cfg.data.num_test} of the CSV's puzzles as the test split "
                      "(data.num_test; 0 for none)")  # fmt: skip
    console.print(_describe(path))


@app.command()
def train(
    preset_name: PresetOpt = None,
    overrides: SetOpt = None,
    data: Annotated[Path | None, typer.Option(help="dataset (default: data/<preset>, built if absent)")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default: runs/<preset>-<date>-<time>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="show progress (a bar on a terminal, lines otherwise)")] = True,
) -> None:
    """Train (and evaluate) a TRM; Ctrl-C stops after the current step with a checkpoint.

    On several GPUs run it under torchrun."""
    if resume:
        if out is None:
            _fail("--resume needs --out, the run directory to continue")
        if preset_name is not None:
            _fail("--preset cannot be combined with --resume: a run continues with its own configuration "
                  "(change train.* settings with --set)")  # fmt: skip
        cfg, data, meta = _resume_config(out, overrides, data)
        implicit = False
    else:
        cfg = _config(preset_name, overrides)
        preset_name = preset_name or DEFAULT_PRESET
        implicit = data is None
        data = data or _default_data(cfg, preset_name)
        if not implicit:
            _check_data(cfg, data, implicit=False)
    rank, world, device = init_distributed()
    with _run_directory(out, preset_name, resume, rank) as out:
        if not resume:
            _check_data_everywhere(cfg, data, implicit)
        if world > 1:  # rank 0 has checked (or built) the data
            torch.distributed.barrier()
        try:
            trainer = Trainer(cfg, data, out, device, rank, world)
            if resume:
                trainer.load(out / CHECKPOINT)
        except (ValueError, checkpoint.CheckpointError) as e:
            _fail(str(e))
        if rank == 0:
            if resume:
                dropped = MetricsLog(out / "metrics.jsonl", True).truncate_after(trainer.step)
                note = f"; dropped {dropped} metric record(s) logged after it" if dropped else ""
                console.print(f"resuming {out} at step {trainer.step} of {cfg.train.steps}{note}")
            elif out.parent.name == "runs" and out.name.startswith(preset_name + "-"):
                _point_latest(out, preset_name)
            console.print(f"{cfg.model.arch.upper()} {trainer.model.num_parameters():,} parameters on {device}, "
                          f"{world} process(es); run directory {out}")  # fmt: skip
        result = fit(trainer, show_progress=progress, console=console)
        stopped_by, step = trainer.stopped_by, trainer.step
        if world > 1:  # every process finishes (rank 0 writes the last checkpoint) before teardown
            torch.distributed.barrier()
            del trainer  # DDP's reducer goes before its process group, not at interpreter exit
            gc.collect()
            torch.distributed.destroy_process_group()
    if rank != 0:
        return
    if stopped_by is not None:
        console.print(f"stopped by {stopped_by} at step {step} of {cfg.train.steps}; checkpoint written. "
                      f"Continue with: trm train --resume --out {shlex.quote(str(out))}")  # fmt: skip
        raise typer.Exit(130 if stopped_by == "SIGINT" else 143)
    if not result:
        console.print(f"[bold green]done[/]: no test puzzles, nothing evaluated; metrics in {out / 'metrics.jsonl'}")
        return
    console.print(
        f"[bold green]test exact accuracy {result['exact_accuracy']:.4f}[/] "
        f"(token accuracy {result['accuracy']:.4f}, {int(result['count'])} held-out puzzles); "
        f"metrics in {out / 'metrics.jsonl'}, plot {out / 'metrics.png'}"
    )


@contextlib.contextmanager
def _run_directory(out: Path | None, preset_name: str | None, resume: bool, rank: int) -> Iterator[Path]:
    """The run directory, created if new and held by this process (rank 0) for the whole run:
    a second `trm train` on it stops with one line naming this one."""
    if rank != 0:  # rank 0 holds it; the others only need its name
        yield out or Path("runs") / f"{preset_name}-rank{rank}"
        return
    made = None
    if out is None:
        out, made = _new_run_dir(preset_name)
    try:
        with paths.held_directory("--out", out, "one run per directory", created=made) as created:
            if not resume and not created and paths.holds_anything(out):
                what = "a run; pass --resume to continue it" if (out / CHECKPOINT).exists() else "files"
                _fail(f"--out {out} already holds {what}; a new run needs a new or empty directory")
            yield out
    except (paths.PathProblem, paths.Busy) as e:
        _fail(str(e))


def _check_data_everywhere(cfg: RunConfig, data: Path, implicit: bool) -> None:
    """Rank 0 checks (and at the default location builds) the data; the others wait for it."""
    if int(os.environ.get("RANK", "0")) == 0:
        _check_data(cfg, data, implicit)


def _resume_config(out: Path, overrides: list[str] | None, data: Path | None) -> tuple[RunConfig, Path, dict]:
    """The run's own config with --set changes (train.* only), checked; exits if the run is finished."""
    try:
        _, meta = checkpoint.load(out / CHECKPOINT)
    except checkpoint.CheckpointError as e:
        _fail(f"{e}; --resume continues a run that has written a checkpoint")
    cfg = RunConfig.from_dict(meta["config"])
    before = cfg.to_dict()
    try:
        validate(apply_overrides(cfg, overrides or []))
    except ValueError as e:
        _fail(str(e))
    after = cfg.to_dict()
    for section in after:
        for name, new in after[section].items():
            key, old = f"{section}.{name}", before[section][name]
            if new == old or key in BOOKKEEPING:
                continue
            if section != "train" and key != "model.forward_dtype":
                _fail(f"{key} cannot change on --resume (the run was trained with {old!r}); start a new run instead")
            _warn(f"{key} changed from {old!r} to {new!r}: the resumed run is no longer an exact continuation"
                  + (" (the ACT carry restarts)" if key == "train.global_batch_size" else ""))  # fmt: skip
    if meta["step"] >= cfg.train.steps:
        console.print(f"{out} is finished (step {meta['step']} of {cfg.train.steps}); to train further: "
                      f"trm train --resume --out {shlex.quote(str(out))} --set train.steps=N")  # fmt: skip
        raise typer.Exit(0)
    return cfg, _run_data(meta, data), meta


def _run_data(meta: dict, data: Path | None) -> Path:
    """--data if given, else the dataset the run recorded (an absolute path; older runs' relative ones too)."""
    if data is not None:
        return data
    recorded = Path(meta.get("data_dir") or "")
    if not meta.get("data_dir") or not (recorded / "metadata.json").exists():
        _fail(f"the run's dataset {str(recorded)!r} is not there (a relative path is read from the current "
              "directory); pass --data")  # fmt: skip
    return recorded


def _load(run: Path, ema: bool) -> Solver:
    """The run's model (on the GPU where there is one), as trm.load gives it."""
    try:
        return load(run, ema=ema)
    except checkpoint.CheckpointError as e:
        _fail(str(e))


@app.command("eval")
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="run directory or checkpoint file")],
    data: Annotated[Path | None, typer.Option(help="dataset (default: the run's)")] = None,
    steps: Annotated[
        str | None,
        typer.Option(
            help="supervision steps (default: the model's n_sup; more = test-time recursion); "
            "with --halt the most a puzzle may take, or a list (16,32,64) to sweep",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="evaluation batch size")] = 256,
    ema: Annotated[bool, typer.Option(help="use the EMA weights")] = True,
    png: Annotated[
        Path | None, typer.Option(help="draw puzzles, targets and answers here, the ones the model got wrong first")
    ] = None,
    show: Annotated[int, typer.Option(help="how many puzzles --png draws")] = 4,
    halt: Annotated[
        bool,
        typer.Option(
            help="each puzzle stops when the model halts, and its slot takes the next puzzle (continuous batching)"
        ),
    ] = False,
    threshold: Annotated[
        float,
        typer.Option(
            help="with --halt: halt when the halting logit exceeds this (0: the training rule; inf: fixed steps)"
        ),
    ] = 0.0,
    sync_every: Annotated[int, typer.Option(help="with --halt: steps between reads of which slots halted")] = 1,
    compare: Annotated[bool, typer.Option(help="with --halt: fixed-step evaluation of the same puzzles too")] = False,
    plot: Annotated[Path | None, typer.Option(help="with --halt: a PNG of steps per puzzle (and the sweep)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the results as JSON here")] = None,
) -> None:
    """Exact and token accuracy on a test split; for ARC, pass@1/2 with voting and a submission.json."""
    depths = _parse_steps(steps, halt)
    _at_least("--batch-size", batch_size, 1)
    _at_least("--show", show, 1)
    _at_least("--sync-every", sync_every, 1)
    if (compare or plot is not None or sync_every != 1 or threshold != 0.0) and not halt:
        _fail("--compare, --plot, --threshold and --sync-every go with --halt")
    if threshold != threshold:  # NaN
        _fail("--threshold nan: must be a number (inf for fixed steps)")
    _check_outputs(("--png", png), ("--json", json_out), ("--plot", plot))
    solver = _load(run, ema)
    model, meta = solver.model, solver.meta
    data = _run_data(meta, data)
    _check_fits_model(data, meta)
    try:
        split = dataset.load_split(data, "test")
    except (ValueError, OSError) as e:
        _fail(str(e))
    if len(split) == 0:
        _fail(f"{data} has no test puzzles; pass --data with a dataset that has a test split")
    task = meta["config"]["data"]["task"]
    if task.startswith("arc"):
        if len(depths) > 1 or compare or plot is not None:
            _fail("for ARC, --halt takes one --steps and no --compare or --plot")
        submission = (run if run.is_dir() else run.parent) / "submission.json"
        _check_outputs(("submission.json in the run directory", submission))
        _evaluate_arc(model, data, batch_size, depths[0], submission, png, show, halt, threshold)
        return
    wrong: list[int] | None = None  # with --halt: found while drawing
    if halt:
        _evaluate_halting(model, split, depths, batch_size, threshold, sync_every, compare, plot, json_out)
    else:
        wrong = []
        result = evaluate(model, split, batch_size, depths[0] or None, wrong)
        console.print(
            f"exact accuracy {result['exact_accuracy']:.4f}, token accuracy {result['accuracy']:.4f} "
            f"on {int(result['count'])} puzzles ({depths[0] or model.cfg.n_sup} supervision steps)"
        )
        if json_out is not None:
            payload = {"mode": "fixed", "steps": depths[0] or model.cfg.n_sup, **result}
            _write_output(json_out, lambda: _write_json(json_out, payload))
    if png is not None:
        halting = (threshold, sync_every) if halt else None
        _write_output(png, lambda: _draw_attempts(model, split, show, depths[0], task, png, batch_size, wrong, halting))


def _check_outputs(*options: tuple[str, Path | None]) -> None:
    """Every file a command will write can be written: checked before any work (exit 2)."""
    for option, path in options:
        if path is not None:
            try:
                paths.check_file(option, path)
            except paths.PathProblem as e:
                _fail(str(e))


def _write_output(path: Path, write) -> None:
    """Run `write()`; if it fails (a full disk, a directory removed meanwhile) say what was kept, exit 1."""
    try:
        write()
    except OSError as e:
        errors.print(f"[red]error:[/red] could not write {escape(str(path))}: {escape(e.strerror or str(e))}; "
                     "the results above were printed, nothing else was lost", markup=True, highlight=False)  # fmt: skip
        raise typer.Exit(1) from None


def _check_fits_model(data: Path, meta: dict) -> None:
    """The dataset holds puzzles of the task, size and encoding the run's model was trained on."""
    try:
        have = dataset.read_metadata(data)
    except ValueError as e:
        _fail(str(e))
    cfg = meta["config"]

    def what(task, size, seq_len, vocab) -> str:
        return f"{size}x{size} {task} (sequence length {seq_len}, vocabulary {vocab})"

    got = what(have.get("task"), have.get("size"), have["seq_len"], have["vocab_size"])
    want = what(cfg["data"]["task"], cfg["data"]["size"], cfg["model"]["seq_len"], cfg["model"]["vocab_size"])
    ids = cfg["model"]["num_puzzle_identifiers"]
    if got != want:
        _fail(f"--data {data} holds {got}, but the model was trained on {want}")
    if have["num_puzzle_identifiers"] > ids:
        _fail(f"--data {data} has {have['num_puzzle_identifiers']} puzzle identifiers; the model has embeddings "
              f"for {ids} (an ARC model evaluates the dataset it was trained with)")  # fmt: skip


def _parse_steps(text: str | None, halt: bool) -> list[int]:
    if text is None:
        return [0]
    try:
        depths = [int(part) for part in text.split(",")]
    except ValueError:
        _fail(f"--steps {text}: expected a whole number, or with --halt a comma-separated list (16,32,64)")
    for depth in depths:
        _at_least("--steps", depth, 0, " (0: the model's n_sup)")
    if len(depths) > 1 and not halt:
        _fail(f"--steps {text}: a list of depths (a sweep) goes with --halt")
    return depths


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {path}")


def _evaluate_halting(model, split, depths, batch_size, threshold, sync_every, compare, plot, json_out) -> None:
    """Adaptive evaluation at each depth; with --compare, fixed steps on the same puzzles too.
    Warmed up first; each depth timed in interleaved rounds (trm.timing): median and spread."""
    sample = dataset.Split(*(a[: min(batch_size, len(split))] for a in (split.inputs, split.labels,
                                                                        split.puzzle_identifiers)))  # fmt: skip
    with console.status("warming up"):
        evaluate_adaptive(model, sample, batch_size, depths[0] or None, threshold, sync_every)
        if compare:
            evaluate(model, sample, batch_size, depths[0] or None)
    rows = []
    for depth in depths:
        depth = depth or model.cfg.n_sup
        sides = {"halting": lambda d=depth: evaluate_adaptive(model, split, batch_size, d, threshold, sync_every)}
        if compare:  # the plain fixed-step evaluation (trm eval without --halt)
            sides["fixed"] = lambda d=depth: evaluate(model, split, batch_size, d)
        with console.status(f"max {depth} steps: timing {' and '.join(sides)} in interleaved rounds"):
            timings, first = timing.interleaved(sides)
        halting = first["halting"]
        rows.append({"mode": "halting", "max_steps": depth, **_timed(halting, timings["halting"], halting["count"])})
        if compare:
            fixed = first["fixed"]
            count = int(fixed["count"])
            rows.append({"mode": "fixed", "max_steps": depth, **fixed, "count": count, "steps_mean": depth,
                         "steps_median": depth, "steps_p90": depth, "steps_max": depth,
                         "steps_histogram": {depth: count}, **_timed({}, timings["fixed"], count)})  # fmt: skip
            ratios = [f / h for f, h in zip(timings["fixed"].seconds, timings["halting"].seconds, strict=True)]
            rows[-2]["speedup_rounds"] = ratios
    console.print(f"{'mode':8} {'max steps':>9} {'exact':>7} {'token':>7} {'steps mean':>10} {'median':>6} {'p90':>5} "
                  f"{'max':>4} {'puzzles/s (median, min-max, rounds)':>36}")  # fmt: skip
    for r in rows:
        console.print(f"{r['mode']:8} {r['max_steps']:>9} {r['exact_accuracy']:>7.4f} {r['accuracy']:>7.4f} "
                      f"{r['steps_mean']:>10.2f} {r['steps_median']:>6.1f} {r['steps_p90']:>5.1f} {r['steps_max']:>4} "
                      f"{timing.spread(r['puzzles_per_second_rounds']):>36}")  # fmt: skip
    if compare:
        for halting, fixed in zip(rows[::2], rows[1::2], strict=True):
            ratios = halting["speedup_rounds"]
            points = 100 * (halting["exact_accuracy"] - fixed["exact_accuracy"])
            spread = f" ({min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} rounds)" if len(ratios) > 1 else ""
            console.print(f"max {halting['max_steps']} steps: halting runs {statistics.median(ratios):.2f}x{spread} "
                          f"the puzzles/s of fixed steps, exact accuracy {points:+.2f} points")  # fmt: skip
    if plot is not None:
        _write_output(plot, lambda: console.print(f"wrote {render.save_halting_png(plot, rows)}"))
    if json_out is not None:
        _write_output(json_out, lambda: _write_json(json_out, {"count": rows[0]["count"], "threshold": threshold,
                                                               "sync_every": sync_every, "results": rows}))  # fmt: skip


def _timed(result: dict, t: timing.Timing, count: int) -> dict:
    """A result with its timing: the median round and every round's puzzles/s."""
    rates = [count / s for s in t.seconds]
    return {**result, "seconds": t.median, "puzzles_per_second": statistics.median(rates),
            "puzzles_per_second_rounds": rates}  # fmt: skip


def _evaluate_arc(model, data: Path, batch_size: int, steps: int, submission: Path, png: Path | None, show: int,
                  halt: bool = False, threshold: float = 0.0) -> None:  # fmt: skip
    """Voting over augmentations, pass@1/2, submission.json next to the checkpoint; --png draws tasks,
    the unsolved ones first."""
    result, votes = evaluate_arc(model, data, batch_size, steps or None, halt, threshold)
    if halt:
        console.print(f"each input halted on its own: {result['steps_mean']:.2f} steps on average")
    console.print(f"ARC pass@1 {result['pass@1']:.4f}, pass@2 {result['pass@2']:.4f} on {result['count']} test "
                  f"inputs ({steps or model.cfg.n_sup} supervision steps)")  # fmt: skip
    _write_output(submission, lambda: submission.write_text(json.dumps(votes.submission())))
    console.print(f"wrote {submission}")
    if png is not None:
        _write_output(png, lambda: console.print(f"wrote {render.save_arc_png(png, votes, show)}"))


def _draw_attempts(model, split: dataset.Split, show: int, steps: int, task: str, png: Path, batch_size: int,
                   wrong: list[int] | None, halting: tuple[float, int] | None) -> None:  # fmt: skip
    """Up to `show` puzzles, the ones the model got wrong first: puzzle, target and the model's
    answer with every wrong cell marked. `wrong`: known from the evaluation, or None to search
    (solving batch by batch until enough wrong ones are found)."""
    device = model.y_init.device

    def answers(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(answer tokens, steps taken) of the puzzles at `index`, as the evaluation ran them."""
        rows = split.batch(index)
        if halting is None:
            *_, (logits, _) = model.solve(to_device(rows, device), steps or None)
            return logits.argmax(-1).cpu().numpy(), np.full(len(index), steps or model.cfg.n_sup)
        solved = adaptive.solve(model, torch.from_numpy(rows["inputs"]), torch.from_numpy(rows["puzzle_identifiers"]),
                                batch_size, steps or None, *halting)  # fmt: skip
        return solved.answers, solved.steps

    if wrong is None:
        wrong = []
        for start in range(0, len(split), batch_size):
            index = np.arange(start, min(start + batch_size, len(split)))
            got, _ = answers(index)
            labels = split.batch(index)["labels"]
            wrong += index[((got != labels) & (labels != -100)).any(-1)].tolist()
            if len(wrong) >= show:
                break
    known = set(wrong)
    others = (i for i in range(len(split)) if i not in known)
    index = np.asarray(wrong[:show] + list(itertools.islice(others, show - len(wrong[:show]))))
    got, taken = answers(index)
    size = int(round(model.cfg.seq_len**0.5))

    def codes(tokens: np.ndarray) -> np.ndarray:
        return (np.asarray(tokens) - 1).clip(0).reshape(size, size)

    rows, batch = [], split.batch(index)
    for row, i in enumerate(index):
        puzzle, target = codes(batch["inputs"][row]), codes(np.maximum(batch["labels"][row], 1))
        answer = codes(got[row])
        verdict = "right" if (answer == target).all() else f"wrong ({int((answer != target).sum())} cells)"
        how = f"after {int(taken[row])} steps" if halting is not None else f"{int(taken[row])} steps"
        rows.append([(f"puzzle #{i}", puzzle), ("target", target, {"givens": puzzle, "colour": render.SOLUTION}),
                     (f"model, {how}: {verdict}", answer, {"givens": puzzle, "target": target})])  # fmt: skip
    console.print(f"wrote {render.save_png(png, rows, task)}")


@app.command()
def solve(
    run: Annotated[Path, typer.Argument(help="run directory or checkpoint file")],
    puzzle: Annotated[str, typer.Argument(help="the grid row by row: Sudoku with '.' or '0' blanks; maze in '# SG'")],
    steps: Annotated[int, typer.Option(help="the most supervision steps (default n_sup; more = test-time depth)")] = 0,
    halt: Annotated[bool, typer.Option(help="stop when the model halts (--no-halt: take every step)")] = True,
    ema: Annotated[bool, typer.Option(help="use the EMA weights")] = True,
    png: Annotated[Path | None, typer.Option(help="also draw the puzzle and every step's answer here")] = None,
) -> None:
    """Solve one puzzle (Sudoku or maze), printing the answer after every supervision step."""
    _at_least("--steps", steps, 0, " (0: the model's n_sup)")
    _check_outputs(("--png", png))
    solver = _load(run, ema)
    if solver.task not in ("sudoku", "maze"):
        _fail(f"trm solve takes Sudoku and maze puzzles; this model was trained on {solver.task} (use trm eval)")
    try:
        grid = solver.parse(puzzle)
    except PuzzleError as e:
        _fail(str(e))
    if solver.task == "sudoku" and len(sudoku.solve(grid, limit=2).solutions) > 1:
        _warn("this puzzle has more than one solution")
    previous, panels = None, [("puzzle", grid)]
    for s in solver.trace(grid, steps or None):
        status = "[green]valid[/]" if s.valid else "[yellow]not yet valid[/]"
        console.print(f"step {s.steps}: P(halt) {s.confidence:.3f}, {status}")
        console.print(render.text(s.answer, solver.task, grid if solver.task == "sudoku" else None, previous))
        previous = s.answer
        panels.append((f"step {s.steps}", s.answer, {"givens": grid} if solver.task == "sudoku" else {}))
        if halt and s.confidence > 0.5:
            console.print(f"the model halted after step {s.steps} (--no-halt takes every step)")
            break
    if png is not None:
        console.print(f"wrote {render.save_png(png, [panels], solver.task)}")


@app.command()
def doctor(
    out: Annotated[Path | None, typer.Option(help="write doctor.json and doctor.md here")] = None,
    quick: Annotated[bool, typer.Option(help="small shapes only (seconds on a CPU)")] = False,
) -> None:
    """Check this machine: environment, every fused op against the reference, CUDA graphs, speed.

    Exit code 0 when every check passed, 1 when any failed (listed first)."""
    if out is not None and out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; pass a directory")
    if out is not None:
        try:
            paths.check_dir("--out", out)
        except paths.PathProblem as e:
            _fail(str(e))
    if doctor_module.needs_interpreter():  # the Triton kernels, on a CPU: in a child process
        argv = [sys.executable, "-m", "trm.doctor", *(["--out", str(out)] if out else []), *(["--quick"] * quick)]
        console.print("no GPU: checking the Triton kernels in the interpreter (TRITON_INTERPRET=1, a child process)")
        code = subprocess.run(argv, env={**os.environ, "TRITON_INTERPRET": "1"}).returncode
        raise typer.Exit(code)
    report = doctor_module.checked_run(out, quick, console)
    raise typer.Exit(1 if report["failed"] else 0)


@app.command("import-reference")
def import_reference(
    source: Annotated[Path, typer.Argument(help="reference checkpoint (torch.save'd state dict)")],
    out: Annotated[Path, typer.Option(help="run directory to write")],
    data: Annotated[Path | None, typer.Option(help="dataset the model was trained on (for eval/solve)")] = None,
    preset_name: ImportPresetOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Convert a reference-implementation checkpoint into a run directory usable by eval/solve."""
    cfg = _config(preset_name or "sudoku-mlp", overrides)
    target = out / "checkpoint.safetensors"
    if target.exists():
        _fail(f"{target} exists; choose another --out")
    try:
        paths.check_dir("--out", out)
    except paths.PathProblem as e:
        _fail(str(e))
    try:
        path = write_model_checkpoint(checkpoint.read_reference(source, cfg.model.arch), cfg, data, target)
    except (checkpoint.CheckpointError, ValueError) as e:
        _fail(str(e))
    console.print(f"wrote {path}")


class _ReaderGone:
    """stdout that, once its reader has gone (``trm train | head``), discards what is written
    instead of raising: the command finishes its work (a run its training, with checkpoints)
    and exits as it would have."""

    def __init__(self, stream):
        self._stream, self._gone = stream, False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._discard()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._discard()

    def _discard(self) -> None:
        self._gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's last flush then finds a file
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main() -> None:
    """The ``trm`` command."""
    sys.stdout = _ReaderGone(sys.stdout)
    app()


if __name__ == "__main__":
    main()
