"""``trm``: build data, train, evaluate, solve, import reference checkpoints."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console

from . import checkpoint, render
from .config import PRESETS, RunConfig, apply_overrides, preset
from .data import dataset, maze, sudoku

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help=f"one of: {', '.join(PRESETS)}")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. train.lr=3e-4 (repeatable)")]


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _config(preset_name: str, overrides: list[str] | None) -> RunConfig:
    try:
        return apply_overrides(preset(preset_name), overrides or [])
    except ValueError as e:
        _fail(str(e))


def _build(cfg: RunConfig, out: Path) -> Path:
    what = f"{cfg.data.size}x{cfg.data.size} {cfg.data.task}"
    with console.status(f"building {what} data") as status:

        def progress(done: int, total: int) -> None:
            status.update(f"generating {what}: {done}/{total} puzzles")

        try:
            return dataset.build(cfg.data, out, progress)
        except (ValueError, OSError) as e:
            _fail(str(e))


def _ensure_data(cfg: RunConfig, data: Path) -> None:
    """Build the preset's data at `data` if absent; refuse data built from different settings."""
    if not (data / "metadata.json").exists():
        console.print(f"building dataset in {data}")
        _build(cfg, data)
        return
    meta = dataset.read_metadata(data)
    want = {
        "task": cfg.data.task,
        "size": cfg.data.size,
        "seed": cfg.data.seed,
        "dihedral": cfg.data.dihedral,
        "augmentations": cfg.data.augmentations,
        "source": dataset.source_of(cfg.data),
    }
    diff = [f"{k}: data has {meta.get(k)!r}, config wants {v!r}" for k, v in want.items() if meta.get(k) != v]
    if diff:
        _fail(f"{data} was built with other settings ({'; '.join(diff)}); pass another --data")


@app.command()
def build(
    out: Annotated[Path, typer.Option(help="dataset directory to create")],
    preset_name: PresetOpt = "sudoku4",
    overrides: SetOpt = None,
    csv: Annotated[Path | None, typer.Option(help="Sudoku-Extreme CSV for training")] = None,
    test_csv: Annotated[Path | None, typer.Option(help="Sudoku-Extreme CSV for testing")] = None,
) -> None:
    """Build a dataset: from Sudoku-Extreme CSVs, or generated offline."""
    cfg = _config(preset_name, overrides)
    cfg.data.csv, cfg.data.test_csv = str(csv or cfg.data.csv), str(test_csv or cfg.data.test_csv)
    if cfg.data.csv == "":
        cfg.data.test_csv = ""
    path = _build(cfg, out)
    meta = dataset.read_metadata(path)
    console.print(f"wrote {path}: {meta['splits']} examples, vocab {meta['vocab_size']}, seq {meta['seq_len']}")


