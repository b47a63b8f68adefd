"""Showing grids: rich text for the terminal, PNG panels for a task and the model's attempts.

Grids hold codes (Sudoku: 0 blank, 1..n digits; maze: ``# SGo`` as 0..4; ARC: colours 0..9), not tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .data import maze, sudoku

MAZE_COLOURS = ["#202020", "#f4f4f4", "#2e7d32", "#1565c0", "#f9a825"]  # wall, open, S, G, path (red: wrong only)
ARC_COLOURS = ["#000000", "#0074d9", "#ff4136", "#2ecc40", "#ffdc00", "#aaaaaa", "#f012be", "#ff851b", "#7fdbff",
               "#870c25"]  # fmt: skip


def text(grid: np.ndarray, task: str, givens: np.ndarray | None = None, previous: np.ndarray | None = None) -> str:
    """Rich markup: Sudoku givens dim; cells changed since `previous` highlighted."""
    lines = []
    for r, row in enumerate(grid):
        cells = []
        for c, v in enumerate(row):
            ch = str(v) if task == "sudoku" else maze.CHARS[v]
            if task == "maze" and v == maze.PATH:
                ch = f"[yellow]{ch}[/]"
            if givens is not None and task == "sudoku" and givens[r, c]:
                cells.append(f"[dim]{ch}[/]")
            elif previous is not None and previous[r, c] != v:
                cells.append(f"[bold reverse]{ch}[/]")
            else:
                cells.append(ch)
        lines.append((" " if task == "sudoku" else "").join(cells))
    return "\n".join(lines)


MAZE_LEGEND = ("wall", "open", "start (S)", "goal (G)", "path")
GIVEN, FILLED, SOLUTION, WRONG, WRONG_FILL = "#111111", "#1565c0", "#757575", "#c62828", "#ffcdd2"


def _sudoku_panel(
    ax, grid: np.ndarray, givens: np.ndarray | None, target: np.ndarray | None, filled: str = FILLED
) -> None:
    """Digits on a white board with box lines: givens black and bold, the other digits in
    `filled` (blue: the model's), and every digit that differs from the target red on pink,
    a given overwritten included."""
    from matplotlib.patches import Rectangle

    size = grid.shape[0]
    box_rows, box_cols = sudoku.BOX.get(size, (size, size))
    ax.imshow(np.zeros_like(grid, dtype=float), cmap="Greys", vmin=0, vmax=1)  # white
    for (r, c), v in np.ndenumerate(grid):
        given = givens is not None and givens[r, c] != 0
        wrong = target is not None and v != target[r, c]
        if wrong:
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, color=WRONG_FILL))
        if v:
            colour = WRONG if wrong else (GIVEN if given or givens is None else filled)
            ax.text(c, r, str(v), ha="center", va="center", color=colour, fontsize=max(5, 60 // size),
                    fontweight="bold" if given else "normal")  # fmt: skip
    for k in range(size + 1):
        thick = 2.0 if k % box_rows == 0 else 0.5
        ax.axhline(k - 0.5, color="black", linewidth=thick)
        thick = 2.0 if k % box_cols == 0 else 0.5
        ax.axvline(k - 0.5, color="black", linewidth=thick)


def _colour_panel(ax, grid: np.ndarray, colours: list[str], target: np.ndarray | None) -> None:
    """A grid of colour codes; with `target` (same shape), every differing cell framed in red."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    if grid.size == 0:
        ax.text(0.5, 0.5, "(empty grid)", ha="center", va="center", fontsize=9, transform=ax.transAxes)
        return
    ax.imshow(grid, cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1)
    if target is not None and target.shape == grid.shape:
        for r, c in zip(*np.nonzero(grid != target), strict=True):
            ax.add_patch(Rectangle((c - 0.45, r - 0.45), 0.9, 0.9, fill=False, edgecolor=WRONG, linewidth=2))


Panel = tuple  # (title, grid) or (title, grid, {"givens": grid, "target": grid})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    try:
        fig.savefig(path, dpi=100)
    finally:
        _pyplot().close(fig)
    return Path(path)


def save_png(path: str | Path, rows: list[list[Panel]], task: str) -> Path:
    """grid_figure(rows, task), written as a PNG."""
    return _save(grid_figure(rows, task), path)


def grid_figure(rows: list[list[Panel]], task: str):
    """One row of panels per puzzle, e.g. [("puzzle", q), ("target", a, {"givens": q, "colour": SOLUTION}),
    ("model", p, {"givens": q, "target": a})].

    Sudoku panels show box lines; with "givens" the given digits are black and the others
    blue (or "colour"); with "target", every cell that differs from it is red. Maze and ARC
    panels frame the differing cells in red. A legend says so.
    """
    from matplotlib.patches import Patch

    plt = _pyplot()
    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.6 * ncols, 2.6 * len(rows) + 0.5), squeeze=False)
    for ax_row, panels in zip(axes, rows, strict=True):
        for ax, (title, grid, *extra) in zip(ax_row, panels, strict=False):
            marks = extra[0] if extra else {}
            if task == "sudoku":
                _sudoku_panel(ax, grid, marks.get("givens"), marks.get("target"), marks.get("colour", FILLED))
            else:
                _colour_panel(ax, grid, MAZE_COLOURS if task == "maze" else ARC_COLOURS, marks.get("target"))
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in ax_row[len(panels) :]:
            ax.axis("off")
    marked = [p[2] for r in rows for p in r if len(p) > 2]
    checked = any("target" in m for m in marked)
    wrong = [Patch(facecolor="none", edgecolor=WRONG, linewidth=2, label="differs from the target")] if checked else []
    if task == "maze":
        cells = zip(MAZE_COLOURS, MAZE_LEGEND, strict=True)
        handles = [*(Patch(facecolor=c, edgecolor="grey", label=n) for c, n in cells), *wrong]
    elif task == "sudoku":
        handles = [Patch(color=GIVEN, label="given"), Patch(color=FILLED, label="filled by the model")]
        handles += [Patch(color=SOLUTION, label="solution")] if any("colour" in m for m in marked) else []
        handles += [Patch(facecolor=WRONG_FILL, edgecolor=WRONG, label="wrong (red digit)")] if checked else []
    else:
        handles = wrong
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.3 / (2.6 * len(rows) + 0.5) + 0.02, 1, 1))
    return fig


