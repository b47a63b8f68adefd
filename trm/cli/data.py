"""trm build, and the datasets trm train checks or builds."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import paths
from ..config import RunConfig, preset
from ..data import dataset
from .common import PresetOpt, app, config_from, console, errors, fail


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
            fail(str(e))
        except KeyboardInterrupt:  # the caller's held directory removes what was built
            bar.stop()
            errors.print(f"interrupted: the half-built dataset {out} is removed; nothing else was written")
            raise typer.Exit(130) from None


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


def check_data(cfg: RunConfig, data: Path, implicit: bool) -> None:
    """The dataset at `data` exists (or, at a preset's default location only, is built) and
    matches the config."""
    if not (data / "metadata.json").exists():
        if not implicit:
            fail(f"--data {data}: no dataset there (no metadata.json); build one with `trm build --out {data}`, "
                  "or leave --data out to use the preset's own")  # fmt: skip
        _build_default(cfg, data)
        return
    try:
        meta = dataset.read_metadata(data)
    except ValueError as e:
        fail(str(e))
    want = {"task": cfg.data.task, "size": cfg.data.size}
    if implicit:  # a preset's default location: it must hold exactly what the preset builds
        want |= {"seed": cfg.data.seed, "dihedral": cfg.data.dihedral, "augmentations": cfg.data.augmentations,
                 "source": dataset.source_of(cfg.data)}  # fmt: skip
    diff = [f"{k}: data has {meta.get(k)!r}, config wants {v!r}" for k, v in want.items() if meta.get(k) != v]
    if diff:
        fail(f"{data} was built with other settings ({'; '.join(diff)}); pass another --data or --preset")


def check_batch_fits(cfg: RunConfig) -> None:
    """A dataset the preset would build holds at least one global batch (else one line, exit 2)."""
    rows = _expected_train_rows(cfg)
    if rows is not None and rows < cfg.train.global_batch_size:
        fail(f"train.global_batch_size={cfg.train.global_batch_size}: the dataset would hold only {rows} "
              "training examples; lower the batch or raise data.num_train")  # fmt: skip


def _build_default(cfg: RunConfig, data: Path) -> None:
    """Build the preset's dataset at its default location. Another process building it
    already is waited for, and its dataset used."""
    check_batch_fits(cfg)

    def waiting(holder: str) -> None:
        console.print(f"waiting for {holder}, which is building {data}")

    try:
        with paths.held_directory("--data", data, "a dataset is being built there", discard_partial=True, wait=True,
                                  on_wait=waiting):  # fmt: skip
            if (data / "metadata.json").exists():  # built by the process waited for
                console.print(f"using {data}, built meanwhile")
                check_data(cfg, data, implicit=True)
                return
            console.print(f"building dataset in {data}")
            _build(cfg, data)
    except paths.PathProblem as e:
        fail(str(e))
    console.print(_describe(data))


def default_data(cfg: RunConfig, preset_name: str) -> Path:
    """data/<preset> for the preset's own data settings. When --set changed them:
    data/<what it holds>-<digest of the data settings> (data/sudoku6-..., data/maze9-...), so
    that `--set data.size=6` builds a dataset of its own, named for what it is. One built under
    the name earlier versions gave it, data/<preset>-<the same digest>, is still found and used."""
    if cfg.data == preset(preset_name).data:
        return Path("data") / preset_name
    digest = hashlib.sha1(json.dumps(dataclasses.asdict(cfg.data), sort_keys=True).encode()).hexdigest()[:8]
    named, earlier = Path("data") / f"{_kind(cfg)}-{digest}", Path("data") / f"{preset_name}-{digest}"
    return earlier if (earlier / "metadata.json").exists() and not named.exists() else named


def _kind(cfg: RunConfig) -> str:
    """What a dataset holds, in a name: sudoku6, maze9; arc1; sudoku-csv (a CSV's grids decide)."""
    d = cfg.data
    if d.csv:
        return f"{d.task}-csv"
    return f"{d.task}{d.size}" if d.task in ("sudoku", "maze") else d.task


def holds_anything(path: Path) -> bool:
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
        fail("--test-csv needs --csv (the training CSV); without --csv the puzzles are generated")
    for option, path in (("--csv", csv), ("--test-csv", test_csv)):
        if path is not None and not path.is_file():
            fail(f"{option} {path}: no such file")
    for item in overrides or []:
        if not item.strip().startswith("data."):
            fail(f"--set {item}: trm build takes data.* settings only (model and train settings go to trm train)")
    cfg = config_from(preset_name, [*(overrides or []), *([f"data.csv={csv}"] if csv else []),
                                *([f"data.test_csv={test_csv}"] if test_csv else [])])  # fmt: skip
    try:
        with paths.held_directory("--out", out, "a dataset is being built there", discard_partial=True) as created:
            if not created and holds_anything(out):
                fail(f"--out {out} already exists; a dataset is built into a new directory")
            path = _build(cfg, out)
    except (paths.PathProblem, paths.Busy) as e:
        fail(str(e))
    if cfg.data.csv and not cfg.data.test_csv and cfg.data.task in ("sudoku", "maze"):
        console.print(f"no --test-csv: held out {cfg.data.num_test} of the CSV's puzzles as the test split "
                      "(data.num_test; 0 for none)")  # fmt: skip
    console.print(_describe(path))
