"""RL from verifiable rewards: the group-relative family (GRPO, Dr. GRPO, RLOO, REINFORCE++) on top of
utils.rl_trainer's loop.

One step:
  1. experience: the actor samples --num_generations replies to each prompt of the batch (one prefill per
     prompt, utils.generation.shared_prefill); the reward functions (utils.rewards) score each reply, their
     weighted sum is its reward; utils.rl.group_advantages turns the rewards of each group into every
     token's advantage. Groups whose rewards are all equal carry no gradient: they are counted, and with
     --drop_zero_variance_groups left out of the loss's normaliser too.
  2. update: --ppo_epochs passes in mini-batches of the clipped surrogate (clip-higher with
     --clip_eps_high), aggregated as --loss_aggregation says, plus --kl_coef x the k3 KL to a frozen
     reference (built only when --kl_coef > 0).
No critic and no reward model to train: the reward is a rule (or a frozen reward model, rm:DIR).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from utils.checkpoint import export_hf
from utils.config import save_config
from utils.dist import Precision, all_reduce_sum, get_world_size
from utils.engine import frozen_engine
from utils.errors import UserError
from utils.model import load_causal_lm
from utils.rewards import RewardFunction, build_reward_functions, load_rl_rows, reward_model_score
from utils.rl import (
    entropy_from_logits,
    group_advantages,
    k3_kl,
    loss_weights,
    masked_rescale,
    masked_sum,
    policy_loss,
    token_logprobs,
    zero_variance_groups,
)
from utils.rl_trainer import (
    Experience,
    RLTrainer,
    build_actor,
    encode_prompts,
    global_mean,
    global_std,
    reply_logits,
    total_rl_steps,
)
from utils.run import write_done
from utils.step import load_tokenizer

log = logging.getLogger("grpo")


class GRPOTrainer(RLTrainer):
    name = "grpo"
    postfix = {"reward": "reward_mean", "zero_var": "zero_variance_share", "len": "response_length",
               "gen": "gen_share"}

    def __init__(self, cfg, run_dir: Path, actor, switch, reference, tokenizer, prompts: list[dict],
                 evals: list[dict], precision: Precision, total_steps: int, funcs: list[RewardFunction]):
        super().__init__(cfg, run_dir, actor, switch, tokenizer, prompts, evals, precision, total_steps)
        self.reference, self.funcs = reference, funcs
        self.no_signal_in_row = 0
        # one optimizer step per batch of experience: the policy that sampled is the one being trained, so
        # the ratio's old log-probs are the training forward's own, detached (no separate forward)
        rows = cfg.per_device_generation_batch_size * cfg.num_generations
        self.reuse_logprobs = cfg.ppo_epochs == 1 and rows == cfg.per_device_training_batch_size * cfg.gradient_accumulation_steps

    # -- experience -----------------------------------------------------------------------------------

    def data_rows(self, source: list[dict], row_ids: torch.Tensor, group_size: int) -> list[dict[str, Any]]:
        return [source[r]["data"] for r in row_ids.tolist() for _ in range(group_size)]

    @torch.no_grad()
    def make_experience(self, batch: dict[str, torch.Tensor], key: int) -> tuple[Experience, dict[str, Any]]:
        cfg, g = self.cfg, self.cfg.num_generations
        exp = self.sample(batch, key, g, score=not self.reuse_logprobs)
        if self.reference is not None:
            exp.ref_logprobs = self.reference_logprobs(self.reference, exp)
        per_func, cut = self.function_rewards(exp, self.data_rows(self.prompts, batch["row_ids"], g), self.funcs)
        weights = torch.tensor([fn.weight for fn in self.funcs])
        exp.scores = (per_func * weights).sum(-1)
        flat = zero_variance_groups(exp.scores, g)
        advantages = group_advantages(exp.scores, g, cfg.advantage_estimator)
        exp.advantages = advantages.to(exp.mask.dtype)[:, None] * exp.mask
        if cfg.advantage_estimator == "reinforce_pp":
            exp.advantages = masked_rescale(exp.advantages, exp.mask)
        if cfg.drop_zero_variance_groups:  # out of the loss and its normaliser (rows stay: ranks keep in step)
            exp.mask = exp.mask * (~flat).repeat_interleave(g).to(exp.mask.dtype)[:, None]
        return exp, {"per_func": per_func, "flat_groups": flat, "truncated": float(cut.sum().item())}

    # -- update ---------------------------------------------------------------------------------------

    def loss_units(self, mb: Experience) -> float:
        return loss_weights(mb.mask, self.cfg.loss_aggregation, self.cfg.max_answer_seq_len)[1]

    def train_micro_batch(self, mb: Experience, units: float, scale: float) -> dict[str, float]:
        cfg = self.cfg
        with self.timed("actor_train"):
            with self.precision.autocast_context():
                logits = reply_logits(self.actor, mb)
                logprobs = token_logprobs(logits, mb.actions, cfg.temperature)
                old = logprobs.detach() if mb.logprobs is None else mb.logprobs
                weights, _ = loss_weights(mb.mask, cfg.loss_aggregation, cfg.max_answer_seq_len)
                loss, stats = policy_loss(logprobs, old, mb.advantages, mb.mask, cfg.clip_eps_low,
                                          cfg.clip_eps_high, weights=weights)
                out = {"policy_loss": loss.item(), **{k: v.item() for k, v in stats.items()}}
                if mb.entropy is None:  # not measured at sampling time
                    with torch.no_grad():
                        out["entropy"] = masked_sum(entropy_from_logits(logits.detach(), cfg.temperature),
                                                    mb.mask).item()
                if self.reference is not None:
                    kl = k3_kl(logprobs, mb.ref_logprobs) * mb.mask
                    loss = loss + cfg.kl_coef * masked_sum(kl, weights)
                    out["kl_k3"] = masked_sum(kl, mb.mask).item()
            self.backward_step(self.actor, loss * scale, "policy")
        return out

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], Experience]:
        cfg, g = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        exp, info = self.make_experience(batch, key=self.state.step + 1)
        t1 = time.perf_counter()
        n_groups = all_reduce_sum(float(info["flat_groups"].numel()))
        usable = n_groups - all_reduce_sum(float(info["flat_groups"].sum().item()))
        if usable > 0:
            self.no_signal_in_row = 0
            record = self.update(exp)
        else:  # every reward equal in every group: no gradient, and an optimizer step would still move Adam
            self.no_signal_in_row += 1
            log.warning("grpo step %d: every group's rewards are all equal: no update (%d steps in a row)",
                        self.state.step + 1, self.no_signal_in_row)
            if self.no_signal_in_row >= cfg.max_no_signal_steps:
                raise UserError(f"{self.no_signal_in_row} GRPO steps in a row had no group with different rewards "
                                "(nothing to learn from): check the reward functions on a few replies, raise "
                                "--num_generations or --temperature, or start from a model that sometimes succeeds")
            record = {"optimizer_steps": 0}
        t2 = time.perf_counter()
        n_rows = all_reduce_sum(float(exp.scores.numel()))
        lengths = exp.attention_mask[:, exp.prompt_width:].sum().item()
        group_std = exp.scores.view(-1, g).std(-1).sum().item()
        truncated = all_reduce_sum(info["truncated"]) / n_rows
        if truncated >= 0.25:
            log.warning("grpo step %d: %.0f%% of the replies were cut at --max_answer_seq_len %d: raise it or add "
                        "a length reward", self.state.step + 1, 100 * truncated, cfg.max_answer_seq_len)
        record.update(
            reward_mean=all_reduce_sum(exp.scores.sum().item()) / n_rows, reward_std=global_std(exp.scores),
            reward_std_in_group=all_reduce_sum(group_std) / n_groups, zero_variance_share=1.0 - usable / n_groups,
            truncated_share=truncated, response_length=all_reduce_sum(lengths) / n_rows,
            lr_actor=self.actor.get_lr()[0], tokens=all_reduce_sum(float(exp.attention_mask.sum().item())),
            experience_seconds=t1 - t0, train_seconds=t2 - t1,
            **{f"reward_{fn.name}": all_reduce_sum(info["per_func"][:, i].sum().item()) / n_rows
               for i, fn in enumerate(self.funcs)})
        if exp.entropy is not None:
            record["entropy"] = global_mean((exp.entropy * exp.attention_mask[:, exp.prompt_width:]).sum().item(),
                                            lengths)
        if exp.ref_logprobs is not None and exp.logprobs is not None:
            record["kl"] = all_reduce_sum(exp.seq_kl.sum().item()) / n_rows
        return record, exp

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy replies to the held-out rows: mean reward (each function and the weighted sum), length."""
        if not self.evals:
            return {}
        n_funcs = len(self.funcs)
        sums = torch.zeros(n_funcs + 3, dtype=torch.float64)  # per function, weighted sum, tokens, rows
        weights = torch.tensor([fn.weight for fn in self.funcs])
        for batch, real in self.eval_batches():
            exp = self.sample(batch, key=0, greedy=True, score=False)
            rows = self.data_rows(self.evals, batch["row_ids"], 1)
            per_func, _ = self.function_rewards(exp, rows, self.funcs)  # on stand-ins too:
            if real:  # an rm: reward is a collective under ZeRO-3
                sums[:n_funcs] += per_func.sum(0).double()
                sums[n_funcs:] += torch.tensor([(per_func * weights).sum().item(), exp.mask.sum().item(),
                                                per_func.shape[0]], dtype=torch.float64)
        totals = [all_reduce_sum(v) for v in sums.tolist()]
        rows = max(totals[-1], 1.0)
        out = {f"eval_reward_{fn.name}": totals[i] / rows for i, fn in enumerate(self.funcs)}
        out.update(eval_reward=totals[n_funcs] / rows, eval_length=totals[n_funcs + 1] / rows)
        return out

    def sample_fields(self, exp: Experience) -> dict[str, list]:
        return {"reward": exp.scores.tolist(), "advantage": exp.advantages[:, 0].tolist()}

    def extra_state(self) -> dict[str, Any]:
        return {"no_signal_in_row": self.no_signal_in_row}

    def load_extra_state(self, state: dict[str, Any], path: Path) -> None:
        self.no_signal_in_row = state["no_signal_in_row"]