def save_arc_png(path: str | Path, votes, show: int) -> Path:
    """arc_rows(votes, show) drawn as a PNG."""
    return save_png(path, arc_rows(votes, show), "arc")


def arc_rows(votes, show: int) -> list[list[Panel]]:
    """ARC test inputs, the unsolved ones first: input, target and the two ranked attempts,
    each titled right or wrong (cells that differ framed in red), or "none" when the votes
    hold fewer than two answers."""
    groups = sorted(range(len(votes.targets)), key=lambda g: votes.solved(g, 2))[:show]
    rows = []
    for group in groups:
        t = votes.targets[group]
        target = np.array(t["target"])
        shown = [(f"{t['task']} test {t['index'] + 1}", np.array(t["input"]))] if "input" in t else []
        panels = [*shown, ("target", target)]
        ranked = votes.ranked(group)[:2]
        for k in range(2):
            if k < len(ranked):
                grid = ranked[k]
                verdict = "right" if np.array_equal(grid, target) else "wrong"
                if grid.shape != target.shape:
                    verdict += f", {grid.shape[0]}x{grid.shape[1] if grid.ndim > 1 else 0}"
                panels.append((f"attempt {k + 1}: {verdict}", grid, {"target": target}))
            else:
                panels.append((f"attempt {k + 1}: none", np.zeros((0, 0), dtype=int)))
        rows.append(panels)
    return rows


def save_halting_png(path: str | Path, rows: list[dict]) -> Path:
    """halting_figure(rows), written as a PNG."""
    return _save(halting_figure(rows), path)


def halting_figure(rows: list[dict]):
    """Adaptive evaluation: how many puzzles halted after each number of steps (bars side by
    side, one colour per max depth), and for a sweep over depths, exact accuracy and
    puzzles/s against the depth (halting, and fixed steps with --compare; the error bars
    span the timed rounds)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    halting = [r for r in rows if r["mode"] == "halting"]
    sweep = len(halting) > 1
    fig, axes = plt.subplots(1, 3 if sweep else 1, figsize=(16 if sweep else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(halting)
    for i, r in enumerate(halting):
        hist = {int(k): v for k, v in r["steps_histogram"].items()}
        offset = (i - (len(halting) - 1) / 2) * width
        ax.bar([k + offset for k in hist], list(hist.values()), width=width, label=f"at most {r['max_steps']} steps")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="supervision steps a puzzle took", ylabel="puzzles", title="when puzzles halted")
    ax.legend(fontsize=8)
    if sweep:
        fixed = [r for r in rows if r["mode"] == "fixed"]
        for series, style, label in ((halting, "o-", "halting"), (fixed, "s--", "fixed steps")):
            if not series:
                continue
            depths = [r["max_steps"] for r in series]
            axes[0][1].plot(depths, [r["exact_accuracy"] for r in series], style, label=label, clip_on=False)
            rates = [r["puzzles_per_second_rounds"] for r in series]
            medians = [float(np.median(v)) for v in rates]
            below = [m - min(v) for m, v in zip(medians, rates, strict=True)]
            above = [max(v) - m for m, v in zip(medians, rates, strict=True)]
            axes[0][2].errorbar(depths, medians, yerr=[below, above], fmt=style, capsize=3, label=label)
        depths = [r["max_steps"] for r in halting]
        accuracies = [r["exact_accuracy"] for r in rows]
        low = max(0.0, math.floor((min(accuracies) - 0.02) * 20) / 20)  # zoomed to the data, never past [0, 1]
        high = min(1.0, math.ceil((max(accuracies) + 0.02) * 20) / 20)
        axes[0][1].set(xlabel="max supervision steps", ylabel="exact accuracy", title="accuracy vs depth",
                       ylim=(low, high))  # fmt: skip
        axes[0][2].set(xlabel="max supervision steps", ylabel="puzzles/s (median, range of rounds)",
                       title="throughput vs depth", ylim=(0, None))  # fmt: skip
        for a in axes[0][1:]:
            a.set_xscale("log")
            a.set_xticks(depths, [str(d) for d in depths])
            a.minorticks_off()
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
    fig.tight_layout()
    return fig
