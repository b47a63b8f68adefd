"""TRM, the Tiny Recursive Model: ``trm.load(run)`` gives a Solver for a trained model (trm.api)."""

from .api import PuzzleError, Solution, Solver, load

__all__ = ["PuzzleError", "Solution", "Solver", "load"]
