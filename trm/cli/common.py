"""What every command shares: the app, the consoles, one-line errors, settings, output checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from .. import checkpoint, paths
from ..api import Solver, load
from ..config import PRESETS, RunConfig, apply_overrides, preset, validate

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="trm: build data, train, evaluate, solve, import reference checkpoints.",
    rich_markup_mode=None,
)
console = Console(soft_wrap=True)  # lines are not wrapped at 80 columns in a pipe or a log file
errors = Console(stderr=True, soft_wrap=True)
PresetOpt = Annotated[
    str | None, typer.Option("--preset", "-p", help=f"one of: {', '.join(PRESETS)} (default: sudoku4)")
]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. train.lr=3e-4 (repeatable)")]
DEFAULT_PRESET = "sudoku4"


def fail(message: str) -> NoReturn:
    errors.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    raise typer.Exit(2)


def warn(message: str) -> None:
    errors.print(f"[yellow]warning:[/yellow] {escape(message)}", markup=True, highlight=False)


def config_from(preset_name: str | None, overrides: list[str] | None) -> RunConfig:
    notes: list[str] = []
    try:
        cfg = validate(apply_overrides(preset(preset_name or DEFAULT_PRESET), overrides or [], notes))
    except ValueError as e:
        fail(str(e))
    for note in notes:
        console.print(f"note: {note}")
    return cfg


def at_least(option: str, value: int, low: int, meaning: str = "") -> None:
    if value < low:
        fail(f"{option} {value}: must be >= {low}{meaning}")


def check_outputs(*options: tuple[str, Path | None]) -> None:
    """Every file a command will write can be written: checked before any work (exit 2)."""
    for option, path in options:
        if path is not None:
            try:
                paths.check_file(option, path)
            except paths.PathProblem as e:
                fail(str(e))


def write_output(path: Path, write) -> None:
    """Run `write()`; if it fails (a full disk, a directory removed meanwhile) say what was kept, exit 1."""
    try:
        write()
    except OSError as e:
        errors.print(f"[red]error:[/red] could not write {escape(str(path))}: {escape(e.strerror or str(e))}; "
                     "the results above were printed, nothing else was lost", markup=True, highlight=False)  # fmt: skip
        raise typer.Exit(1) from None


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {path}")


def run_data(meta: dict, data: Path | None) -> Path:
    """--data if given, else the dataset the run recorded (an absolute path; older runs' relative ones too)."""
    if data is not None:
        return data
    recorded = Path(meta.get("data_dir") or "")
    if not meta.get("data_dir") or not (recorded / "metadata.json").exists():
        fail(f"the run's dataset {str(recorded)!r} is not there (a relative path is read from the current "
              "directory); pass --data")  # fmt: skip
    return recorded


def load_run(run: Path, ema: bool) -> Solver:
    """The run's model (on the GPU where there is one), as trm.load gives it."""
    try:
        return load(run, ema=ema)
    except checkpoint.CheckpointError as e:
        fail(str(e))
