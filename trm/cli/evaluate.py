"""trm eval: fixed-step, adaptive and ARC evaluation, sweeps, comparisons and pictures."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from .. import adaptive, render, timing
from ..data import dataset
from ..evaluate import evaluate, evaluate_adaptive, evaluate_arc, to_device
from .common import app, at_least, check_outputs, console, fail, load_run, run_data, write_json, write_output


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
    at_least("--batch-size", batch_size, 1)
    at_least("--show", show, 1)
    at_least("--sync-every", sync_every, 1)
    if (compare or plot is not None or sync_every != 1 or threshold != 0.0) and not halt:
        fail("--compare, --plot, --threshold and --sync-every go with --halt")
    if threshold != threshold:  # NaN
        fail("--threshold nan: must be a number (inf for fixed steps)")
    check_outputs(("--png", png), ("--json", json_out), ("--plot", plot))
    solver = load_run(run, ema)
    model, meta = solver.model, solver.meta
    data = run_data(meta, data)
    _check_fits_model(data, meta)
    try:
        split = dataset.load_split(data, "test")
    except (ValueError, OSError) as e:
        fail(str(e))
    if len(split) == 0:
        fail(f"{data} has no test puzzles; pass --data with a dataset that has a test split")
    task = meta["config"]["data"]["task"]
    if task.startswith("arc"):
        if len(depths) > 1 or compare or plot is not None:
            fail("for ARC, --halt takes one --steps and no --compare or --plot")
        submission = (run if run.is_dir() else run.parent) / "submission.json"
        check_outputs(("submission.json in the run directory", submission))
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
            write_output(json_out, lambda: write_json(json_out, payload))
    if png is not None:
        halting = (threshold, sync_every) if halt else None
        write_output(png, lambda: _draw_attempts(model, split, show, depths[0], task, png, batch_size, wrong, halting))


def _check_fits_model(data: Path, meta: dict) -> None:
    """The dataset holds puzzles of the task, size and encoding the run's model was trained on."""
    try:
        have = dataset.read_metadata(data)
    except ValueError as e:
        fail(str(e))
    cfg = meta["config"]

    def what(task, size, seq_len, vocab) -> str:
        return f"{size}x{size} {task} (sequence length {seq_len}, vocabulary {vocab})"

    got = what(have.get("task"), have.get("size"), have["seq_len"], have["vocab_size"])
    want = what(cfg["data"]["task"], cfg["data"]["size"], cfg["model"]["seq_len"], cfg["model"]["vocab_size"])
    ids = cfg["model"]["num_puzzle_identifiers"]
    if got != want:
        fail(f"--data {data} holds {got}, but the model was trained on {want}")
    if have["num_puzzle_identifiers"] > ids:
        fail(f"--data {data} has {have['num_puzzle_identifiers']} puzzle identifiers; the model has embeddings "
              f"for {ids} (an ARC model evaluates the dataset it was trained with)")  # fmt: skip


def _parse_steps(text: str | None, halt: bool) -> list[int]:
    if text is None:
        return [0]
    try:
        depths = [int(part) for part in text.split(",")]
    except ValueError:
        fail(f"--steps {text}: expected a whole number, or with --halt a comma-separated list (16,32,64)")
    for depth in depths:
        at_least("--steps", depth, 0, " (0: the model's n_sup)")
    if len(depths) > 1 and not halt:
        fail(f"--steps {text}: a list of depths (a sweep) goes with --halt")
    return depths


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
        write_output(plot, lambda: console.print(f"wrote {render.save_halting_png(plot, rows)}"))
    if json_out is not None:
        write_output(json_out, lambda: write_json(json_out, {"count": rows[0]["count"], "threshold": threshold,
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
    write_output(submission, lambda: submission.write_text(json.dumps(votes.submission())))
    console.print(f"wrote {submission}")
    if png is not None:
        write_output(png, lambda: console.print(f"wrote {render.save_arc_png(png, votes, show)}"))


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
        differ = int((answer != target).sum())
        verdict = "right" if not differ else f"wrong ({differ} cell{'s' if differ > 1 else ''})"
        how = f"after {int(taken[row])} steps" if halting is not None else f"{int(taken[row])} steps"
        rows.append([(f"puzzle #{i}", puzzle), ("target", target, {"givens": puzzle, "colour": render.SOLUTION}),
                     (f"model, {how}: {verdict}", answer, {"givens": puzzle, "target": target})])  # fmt: skip
    console.print(f"wrote {render.save_png(png, rows, task)}")
