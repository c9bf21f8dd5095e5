"""Benchmark suite of the group-relative RL path (step3_rlhf_ppo/grpo.py) against TRL's GRPOTrainer (a
bench-only dependency, as for rm and dpo).

  grpo   samples/s of one RL step (sample G replies to each prompt, score them, group advantages, one
         optimizer step on the clipped surrogate): our GRPOTrainer against TRL's GRPOTrainer, the same tiny
         model, PROMPTS prompts of PROMPT random tokens per step, G replies each of REPLY tokens at
         temperature 1 (a random model never stops early, so both sides sample exactly REPLY tokens), the
         same rule reward, no reference model (beta / kl_coef 0), token-mean loss with clip 0.2 / 0.28, fp32,
         torch AdamW, no gradient checkpointing (TRL's GRPOConfig turns both bf16 and checkpointing on by
         default; on a CPU without native bf16 that made its step 13x slower than ours);
         our step's time split (generation, actor forward, training) from its metrics.
         Also the shared prefill: the G replies of a prompt sampled from one prefill (its KV cache repeated)
         against the prompt repeated as G rows (utils.generation.sample_tokens), tokens identical, for
         replies of 4, 16 and 48 tokens after the 96-token prompts.
Windows of the two sides alternate (bench.common.interleaved_windows); ratios are medians of per-round ratios.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset

from bench.common import hf_args, hf_style_step_fn, interleaved_windows, paired_ratio, rl_step_fn
from bench.preference import _ids, _saved_tiny, as_text, word_tokenizer
from step3_rlhf_ppo.grpo import GRPOConfig
from step3_rlhf_ppo.grpo_trainer import GRPOTrainer
from utils.config import parse_config
from utils.dist import choose_precision
from utils.generation import SamplingConfig, sample_tokens
from utils.model import load_causal_lm
from utils.rewards import RewardFunction
from utils.rl_trainer import build_actor
from utils.trainer import MicroBatchStream

PROMPTS, G, PROMPT, REPLY = 4, 8, 96, 48
PREFILL_REPLIES = (4, 16, 48)


def even_share(completions: list[str]) -> list[float]:
    """The rule reward of both sides: the share of even word ids in the reply text ("w12 w7" -> 0.5)."""
    out = []
    for text in completions:
        ids = [int(w[1:]) for w in text.split() if w[1:].isdigit()]
        out.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return out


def _prompt_ids(n: int = 64) -> list[list[int]]:
    return _ids(n, PROMPT, 7)


def our_grpo_step_fn(root: Path, record: list) -> Callable[[], float]:
    out = root / "ours-grpo"
    cfg = parse_config(GRPOConfig, [
        "--actor_model_name_or_path", str(root / "tiny"), "--data_path", "-", "--output_dir", str(out),
        "--num_generations", str(G), "--per_device_generation_batch_size", str(PROMPTS),
        "--per_device_training_batch_size", str(PROMPTS * G), "--max_prompt_seq_len", str(PROMPT),
        "--max_answer_seq_len", str(REPLY), "--actor_learning_rate", "1e-6", "--dtype", "fp32",
        "--max_steps", "10000", "--eval_interval", "0", "--save_interval", "0", "--samples_interval", "0",
        "--enable_tensorboard", "false", "--loss_aggregation", "token_mean"])
    out.mkdir()
    tokenizer = word_tokenizer()
    precision = choose_precision("fp32")
    prompts = [{"prompt_ids": ids, "row": i, "data": {"prompt": as_text(ids)}} for i, ids in enumerate(_prompt_ids())]
    actor, switch, _ = build_actor(cfg, tokenizer, precision, total_updates=10_000)
    reward = RewardFunction("even", 1.0, lambda replies: even_share(replies.completions))
    trainer = GRPOTrainer(cfg, out, actor, switch, None, tokenizer, prompts, [], precision, 10_000, [reward])
    stream = MicroBatchStream(trainer.prompts, trainer.collate, trainer.plan, trainer.state, trainer.device)
    return rl_step_fn(trainer, stream, record)


def trl_grpo_step_fn(root: Path) -> Callable[[], float]:
    from trl import GRPOConfig, GRPOTrainer  # trl: installed by make bench only

    def reward(prompts, completions, **_):
        return even_share(completions)

    args = hf_args(GRPOConfig, str(root / "trl-grpo"), PROMPTS * G, num_generations=G,
                   max_completion_length=REPLY, temperature=1.0, top_p=1.0, beta=0.0, loss_type="dapo",
                   epsilon=0.2, epsilon_high=0.28, learning_rate=1e-6, num_iterations=1, log_completions=False,
                   gradient_checkpointing=False, bf16=False)  # TRL's defaults are on: both sides fp32, no recompute
    data = Dataset.from_list([{"prompt": as_text(ids)} for ids in _prompt_ids()])
    trainer = GRPOTrainer(model=load_causal_lm(root / "tiny"), reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=word_tokenizer())
    return hf_style_step_fn(trainer, trainer.model, float(PROMPTS * G))


def prefill_fns(root: Path, reply: int) -> dict[str, Callable[[], float]]:
    """Sampling G replies of `reply` tokens per prompt with one prefill per prompt, and with the prompt
    repeated G times."""
    model, tokenizer = load_causal_lm(root / "tiny").eval(), word_tokenizer()
    ids = torch.tensor(_prompt_ids(PROMPTS))
    mask = torch.ones_like(ids)
    sampling = SamplingConfig(reply, temperature=1.0, row_seeds=tuple(range(PROMPTS * G)))

    def shared() -> float:
        return float(sample_tokens(model, ids, mask, sampling, tokenizer, group_size=G).numel())

    def repeated() -> float:
        return float(sample_tokens(model, ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), sampling,
                                   tokenizer).numel())
    first = sample_tokens(model, ids, mask, sampling, tokenizer, group_size=G)
    assert torch.equal(first, sample_tokens(model, ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), sampling,
                                            tokenizer)), "the shared prefill must sample what repeated rows sample"
    return {f"shared_prefill_reply{reply}": shared, f"repeated_rows_reply{reply}": repeated}


def suite_grpo(args) -> dict:
    kw = {"steps": 1, "windows": max(args.windows, 3), "warmup": 1, "max_foreign": args.max_foreign}
    out: dict = {"config": {"preset": "tiny", "prompts_per_step": PROMPTS, "group": G, "prompt": PROMPT,
                            "reply": REPLY, "loss": "token mean, clip 0.2 / 0.28, no KL", "dtype": "fp32"}}
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        root = Path(tmp)
        _saved_tiny(root)
        word_tokenizer().save_pretrained(root / "tiny")
        record: list = []
        out.update(interleaved_windows({"ours": our_grpo_step_fn(root, record), "trl_grpo_trainer":
                                        trl_grpo_step_fn(root)}, **kw))
        out["ratio_ours_vs_trl"] = paired_ratio(out["ours"], out["trl_grpo_trainer"])
        timed = record[1:]  # the warm-up step is left out
        total = sum(r["step_seconds"] for r in timed)
        out["ours_time_split"] = {k.removeprefix("time_"): sum(r[k] for r in timed) / total
                                  for k in sorted(timed[0]) if k.startswith("time_")}
        for reply in PREFILL_REPLIES:  # the demo's answers: 2 tokens (sentiment) to ~50 (segmentation)
            out.update(interleaved_windows(prefill_fns(root, reply), **{**kw, "steps": 2}))
            out[f"ratio_shared_prefill_reply{reply}"] = paired_ratio(out[f"shared_prefill_reply{reply}"],
                                                                     out[f"repeated_rows_reply{reply}"])
    return out
