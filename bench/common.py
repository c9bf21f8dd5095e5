"""Shared pieces of the benchmarks: timed windows with a foreign-load check, the preset models and random
batches every suite starts from, and the environment record."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import torch

from utils.dist import choose_precision, cpu_flags, cpu_has_fast_bf16
from utils.engine import init_engine
from utils.model import create_causal_lm
from utils.trainer import MicroBatchStream, Trainer, measure_peak_flops

SEQ, MICRO = 256, 8
# the CPU features that decide matmul speed and precision, recorded with every result
MATH_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                        "amx_int8"})


# ----------------------------------------------------------------------------------------------------
# Timing with a foreign-load check


def _foreign_cpu_seconds() -> float:
    """CPU seconds used by every process except this one (user + system, from /proc/stat minus ours)."""
    with open("/proc/stat", encoding="utf-8") as f:
        fields = f.readline().split()[1:]
    ticks = os.sysconf("SC_CLK_TCK")
    busy = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4)) / ticks  # all but idle and iowait
    own = sum(os.times()[:4])
    return busy - own


def timed_windows(step: Callable[[], float], *, steps: int, windows: int, warmup: int,
                  max_foreign: float) -> dict[str, float]:
    """Run `warmup` steps, then `windows` windows of `steps` steps; `step()` returns the work it did
    (tokens). Windows where other processes used more than max_foreign x the window's length are redone
    (at most 3 x windows redos in all)."""
    return interleaved_windows({"run": step}, steps=steps, windows=windows, warmup=warmup,
                               max_foreign=max_foreign)["run"]


def interleaved_windows(runs: dict[str, Callable[[], float]], *, steps: int, windows: int, warmup: int,
                        max_foreign: float) -> dict[str, dict]:
    """Time several runs in rounds: each round times one window of every run, back to back, in an order
    that rotates from round to round, so a slow spell of the machine hits every run alike. Returns
    timed_windows' figures per run, each with `rates`, its windows' rates in round order, from which
    `paired_ratio` takes per-round ratios."""
    for step in runs.values():
        for _ in range(warmup):
            step()
    names = list(runs)
    rates: dict[str, list[float]] = {name: [] for name in names}
    redone = dict.fromkeys(names, 0)
    for r in range(windows):
        for name in names[r % len(names):] + names[:r % len(names)]:
            while True:
                f0, t0 = _foreign_cpu_seconds(), time.perf_counter()
                work = sum(runs[name]() for _ in range(steps))
                dt = time.perf_counter() - t0
                if _foreign_cpu_seconds() - f0 <= max_foreign * dt or redone[name] >= 3 * windows:
                    break
                redone[name] += 1
            rates[name].append(work / dt)
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "windows": len(v),
                   "redone": redone[name], "rates": v} for name, v in rates.items()}


def paired_ratio(a: dict, b: dict) -> dict[str, float]:
    """a / b per round of interleaved_windows (windows timed next to each other): median, min and max."""
    ratios = [x / y for x, y in zip(a["rates"], b["rates"], strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


# ----------------------------------------------------------------------------------------------------
# Models and data


def bench_model(seed: int = 0, preset: str = "tiny", max_positions: int = 2048):
    """A preset's model (tiny unless asked) with the bench's 8,192-token vocabulary."""
    return create_causal_lm(preset, 8192, max_positions, seed=seed)


class GenTokenizer:
    """The ids generation needs; the stop ids are outside the vocabulary, so every row runs the full length."""
    pad_token_id, eos_token_id, unk_token_id = 4, 10**6, 0
    chat_template = None  # no end-of-turn token: only the eos id stops a reply

    def convert_tokens_to_ids(self, _token: str) -> int:
        return 10**6 + 1


def random_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 8192, (MICRO, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def matmul_peak() -> float:
    return measure_peak_flops(torch.device("cpu"))


def environment() -> dict:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "fast_bf16": cpu_has_fast_bf16(), "threads": torch.get_num_threads(),
            "cpu_flags": sorted(cpu_flags() & MATH_FLAGS),
            "python": platform.python_version(),
            "packages": {p: _version(p) for p in ("torch", "deepspeed", "transformers", "trl")},
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "date": time.strftime("%Y-%m-%d %H:%M")}


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


# ----------------------------------------------------------------------------------------------------
# Step functions shared by the suites


def our_loop_step_fn(model, task, data: list, collate: Callable, cfg) -> Callable[[], dict]:
    """One optimizer step of utils.trainer's loop (normalisation, NaN guard, metrics) on a DeepSpeed engine
    built from `cfg` (a TrainConfig or a step's config); returns the step's metrics."""
    precision = choose_precision(cfg.dtype)
    engine = init_engine(model, cfg, precision, total_steps=10_000)
    trainer = Trainer(cfg, engine, data, collate, task, precision=precision, total_steps=10_000,
                      flops_per_token=0.0, run_dir=cfg.output_dir)
    stream = MicroBatchStream(data, collate, trainer.plan, trainer.state, engine.device)
    engine.train()

    def step() -> dict:
        return trainer._train_step(stream)

    step.engine = engine  # for a caller that goes on with the trained engine (bench/gpu_check.py generates)
    return step


def hf_style_step_fn(trainer, model, work: float) -> Callable[[], float]:
    """One optimizer step of a transformers Trainer (or a TRL trainer built on it) driven step by step:
    training_step (forward, loss, backward), gradient clipping, optimizer and schedule, as Trainer's own
    loop does them; returns `work` per step."""
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    loader = iter(trainer.get_train_dataloader())
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which this replaces
    model.train()

    def step() -> float:
        nonlocal loader
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(trainer.get_train_dataloader())
            batch = next(loader)
        trainer.training_step(model, batch, None)  # num_items_in_batch: None = the trainer's own normalisation
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)  # as Trainer's own loop
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        return work
    return step


def rl_step_fn(trainer, stream, record: list) -> Callable[[], float]:
    """One RL step of an `utils.rl_trainer.RLTrainer` (PPO's or GRPO's) on the next batch of prompts; each
    step's metrics (time breakdown included) go to `record`; returns the replies sampled."""
    def step() -> float:
        metrics, exp = trainer.run_step(next(stream))
        trainer.state.step += 1
        record.append(metrics)
        return float(exp.input_ids.shape[0])
    return step


def hf_args(cls, out: str, micro: int, **extra):
    """Arguments of a transformers/TRL trainer that only trains: CPU, no logging, saving or workers."""
    return cls(output_dir=out, per_device_train_batch_size=micro, max_steps=10_000, report_to=[],
               save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
               disable_tqdm=True, **extra)
