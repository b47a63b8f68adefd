"""trm solve, trm doctor, trm import-reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from .. import checkpoint, paths, render
from .. import doctor as doctor_module
from ..api import PuzzleError
from ..data import sudoku
from ..evaluate import write_model_checkpoint
from .common import SetOpt, app, at_least, check_outputs, config_from, console, fail, load_run, warn

ImportPresetOpt = Annotated[str | None, typer.Option("--preset", "-p", help="the run's preset (default: sudoku-mlp)")]


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
    at_least("--steps", steps, 0, " (0: the model's n_sup)")
    check_outputs(("--png", png))
    solver = load_run(run, ema)
    if solver.task not in ("sudoku", "maze"):
        fail(f"trm solve takes Sudoku and maze puzzles; this model was trained on {solver.task} (use trm eval)")
    try:
        grid = solver.parse(puzzle)
    except PuzzleError as e:
        fail(str(e))
    if solver.task == "sudoku" and len(sudoku.solve(grid, limit=2).solutions) > 1:
        warn("this puzzle has more than one solution")
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
        fail(f"--out {out} is a file; pass a directory")
    if out is not None:
        try:
            paths.check_dir("--out", out)
        except paths.PathProblem as e:
            fail(str(e))
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
    cfg = config_from(preset_name or "sudoku-mlp", overrides)
    target = out / "checkpoint.safetensors"
    if target.exists():
        fail(f"{target} exists; choose another --out")
    try:
        paths.check_dir("--out", out)
    except paths.PathProblem as e:
        fail(str(e))
    try:
        path = write_model_checkpoint(checkpoint.read_reference(source, cfg.model.arch), cfg, data, target)
    except (checkpoint.CheckpointError, ValueError) as e:
        fail(str(e))
    console.print(f"wrote {path}")
