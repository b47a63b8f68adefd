"""Showing grids: rich text for the terminal, PNG panels for a task and the model's attempts.

Grids hold codes (Sudoku: 0 blank, 1..n digits; maze: ``# SGo`` as 0..4; ARC: colours 0..9), not tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import maze, sudoku

MAZE_COLOURS = ["#202020", "#f4f4f4", "#2e7d32", "#c62828", "#f9a825"]  # wall, open, S, G, path
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
GIVEN, FILLED, WRONG = "#111111", "#1565c0", "#c62828"


def _sudoku_panel(ax, grid: np.ndarray, givens: np.ndarray | None, target: np.ndarray | None) -> None:
    """Digits on a white board with box lines; givens black, filled digits blue, wrong cells red."""
    from matplotlib.patches import Rectangle

    size = grid.shape[0]
    box_rows, box_cols = sudoku.BOX.get(size, (size, size))
    ax.imshow(np.zeros_like(grid, dtype=float), cmap="Greys", vmin=0, vmax=1)  # white
    for (r, c), v in np.ndenumerate(grid):
        given = givens is not None and givens[r, c] != 0
        wrong = target is not None and not given and v != target[r, c]
        if wrong:
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, color="#ffcdd2"))
        if v:
            colour = GIVEN if given or givens is None else (WRONG if wrong else FILLED)
            ax.text(c, r, str(v), ha="center", va="center", color=colour, fontsize=max(5, 60 // size),
                    fontweight="bold" if given else "normal")  # fmt: skip
    for k in range(size + 1):
        thick = 2.0 if k % box_rows == 0 else 0.5
        ax.axhline(k - 0.5, color="black", linewidth=thick)
        thick = 2.0 if k % box_cols == 0 else 0.5
        ax.axvline(k - 0.5, color="black", linewidth=thick)


Panel = tuple  # (title, grid) or (title, grid, {"givens": grid, "target": grid}) for Sudoku


def save_png(path: str | Path, rows: list[list[Panel]], task: str) -> Path:
    """One row of panels per puzzle, e.g. [("puzzle", q), ("target", a), ("model", p, {"givens": q, "target": a})].

    Sudoku panels show box lines; with "givens" the given digits are black and the filled
    ones blue, and with "target" wrong cells are red. Mazes get a colour legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.6 * ncols, 2.6 * len(rows) + 0.4), squeeze=False)
    for ax_row, panels in zip(axes, rows, strict=True):
        for ax, (title, grid, *extra) in zip(ax_row, panels, strict=False):
            marks = extra[0] if extra else {}
            if task == "maze" or task.startswith("arc"):
                colours = MAZE_COLOURS if task == "maze" else ARC_COLOURS
                ax.imshow(grid, cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1)
            else:
                _sudoku_panel(ax, grid, marks.get("givens"), marks.get("target"))
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in ax_row[len(panels) :]:
            ax.axis("off")
    if task == "maze":
        handles = [
            Patch(facecolor=c, edgecolor="grey", label=n) for c, n in zip(MAZE_COLOURS, MAZE_LEGEND, strict=True)
        ]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    elif task == "sudoku":
        handles = [Patch(color=GIVEN, label="given"), Patch(color=FILLED, label="filled by the model"),
                   Patch(color=WRONG, label="wrong")]  # fmt: skip
        fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if task in ("maze", "sudoku") else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def save_halting_png(path: str | Path, rows: list[dict]) -> Path:
    """Adaptive evaluation: a histogram of the steps each puzzle took (per max depth), and for a
    sweep over depths, exact accuracy and puzzles/s against the depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    halting = [r for r in rows if r["mode"] == "halting"]
    sweep = len(halting) > 1
    fig, axes = plt.subplots(1, 3 if sweep else 1, figsize=(15 if sweep else 6, 4), squeeze=False)
    ax = axes[0][0]
    for r in halting:
        hist = {int(k): v for k, v in r["steps_histogram"].items()}
        ax.bar(list(hist), list(hist.values()), alpha=0.6, label=f"max {r['max_steps']} steps")
    ax.set(xlabel="supervision steps taken", ylabel="puzzles", title="steps per puzzle (halting)")
    ax.legend()
    if sweep:
        depths = [r["max_steps"] for r in halting]
        axes[0][1].plot(depths, [r["exact_accuracy"] for r in halting], "o-", label="halting")
        axes[0][2].plot(depths, [r["puzzles_per_second"] for r in halting], "o-", label="halting")
        fixed = [r for r in rows if r["mode"] == "fixed"]
        if fixed:
            axes[0][1].plot([r["max_steps"] for r in fixed], [r["exact_accuracy"] for r in fixed], "s--", label="fixed")
            axes[0][2].plot([r["max_steps"] for r in fixed], [r["puzzles_per_second"] for r in fixed], "s--",
                            label="fixed")  # fmt: skip
        axes[0][1].set(xlabel="max supervision steps", ylabel="exact accuracy", title="accuracy vs depth", xscale="log")
        axes[0][2].set(xlabel="max supervision steps", ylabel="puzzles/s", title="throughput vs depth", xscale="log")
        for a in axes[0][1:]:
            a.set_xticks(depths, [str(d) for d in depths])
            a.minorticks_off()
            a.grid(alpha=0.3)
            a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
