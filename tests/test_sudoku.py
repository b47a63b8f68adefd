"""Sudoku solver, generator, augmentation and CSV loader against independent oracles."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trm.data import sudoku
from trm.data.csvio import PuzzleFormatError


def all_4x4_grids() -> list[np.ndarray]:
    """Every valid 4x4 Sudoku (288), by brute force over row permutations: independent of the solver."""
    perms = [np.array(p) + 1 for p in itertools.permutations(range(4))]
    grids = []
    for rows in itertools.product(perms, repeat=4):
        g = np.stack(rows)
        if sudoku.is_solution(g):
            grids.append(g)
    return grids


GRIDS_4 = all_4x4_grids()

# A published 9x9 puzzle ("Arto Inkala's hardest") and its solution.
HARD_Q = "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."
HARD_A = "812753649943682175675491283154237896369845721287169534521974368438526917796318452"


def test_there_are_288_4x4_grids():
    assert len(GRIDS_4) == 288


def test_generated_4x4_puzzles_have_exactly_one_solution(rng):
    for _ in range(30):
        puzzle, solution = sudoku.generate(4, rng)
        fits = [g for g in GRIDS_4 if np.all((puzzle == 0) | (puzzle == g))]
        assert len(fits) == 1 and np.array_equal(fits[0], solution)


@pytest.mark.parametrize("size", [6, 9])
def test_generated_larger_puzzles_are_unique_and_consistent(size, rng):
    puzzle, solution = sudoku.generate(size, rng)
    assert sudoku.is_solution(solution, puzzle)
    assert len(sudoku.solve(puzzle, limit=5).solutions) == 1


def test_solver_on_a_published_hard_puzzle():
    q = sudoku.parse(HARD_Q, 9, blanks=True)
    result = sudoku.solve(q, limit=2)
    assert len(result.solutions) == 1
    assert "".join(map(str, result.solutions[0].ravel())) == HARD_A
    assert result.backtracks > 100  # it is hard


def test_difficulty_controls(rng):
    puzzle, _ = sudoku.generate(6, rng, min_blanks=24, min_backtracks=5)
    assert (puzzle == 0).sum() >= 24 and sudoku.solve(puzzle).backtracks >= 5
    with pytest.raises(RuntimeError, match="lower the difficulty"):
        sudoku.generate(4, rng, min_blanks=16, max_tries=3)


@settings(max_examples=40, deadline=None)
@given(size=st.sampled_from([4, 6, 9]), seed=st.integers(0, 2**32 - 1))
def test_augmentation_keeps_puzzles_valid_and_consistent(size, seed):
    rng = np.random.default_rng(seed)
    grids = GRIDS_4 if size == 4 else None
    solution = (
        grids[rng.integers(len(grids))]
        if grids
        else sudoku.solve(np.zeros((size, size), dtype=np.int64), limit=1, rng=rng).solutions[0]
    )
    puzzle = np.where(rng.random((size, size)) < 0.5, 0, solution)
    q, a = sudoku.augment(puzzle, solution, rng)
    assert sudoku.is_solution(a, q)
    assert (q == 0).sum() == (puzzle == 0).sum()
    assert len(sudoku.solve(q, limit=2).solutions) == len(sudoku.solve(puzzle, limit=2).solutions)


def test_augmentation_reaches_transposes_and_relabels(rng):
    q, a = sudoku.generate(4, rng)
    outs = {sudoku.augment(q, a, rng)[1].tobytes() for _ in range(200)}
    assert len(outs) > 50


def write_csv(path, rows):
    path.write_text("source,question,answer,rating\n" + "\n".join(rows) + "\n")
    return path


def test_csv_loader_reads_valid_rows(tmp_path):
    path = write_csv(tmp_path / "ok.csv", [f"x,{HARD_Q},{HARD_A},99", f"y,{HARD_Q.replace('.', '0')},{HARD_A},1"])
    q, a = sudoku.load_csv(path)
    assert q.shape == (2, 9, 9) and np.array_equal(q[0], q[1])
    assert "".join(map(str, a[0].ravel())) == HARD_A


def test_csv_loader_reports_bad_rows_by_line(tmp_path):
    wrong = HARD_A[:-2] + HARD_A[-1] + HARD_A[-2]  # swap the last two digits: invalid grid
    contradicts = "9" + HARD_Q[1:]
    path = write_csv(
        tmp_path / "bad.csv",
        [
            f"x,{HARD_Q},{HARD_A},1",
            f"x,{HARD_Q[:-1]},{HARD_A},1",
            f"x,{HARD_Q[:-1]}x,{HARD_A},1",
            f"x,{HARD_Q},{wrong},1",
            f"x,{contradicts},{HARD_A},1",
            "x,only-two",
        ],
    )
    with pytest.raises(PuzzleFormatError) as e:
        sudoku.load_csv(path)
    msg = str(e.value)
    assert "5 bad row(s)" in msg
    assert "line 3: question has 80 characters" in msg
    assert "line 4: question has invalid characters 'x'" in msg
    assert "line 5: answer is not a valid Sudoku grid" in msg
    assert "line 6: answer contradicts a given digit" in msg
    assert "line 7: has 2 columns" in msg


def test_csv_loader_rejects_missing_header_and_file(tmp_path):
    path = tmp_path / "nohdr.csv"
    path.write_text(f"x,{HARD_Q},{HARD_A},1\n")
    with pytest.raises(PuzzleFormatError, match="line 1 must be the header"):
        sudoku.load_csv(path)
    with pytest.raises(FileNotFoundError):
        sudoku.load_csv(tmp_path / "missing.csv")


def test_csv_loader_names_the_line_of_a_file_that_is_not_utf8_and_an_empty_file(tmp_path):
    path = write_csv(tmp_path / "latin1.csv", [f"x,{HARD_Q},{HARD_A},1", f"caf\u00e9,{HARD_Q},{HARD_A},1"])
    path.write_bytes(path.read_text().encode("latin-1"))
    with pytest.raises(PuzzleFormatError, match=r"latin1.csv: line 3 is not UTF-8 text \(byte 0xe9 at column 4\)"):
        sudoku.load_csv(path)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(PuzzleFormatError, match="empty.csv is empty; expected the header source,question"):
        sudoku.load_csv(tmp_path / "empty.csv")


def test_build_from_an_empty_csv_says_so_in_one_line_and_keeps_nothing(tmp_path):
    from typer.testing import CliRunner

    from trm.cli import app

    (tmp_path / "empty.csv").write_text("")
    result = CliRunner().invoke(app, ["build", "--out", str(tmp_path / "d"), "--csv", str(tmp_path / "empty.csv")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "is empty" in result.output and "None" not in result.output and "holding out" not in result.output
    assert not (tmp_path / "d").exists()
