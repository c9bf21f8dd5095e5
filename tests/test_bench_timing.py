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


def test_train_report_renders_each_preset_and_the_auto_precision_rows():
    """bench.report's train tables: one per preset, the auto-precision rows and their ratio to fp32 Trainer
    only where the run had them, and results from before presets (flat, tiny only) still render."""
    from bench.report import train

    def stat(x: float) -> dict:
        return {"median": x, "min": x - 1, "max": x + 1, "redone": 0}

    def ratio(x: float) -> dict:
        return {"median": x, "min": x, "max": x, "rounds": 1}

    runs = ("plain", "ours_zero0", "ours_zero1", "ours_zero2", "ours_zero3", "hf_trainer")
    fp32 = {**{k: stat(100.0 + i) for i, k in enumerate(runs)}, "auto_precision": "fp32",
            "ratios": {**{k: ratio(1.0) for k in runs}, "ours_zero0_vs_hf_trainer": ratio(0.96)},
            "mfu": {k: 0.5 for k in runs}}
    bf16 = {**fp32, "auto_precision": "bf16", "ours_zero0_auto": stat(170.0), "plain_autocast": stat(180.0),
            "ratios": {**fp32["ratios"], "ours_zero0_auto": ratio(1.7), "plain_autocast": ratio(1.8),
                       "ours_zero0_auto_vs_hf_trainer": ratio(1.62)}}
    text = train({"presets": {"tiny": fp32, "small": bf16}, "peak_flops": 2e11})
    tiny, small = text.split("**small**")
    assert "**tiny**" in tiny and "--dtype auto resolves to fp32" in tiny and "--dtype auto |" not in tiny
    assert "| our loop, ZeRO-0, --dtype auto | 170 (169-171) | 1.70x (1.70-1.70) |  | 0 |" in small
    assert "at --dtype auto (bf16) vs fp32 Trainer: **1.62x (1.62-1.62)**" in small
    assert "**0.96x (0.96-0.96)**" in tiny and "matmul peak 200 GFLOP/s" in small
    flat = {k: v for k, v in fp32.items() if k != "auto_precision"}
    assert train({**flat, "peak_flops": 2e11}).count("| our loop, ZeRO-3 |") == 1
