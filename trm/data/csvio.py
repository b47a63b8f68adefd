"""Reading the puzzle CSVs (``source,question,answer,rating``) with every row validated."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np


class PuzzleFormatError(ValueError):
    """A puzzle CSV with malformed rows; the message lists them by line number."""


def read_pairs(
    path: str | Path, parse: Callable[[str, str], tuple[np.ndarray, np.ndarray]], kind: str, max_errors: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """(questions, answers) stacked. `parse(question, answer)` raises ValueError on a bad row;
    every bad row is reported, by line number, in one PuzzleFormatError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} CSV not found: {path}")
    questions, answers, errors = [], [], []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise PuzzleFormatError(f"{path} is empty; expected the header source,question,answer,rating "
                                        "and one puzzle per line")  # fmt: skip
            if [h.strip() for h in header[:3]] != ["source", "question", "answer"]:
                raise PuzzleFormatError(f"{path}: line 1 must be the header source,question,answer,rating; "
                                        f"got {','.join(header)!r}")  # fmt: skip
            for row in reader:
                try:
                    if len(row) < 3:
                        raise ValueError(f"has {len(row)} columns, expected 4 (source,question,answer,rating)")
                    q, a = parse(row[1].strip(), row[2].strip())
                except ValueError as e:
                    errors.append(f"line {reader.line_num}: {e}")
                    continue
                questions.append(q)
                answers.append(a)
    except UnicodeDecodeError:
        raise PuzzleFormatError(_not_utf8(path)) from None
    if errors:
        shown = "\n  ".join(errors[:max_errors])
        more = f"\n  ... and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
        raise PuzzleFormatError(f"{path}: {len(errors)} bad row(s):\n  {shown}{more}")
    if not questions:
        raise PuzzleFormatError(f"{path}: no {kind} puzzles")
    return np.stack(questions), np.stack(answers)


def _not_utf8(path: Path) -> str:
    """Where a file stops being UTF-8: its first undecodable line, column and byte."""
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            return (f"{path}: line {number} is not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                    "save the file as UTF-8")  # fmt: skip
    return f"{path} is not UTF-8 text; save it as UTF-8"


def labelled(what: str, parse: Callable[[], np.ndarray]) -> np.ndarray:
    """parse(), with `what` prefixed to its error message."""
    try:
        return parse()
    except ValueError as e:
        raise ValueError(f"{what} {e}") from None
