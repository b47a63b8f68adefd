"""The pictures: which cells are marked wrong, what is titled, and plots a person reads at a glance."""

import warnings

import numpy as np
import pytest

from trm import render
from trm.data import arc


def texts_by_cell(ax) -> dict[tuple[int, int], tuple[str, str]]:
    """(row, col) -> (digit, colour) of every digit drawn on a Sudoku panel."""
    from matplotlib.colors import to_hex

    return {(round(t.get_position()[1]), round(t.get_position()[0])): (t.get_text(), to_hex(t.get_color()))
            for t in ax.texts}  # fmt: skip


def framed_cells(ax) -> set[tuple[int, int]]:
    """Cells with a red frame or fill patch on a panel."""
    from matplotlib.colors import to_hex

    cells = set()
    for p in ax.patches:
        colours = {to_hex(p.get_edgecolor()), to_hex(p.get_facecolor())}
        if colours & {render.WRONG, render.WRONG_FILL}:
            x, y = p.get_xy()
            cells.add((round(y + 0.5), round(x + 0.5)))
    return cells


def test_a_wrong_digit_is_red_wherever_it_is_even_on_a_given_cell():
    target = np.array([[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]])
    givens = np.zeros_like(target)
    givens[0, 0], givens[1, 1] = 1, 4
    answer = target.copy()
    answer[0, 0] = 2  # the model overwrote a given with a wrong digit
    answer[2, 3] = 1  # and filled one cell wrongly
    answer[3, 3] = 0  # and left one blank
    fig = render.grid_figure([[("model", answer, {"givens": givens, "target": target})]], "sudoku")
    ax = fig.axes[0]
    drawn = texts_by_cell(ax)
    red = {cell for cell, (_, colour) in drawn.items() if colour == render.WRONG}
    assert red == {(0, 0), (2, 3)}
    assert framed_cells(ax) == {(0, 0), (2, 3), (3, 3)}  # the blank one too: pink, with no digit
    assert drawn[(1, 1)] == ("4", render.GIVEN)  # a given kept: black
    assert drawn[(0, 1)] == ("2", render.FILLED)  # a right digit the model wrote: blue
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["given", "filled by the model", "wrong (red digit)"]
    render._pyplot().close(fig)


def test_maze_mistakes_are_framed_and_the_goal_is_not_red():
    target = np.array([[0, 0, 0], [2, 4, 3], [0, 0, 0]])
    answer = target.copy()
    answer[1, 1] = 1  # the path not drawn
    fig = render.grid_figure([[("target", target), ("model", answer, {"target": target})]], "maze")
    assert framed_cells(fig.axes[1]) == {(1, 1)} and framed_cells(fig.axes[0]) == set()
    assert render.MAZE_COLOURS[3] != render.WRONG  # G is drawn in a colour that does not read as "wrong"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [*render.MAZE_LEGEND, "differs from the target"]
    render._pyplot().close(fig)


def test_arc_panels_show_unsolved_inputs_first_and_label_a_missing_attempt():
    identity = [{"task": "t", "k": 0, "colours": list(range(10))}]
    solved = {"task": "solved", "index": 0, "input": [[1]], "target": [[2, 2]]}
    unsolved = {"task": "unsolved", "index": 0, "input": [[1]], "target": [[3, 3]]}
    votes = arc.Votes(identity, [solved, unsolved])
    votes.add(arc.place(np.array([[2, 2]])).ravel(), 0, 0, 1.0)  # group 0: one answer, right
    votes.add(arc.place(np.array([[3, 4]])).ravel(), 0, 1, 1.0)  # group 1: one answer, wrong
    rows = render.arc_rows(votes, 2)
    assert [r[0][0] for r in rows] == ["unsolved test 1", "solved test 1"]
    assert [p[0] for p in rows[0]] == ["unsolved test 1", "target", "attempt 1: wrong", "attempt 2: none"]
    assert rows[1][2][0] == "attempt 1: right"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned on the empty panel before
        fig = render.grid_figure(rows, "arc")
    assert framed_cells(fig.axes[2]) == {(0, 1)}
    assert fig.axes[3].get_title() == "attempt 2: none" and fig.axes[3].texts[0].get_text() == "(empty grid)"
    render._pyplot().close(fig)


def halting_row(mode, depth, hist, exact, rates):
    return {"mode": mode, "max_steps": depth, "steps_histogram": hist, "exact_accuracy": exact,
            "puzzles_per_second_rounds": rates}  # fmt: skip


def test_the_sweep_plot_puts_depths_side_by_side_with_whole_step_ticks_and_accuracy_at_most_one():
    rows = [halting_row("halting", 4, {1: 50, 4: 10}, 1.0, [100.0, 90.0, 110.0]),
            halting_row("fixed", 4, {4: 60}, 1.0, [40.0, 41.0, 39.0]),
            halting_row("halting", 8, {1: 50, 2: 5, 8: 5}, 0.9, [80.0, 85.0, 75.0]),
            halting_row("fixed", 8, {8: 60}, 0.95, [20.0, 21.0, 19.0])]  # fmt: skip
    fig = render.halting_figure(rows)
    hist, accuracy, throughput = fig.axes
    bars = [(round(p.get_x(), 6), round(p.get_width(), 6)) for p in hist.patches]
    spans = sorted((x, x + w) for x, w in bars)
    assert all(a_end <= b_start + 1e-9 for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    assert len(hist.get_legend().get_texts()) == 2  # one entry per depth, one colour each
    ticks = [t for t in hist.get_xticks() if hist.get_xlim()[0] <= t <= hist.get_xlim()[1]]
    assert all(float(t).is_integer() for t in ticks)
    low, high = accuracy.get_ylim()
    assert 0.0 <= low < 0.9 and 0.95 < high <= 1.0  # zoomed to the data, never above 1
    assert [t.get_text() for t in throughput.get_legend().get_texts()] == ["halting", "fixed steps"]
    render._pyplot().close(fig)


@pytest.mark.parametrize("task", ["sudoku", "maze"])
def test_a_picture_without_targets_has_no_wrong_entry_in_its_legend(task, tmp_path):
    grid = np.zeros((4, 4), dtype=int)
    path = render.save_png(tmp_path / "p.png", [[("puzzle", grid), ("step 1", grid, {"givens": grid})]], task)
    assert path.stat().st_size > 0
    fig = render.grid_figure([[("puzzle", grid), ("step 1", grid, {"givens": grid})]], task)
    assert "wrong" not in " ".join(t.get_text() for t in fig.legends[0].get_texts())
    render._pyplot().close(fig)
