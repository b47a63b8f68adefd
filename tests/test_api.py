"""trm.load and the Solver: puzzles of each task round-trip, malformed ones are named, solving is adaptive."""

import numpy as np
import pytest
import torch

import trm
from trm.config import RunConfig, preset
from trm.data import maze, sudoku
from trm.evaluate import write_model_checkpoint

TASKS = {  # task -> (preset, vocab, seq_len)
    "sudoku": ("sudoku4", 6, 16),
    "maze": ("maze7", 6, 49),
    "arc1": ("arc1", 12, 900),
}


@pytest.fixture(params=list(TASKS))
def solver(request, tmp_path):
    name, vocab, seq = TASKS[request.param]
    cfg = preset(name)
    cfg.model.vocab_size, cfg.model.seq_len = vocab, seq
    cfg.model.hidden_size, cfg.model.num_heads, cfg.model.n_sup = 32, 2, 3
    cfg.model.T, cfg.model.n, cfg.model.puzzle_emb_len = 1, 1, 1
    from trm.arch import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.q_head.weight.normal_(0, 1.0)
        model.q_head.bias.zero_()
    target = tmp_path / "checkpoint.safetensors"
    write_model_checkpoint(model.state_dict(), RunConfig.from_dict(cfg.to_dict()), None, target)
    return trm.load(tmp_path, device="cpu")


def examples(task: str, rng) -> list:
    if task == "sudoku":
        return [sudoku.generate(4, rng)[0] for _ in range(3)]
    if task == "maze":
        return [maze.generate(7, rng, 4)[0] for _ in range(3)]
    return [rng.integers(0, 10, (h, w)) for h, w in ((3, 3), (1, 30), (30, 2))]


def text(task: str, grid: np.ndarray) -> str:
    return maze.to_text(grid) if task == "maze" else "".join(str(v) if v else "." for v in grid.ravel())


def test_puzzles_round_trip_and_solve_adaptively(solver, rng):
    grids = examples(solver.task, rng)
    for grid in grids:
        np.testing.assert_array_equal(solver.decode(solver.tokens(solver.parse(grid))), grid)
        if solver.task != "arc1":
            np.testing.assert_array_equal(solver.parse(text(solver.task, grid)), grid)
    solutions = solver.solve(grids, max_steps=4)
    assert len(solutions) == 3
    for s, grid in zip(solutions, grids, strict=True):
        np.testing.assert_array_equal(s.puzzle, grid)
        assert 1 <= s.steps <= 4 and 0 < s.confidence < 1
        assert (s.valid is None) == (solver.task == "arc1")
        if solver.task != "arc1":
            assert s.answer.shape == grid.shape
    fixed = solver.solve(grids, max_steps=4, halt=False)
    assert [s.steps for s in fixed] == [4, 4, 4]
    one = solver.solve(grids[0], max_steps=4)  # a single puzzle
    assert len(one) == 1 and one[0].steps == solutions[0].steps
    traced = list(solver.trace(grids[0], 2))
    assert [t.steps for t in traced] == [1, 2]


BAD = {
    "sudoku": [("1...", "has 4 characters, expected 16"), ("x" * 16, "has invalid characters 'x'"),
               ("1.3..4.12..3.1..", "has no solution"), (np.zeros((3, 3)), "expected (4, 4)"),
               (np.full((4, 4), 7), "with codes 0..4")],
    "maze": [("#" * 48, "has 48 characters, expected 49"), ("#" * 49, "has 0 S and 0 G"),
             (np.zeros((7, 7)), "has 0 S and 0 G")],
    "arc1": [(np.full((3, 3), 10), "colours 0..9"), (np.zeros((31, 2)), "at most 30x30"),
             (np.zeros(5), "is not a 2-D grid")],
}  # fmt: skip


def test_malformed_puzzles_are_named(solver):
    for puzzle, message in BAD[solver.task]:
        with pytest.raises(trm.PuzzleError, match=None) as caught:
            solver.solve([puzzle])
        assert message in str(caught.value), (str(caught.value), message)


def test_wrong_arguments_are_named(solver, rng):
    good = examples(solver.task, rng)[0]
    with pytest.raises(TypeError, match="puzzles must be a puzzle .* or a list of puzzles, got int"):
        solver.solve(1234)
    with pytest.raises(trm.PuzzleError, match=r"^puzzles\[1\]: puzzle "):
        solver.solve([good, np.full((2, 2), 99)])
    with pytest.raises(ValueError, match="threshold nan: must be a number"):
        solver.solve([good], threshold=float("nan"))
    for name in ("max_steps", "batch_size"):
        with pytest.raises(ValueError, match=f"{name}=0: must be a whole number >= 1"):
            solver.solve([good], **{name: 0})
    with pytest.raises(ValueError, match="max_steps=0"):
        next(solver.trace(good, 0))


def test_a_maze_whose_start_is_walled_off_is_refused(rng):
    grid = maze.generate(7, rng, 4)[0]
    start = tuple(np.argwhere(grid == maze.START)[0])
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r, c = start[0] + dr, start[1] + dc
        if 0 <= r < 7 and 0 <= c < 7 and grid[r, c] != maze.GOAL:
            grid[r, c] = maze.WALL
    cfg = preset("maze7")
    cfg.model.vocab_size, cfg.model.seq_len, cfg.model.hidden_size, cfg.model.num_heads = 6, 49, 32, 2
    from trm.api import Solver
    from trm.arch import build_model

    solver = Solver(build_model(cfg.model), {"config": cfg.to_dict()})
    with pytest.raises(trm.PuzzleError, match="has no path from S to G"):
        solver.parse(maze.to_text(grid))
