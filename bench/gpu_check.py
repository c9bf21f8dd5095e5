"""The Python half of bench/gpu_check.sh (which runs the chain first; see there):

    python -m bench.gpu_check base OUT     a preset's (default base, ~0.1B with a 32k vocabulary) training
                                          steps on a DeepSpeed engine (bf16 where the GPU runs it, torch's
                                          fused AdamW) and sampled generation on that engine; OUT/base.json
    python -m bench.gpu_check table OUT   the table: step, ok/failed, tokens/s, peak GPU memory, from the
                                          chain's run dirs under OUT and OUT/base.json

GPU_CHECK_PRESET picks another preset for `base` (the CPU test of the plumbing uses nano).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.common import MICRO, SEQ, GenTokenizer, our_loop_step_fn, random_batch
from utils.config import TrainConfig
from utils.data import stack_collate
from utils.dist import choose_precision, init_distributed
from utils.generation import SamplingConfig
from utils.hybrid import GenerationSwitch
from utils.lm import CausalLMTask
from utils.log import peak_gpu_mib, setup_logging
from utils.model import count_parameters, create_causal_lm
from utils.report import STEPS, find_runs, read_json, tokens_per_second

VOCAB = 32_000  # the base preset's 0.1B scale (utils/model.py)
PROMPT, NEW = 32, 128  # generation: prompt and reply length


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def base_check(out: Path, steps: int = 5) -> dict:
    """Training tokens/s and generated tokens/s of a preset model on our engine, with the peak GPU memory."""
    preset = os.environ.get("GPU_CHECK_PRESET", "base")
    cfg = TrainConfig(output_dir=str(out / "base_run"), preset=preset, per_device_train_batch_size=MICRO,
                      max_seq_len=SEQ, eval_interval=0, save_interval=0, enable_tensorboard=False, dtype="auto")
    model = create_causal_lm(preset, VOCAB, 2048, seed=0)
    result: dict = {"preset": preset, "parameters": count_parameters(model),
                    "precision": choose_precision(cfg.dtype).name}
    data = [{k: v[j] for k, v in random_batch(i).items()} for i in range(16) for j in range(MICRO)]
    step = our_loop_step_fn(model, CausalLMTask([], stack_collate, MICRO, 0), data, stack_collate, cfg)
    step()  # warm-up: kernels, allocator
    _sync()
    start, tokens = time.perf_counter(), 0.0
    for _ in range(steps):
        metrics = step()
        tokens += float(metrics["tokens"])
    _sync()
    result["train_tok_per_s"] = tokens / (time.perf_counter() - start)
    result["final_loss"] = float(metrics["loss"])
    engine = step.engine
    switch = GenerationSwitch(engine, GenTokenizer(), 0, use_hybrid_engine=False, lora_scale=None)
    ids = torch.randint(5, 8192, (MICRO, PROMPT), generator=torch.Generator().manual_seed(0)).to(engine.device)
    sampling = SamplingConfig(max_new_tokens=NEW, temperature=1.0)
    switch.generate(ids, torch.ones_like(ids), sampling)  # warm-up
    _sync()
    start = time.perf_counter()
    replies = switch.generate(ids, torch.ones_like(ids), sampling)
    _sync()
    result["generate_tok_per_s"] = replies.shape[0] * (replies.shape[1] - PROMPT) / (time.perf_counter() - start)
    result["peak_gpu_mib"] = peak_gpu_mib()
    return result


def _mib(value) -> str:
    return f"{value:,.0f} MiB" if isinstance(value, int | float) else "-"


def _rate(value) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else "-"


def table(out: Path) -> tuple[str, bool]:
    """The check's table (Markdown) and whether every row is ok."""
    runs = {step: run for step, run in find_runs(out)} if out.is_dir() else {}
    rows, all_ok = [], True
    for step, title in STEPS.items():
        run = runs.get(step)
        summary = read_json(run / "summary.json") if run else {}
        config = read_json(run / "config.json") if run else {}
        ok = bool(run and (run / "done").is_file())
        all_ok &= ok
        rate = tokens_per_second(summary)
        detail = ", ".join(f"{k} {config[k]}" for k in ("precision", "generation_path") if config.get(k))
        rows.append([title, "ok" if ok else ("failed" if run else "not run"), _rate(rate),
                     _mib(summary.get("peak_gpu_mib")), detail])
    base = read_json(out / "base.json")
    ok = "train_tok_per_s" in base
    all_ok &= ok
    rows.append([f"{base.get('preset', 'base')} preset: training steps", "ok" if ok else "failed",
                 _rate(base.get("train_tok_per_s")), _mib(base.get("peak_gpu_mib")),
                 f"{base.get('parameters', 0) / 1e6:.0f}M parameters, {base.get('precision', '?')}"
                 + (f"; {base['error']}" if base.get("error") else "")])
    rows.append([f"{base.get('preset', 'base')} preset: generation (batch {MICRO}, {NEW} new tokens)",
                 "ok" if "generate_tok_per_s" in base else "failed", _rate(base.get("generate_tok_per_s")),
                 _mib(base.get("peak_gpu_mib")), "own path on the engine"])
    lines = ["| step | result | tokens/s | peak GPU memory | notes |", "|---|---|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines), all_ok


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("base", "table"):
        print("usage: python -m bench.gpu_check base|table OUT", file=sys.stderr)
        return 2
    out = Path(args[1])
    if args[0] == "table":
        text, ok = table(out)
        print(text)
        return 0 if ok else 1
    setup_logging()
    init_distributed()
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = base_check(out)
    except Exception as err:  # the table reports the failure; the traceback goes to the log
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:200]}
    (out / "base.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
