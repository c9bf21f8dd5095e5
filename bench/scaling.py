"""Benchmark suites of scale and memory. Peak memory is per process, so every configuration runs in a
child process of its own (`python -m bench.scaling ONE-CONFIG-JSON` prints its result as JSON).

  scaling  training tokens/s, MFU and peak RSS of our loop (ZeRO-0, fp32, random tokens) against the preset
           (nano, tiny, small, base at seq 256, micro batch 8) and against the sequence length (tiny at
           128-1024, micro batch chosen so each step holds 2048 tokens).
  memory   peak RSS of every step of the last `make demo` run (from each step's summary.json, --demo OUT),
           and of two PPO steps with four base-preset (~0.1B) models (actor, reference, critic, reward
           model) under ZeRO-3, with and without CPU offload (step3_rlhf_ppo/main.py in a child process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("nano", "tiny", "small", "base")
DEMO_STEPS = ("step1_pretrain", "step1_sft", "step2_reward", "step3_ppo", "step3_dpo")


def child_env() -> dict:
    """This environment minus the process-group variables init_distributed set here: a child starts its
    own one-process group on a free port."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _child(config: dict, timeout: int = 1800) -> dict:
    """Run one configuration in a fresh interpreter; its last stdout line is the JSON result."""
    proc = subprocess.run([sys.executable, "-m", "bench.scaling", json.dumps(config)], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env=child_env())
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_training(preset: str, seq: int, micro: int, steps: int, windows: int, max_foreign: float) -> dict:
    """(in the child) tokens/s, MFU and peak RSS of our loop on `preset` at (micro, seq)."""
    import torch  # in the child only: the parent stays light, the child's peak RSS is the run's

    from bench.common import bench_model, our_loop_step_fn, timed_windows
    from utils.config import TrainConfig
    from utils.data import stack_collate
    from utils.dist import init_distributed
    from utils.lm import CausalLMTask
    from utils.log import peak_rss_mib
    from utils.model import count_parameters, flops_per_token
    from utils.trainer import measure_peak_flops

    init_distributed()
    model = bench_model(preset=preset, max_positions=max(seq, 2048))
    n_params = count_parameters(model)
    fpt = flops_per_token(n_params, model.config.num_hidden_layers, model.config.hidden_size, seq)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(5, 8192, (64, seq), generator=gen)]
    cfg = TrainConfig(output_dir=tempfile.mkdtemp(prefix="bench-scale-"), per_device_train_batch_size=micro,
                      max_seq_len=seq, eval_interval=0, save_interval=0, enable_tensorboard=False, dtype="fp32")
    step = our_loop_step_fn(model, CausalLMTask([], stack_collate, micro, 0), data, stack_collate, cfg)
    result = timed_windows(lambda: float(step()["tokens"]), steps=steps, windows=windows, warmup=1,
                           max_foreign=max_foreign)
    rss = peak_rss_mib()  # before the matmul-peak measurement, whose large buffers would set it
    peak = measure_peak_flops(torch.device("cpu"))
    return {**result, "parameters": n_params, "mfu": result["median"] * fpt / peak, "peak_flops": peak,
            "peak_rss_mib": rss}


def suite_scaling(args) -> dict:
    base = {"steps": 2, "windows": args.windows, "max_foreign": args.max_foreign}
    out: dict = {"config": {"loop": "ours, ZeRO-0, fp32, torch AdamW", "vocab": 8192}}
    for preset in PRESETS:
        out[f"preset_{preset}_seq256"] = _child({"preset": preset, "seq": 256, "micro": 8, **base})
    for seq in (128, 512, 1024):
        out[f"preset_tiny_seq{seq}"] = _child({"preset": "tiny", "seq": seq, "micro": 2048 // seq, **base})
    return out


# ----------------------------------------------------------------------------------------------------
# Memory


def base_ppo_models(root: Path) -> tuple[Path, Path, Path]:
    """Untrained base-preset exports as step 3 takes them: an actor (causal LM) and a reward model
    (sequence classifier) sharing the tests' chat tokenizer, plus a prompts file."""
    from testkit.chat_tokenizer import make_chat_tokenizer  # in the child only (see measure_training)
    from utils.model import create_causal_lm
    from utils.reward import create_reward_model

    tokenizer = make_chat_tokenizer(root / "tokenizer", vocab=4000)
    actor, reward = root / "actor", root / "reward"
    create_causal_lm("base", len(tokenizer), 2048, seed=0).save_pretrained(actor)
    tokenizer.save_pretrained(actor)
    create_reward_model(actor, tokenizer.pad_token_id, seed=0).save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    prompts = root / "prompts.jsonl"
    topics = ("这家酒店", "这本书", "这台笔记本电脑")
    prompts.write_text("".join(json.dumps({"prompt": f"写一条关于{topics[i % 3]}的评论。"}, ensure_ascii=False) + "\n"
                               for i in range(64)), encoding="utf-8")
    return actor, reward, prompts


def base_ppo_peak(root: Path, offload: bool) -> dict:
    actor, reward, prompts = root / "actor", root / "reward", root / "prompts.jsonl"
    out = root / f"ppo-offload{int(offload)}"
    cmd = [sys.executable, str(REPO / "step3_rlhf_ppo" / "main.py"), "--actor_model_name_or_path", str(actor),
           "--critic_model_name_or_path", str(reward), "--data_path", str(prompts), "--output_dir", str(out),
           "--actor_zero_stage", "3", "--critic_zero_stage", "3", "--per_device_generation_batch_size", "8",
           "--per_device_training_batch_size", "8", "--max_prompt_seq_len", "64", "--max_answer_seq_len", "64",
           "--max_steps", "2", "--eval_interval", "0", "--save_interval", "0", "--samples_interval", "0",
           "--dtype", "fp32", "--enable_tensorboard", "false"]
    if offload:
        cmd += ["--offload", "--offload_reference_model"]
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=3600, env=child_env())
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {"peak_rss_mib": summary["peak_rss_mib"], "wall_seconds_2_steps": summary.get("wall_seconds"),
            "offload": offload}


def suite_memory(args) -> dict:
    out: dict = {"demo_steps": {}}
    demo = Path(args.demo)
    for step in DEMO_STEPS:
        path = demo / step / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text(encoding="utf-8"))
            out["demo_steps"][step] = summary.get("peak_rss_mib", "not recorded")
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        root = Path(tmp)
        actor, _, _ = base_ppo_models(root)
        from utils.model import count_parameters, load_causal_lm  # in the child only (see measure_training)

        out["base_parameters"] = count_parameters(load_causal_lm(actor))
        out["base_ppo_zero3"] = base_ppo_peak(root, offload=False)
        out["base_ppo_zero3_offload"] = base_ppo_peak(root, offload=True)
    return out


if __name__ == "__main__":
    print(json.dumps(measure_training(**json.loads(sys.argv[1]))))
