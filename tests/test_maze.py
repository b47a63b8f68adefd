"""Mazes: unique shortest paths (brute-force oracle), validation, dihedral variants, a CLI run."""

import numpy as np
import pytest

from trm.config import DataConfig
from trm.data import dataset, maze
from trm.data.csvio import PuzzleFormatError
from trm.data.grids import INVERSE, dihedral


def shortest_paths_by_brute_force(q: np.ndarray) -> list[list[int]]:
    """Every S-G walk of minimal length, by exhaustive search (independent of maze.bfs)."""
    size, flat = q.shape[0], q.ravel()
    start, goal = int(np.flatnonzero(flat == maze.START)[0]), int(np.flatnonzero(flat == maze.GOAL)[0])

    def steps(cell):
        r, c = divmod(cell, size)
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if 0 <= r + dr < size and 0 <= c + dc < size and flat[(r + dr) * size + c + dc] != maze.WALL:
                yield (r + dr) * size + c + dc

    frontier, seen = [[start]], {start}
    while frontier:
        done = [p for p in frontier if p[-1] == goal]
        if done:
            return done
        nxt = [p + [n] for p in frontier for n in steps(p[-1]) if n not in p]
        seen |= {p[-1] for p in nxt}
        frontier = nxt
    return []


def test_generated_mazes_have_one_shortest_path_and_the_label_marks_it(rng):
    for _ in range(15):
        q, a = maze.generate(9, rng, min_path_length=6, loop_prob=0.15)
        paths = shortest_paths_by_brute_force(q)
        assert len(paths) == 1
        assert len(paths[0]) - 1 >= 6
        marked = set(np.flatnonzero(a.ravel() == maze.PATH).tolist())
        assert marked == set(paths[0][1:-1])
        maze.check_pair(q, a)


def test_difficulty_control(rng):
    q, a = maze.generate(15, rng, min_path_length=30)
    assert (a == maze.PATH).sum() + 1 >= 30
    with pytest.raises(RuntimeError, match="unique shortest path"):
        maze.generate(5, rng, min_path_length=100, max_tries=5)


def test_dihedral_variants_are_valid_distinct_and_invertible(rng):
    q, a = maze.generate(11, rng)
    images = [dihedral(q, k) for k in range(8)]
    assert len({im.tobytes() for im in images}) == 8
    for k in range(8):
        maze.check_pair(dihedral(q, k), dihedral(a, k))
        assert np.array_equal(dihedral(images[k], INVERSE[k]), q)


def write_csv(path, rows):
    path.write_text("source,question,answer,rating\n" + "\n".join(rows) + "\n")
    return path


def test_csv_loader_accepts_valid_and_reports_bad_rows_by_line(tmp_path, rng):
    q, a = maze.generate(7, rng, min_path_length=4)
    qt, at = maze.to_text(q), maze.to_text(a)
    ok = write_csv(tmp_path / "ok.csv", [f"x,{qt},{at},0"])
    lq, la = maze.load_csv(ok, size=7)
    assert np.array_equal(lq[0], q) and np.array_equal(la[0], a)
    detour = at.replace("o", " ", 1)  # one path cell missing
    no_goal = qt.replace("G", " ")
    rows = [
        f"x,{qt},{at},0",
        f"x,{qt[:-1]},{at},0",
        f"x,{qt},{at[:-1]}x,0",
        f"x,{qt},{detour},0",
        f"x,{no_goal},{at},0",
        f"x,{qt.replace(' ', 'o', 1)},{at},0",
    ]
    bad = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(PuzzleFormatError) as e:
        maze.load_csv(bad, size=7)
    msg = str(e.value)
    assert "5 bad row(s)" in msg
    assert "line 3: question has 48 characters, expected 49" in msg
    assert "line 4: answer has invalid characters 'x'" in msg
    assert "line 5: answer marks" in msg
    assert "line 6: question has 1 S and 0 G" in msg
    assert "line 7: question has invalid characters 'o'" in msg


def test_built_maze_dataset_with_dihedral_augmentation(tmp_path):
    cfg = DataConfig(task="maze", size=9, num_train=10, num_test=4, dihedral=True, seed=3)
    out = dataset.build(cfg, tmp_path / "maze")
    meta = dataset.read_metadata(out)
    assert meta["vocab_size"] == 6 and meta["seq_len"] == 81 and meta["splits"] == {"train": 80, "test": 4}
    train = dataset.load_split(out, "train")
    for q, a in zip(train.inputs, train.labels, strict=True):
        maze.check_pair(q.reshape(9, 9).astype(np.int64) - 1, a.reshape(9, 9).astype(np.int64) - 1)


def test_no_test_maze_is_an_image_of_a_training_maze(tmp_path):
    """7x7 mazes are few: without a check on all 8 images, 9 of maze7's 64 test mazes were
    rotations or reflections of training mazes, which data.dihedral puts in the training split."""
    cfg = DataConfig(task="maze", size=7, num_train=512, num_test=256, min_path_length=4, dihedral=True)
    out = dataset.build(cfg, tmp_path / "maze")
    seen = {row.tobytes() for row in dataset.load_split(out, "train").inputs}
    test = dataset.load_split(out, "test").inputs
    assert len(test) == 256 and not any(row.tobytes() in seen for row in test)


def test_maze_trains_and_evaluates_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset builds its data in data/maze7
    from typer.testing import CliRunner

    from trm.cli import app

    args = ["train", "--preset", "maze7", "--out", str(tmp_path / "run"),
            "--set", "data.num_train=64", "--set", "data.num_test=8", "--set", "data.size=9",
            "--set", "train.steps=3", "--set", "train.global_batch_size=32", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test exact accuracy" in result.output and "8 held-out puzzles" in result.output


def test_solve_and_eval_draw_mazes(tmp_path, rng, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from typer.testing import CliRunner

    from trm.cli import app

    runner = CliRunner()
    args = ["train", "--preset", "maze7", "--out", str(tmp_path / "run"),
            "--set", "data.num_train=32", "--set", "data.num_test=4", "--set", "data.size=7",
            "--set", "train.steps=2", "--set", "train.global_batch_size=32", "--no-progress"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    q, _ = maze.generate(7, rng)
    result = runner.invoke(app, ["solve", str(tmp_path / "run"), maze.to_text(q), "--png", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert "step 1:" in result.output and (tmp_path / "s.png").stat().st_size > 0
    result = runner.invoke(app, ["solve", str(tmp_path / "run"), "#" * 48])
    assert result.exit_code == 2 and "has 48 characters, expected 49" in result.output
    no_goal = maze.to_text(q).replace("G", " ")
    result = runner.invoke(app, ["solve", str(tmp_path / "run"), no_goal])
    assert result.exit_code == 2 and "has 1 S and 0 G; a maze needs exactly one of each" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--png", str(tmp_path / "e.png"), "--show", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e.png").stat().st_size > 0
