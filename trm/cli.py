"""trm: build data, train, evaluate, solve, import reference checkpoints."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import torch
import typer
from rich.console import Console
from rich.markup import escape

from . import checkpoint, render
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
    try:
        return validate(apply_overrides(preset(preset_name or DEFAULT_PRESET), overrides or []))
    except ValueError as e:
        _fail(str(e))


def _at_least(option: str, value: int, low: int, meaning: str = "") -> None:
    if value < low:
        _fail(f"{option} {value}: must be >= {low}{meaning}")


def _build(cfg: RunConfig, out: Path) -> Path:
    what = f"{cfg.data.size}x{cfg.data.size} {cfg.data.task}"
    with console.status(f"building {what} data") as status:

        def progress(done: int, total: int) -> None:
            status.update(f"generating {what}: {done}/{total} puzzles")

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
        rows = _expected_train_rows(cfg)
        if rows is not None and rows < cfg.train.global_batch_size:
            _fail(f"train.global_batch_size={cfg.train.global_batch_size}: the dataset would hold only {rows} "
                  "training examples; lower the batch or raise data.num_train")  # fmt: skip
        console.print(f"building dataset in {data}")
        _build(cfg, data)
        console.print(_describe(data))
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


def _default_data(cfg: RunConfig, preset_name: str) -> Path:
    """data/<preset>, or data/<preset>-<digest of the data settings> when --set changed them
    (so that `--set data.size=6` builds its own dataset instead of clashing with the preset's)."""
    if cfg.data == preset(preset_name).data:
        return Path("data") / preset_name
    digest = hashlib.sha1(json.dumps(dataclasses.asdict(cfg.data), sort_keys=True).encode()).hexdigest()[:8]
    return Path("data") / f"{preset_name}-{digest}"


def _new_run_dir(preset_name: str) -> Path:
    """runs/<preset>-<date>-<time>, unique, and runs/<preset>-latest pointing at it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{preset_name}-{stamp}"
    suffix = 1
    while out.exists():
        suffix += 1
        out = Path("runs") / f"{preset_name}-{stamp}-{suffix}"
    return out


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
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@app.command()
def build(
    out: Annotated[Path, typer.Option(help="dataset directory to create")],
    preset_name: PresetOpt = None,
    overrides: SetOpt = None,
    csv: Annotated[Path | None, typer.Option(help="puzzle CSV for training (Sudoku-Extreme / Maze-Hard style)")] = None,
    test_csv: Annotated[Path | None, typer.Option(help="puzzle CSV for testing (needs --csv)")] = None,
) -> None:
    """Build a dataset: from puzzle CSVs, or generated offline."""
    if test_csv is not None and csv is None:
        _fail("--test-csv needs --csv (the training CSV); without --csv the puzzles are generated")
    for option, path in (("--csv", csv), ("--test-csv", test_csv)):
        if path is not None and not path.is_file():
            _fail(f"{option} {path}: no such file")
    cfg = _config(preset_name, [*(overrides or []), *([f"data.csv={csv}"] if csv else []),
                                *([f"data.test_csv={test_csv}"] if test_csv else [])])  # fmt: skip
    if _holds_anything(out):
        _fail(f"--out {out} already exists; a dataset is built into a new directory")
    if cfg.data.csv and not cfg.data.test_csv and cfg.data.task in ("sudoku", "maze"):
        console.print(f"no --test-csv: holding out {cfg.data.num_test} of the CSV's puzzles as the test split "
                      "(data.num_test; 0 for none)")  # fmt: skip
    path = _build(cfg, out)
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
    else:
        cfg = _config(preset_name, overrides)
        preset_name = preset_name or DEFAULT_PRESET
        if out is None:
            out = _new_run_dir(preset_name)
        elif _holds_anything(out):
            what = "a run; pass --resume to continue it" if (out / CHECKPOINT).exists() else "files"
            _fail(f"--out {out} already holds {what}; a new run needs a new or empty directory")
        implicit = data is None
        data = data or _default_data(cfg, preset_name)
        _check_data_everywhere(cfg, data, implicit)
    rank, world, device = init_distributed()
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
        console.print(
            f"TRM {trainer.model.num_parameters():,} parameters on {device}, {world} process(es); run directory {out}"
        )
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
                      f"Continue with: trm train --resume --out {out}")  # fmt: skip
        raise typer.Exit(130 if stopped_by == "SIGINT" else 143)
    if not result:
        console.print(f"[bold green]done[/]: no test puzzles, nothing evaluated; metrics in {out / 'metrics.jsonl'}")
        return
    console.print(
        f"[bold green]test exact accuracy {result['exact_accuracy']:.4f}[/] "
        f"(token accuracy {result['accuracy']:.4f}, {int(result['count'])} held-out puzzles); "
        f"metrics in {out / 'metrics.jsonl'}, plot {out / 'metrics.png'}"
    )


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
                      f"trm train --resume --out {out} --set train.steps=N")  # fmt: skip
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
        str,
        typer.Option(
            help="supervision steps (default n_sup; more = test-time recursion); "
            "with --halt the most a puzzle may take, or a list (16,32,64) to sweep"
        ),
    ] = "0",
    batch_size: Annotated[int, typer.Option(help="evaluation batch size")] = 256,
    ema: Annotated[bool, typer.Option(help="use the EMA weights")] = True,
    png: Annotated[Path | None, typer.Option(help="draw the first test puzzles, targets and answers here")] = None,
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
    solver = _load(run, ema)
    model, meta = solver.model, solver.meta
    data = _run_data(meta, data)
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
        _evaluate_arc(model, data, batch_size, depths[0], run, png, show, halt, threshold)
        return
    if halt:
        _evaluate_halting(model, split, depths, batch_size, threshold, sync_every, compare, plot, json_out)
    else:
        result = evaluate(model, split, batch_size, depths[0] or None)
        console.print(
            f"exact accuracy {result['exact_accuracy']:.4f}, token accuracy {result['accuracy']:.4f} "
            f"on {int(result['count'])} puzzles ({depths[0] or model.cfg.n_sup} supervision steps)"
        )
        if json_out is not None:
            _write_json(json_out, {"mode": "fixed", "steps": depths[0] or model.cfg.n_sup, **result})
    if png is not None:
        _draw_attempts(model, split, min(show, len(split)), depths[0], task, png)


def _parse_steps(text: str, halt: bool) -> list[int]:
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
    """Adaptive evaluation at each depth; with --compare, fixed steps on the same puzzles too."""
    rows = []
    for depth in depths:
        depth = depth or model.cfg.n_sup
        adaptive_result = evaluate_adaptive(model, split, batch_size, depth, threshold, sync_every)
        rows.append({"mode": "halting", "max_steps": depth, **adaptive_result})
        if compare:  # the plain fixed-step evaluation (trm eval without --halt), timed the same way
            started = time.perf_counter()
            fixed = evaluate(model, split, batch_size, depth)
            seconds = time.perf_counter() - started
            rows.append({"mode": "fixed", "max_steps": depth, **fixed, "count": int(fixed["count"]),
                         "steps_mean": depth, "steps_median": depth, "steps_p90": depth, "steps_max": depth,
                         "steps_histogram": {depth: int(fixed["count"])}, "seconds": seconds,
                         "puzzles_per_second": fixed["count"] / seconds})  # fmt: skip
    console.print(f"{'mode':8} {'max steps':>9} {'exact':>7} {'token':>7} {'steps mean':>10} {'median':>6} {'p90':>5} "
                  f"{'max':>4} {'puzzles/s':>10}")  # fmt: skip
    for r in rows:
        console.print(f"{r['mode']:8} {r['max_steps']:>9} {r['exact_accuracy']:>7.4f} {r['accuracy']:>7.4f} "
                      f"{r['steps_mean']:>10.2f} {r['steps_median']:>6.1f} {r['steps_p90']:>5.1f} {r['steps_max']:>4} "
                      f"{r['puzzles_per_second']:>10.1f}")  # fmt: skip
    if compare:
        for halting, fixed in zip(rows[::2], rows[1::2], strict=True):
            speed = halting["puzzles_per_second"] / fixed["puzzles_per_second"]
            points = 100 * (halting["exact_accuracy"] - fixed["exact_accuracy"])
            console.print(f"max {halting['max_steps']} steps: halting runs {speed:.2f}x the puzzles/s of fixed steps, "
                          f"exact accuracy {points:+.2f} points")  # fmt: skip
    if plot is not None:
        console.print(f"wrote {render.save_halting_png(plot, rows)}")
    if json_out is not None:
        _write_json(json_out, {"count": rows[0]["count"], "threshold": threshold, "sync_every": sync_every,
                               "results": rows})  # fmt: skip


def _evaluate_arc(model, data: Path, batch_size: int, steps: int, run: Path, png: Path | None, show: int,
                  halt: bool = False, threshold: float = 0.0) -> None:  # fmt: skip
    """Voting over augmentations, pass@1/2, submission.json next to the checkpoint; --png draws tasks."""
    result, votes = evaluate_arc(model, data, batch_size, steps or None, halt, threshold)
    if halt:
        console.print(f"each input halted on its own: {result['steps_mean']:.2f} steps on average")
    target = (run if run.is_dir() else run.parent) / "submission.json"
    target.write_text(json.dumps(votes.submission()))
    console.print(f"ARC pass@1 {result['pass@1']:.4f}, pass@2 {result['pass@2']:.4f} on {result['count']} test "
                  f"inputs ({steps or model.cfg.n_sup} supervision steps); wrote {target}")  # fmt: skip
    if png is not None:
        rows = []
        for group, t in enumerate(votes.targets[:show]):
            ranked = votes.ranked(group)[:2]
            shown = [("test input " + t["task"], np.array(t["input"]))] if "input" in t else []
            rows.append(shown + [("target", np.array(t["target"]))]
                        + [(f"attempt {i + 1}", g) for i, g in enumerate(ranked)])  # fmt: skip
        console.print(f"wrote {render.save_png(png, rows, 'arc')}")


def _draw_attempts(model, split: dataset.Split, count: int, steps: int, task: str, png: Path) -> None:
    batch = to_device(split.batch(np.arange(count)), model.y_init.device)
    *_, (logits, _) = model.solve(batch, steps or None)
    size = int(round(model.cfg.seq_len**0.5))

    def codes(tokens: torch.Tensor) -> np.ndarray:
        return (tokens.cpu().numpy() - 1).clip(0).reshape(size, size)

    rows = []
    for i in range(count):
        puzzle, target = codes(batch["inputs"][i]), codes(batch["labels"][i].clamp_min(1))
        marks = {"givens": puzzle, "target": target}
        rows.append(
            [("puzzle", puzzle), ("target", target, {"givens": puzzle}), ("model", codes(logits[i].argmax(-1)), marks)]
        )
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
    if doctor_module.needs_interpreter():  # the Triton kernels, on a CPU: in a child process
        argv = [sys.executable, "-m", "trm.doctor", *(["--out", str(out)] if out else []), *(["--quick"] * quick)]
        console.print("no GPU: checking the Triton kernels in the interpreter (TRITON_INTERPRET=1, a child process)")
        code = subprocess.run(argv, env={**os.environ, "TRITON_INTERPRET": "1"}).returncode
        raise typer.Exit(code)
    with console.status("trm doctor") as status:
        report = doctor_module.run(out, quick, lambda what: status.update(f"checking {what}"))
    console.print(doctor_module.markdown(report), markup=False, highlight=False)
    if out is not None:
        console.print(f"wrote {out / 'doctor.json'} and {out / 'doctor.md'}")
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
        path = write_model_checkpoint(checkpoint.read_reference(source, cfg.model.arch), cfg, data, target)
    except (checkpoint.CheckpointError, ValueError) as e:
        _fail(str(e))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    app()
