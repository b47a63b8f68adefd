"""Sudoku of side 4, 6 or 9: solver, generator with difficulty control, augmentation, CSV loader.

Grids are int arrays [n, n] with 0 for a blank and 1..n for digits. Tokens (what the
model sees) are 0 pad, 1 blank, 2..n+1 the digits: ``tokens = grid + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .csvio import labelled, read_pairs

BOX = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # side -> (box rows, box cols)


def box_shape(size: int) -> tuple[int, int]:
    if size not in BOX:
        raise ValueError(f"unsupported Sudoku size {size}; choose one of {sorted(BOX)}")
    return BOX[size]


@dataclass
class SearchResult:
    solutions: list[np.ndarray]
    backtracks: int  # placements whose subtree held no solution: the difficulty measure


def solve(grid: np.ndarray, limit: int = 2, rng: np.random.Generator | None = None) -> SearchResult:
    """Depth-first search with the most-constrained cell first, stopping after `limit` solutions.

    With `rng`, candidates are tried in random order (used to draw random full grids).
    """
    size = grid.shape[0]
    br, bc = box_shape(size)
    full = (1 << (size + 1)) - 2  # bits 1..size
    rows, cols, boxes = [0] * size, [0] * size, [0] * size
    cells = grid.astype(np.int64).copy()
    empty = []
    for r in range(size):
        for c in range(size):
            d = int(cells[r, c])
            b = (r // br) * br + c // bc
            if d == 0:
                empty.append((r, c, b))
                continue
            bit = 1 << d
            if rows[r] & bit or cols[c] & bit or boxes[b] & bit:
                return SearchResult([], 0)  # the givens already conflict
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    result = SearchResult([], 0)

    def search() -> bool:
        if not empty:
            result.solutions.append(cells.copy())
            return len(result.solutions) >= limit
        best, best_free, best_count = 0, 0, size + 1
        for i, (r, c, b) in enumerate(empty):
            free = full & ~(rows[r] | cols[c] | boxes[b])
            count = free.bit_count()
            if count < best_count:
                best, best_free, best_count = i, free, count
                if count <= 1:
                    break
        r, c, b = empty[best]
        empty[best] = empty[-1]
        empty.pop()
        digits = [d for d in range(1, size + 1) if best_free >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        for d in digits:
            bit = 1 << d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            cells[r, c] = d
            found = len(result.solutions)
            if search():
                return True
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            cells[r, c] = 0
            result.backtracks += len(result.solutions) == found
        empty.append((r, c, b))
        empty[best], empty[-1] = empty[-1], empty[best]
        return False

    search()
    return result


def is_solution(solution: np.ndarray, puzzle: np.ndarray | None = None) -> bool:
    """A complete valid grid that (if given) keeps every given digit of `puzzle`."""
    size = solution.shape[0]
    br, bc = box_shape(size)
    digits = np.arange(1, size + 1)
    groups = [solution[r] for r in range(size)] + [solution[:, c] for c in range(size)]
    groups += [solution[r : r + br, c : c + bc].ravel() for r in range(0, size, br) for c in range(0, size, bc)]
    if any(not np.array_equal(np.sort(g), digits) for g in groups):
        return False
    return puzzle is None or bool(np.all((puzzle == 0) | (puzzle == solution)))


def generate(
    size: int, rng: np.random.Generator, min_blanks: int = 0, min_backtracks: int = 0, max_tries: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """A puzzle with exactly one solution, and that solution.

    Draws a random full grid, then blanks cells in random order while the solution stays
    unique (a locally minimal puzzle). Retries until the puzzle has at least `min_blanks`
    blanks and its solver needs at least `min_backtracks` backtracks.
    """
    box_shape(size)
    for _ in range(max_tries):
        solution = solve(np.zeros((size, size), dtype=np.int64), limit=1, rng=rng).solutions[0]
        puzzle = solution.copy()
        for cell in rng.permutation(size * size):
            r, c = divmod(int(cell), size)
            kept, puzzle[r, c] = puzzle[r, c], 0
            if len(solve(puzzle, limit=2).solutions) != 1:
                puzzle[r, c] = kept
        if int((puzzle == 0).sum()) >= min_blanks and solve(puzzle, limit=2).backtracks >= min_backtracks:
            return puzzle, solution
    raise RuntimeError(
        f"no {size}x{size} puzzle with >= {min_blanks} blanks and >= {min_backtracks} backtracks "
        f"in {max_tries} tries; lower the difficulty"
    )


def augment(puzzle: np.ndarray, solution: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A validity-preserving random transform applied to both grids.

    Digit relabelling, transpose (p = 0.5, square boxes only), permutation of bands and of
    rows within each band, of stacks and of columns within each stack.
    """
    size = puzzle.shape[0]
    br, bc = box_shape(size)
    relabel = np.concatenate(([0], rng.permutation(size) + 1))
    rows = np.concatenate([band * br + rng.permutation(br) for band in rng.permutation(size // br)])
    cols = np.concatenate([stack * bc + rng.permutation(bc) for stack in rng.permutation(size // bc)])
    transpose = br == bc and rng.random() < 0.5

    def apply(grid: np.ndarray) -> np.ndarray:
        grid = grid.T if transpose else grid
        return relabel[grid[rows][:, cols]]

    return apply(puzzle), apply(solution)


def parse(text: str, size: int, blanks: bool) -> np.ndarray:
    if len(text) != size * size:
        raise ValueError(f"has {len(text)} characters, expected {size * size}")
    allowed = set("123456789"[:size]) | (set(".0") if blanks else set())
    bad = sorted(set(text) - allowed)
    if bad:
        raise ValueError(f"has invalid characters {''.join(bad)!r}")
    return np.array([0 if ch in ".0" else int(ch) for ch in text], dtype=np.int64).reshape(size, size)


def load_csv(path: str | Path, size: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Read a Sudoku-Extreme style CSV (``source,question,answer,rating``).

    Every row is checked: grid lengths and characters, the answer is a valid grid, and
    it keeps the question's givens. Returns (puzzles, solutions) as [N, size, size].
    Raises PuzzleFormatError listing bad rows by line number.
    """

    def parse_row(question: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
        q = labelled("question", lambda: parse(question, size, blanks=True))
        a = labelled("answer", lambda: parse(answer, size, blanks=False))
        if not is_solution(a):
            raise ValueError("answer is not a valid Sudoku grid")
        if not is_solution(a, q):
            raise ValueError("answer contradicts a given digit of the question")
        return q, a

    return read_pairs(path, parse_row, "Sudoku")
