"""Benchmarks (not tests): `make bench` = `python -m bench.run [--only NAME ...] [--windows 3]`.

Every figure is the median of >= 3 timed windows after a warm-up, with min and max, and every comparison a
ratio measured in the same run (absolute speeds drift on shared machines; ratios hold). The suites that
compare (train, generate, rm, dpo) interleave their runs' windows round by round and report the median of the
per-round ratios, so a slow spell of the machine lands on both sides of a ratio. Two threads on two
cores collapse when another process takes CPU time, so each window records the CPU time other processes
used meanwhile (from /proc) and a window disturbed by more than --max_foreign of its length is run again.
Results: bench/results/<name>.json (gitignored) and a table printed for docs/BENCHMARKS.md.

Suites:
  train       tokens/s of one optimizer step on the tiny and small presets (--presets; seq 256, micro batch 8,
              fp32, random tokens): plain PyTorch loop, our loop (utils.trainer) under ZeRO 0-3, transformers
              Trainer; MFU. On a CPU with native bf16 (where --dtype auto means bf16) also our loop at auto
              precision and the plain loop under bf16 autocast, against fp32 Trainer.
  generate    new tokens/s of HF generate with and without KV cache, and of PPO's own generation path
              (utils.hybrid) at ZeRO-0 and ZeRO-3 (weights gathered once), against generate on the
              ZeRO-3-partitioned module (gathered in every forward); batch 1 and 8 (prompt 32, 128 new
              tokens, sampling).
  ppo         samples/s of a PPO step on the demo's SFT and reward-model exports (--demo OUT), its time
              breakdown (generation; actor, reference, reward and critic forwards; actor and critic
              training), and how both grow with the generation batch (8, 16, 32) and reply length (32-128).
  rm, dpo     our reward-model and DPO training against TRL's RewardTrainer and DPOTrainer (bench/preference.py).
  grpo        samples/s of a GRPO step against TRL's GRPOTrainer, our time split, and sampling a group from one
              shared prefill against repeated prompt rows (bench/grpo.py).
  data        cleaning and MinHash dedup, tokenizer training, packing (bench/data.py).
  data_memory peak RSS and documents/s of data_process/main.py on generated corpora of --data_mb sizes (distinct
              documents, so the dedup tables grow): flat memory = the same peak at every size. Not in the
              default set (the 1 GB input takes about 20 minutes on 2 cores); run it with --only data_memory.
  scaling     tokens/s and peak memory against preset and sequence length (bench/scaling.py).
  memory      peak RSS of every demo step, and of base-preset PPO under ZeRO-3 with and without offload.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tempfile

import torch
from transformers import Trainer, TrainingArguments

from bench.common import (
    MICRO,
    SEQ,
    GenTokenizer,
    bench_model,
    environment,
    hf_args,
    hf_style_step_fn,
    interleaved_windows,
    matmul_peak,
    our_loop_step_fn,
    paired_ratio,
    random_batch,
    rl_step_fn,
    timed_windows,
)
from bench.data import suite_data, suite_data_memory
from bench.grpo import suite_grpo
from bench.preference import suite_dpo, suite_rm
from bench.scaling import suite_memory, suite_scaling
from step3_rlhf_ppo.main import PPOConfig
from step3_rlhf_ppo.ppo_trainer import PPOTrainer, build_engines
from utils.config import TrainConfig, parse_config
from utils.data import stack_collate
from utils.dist import choose_precision, init_distributed
from utils.engine import init_engine
from utils.generation import SamplingConfig
from utils.hybrid import GenerationSwitch
from utils.lm import CausalLMTask
from utils.log import setup_logging
from utils.model import count_parameters, flops_per_token
from utils.preference import load_prompts
from utils.rl_trainer import encode_prompts
from utils.step import load_tokenizer
from utils.trainer import MicroBatchStream

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench")


# ----------------------------------------------------------------------------------------------------
# Suite: training throughput


def plain_step_fn(preset: str = "tiny", autocast: bool = False) -> Callable[[], float]:
    """The plain PyTorch loop: forward, loss, backward, torch AdamW; under CPU bf16 autocast if asked."""
    model = bench_model(preset=preset).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = random_batch()

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(MICRO * SEQ)
    return step


def our_lm_step_fn(stage: int, preset: str = "tiny", dtype: str = "fp32") -> Callable[[], float]:
    """One optimizer step of utils.trainer's loop on the LM loss at ZeRO `stage` and --dtype `dtype`."""
    cfg = TrainConfig(output_dir="/tmp/bench-run", zero_stage=stage, per_device_train_batch_size=MICRO,
                      max_seq_len=SEQ, eval_interval=0, save_interval=0, enable_tensorboard=False, dtype=dtype)
    data = [{k: v[j] for k, v in random_batch(i).items()} for i in range(64) for j in range(MICRO)]
    step = our_loop_step_fn(bench_model(preset=preset), CausalLMTask([], stack_collate, MICRO, 0), data,
                            stack_collate, cfg)
    return lambda: float(step()["tokens"])


