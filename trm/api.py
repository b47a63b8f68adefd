"""Solving puzzles from Python with a trained model::

    import trm

    solver = trm.load("runs/sudoku4-latest")                 # a run directory or a checkpoint file
    for s in solver.solve(["...4.2..3......1", "1...2...3...4..."]):
        print(s.answer, s.steps, s.confidence, s.valid)

Puzzles are given in their task's format: Sudoku and maze grids as text (row by row; Sudoku
``.`` or ``0`` for blanks, mazes in ``# SG``) or as arrays of codes, ARC grids as arrays of
colours 0..9. Solving is batched and adaptive: each puzzle stops when the model halts (its
halting logit above ``threshold``) or after ``max_steps``; ``halt=False`` runs every puzzle
``max_steps``. A malformed puzzle raises :class:`PuzzleError` naming it and the problem.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import adaptive
from .data import arc, maze, sudoku
from .evaluate import model_from_checkpoint
from .model import RecursiveReasoningModel


class PuzzleError(ValueError):
    """A puzzle that does not fit the model's task (size, characters, contents)."""


@dataclass
class Solution:
    puzzle: np.ndarray  # the puzzle as codes (Sudoku: 0 blank; maze: # SGo as 0..4; ARC: colours)
    answer: np.ndarray  # the model's answer, as codes
    steps: int  # supervision steps taken
    confidence: float  # sigmoid of the halting logit at the last step (TRM: the model's P(its answer is right))
    valid: bool | None  # Sudoku: a solution keeping the givens; maze: a shortest S-G path; ARC: None


