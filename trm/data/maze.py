"""Maze-Hard style mazes: generator with a unique shortest path, CSV loader, dihedral augmentation.

Grids are strings of side*side characters: ``#`` wall, space open, ``S`` start, ``G`` goal,
and in labels ``o`` for the cells of the shortest path between S and G (S and G keep their
letters). Tokens: 0 pad, then ``# SGo`` -> 1..5, so a maze's vocabulary is 6.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np

from .csvio import labelled, read_pairs

CHARS = "# SGo"
WALL, OPEN, START, GOAL, PATH = range(5)  # codes; token = code + 1


def _neighbours(size: int, cell: int):
    r, c = divmod(cell, size)
    if r > 0:
        yield cell - size
    if r < size - 1:
        yield cell + size
    if c > 0:
        yield cell - 1
    if c < size - 1:
        yield cell + 1


def bfs(grid: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances from `start` over non-wall cells (-1: unreachable) and the number of shortest
    paths reaching each cell, capped at 2."""
    size = grid.shape[0]
    flat = grid.ravel()
    dist = np.full(flat.size, -1, dtype=np.int64)
    count = np.zeros(flat.size, dtype=np.int64)
    dist[start], count[start] = 0, 1
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        for nxt in _neighbours(size, cell):
            if flat[nxt] == WALL:
                continue
            if dist[nxt] == -1:
                dist[nxt] = dist[cell] + 1
                queue.append(nxt)
            if dist[nxt] == dist[cell] + 1:
                count[nxt] = min(2, count[nxt] + count[cell])
    return dist, count


def shortest_path(grid: np.ndarray, start: int, goal: int) -> list[int] | None:
    """The cells of a shortest path from start to goal (inclusive), or None."""
    dist, _ = bfs(grid, start)
    if dist[goal] < 0:
        return None
    size, path = grid.shape[0], [goal]
    while path[-1] != start:
        path.append(next(n for n in _neighbours(size, path[-1]) if dist[n] == dist[path[-1]] - 1))
    return path[::-1]


def carve(size: int, rng: np.random.Generator, loop_prob: float) -> np.ndarray:
    """A maze: a spanning tree carved through the odd cells (randomised DFS), then some
    walls knocked out with probability `loop_prob` to make loops."""
    grid = np.full((size, size), WALL, dtype=np.int64)
    cells = [(r, c) for r in range(1, size - 1, 2) for c in range(1, size - 1, 2)]
    start = cells[rng.integers(len(cells))]
    grid[start] = OPEN
    stack = [start]
    while stack:
        r, c = stack[-1]
        options = [(r + dr, c + dc) for dr, dc in ((2, 0), (-2, 0), (0, 2), (0, -2))
                   if 0 < r + dr < size - 1 and 0 < c + dc < size - 1 and grid[r + dr, c + dc] == WALL]  # fmt: skip
        if not options:
            stack.pop()
            continue
        nr, nc = options[rng.integers(len(options))]
        grid[(r + nr) // 2, (c + nc) // 2] = OPEN
        grid[nr, nc] = OPEN
        stack.append((nr, nc))
    inner = grid[1:-1, 1:-1]
    knock = (inner == WALL) & (rng.random(inner.shape) < loop_prob)
    inner[knock] = OPEN
    return grid


def generate(
    size: int, rng: np.random.Generator, min_path_length: int = 0, loop_prob: float = 0.05, max_tries: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """(question, label) code grids: S and G joined by exactly one shortest path of at least
    `min_path_length` steps, marked with PATH in the label."""
    if size < 5:
        raise ValueError(f"maze size {size} is too small (>= 5)")
    for _ in range(max_tries):
        grid = carve(size, rng, loop_prob)
        open_cells = np.flatnonzero(grid.ravel() != WALL)
        start = int(rng.choice(open_cells))
        dist, count = bfs(grid, start)
        far = np.flatnonzero((dist >= max(min_path_length, 2)) & (count == 1))
        if far.size == 0:
            continue
        goal = int(rng.choice(far))
        question = grid.copy().ravel()
        question[start], question[goal] = START, GOAL
        label = question.copy()
        for cell in shortest_path(grid, start, goal)[1:-1]:
            label[cell] = PATH
        return question.reshape(size, size), label.reshape(size, size)
    raise RuntimeError(f"no {size}x{size} maze with a unique shortest path >= {min_path_length} in {max_tries} tries")


def to_text(grid: np.ndarray) -> str:
    return "".join(CHARS[v] for v in grid.ravel())


def parse(text: str, size: int, labels: bool) -> np.ndarray:
    if len(text) != size * size:
        raise ValueError(f"has {len(text)} characters, expected {size * size}")
    allowed = set(CHARS if labels else CHARS[:4])
    bad = sorted(set(text) - allowed)
    if bad:
        raise ValueError(f"has invalid characters {''.join(bad)!r}")
    return np.array([CHARS.index(ch) for ch in text], dtype=np.int64).reshape(size, size)


def check_pair(question: np.ndarray, label: np.ndarray) -> None:
    """Raise ValueError unless the label marks a shortest S-G path of the question's maze."""
    q, a = question.ravel(), label.ravel()
    starts, goals = np.flatnonzero(q == START), np.flatnonzero(q == GOAL)
    if len(starts) != 1 or len(goals) != 1:
        raise ValueError(f"question has {len(starts)} S and {len(goals)} G, expected one of each")
    if not np.array_equal(np.where(a == PATH, OPEN, a), q):
        raise ValueError("answer differs from the question outside the path")
    dist, _ = bfs(question, int(starts[0]))
    if dist[goals[0]] < 0:
        raise ValueError("G is unreachable from S")
    marked = set(np.flatnonzero(a == PATH).tolist())
    if len(marked) != dist[goals[0]] - 1:
        raise ValueError(f"answer marks {len(marked)} path cells, a shortest path has {dist[goals[0]] - 1}")
    size = question.shape[0]
    cell, seen = int(starts[0]), 0
    while seen < len(marked):  # walk the marked cells from S: each must lead on by one step
        step = [n for n in _neighbours(size, cell) if n in marked and dist[n] == dist[cell] + 1]
        if not step:
            raise ValueError("the marked cells are not a path from S")
        cell, seen = step[0], seen + 1
    if goals[0] not in _neighbours(size, cell):
        raise ValueError("the marked path does not reach G")


def load_csv(path: str | Path, size: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Read a Maze-Hard CSV (``source,question,answer,rating``), validating every row:
    lengths, characters, one S and one G, and an answer that marks a shortest S-G path."""

    def parse_row(question: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
        q = labelled("question", lambda: parse(question, size, labels=False))
        a = labelled("answer", lambda: parse(answer, size, labels=True))
        check_pair(q, a)
        return q, a

    return read_pairs(path, parse_row, "maze")