def hf_trainer_step_fn(preset: str = "tiny") -> Callable[[], float]:
    model = bench_model(preset=preset)
    data = [{k: v[j] for k, v in random_batch(i).items()} for i in range(64) for j in range(MICRO)]
    trainer = Trainer(model=model, args=hf_args(TrainingArguments, "/tmp/bench-hf", MICRO), train_dataset=data)
    return hf_style_step_fn(trainer, model, float(MICRO * SEQ))


def train_preset(preset: str, kw: dict, peak: float) -> dict:
    """The train suite on one preset: every run's tokens/s, interleaved; ratios to the plain loop and of our
    ZeRO-0 loop to Trainer; MFU. Where --dtype auto resolves to bf16 (a CPU with native bf16), also our
    ZeRO-0 loop at auto precision and the plain loop under bf16 autocast, each against fp32 Trainer."""
    auto = choose_precision("auto").name
    runs = {"plain": plain_step_fn(preset),
            **{f"ours_zero{stage}": our_lm_step_fn(stage, preset) for stage in (0, 1, 2, 3)},
            "hf_trainer": hf_trainer_step_fn(preset)}
    if auto != "fp32":
        runs.update({"ours_zero0_auto": our_lm_step_fn(0, preset, "auto"), "plain_autocast": plain_step_fn(preset, True)})
    out: dict = {"auto_precision": auto}
    out.update(interleaved_windows(runs, **kw))
    model = bench_model(preset=preset)
    fpt = flops_per_token(count_parameters(model), model.config.num_hidden_layers, model.config.hidden_size, SEQ)
    out["parameters"] = count_parameters(model)
    out["ratios"] = {name: paired_ratio(out[name], out["plain"]) for name in runs}
    out["ratios"]["ours_zero0_vs_hf_trainer"] = paired_ratio(out["ours_zero0"], out["hf_trainer"])
    if auto != "fp32":
        out["ratios"]["ours_zero0_auto_vs_hf_trainer"] = paired_ratio(out["ours_zero0_auto"], out["hf_trainer"])
    out["mfu"] = {name: out[name]["median"] * fpt / peak for name in runs if not name.endswith(("auto", "autocast"))}
    return out


def suite_train(args) -> dict:
    kw = {"steps": args.steps, "windows": args.windows, "warmup": 3, "max_foreign": args.max_foreign}
    out: dict = {"config": {"presets": list(args.presets), "seq": SEQ, "micro_batch": MICRO, "dtype": "fp32",
                            "timing": "windows interleaved per preset; ratios are medians of per-round ratios"}}
    out["peak_flops"] = peak = matmul_peak()  # MFU is against fp32 matmul
    out["presets"] = {preset: train_preset(preset, kw, peak) for preset in args.presets}
    return out


# ----------------------------------------------------------------------------------------------------
# Suite: generation


def hf_generate_fn(ids: torch.Tensor, new: int, cache: bool) -> Callable[[], float]:
    model = bench_model().eval()

    def step() -> float:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 max_new_tokens=new, min_new_tokens=new, use_cache=cache, pad_token_id=4)
        return float((out.shape[1] - ids.shape[1]) * ids.shape[0])
    return step