@app.command()
def train(
    preset_name: PresetOpt = "sudoku4",
    overrides: SetOpt = None,
    data: Annotated[Path | None, typer.Option(help="dataset (default: data/<preset>, built if absent)")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default: runs/<preset>-<date>-<time>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
) -> None:
    """Train (and evaluate) a TRM; on several GPUs run it under torchrun."""
    from .train import CHECKPOINT, Trainer, fit, init_distributed

    if out is None:
        if resume:
            _fail("--resume needs --out, the run directory to continue")
        out = Path("runs") / f"{preset_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    ckpt = out / CHECKPOINT
    if resume:
        try:
            _, meta = checkpoint.load(ckpt)
        except checkpoint.CheckpointError as e:
            _fail(str(e))
        cfg = RunConfig.from_dict(meta["config"])
        apply_overrides(cfg, overrides or [])
        data = data or Path(meta["data_dir"])
    else:
        if ckpt.exists():
            _fail(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        cfg = _config(preset_name, overrides)
        data = data or Path("data") / preset_name
    rank, world, device = init_distributed()
    if rank == 0 and not resume:
        _ensure_data(cfg, data)
    if world > 1:
        torch.distributed.barrier()
    try:
        trainer = Trainer(cfg, data, out, device, rank, world)
        if resume:
            trainer.load(ckpt)
    except (ValueError, checkpoint.CheckpointError) as e:
        _fail(str(e))
    if rank == 0:
        console.print(
            f"TRM {trainer.model.num_parameters():,} parameters on {device}, {world} process(es); run directory {out}"
        )
    result = fit(trainer, show_progress=progress)
    if world > 1:  # every process finishes (rank 0 writes the last checkpoint) before teardown
        torch.distributed.barrier()
        del trainer  # DDP's reducer goes before its process group, not at interpreter exit
        gc.collect()
        torch.distributed.destroy_process_group()
    if rank == 0:
        console.print(
            f"[bold green]test exact accuracy {result['exact_accuracy']:.4f}[/] "
            f"(token accuracy {result['accuracy']:.4f}, {int(result['count'])} held-out puzzles); "
            f"metrics in {out / 'metrics.jsonl'}, plot {out / 'metrics.png'}"
        )


def _load(run: Path, device: torch.device, ema: bool):
    from .evaluate import model_from_checkpoint

    path = run / "checkpoint.safetensors" if run.is_dir() else run
    try:
        return model_from_checkpoint(path, device, ema)
    except checkpoint.CheckpointError as e:
        _fail(str(e))


@app.command("eval")
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="run directory or checkpoint file")],
    data: Annotated[Path | None, typer.Option(help="dataset (default: the run's)")] = None,
    steps: Annotated[int, typer.Option(help="supervision steps (default n_sup; more = test-time recursion)")] = 0,
    batch_size: Annotated[int, typer.Option(help="evaluation batch size")] = 256,
    ema: Annotated[bool, typer.Option(help="use the EMA weights")] = True,
    png: Annotated[Path | None, typer.Option(help="draw the first test puzzles, targets and answers here")] = None,
    show: Annotated[int, typer.Option(help="how many puzzles --png draws")] = 4,
) -> None:
    """Exact and token accuracy on a test split; for ARC, pass@1/2 with voting and a submission.json."""
    from .evaluate import evaluate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = _load(run, device, ema)
    try:
        split = dataset.load_split(data or meta["data_dir"], "test")
    except (ValueError, OSError) as e:
        _fail(str(e))
    task = meta["config"]["data"]["task"]
    if task.startswith("arc"):
        _evaluate_arc(model, Path(data or meta["data_dir"]), batch_size, steps, run, png, show)
        return
    result = evaluate(model, split, batch_size, steps or None)
    if png is not None:
        _draw_attempts(model, split, min(show, len(split)), steps, task, png)
    console.print(
        f"exact accuracy {result['exact_accuracy']:.4f}, token accuracy {result['accuracy']:.4f} "
        f"on {int(result['count'])} puzzles ({steps or model.cfg.n_sup} supervision steps)"
    )


def _evaluate_arc(model, data: Path, batch_size: int, steps: int, run: Path, png: Path | None, show: int) -> None:
    """Voting over augmentations, pass@1/2, submission.json next to the checkpoint; --png draws tasks."""
    import json

    from .evaluate import evaluate_arc

    result, votes = evaluate_arc(model, data, batch_size, steps or None)
    target = (run if run.is_dir() else run.parent) / "submission.json"
    target.write_text(json.dumps(votes.submission()))
    console.print(f"ARC pass@1 {result['pass@1']:.4f}, pass@2 {result['pass@2']:.4f} on {result['count']} test "
                  f"inputs ({steps or model.cfg.n_sup} supervision steps); wrote {target}")  # fmt: skip
    if png is not None:
        rows = []
        for group, t in enumerate(votes.targets[:show]):
            ranked = votes.ranked(group)[:2]
            rows.append([("target " + t["task"], np.array(t["target"]))]
                        + [(f"attempt {i + 1}", g) for i, g in enumerate(ranked)])  # fmt: skip
        console.print(f"wrote {render.save_png(png, rows, 'arc')}")


