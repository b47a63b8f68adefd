"""Symmetries of square grids shared by the grid tasks."""

from __future__ import annotations

import numpy as np


def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 symmetries of the square (k = 0 is the identity; 4..7 transpose)."""
    grid = np.rot90(grid, k % 4)
    return np.ascontiguousarray(grid.T if k >= 4 else grid)


def _inverse(k: int) -> int:
    probe = np.arange(12).reshape(3, 4)
    return next(j for j in range(8) if np.array_equal(dihedral(dihedral(probe, k), j), probe))


INVERSE = [_inverse(k) for k in range(8)]  # dihedral(dihedral(g, k), INVERSE[k]) == g
