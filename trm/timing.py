"""Timings that reproduce: warmed up, interleaved, repeated until there is enough work, median and spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

MIN_SECONDS = 2.0  # of timed work per side
MIN_ROUNDS = 3
LONG_ROUND = 30.0  # rounds this long are timed twice: enough work, and a spread, without tripling a long evaluation


@dataclass
class Timing:
    seconds: list[float]  # one per round

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def rate(self, work: float) -> tuple[float, float, float]:
        """work / second: (median, slowest round, fastest round)."""
        return work / self.median, work / max(self.seconds), work / min(self.seconds)


def interleaved(
    sides: dict[str, Callable[[], object]],
    min_seconds: float = MIN_SECONDS,
    min_rounds: int = MIN_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, Timing], dict[str, object]]:
    """Time each side in rounds, one call of every side per round (so that a machine that
    slows down or speeds up affects all of them alike), until each has run `min_seconds` in
    all and at least `min_rounds` rounds, or two rounds where one took LONG_ROUND seconds.
    The caller warms up first. Returns the timings and each side's first result."""
    timings = {name: Timing([]) for name in sides}
    first: dict[str, object] = {}
    while True:
        for name, fn in sides.items():
            started = clock()
            result = fn()
            timings[name].seconds.append(clock() - started)
            first.setdefault(name, result)
        rounds = len(next(iter(timings.values())).seconds)
        if rounds >= 2 and any(max(t.seconds) >= LONG_ROUND for t in timings.values()):
            break
        if rounds >= min_rounds and all(sum(t.seconds) >= min_seconds for t in timings.values()):
            break
    return timings, first


def spread(values: list[float]) -> str:
    """'median (min-max, n rounds)', or the one value."""
    if len(values) == 1:
        return f"{values[0]:.1f} (1 round)"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}, {len(values)} rounds)"