def _draw_attempts(model, split: dataset.Split, count: int, steps: int, task: str, png: Path) -> None:
    from .evaluate import to_device

    batch = to_device(split.batch(np.arange(count)), model.y_init.device)
    *_, (logits, _) = model.solve(batch, steps or None)
    size = int(round(model.cfg.seq_len**0.5))

    def codes(tokens: torch.Tensor) -> np.ndarray:
        return (tokens.cpu().numpy() - 1).clip(0).reshape(size, size)

    rows = [[("puzzle", codes(batch["inputs"][i])), ("target", codes(batch["labels"][i].clamp_min(1))),
             ("model", codes(logits[i].argmax(-1)))] for i in range(count)]  # fmt: skip
    console.print(f"wrote {render.save_png(png, rows, task)}")


def _parse_puzzle(task: str, text: str, size: int) -> np.ndarray:
    """A puzzle given on the command line, as codes; exits with a message if it is malformed."""
    try:
        if task == "maze":
            return maze.parse(text, size, labels=False)
        return sudoku.parse(text, size, blanks=True)
    except ValueError as e:
        _fail(f"puzzle {e} (this model solves {size}x{size} {task})")


def _answer_ok(task: str, answer: np.ndarray, question: np.ndarray) -> bool:
    if task == "sudoku":
        return sudoku.is_solution(answer, question)
    try:
        maze.check_pair(question, answer)
        return True
    except ValueError:
        return False


@app.command()
def solve(
    run: Annotated[Path, typer.Argument(help="run directory or checkpoint file")],
    puzzle: Annotated[str, typer.Argument(help="the grid row by row: Sudoku with '.' or '0' blanks; maze in '# SG'")],
    steps: Annotated[int, typer.Option(help="supervision steps (default n_sup)")] = 0,
    ema: Annotated[bool, typer.Option(help="use the EMA weights")] = True,
    png: Annotated[Path | None, typer.Option(help="also draw the puzzle and every step's answer here")] = None,
) -> None:
    """Solve one puzzle (Sudoku or maze), printing the answer after every supervision step."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = _load(run, device, ema)
    task = meta["config"]["data"]["task"]
    size = int(round(model.cfg.seq_len**0.5))
    grid = _parse_puzzle(task, puzzle.strip(), size)
    if task == "sudoku":
        solutions = len(sudoku.solve(grid, limit=2).solutions)
        if solutions == 0:
            _fail("this puzzle has no solution (its givens cannot all be kept)")
        if solutions > 1:
            console.print("[yellow]warning:[/] this puzzle has more than one solution")
    tokens = torch.from_numpy(grid.reshape(1, -1) + 1).to(device)
    batch = {"inputs": tokens, "puzzle_identifiers": torch.zeros(1, dtype=torch.long, device=device)}
    previous, panels = None, [("puzzle", grid)]
    for step, (logits, q_halt) in enumerate(model.solve(batch, steps or None), 1):
        answer = (logits.argmax(-1)[0].cpu().numpy() - 1).clip(0).reshape(size, size)
        status = "[green]valid[/]" if _answer_ok(task, answer, grid) else "[yellow]not yet valid[/]"
        console.print(f"step {step}: P(halt) {torch.sigmoid(q_halt[0]).item():.3f}, {status}")
        console.print(render.text(answer, task, grid if task == "sudoku" else None, previous))
        previous = answer
        panels.append((f"step {step}", answer))
    if png is not None:
        console.print(f"wrote {render.save_png(png, [panels], task)}")


@app.command("import-reference")
def import_reference(
    source: Annotated[Path, typer.Argument(help="reference checkpoint (torch.save'd state dict)")],
    out: Annotated[Path, typer.Option(help="run directory to write")],
    data: Annotated[Path | None, typer.Option(help="dataset the model was trained on (for eval/solve)")] = None,
    preset_name: PresetOpt = "sudoku-mlp",
    overrides: SetOpt = None,
) -> None:
    """Convert a reference-implementation checkpoint into a run directory usable by eval/solve."""
    from .evaluate import write_model_checkpoint

    cfg = _config(preset_name, overrides)
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