class Solver:
    """A trained model and its task: parse, solve (batched, adaptive) and check puzzles."""

    def __init__(self, model: RecursiveReasoningModel, meta: dict):
        self.model, self.meta = model, meta
        self.task = meta["config"]["data"]["task"]
        self.size = 30 if self.task.startswith("arc") else int(round(model.cfg.seq_len**0.5))

    @property
    def device(self) -> torch.device:
        return self.model.y_init.device

    def parse(self, puzzle: str | np.ndarray | Sequence) -> np.ndarray:
        """The puzzle as a grid of codes; raises PuzzleError if it does not fit the model."""
        what = f"this model solves {self.size}x{self.size} {self.task}" if not self.task.startswith("arc") else (
            "this model solves ARC grids of colours 0..9, at most 30x30")  # fmt: skip
        try:
            if self.task.startswith("arc"):
                grid = np.asarray(puzzle, dtype=np.int64)
                if grid.ndim != 2 or grid.size == 0:
                    raise ValueError(f"is not a 2-D grid (shape {grid.shape})")
                arc.place(grid)  # checks size and colours
                return grid
            if isinstance(puzzle, str):
                grid = maze.parse(puzzle.strip(), self.size, labels=False) if self.task == "maze" else (
                    sudoku.parse(puzzle.strip(), self.size, blanks=True))  # fmt: skip
            else:
                grid = np.asarray(puzzle, dtype=np.int64)
                top = maze.GOAL if self.task == "maze" else self.size
                if grid.shape != (self.size, self.size) or grid.min() < 0 or grid.max() > top:
                    raise ValueError(f"is a grid of shape {grid.shape} with codes {grid.min()}..{grid.max()}, "
                                     f"expected ({self.size}, {self.size}) with codes 0..{top}")  # fmt: skip
            if self.task == "maze":
                starts, goals = np.flatnonzero(grid == maze.START), np.flatnonzero(grid == maze.GOAL)
                if (len(starts), len(goals)) != (1, 1):
                    raise ValueError(f"has {len(starts)} S and {len(goals)} G; a maze needs exactly one of each")
                if maze.shortest_path(grid, int(starts[0]), int(goals[0])) is None:
                    raise ValueError("has no path from S to G (walls cut them apart)")
            elif not sudoku.solve(grid, limit=1).solutions:
                raise ValueError("has no solution (its givens cannot all be kept)")
            return grid
        except (ValueError, TypeError) as e:
            raise PuzzleError(f"puzzle {e} ({what})") from None

    def tokens(self, grid: np.ndarray) -> np.ndarray:
        return arc.place(grid).ravel() if self.task.startswith("arc") else grid.ravel() + 1

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        if self.task.startswith("arc"):
            return arc.decode(tokens)
        return (np.asarray(tokens) - 1).clip(0).reshape(self.size, self.size)

    def valid(self, answer: np.ndarray, puzzle: np.ndarray) -> bool | None:
        if self.task == "sudoku":
            return sudoku.is_solution(answer, puzzle)
        if self.task == "maze":
            try:
                maze.check_pair(puzzle, answer)
                return True
            except ValueError:
                return False
        return None

    def solve(
        self,
        puzzles: Sequence,
        max_steps: int | None = None,
        halt: bool = True,
        threshold: float = 0.0,
        batch_size: int = 256,
    ) -> list[Solution]:
        """Solve puzzles (a list, or one puzzle) in batches; each stops when the model halts.

        A malformed puzzle raises PuzzleError naming its index in the list."""
        if threshold != threshold:
            raise ValueError("threshold nan: must be a number (inf: every puzzle takes max_steps)")
        for name, value in (("max_steps", max_steps), ("batch_size", batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}: must be a whole number >= 1")
        single = isinstance(puzzles, str) or (isinstance(puzzles, np.ndarray) and puzzles.ndim == 2)
        if not single and (isinstance(puzzles, bytes | dict) or not isinstance(puzzles, Sequence | np.ndarray)):
            raise TypeError(f"puzzles must be a puzzle (text or a grid) or a list of puzzles, "
                            f"got {type(puzzles).__name__}")  # fmt: skip
        grids = []
        for i, p in enumerate([puzzles] if single else puzzles):
            try:
                grids.append(self.parse(p))
            except PuzzleError as e:
                raise PuzzleError(str(e) if single else f"puzzles[{i}]: {e}") from None
        if not grids:
            return []
        tokens = torch.from_numpy(np.stack([self.tokens(g) for g in grids]))
        solved = adaptive.solve(self.model, tokens, torch.zeros(len(grids), dtype=torch.long), batch_size,
                                max_steps, threshold if halt else float("inf"))  # fmt: skip
        out = []
        for grid, answer, steps, logit in zip(grids, solved.answers, solved.steps, solved.halt_logit, strict=True):
            decoded = self.decode(answer)
            out.append(Solution(grid, decoded, int(steps), _sigmoid(logit), self.valid(decoded, grid)))
        return out

    def trace(self, puzzle, max_steps: int | None = None) -> Iterator[Solution]:
        """One puzzle step by step: its answer and confidence after every supervision step."""
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps={max_steps!r}: must be a whole number >= 1")
        grid = self.parse(puzzle)
        batch = {"inputs": torch.from_numpy(self.tokens(grid)[None]).to(self.device),
                 "puzzle_identifiers": torch.zeros(1, dtype=torch.long, device=self.device)}  # fmt: skip
        for step, (logits, q) in enumerate(self.model.solve_steps(batch, max_steps), 1):
            answer = self.decode(logits.argmax(-1)[0].cpu().numpy())
            logit = adaptive.halting_logit(self.model, q.float())[0].item()
            yield Solution(grid, answer, step, _sigmoid(logit), self.valid(answer, grid))


def _sigmoid(logit: float) -> float:
    return float(1 / (1 + np.exp(-logit)))


def load(path: str | Path, device: str | torch.device | None = None, ema: bool = True) -> Solver:
    """A Solver for a run directory or a checkpoint file (EMA weights when present and `ema`)."""
    path = Path(path)
    file = path / "checkpoint.safetensors" if path.is_dir() else path
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = model_from_checkpoint(file, device, ema)
    return Solver(model, meta)


__all__ = ["PuzzleError", "Solution", "Solver", "load"]