def own_generate_fn(ids: torch.Tensor, new: int, stage: int) -> Callable[[], float]:
    """PPO's own generation path (utils.hybrid) on a DeepSpeed engine at ZeRO `stage`."""
    cfg = TrainConfig(output_dir="/tmp/bench-gen", zero_stage=stage, per_device_train_batch_size=ids.shape[0])
    engine = init_engine(bench_model(), cfg, choose_precision("fp32"), 10)
    switch = GenerationSwitch(engine, GenTokenizer(), stage, use_hybrid_engine=False, lora_scale=None)
    sampling = SamplingConfig(max_new_tokens=new, temperature=1.0)
    mask = torch.ones_like(ids)

    def step() -> float:
        return float(switch.generate(ids, mask, sampling).shape[1] * ids.shape[0])
    return step


def per_forward_generate_fn(ids: torch.Tensor, new: int) -> Callable[[], float]:
    """HF generate on a ZeRO-3 engine's partitioned module: DeepSpeed's hooks gather each layer's weights
    again in every forward (one per new token), what the own path's gather-once avoids."""
    cfg = TrainConfig(output_dir="/tmp/bench-gen", zero_stage=3, per_device_train_batch_size=ids.shape[0])
    engine = init_engine(bench_model(), cfg, choose_precision("fp32"), 10)
    engine.eval()
    mask = torch.ones_like(ids)

    def step() -> float:
        with torch.no_grad():
            out = engine.module.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new,
                                         min_new_tokens=new, pad_token_id=4)
        return float((out.shape[1] - ids.shape[1]) * ids.shape[0])
    return step


def suite_generate(args) -> dict:
    new = 128
    out: dict = {"config": {"preset": "tiny", "prompt": 32, "new_tokens": new, "sampling": "temperature 1"}}
    for batch in (1, 8):
        # a batch-1 call takes under a second: 4 calls a window, so that the window resolves a 5% difference
        kw = {"steps": 4 if batch == 1 else 1, "windows": args.windows, "warmup": 1, "max_foreign": args.max_foreign}
        ids = torch.randint(5, 8192, (batch, 32), generator=torch.Generator().manual_seed(batch))
        runs = {f"generate_b{batch}_cache": hf_generate_fn(ids, new, True),
                f"generate_b{batch}_nocache": hf_generate_fn(ids, new, False),
                f"own_b{batch}_zero0": own_generate_fn(ids, new, 0),
                f"own_b{batch}_zero3": own_generate_fn(ids, new, 3),
                f"zero3_per_forward_b{batch}": per_forward_generate_fn(ids, new)}
        out.update(interleaved_windows(runs, **kw))
        for name in runs:
            out[f"ratio_{name}_vs_cache"] = paired_ratio(out[name], out[f"generate_b{batch}_cache"])
        out[f"ratio_b{batch}_gather_once_vs_per_forward"] = paired_ratio(out[f"own_b{batch}_zero3"],
                                                                         out[f"zero3_per_forward_b{batch}"])
    return out


# ----------------------------------------------------------------------------------------------------
# Suite: a PPO step


def ppo_step_fn(demo: Path, gen_batch: int, answer_len: int, record: list) -> Callable[[], float]:
    """One PPO step of step3.sh's configuration on the demo's SFT and reward-model exports (actor, reference,
    critic, reward model), with the generation batch and reply length given; each step's metrics line
    (time breakdown included) is appended to `record`."""
    out = tempfile.mkdtemp(prefix="bench-ppo-")
    cfg = parse_config(PPOConfig, [
        "--actor_model_name_or_path", str(demo / "step1_sft" / "final"),
        "--critic_model_name_or_path", str(demo / "step2_reward" / "final"), "--data_path", str(demo / "data" / "prompts"),
        "--output_dir", out, "--per_device_generation_batch_size", str(gen_batch),
        "--per_device_training_batch_size", str(min(8, gen_batch)), "--max_answer_seq_len", str(answer_len),
        "--temperature", "0.7", "--top_p", "0.9", "--actor_learning_rate", "1e-5", "--critic_learning_rate", "1e-5",
        "--init_kl_coef", "0.5", "--dtype", "fp32", "--max_steps", "1000", "--eval_interval", "0",
        "--save_interval", "0", "--samples_interval", "0", "--enable_tensorboard", "false"])
    precision = choose_precision("fp32")
    tokenizer = load_tokenizer(cfg.actor_model_name_or_path)
    prompts = encode_prompts(tokenizer, load_prompts(cfg.data_path), cfg.max_prompt_seq_len, "bench")
    engines = build_engines(cfg, tokenizer, precision, total_updates=2000)
    trainer = PPOTrainer(cfg, Path(out), engines, tokenizer, prompts, [], precision, 1000, None)
    stream = MicroBatchStream(trainer.prompts, trainer.collate, trainer.plan, trainer.state, trainer.device)
    return rl_step_fn(trainer, stream, record)


