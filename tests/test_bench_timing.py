"""bench.common's timing: interleaved windows rotate their order round by round, and ratios pair windows
of the same round (the benchmarks themselves run with `make bench`, never as tests)."""

from __future__ import annotations

import pytest

from bench.common import interleaved_windows, paired_ratio, timed_windows


def test_interleaved_windows_rotate_and_count_work():
    calls: list[str] = []

    def run(name: str, work: float):
        def step() -> float:
            calls.append(name)
            return work
        return step

    out = interleaved_windows({"a": run("a", 2.0), "b": run("b", 5.0), "c": run("c", 1.0)},
                              steps=2, windows=3, warmup=1, max_foreign=float("inf"))
    # one warm-up step each, then per round one window (2 steps) of every run, the start rotating
    assert calls == ["a", "b", "c"] + ["a", "a", "b", "b", "c", "c"] + ["b", "b", "c", "c", "a", "a"] \
        + ["c", "c", "a", "a", "b", "b"]
    for name in "abc":
        assert out[name]["windows"] == 3 and len(out[name]["rates"]) == 3 and out[name]["redone"] == 0
        assert out[name]["min"] <= out[name]["median"] <= out[name]["max"]


def test_paired_ratio_divides_windows_of_the_same_round():
    a = {"rates": [10.0, 20.0, 40.0]}
    b = {"rates": [5.0, 20.0, 10.0]}
    assert paired_ratio(a, b) == {"median": 2.0, "min": 1.0, "max": 4.0, "rounds": 3}
    with pytest.raises(ValueError):
        paired_ratio(a, {"rates": [1.0]})


def test_disturbed_windows_are_redone_up_to_the_limit():
    # a hugely negative max_foreign marks every window disturbed: each run redoes at most 3 x windows of them
    out = timed_windows(lambda: 1.0, steps=1, windows=2, warmup=0, max_foreign=-1e12)
    assert out["windows"] == 2 and out["redone"] == 6
