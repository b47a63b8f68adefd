"""Showing grids: rich text for the terminal, PNG panels for a task and the model's attempts.

Grids hold codes (Sudoku: 0 blank, 1..n digits; maze: ``# SGo`` as 0..4; ARC: colours 0..9), not tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import maze

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


def save_png(path: str | Path, rows: list[list[tuple[str, np.ndarray]]], task: str) -> Path:
    """One row of panels per puzzle, e.g. [("question", q), ("target", a), ("model", p)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.6 * ncols, 2.6 * len(rows)), squeeze=False)
    for ax_row, panels in zip(axes, rows, strict=True):
        for ax, (title, grid) in zip(ax_row, panels, strict=False):
            if task == "maze" or task.startswith("arc"):
                colours = MAZE_COLOURS if task == "maze" else ARC_COLOURS
                ax.imshow(grid, cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1)
            else:
                ax.imshow(np.zeros_like(grid), cmap="Greys", vmin=0, vmax=1)
                for (r, c), v in np.ndenumerate(grid):
                    if v:
                        ax.text(c, r, str(v), ha="center", va="center", fontsize=max(5, 60 // grid.shape[0]))
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in ax_row[len(panels) :]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