def suite_ppo(args) -> dict:
    demo = Path(args.demo)
    if not (demo / "step2_reward" / "done").is_file() or not (demo / "step1_sft" / "done").is_file():
        return {"skipped": f"no finished SFT and reward model under {demo}: run make demo first (or --demo OUT)"}
    out: dict = {"config": {"models": str(demo), "ppo": "step3.sh defaults (train batch 8, 1 PPO epoch, fp32)"}}
    kw = {"steps": 2, "windows": args.windows, "warmup": 1, "max_foreign": args.max_foreign}
    for gen_batch, answer_len in ((16, 64), (8, 64), (32, 64), (16, 32), (16, 128)):
        record: list = []
        name = f"gen{gen_batch}_answer{answer_len}"
        result = timed_windows(ppo_step_fn(demo, gen_batch, answer_len, record), **kw)
        timed = record[1:]  # the warm-up step is left out
        parts = sorted(k for k in timed[0] if k.startswith("time_"))
        step_seconds = statistics.mean(r["experience_seconds"] + r["train_seconds"] for r in timed)
        result.update(samples_per_s=result["median"], step_seconds=step_seconds,
                      response_tokens=statistics.mean(r["response_length"] for r in timed),
                      breakdown={p.removeprefix("time_"): statistics.mean(r[p] for r in timed) / step_seconds
                                 for p in parts})
        out[name] = result
    return out


SUITES = {"train": suite_train, "generate": suite_generate, "ppo": suite_ppo, "rm": suite_rm, "dpo": suite_dpo,
          "grpo": suite_grpo, "data": suite_data, "scaling": suite_scaling, "memory": suite_memory,
          "data_memory": suite_data_memory}
DEFAULT_SUITES = sorted(set(SUITES) - {"data_memory"})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SUITES), default=DEFAULT_SUITES)
    parser.add_argument("--windows", type=int, default=3, help="timed windows per figure (median reported)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per training window")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], help="model presets of the train suite")
    parser.add_argument("--demo", default=str(Path(__file__).resolve().parent.parent / "outputs" / "demo"),
                        help="a make demo output dir (the ppo suite uses its SFT and reward-model exports)")
    parser.add_argument("--data_mb", nargs="+", type=int, default=[100, 1000],
                        help="corpus sizes (MB) of the data_memory suite")
    parser.add_argument("--scratch", default=None, help="where the data_memory suite writes its corpora "
                        "(default: the system temp dir; needs about 3x the largest size free)")
    parser.add_argument("--max_foreign", type=float, default=0.05,
                        help="redo a window when other processes used more CPU than this share of it")
    args = parser.parse_args(argv)
    setup_logging()
    init_distributed()
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment()}
    for name in args.only:
        try:
            report[name] = SUITES[name](args)
        except Exception as err:  # one broken suite must not cost the others' figures
            log.exception("suite %s failed", name)
            report[name] = {"error": f"{type(err).__name__}: {err}"}
        (RESULTS / f"{name}.json").write_text(json.dumps({"environment": report["environment"], name: report[name]},
                                                         indent=1), encoding="utf-8")
        print(json.dumps({name: report[name]}, indent=1))
    return report


if __name__ == "__main__":
    main()