def interleave(sources: list[list[dict]]) -> list[dict]:
    """The rows of several files taken in turn (a limited evaluation, --eval_batches, then sees each)."""
    longest = max(len(rows) for rows in sources)
    return [rows[i] for i in range(longest) for rows in sources if i < len(rows)]


def run_grpo(cfg, run_dir: Path, precision: Precision) -> dict[str, Any]:
    """Load rows, reward functions and models, train, export final/ (the actor), mark done."""
    tokenizer = load_tokenizer(cfg.tokenizer_path or cfg.actor_model_name_or_path, "--tokenizer_path")
    g = cfg.num_generations

    def model_reward(model_dir: str):
        return reward_model_score(model_dir, tokenizer, cfg.per_device_generation_batch_size * g,
                                  cfg.actor_zero_stage, precision)

    funcs = build_reward_functions(cfg.reward_funcs, cfg.reward_weights, cfg.max_answer_seq_len, model_reward)
    rows = load_rl_rows(cfg.data_path, "train", funcs, "--data_path")
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows], cfg.max_prompt_seq_len,
                             f"--data_path {cfg.data_path}", cfg.long_inputs, extra=rows)
    evals = []
    if cfg.eval_data:
        eval_rows = interleave([load_rl_rows(path, "train", funcs, "--eval_data") for path in cfg.eval_data])
        evals = encode_prompts(tokenizer, [r["prompt"] for r in eval_rows], cfg.max_prompt_seq_len,
                               f"--eval_data {cfg.eval_data}", cfg.long_inputs, extra=eval_rows)
    total_steps = total_rl_steps(cfg, len(prompts))
    minis = cfg.per_device_generation_batch_size * g // (cfg.per_device_training_batch_size * cfg.gradient_accumulation_steps)
    actor, switch, parameters = build_actor(cfg, tokenizer, precision, total_steps * cfg.ppo_epochs * minis)
    reference = (frozen_engine(load_causal_lm(cfg.actor_model_name_or_path), cfg.per_device_training_batch_size,
                               cfg.actor_zero_stage, cfg.offload_reference_model, precision)
                 if cfg.kl_coef > 0 else None)
    save_config(cfg, run_dir / "config.json", extra={
        "step": "grpo", "world_size": get_world_size(), "precision": precision.name, "parameters": parameters,
        "total_steps": total_steps, "optimizer_steps_per_rl_step": cfg.ppo_epochs * minis,
        "train_prompts": len(prompts), "eval_rows": len(evals), "generation_path": switch.path})
    log.info("GRPO (%s, %s): actor %.2fM parameters; %d prompts x %d replies, %d steps, rewards %s, %s",
             cfg.advantage_estimator, cfg.loss_aggregation, parameters["actor"] / 1e6, len(prompts), g, total_steps,
             " + ".join(f"{fn.weight:g} x {fn.name}" for fn in funcs), precision.name)
    trainer = GRPOTrainer(cfg, run_dir, actor, switch, reference, tokenizer, prompts, evals, precision, total_steps,
                          funcs)
    summary = trainer.fit()
    export_hf(actor.module, run_dir / "final", zero_stage=cfg.actor_zero_stage, tokenizer=tokenizer,
              lora_scale=cfg.lora_scale("actor"))
    summary["parameters"] = parameters
    write_done(run_dir, cfg, summary)
    return summary
