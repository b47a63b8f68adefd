"""Timings that reproduce: rounds interleave the sides and repeat until there is enough work."""

from trm import timing


class Clock:
    """A stand-in clock: each call of a side advances it by that side's duration."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sides(clock: Clock, durations: dict[str, float], calls: list[str]):
    def make(name):
        def run():
            calls.append(name)
            clock.now += durations[name]
            return name.upper()

        return run

    return {name: make(name) for name in durations}


def test_rounds_alternate_and_repeat_until_each_side_has_two_seconds_and_three_rounds():
    clock, calls = Clock(), []
    timings, first = timing.interleaved(sides(clock, {"halting": 0.25, "fixed": 0.5}, calls), clock=clock)
    assert calls[:4] == ["halting", "fixed", "halting", "fixed"]  # interleaved, never all of one side first
    assert len(timings["halting"].seconds) == 8  # 8 x 0.25 s = 2 s; fixed then has 4 s
    assert first == {"halting": "HALTING", "fixed": "FIXED"}
    assert timings["fixed"].rate(100) == (200.0, 200.0, 200.0)


def test_quick_work_still_takes_three_rounds_and_long_rounds_two():
    clock, calls = Clock(), []
    timings, _ = timing.interleaved(sides(clock, {"a": 1.5}, calls), clock=clock)
    assert len(timings["a"].seconds) == 3  # 2 s reached after 2 rounds; at least 3 for a spread
    clock, calls = Clock(), []
    timings, _ = timing.interleaved(sides(clock, {"a": 0.1, "b": 45.0}, calls), clock=clock)
    assert calls == ["a", "b", "a", "b"]  # two rounds of a long evaluation: a spread, not six minutes


def test_spread_reads_median_and_range():
    assert timing.spread([10.0, 12.0, 11.0]) == "11.0 (10.0-12.0, 3 rounds)"
    assert timing.spread([5.0]) == "5.0 (1 round)"
