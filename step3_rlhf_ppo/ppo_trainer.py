"""PPO for the chat model: four engines, experience, the clipped updates, and the run loop.

One PPO step:
  1. experience: the actor samples replies to a batch of prompts (utils.hybrid.GenerationSwitch); one
     forward each of actor, reference, critic and reward model gives log-probs, reference log-probs,
     per-token values and the score (plus the rule rewards of --shaping_funcs, e.g. repetition and length
     penalties, utils.rewards); utils.rl turns them into KL-penalised per-token rewards and GAE
     advantages (whitened over the whole batch on all ranks).
  2. update: --ppo_epochs passes over the batch in mini-batches; each optimizer step trains the actor on
     the clipped policy loss (+ the pretraining loss with --ptx_data) and the critic on the clipped value
     loss, both normalised by the response tokens of the whole global mini-batch, so one process and
     several give the same gradients. A pass stops early once a mini-batch's approx KL passes
     --max_approx_kl.
With --stop_repetition / --stop_length_ratio, training stops at the first held-out evaluation whose replies
degenerate, and the weights of the last evaluation within the limits are exported (utils.rl_trainer).
The loop, sampling, the mini-batch update, checkpoints and samples are utils.rl_trainer's (shared with
the group-relative path, grpo.py); this module adds the critic, the reference and the reward model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.checkpoint import export_hf, load_tensors
from utils.config import save_config
from utils.data import MicroBatchPlan, PackedTokens, read_token_meta
from utils.dist import Precision, all_reduce_sum, get_rank, get_world_size
from utils.engine import frozen_engine, init_engine
from utils.errors import UserError
from utils.hybrid import GenerationSwitch, merged_weights
from utils.losses import count_label_tokens, next_token_loss_sum
from utils.model import count_parameters, load_causal_lm
from utils.preference import load_prompts
from utils.reward import load_reward_model, score_head, sequence_rewards, token_values
from utils.rewards import build_reward_functions, repeated_ngram_share
from utils.rl import (
    KLController,
    gae,
    kl_penalised_rewards,
    masked_whiten,
    policy_loss,
    token_logprobs,
    value_loss,
)
from utils.rl_trainer import (
    Experience,
    RLTrainer,
    build_actor,
    check_same_tokenizer,
    encode_prompts,
    global_mean,
    global_std,
    reply_logits,
    total_rl_steps,
)
from utils.run import write_done
from utils.step import load_tokenizer, prepare_model

log = logging.getLogger("ppo")


def reply_values(critic, head: torch.nn.Module, exp: Experience) -> torch.Tensor:
    """(B, R) critic values of the states each reply token is taken from (aligned like reply_logits)."""
    values = token_values(critic, head, **exp.model_inputs())
    return values[:, exp.prompt_width - 1:exp.prompt_width - 1 + exp.actions.shape[1]]


# ----------------------------------------------------------------------------------------------------
# Engines


class EMA:
    """Exponential moving average of the actor's (LoRA-merged) weights, the same on every rank:
    ema <- decay * ema + (1 - decay) * weights after each PPO step (DeepSpeed-Chat uses decay 0.992)."""

    def __init__(self, state: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.state = {k: v.detach().float().clone() for k, v in state.items()}

    def update(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.state[key].mul_(self.decay).add_(value.detach().float(), alpha=1.0 - self.decay)


@dataclass
class Engines:
    actor: Any
    reference: Any
    critic: Any
    reward: Any
    switch: GenerationSwitch
    value_head: torch.nn.Module
    ema: EMA | None
    parameters: dict[str, int]


def build_engines(cfg, tokenizer, precision: Precision, total_updates: int) -> Engines:
    """Actor and critic as trained engines (own ZeRO stage, LoRA, schedule), reference and reward model as
    frozen inference engines; the generation switch on the actor."""
    reward_dir = cfg.reward_model_name_or_path or cfg.critic_model_name_or_path
    check_same_tokenizer(tokenizer, reward_dir, "reward model", "--reward_model_name_or_path")
    actor, switch, actor_counts = build_actor(cfg, tokenizer, precision, total_updates)
    critic_cfg = cfg.role("critic")
    critic_model = prepare_model(load_reward_model(cfg.critic_model_name_or_path), critic_cfg, tokenizer,
                                 always_train=("score",))
    critic = init_engine(critic_model, critic_cfg, precision, total_updates)
    micro = cfg.per_device_generation_batch_size
    reference = frozen_engine(load_causal_lm(cfg.actor_model_name_or_path), micro, cfg.actor_zero_stage,
                              cfg.offload_reference_model, precision)
    reward = frozen_engine(load_reward_model(reward_dir), micro, cfg.critic_zero_stage, False, precision)
    actor_scale = cfg.lora_scale("actor")
    ema = EMA(merged_weights(actor.module, cfg.actor_zero_stage, actor_scale), cfg.ema_decay) if cfg.enable_ema else None
    parameters = {**actor_counts, "critic": count_parameters(critic_model),
                  "critic_trainable": count_parameters(critic_model, trainable_only=True)}
    return Engines(actor, reference, critic, reward, switch, score_head(critic.module), ema, parameters)


# ----------------------------------------------------------------------------------------------------
# The pretraining mix


class PretrainMix:
    """Windows of step0's packed pretraining tokens for the ptx loss, in a seeded rank-aware order; the
    position is one integer (micro-batches drawn so far), kept in the checkpoint."""

    def __init__(self, tokens_dir: str, seq_len: int, micro_batch: int, seed: int):
        meta = read_token_meta(tokens_dir)
        self.data = PackedTokens(Path(tokens_dir) / "train.bin", seq_len, meta["dtype"])
        self.plan = MicroBatchPlan(len(self.data), micro_batch, get_world_size(), get_rank(), seed)
        if self.plan.micro_batches_per_epoch == 0:
            raise UserError(f"--ptx_data {tokens_dir}: too few tokens for one batch of {micro_batch} x {seq_len}")
        self.drawn = 0

    def next(self, device) -> dict[str, torch.Tensor]:
        epoch, k = divmod(self.drawn, self.plan.micro_batches_per_epoch)
        self.drawn += 1
        rows = [self.data[i] for i in self.plan.rows(epoch, k)]
        return {key: torch.stack([r[key] for r in rows]).to(device) for key in rows[0]}


# ----------------------------------------------------------------------------------------------------
# The trainer


class PPOTrainer(RLTrainer):
    name = "ppo"
    postfix = {"score": "score_mean", "kl": "kl", "len": "response_length", "gen": "gen_share"}

    def __init__(self, cfg, run_dir: Path, engines: Engines, tokenizer, prompts: list[dict], evals: list[dict],
                 precision: Precision, total_steps: int, ptx: PretrainMix | None):
        super().__init__(cfg, run_dir, engines.actor, engines.switch, tokenizer, prompts, evals, precision, total_steps)
        self.e, self.ptx = engines, ptx
        self.kl = KLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.shaping = build_reward_functions(cfg.shaping_funcs, cfg.shaping_weights, cfg.max_answer_seq_len,
                                              ) if cfg.shaping_funcs else []

    # -- experience -----------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, batch: dict[str, torch.Tensor], key: int) -> Experience:
        """Sample replies (seeded per prompt row and `key`) and score them with the actor, the reference and
        the reward model."""
        exp = self.sample(batch, key)
        exp.ref_logprobs = self.reference_logprobs(self.e.reference, exp)
        with self.precision.autocast_context(), self.timed("reward_forward"):
            exp.scores = sequence_rewards(self.e.reward, **exp.model_inputs())
        if self.shaping:  # rule rewards (repetition, length, ...), added to the clipped score
            per_func, _ = self.function_rewards(exp, [{"prompt": p} for p in self.texts(exp)[0]], self.shaping)
            weights = torch.tensor([fn.weight for fn in self.shaping])
            exp.shaping = (per_func * weights).sum(-1).to(exp.scores)
        return exp

    @torch.no_grad()
    def make_experience(self, batch: dict[str, torch.Tensor], key: int) -> Experience:
        exp = self.rollout(batch, key)
        with self.precision.autocast_context(), self.timed("critic_forward"):
            self.e.critic.eval()
            exp.values = reply_values(self.e.critic, self.e.value_head, exp) * exp.mask
            self.e.critic.train()
        exp.rewards, _ = kl_penalised_rewards(exp.logprobs, exp.ref_logprobs, exp.scores, exp.mask, self.kl.value,
                                              self.cfg.reward_clip, exp.shaping)
        exp.advantages, exp.returns = gae(exp.rewards, exp.values, exp.mask, self.cfg.gamma, self.cfg.lam)
        return exp

    # -- update ---------------------------------------------------------------------------------------

    def _actor_loss(self, mb: Experience, units: float, scale: float) -> tuple[torch.Tensor, dict[str, float]]:
        logprobs = token_logprobs(reply_logits(self.e.actor, mb), mb.actions, self.cfg.temperature)
        loss, stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, self.cfg.cliprange)
        out = {"policy_loss": loss.item(), **{k: v.item() for k, v in stats.items()}}
        total = loss * scale
        if self.ptx is not None:
            batch = self.ptx.next(self.device)
            logits = self.e.actor(input_ids=batch["input_ids"], use_cache=False).logits
            ptx_sum = next_token_loss_sum(logits, batch["labels"])
            ptx_units = all_reduce_sum(count_label_tokens(batch["labels"]))
            # ptx_coef x (mean LM loss over the global ptx batch), in the same units as the policy loss
            total = total + self.cfg.ptx_coef * ptx_sum * scale * units / max(ptx_units, 1.0)
            out["ptx_loss"] = ptx_sum.item() * units / max(ptx_units, 1.0)
        return total, out

    def _critic_loss(self, mb: Experience, scale: float) -> tuple[torch.Tensor, dict[str, float]]:
        values = reply_values(self.e.critic, self.e.value_head, mb)
        loss, stats = value_loss(values, mb.values, mb.returns, mb.mask, self.cfg.cliprange_value)
        return loss * scale, {"value_loss": loss.item(), **{k: v.item() for k, v in stats.items()}}

    def train_micro_batch(self, mb: Experience, units: float, scale: float) -> dict[str, float]:
        with self.timed("actor_train"):
            with self.precision.autocast_context():
                actor_loss, a_stats = self._actor_loss(mb, units, scale)
            self.backward_step(self.e.actor, actor_loss, "policy")
        with self.timed("critic_train"):
            with self.precision.autocast_context():
                critic_loss, c_stats = self._critic_loss(mb, scale)
            self.backward_step(self.e.critic, critic_loss, "value")
        return {**a_stats, **c_stats}

    # -- one step, evaluation, samples ----------------------------------------------------------------

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], Experience]:
        cfg = self.cfg
        t0 = time.perf_counter()
        exp = self.make_experience(batch, key=self.state.step + 1)
        raw_adv = exp.advantages
        if cfg.whiten_advantages:
            exp.advantages = masked_whiten(exp.advantages, exp.mask)
        t1 = time.perf_counter()
        record = self.update(exp, cfg.max_approx_kl)
        t2 = time.perf_counter()
        mask, n_tokens = exp.mask, exp.mask.sum().item()
        n_rows = all_reduce_sum(float(mask.shape[0]))
        record.update(
            score_mean=all_reduce_sum(exp.scores.sum().item()) / n_rows, score_std=global_std(exp.scores),
            reward_mean=all_reduce_sum(exp.rewards.sum().item()) / n_rows,
            kl=all_reduce_sum(exp.seq_kl.sum().item()) / n_rows, kl_coef=self.kl.value,
            entropy=global_mean((exp.entropy * mask).sum().item(), n_tokens),
            response_length=all_reduce_sum(n_tokens) / n_rows,
            advantages_mean=global_mean(raw_adv.sum().item(), n_tokens), advantages_std=global_std(raw_adv[mask > 0]),
            returns_mean=global_mean(exp.returns.sum().item(), n_tokens),
            values_mean=global_mean(exp.values.sum().item(), n_tokens),
            lr_actor=self.e.actor.get_lr()[0], lr_critic=self.e.critic.get_lr()[0],
            tokens=all_reduce_sum(float(exp.attention_mask.sum().item())),
            experience_seconds=t1 - t0, train_seconds=t2 - t1)
        if exp.shaping is not None:
            record["shaping_mean"] = all_reduce_sum(exp.shaping.sum().item()) / n_rows
        self.kl.update(record["kl"], int(n_rows))
        if self.e.ema is not None:
            self.e.ema.update(merged_weights(self.e.actor.module, cfg.actor_zero_stage, cfg.lora_scale("actor")))
        return record, exp

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out prompts sampled with a fixed seed: reward-model score, KL to the reference, length, and the
        degeneration measure: the share of the replies' character 4-grams that repeat."""
        if not self.evals:
            return {}
        sums = {"score": 0.0, "kl": 0.0, "length": 0.0, "repetition": 0.0, "n": 0.0}
        for batch, real in self.eval_batches():
            exp = self.rollout(batch, key=0)
            if real:
                sums["repetition"] += sum(repeated_ngram_share(r) for r in self.texts(exp)[1])
                sums["score"] += exp.scores.sum().item()
                sums["kl"] += exp.seq_kl.sum().item()
                sums["length"] += exp.mask.sum().item()
                sums["n"] += exp.mask.shape[0]
        totals = {k: all_reduce_sum(v) for k, v in sums.items()}
        n = max(totals.pop("n"), 1.0)
        return {f"eval_{k}": v / n for k, v in totals.items()}

    def sample_fields(self, exp: Experience) -> dict[str, list]:
        return {"score": exp.scores.tolist(), "kl": exp.seq_kl.tolist()}

    # -- checkpoints ----------------------------------------------------------------------------------

    def engines(self) -> dict[str, Any]:
        return {"actor": self.e.actor, "critic": self.e.critic}

    def extra_state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl.value, "ptx_drawn": self.ptx.drawn if self.ptx else 0}

    def extra_tensors(self) -> dict[str, torch.Tensor] | None:
        return {f"ema.{k}": v for k, v in self.e.ema.state.items()} if self.e.ema else None

    def load_extra_state(self, state: dict[str, Any], path: Path) -> None:
        self.kl.value = state["kl_coef"]
        if self.ptx:
            self.ptx.drawn = state["ptx_drawn"]
        if self.e.ema is not None:
            saved = load_tensors(path)
            self.e.ema.state = {k.removeprefix("ema."): v for k, v in saved.items() if k.startswith("ema.")}

    def summary(self) -> dict[str, Any]:
        return {"kl_coef": self.kl.value}

    def degeneration_limits(self) -> tuple[float, float]:
        return self.cfg.stop_repetition, self.cfg.stop_length_ratio


def run_ppo(cfg, run_dir: Path, precision: Precision) -> dict[str, Any]:
    """Load data and models, train, export final/ (actor), final_ema/ and critic/, mark done."""
    tokenizer = load_tokenizer(cfg.tokenizer_path or cfg.actor_model_name_or_path, "--tokenizer_path")
    prompts = encode_prompts(tokenizer, load_prompts(cfg.data_path, "train"), cfg.max_prompt_seq_len,
                             f"--data_path {cfg.data_path}", cfg.long_inputs)
    evals = (encode_prompts(tokenizer, load_prompts(cfg.eval_prompts, "train"), cfg.max_prompt_seq_len,
                            f"--eval_prompts {cfg.eval_prompts}", cfg.long_inputs) if cfg.eval_prompts else [])
    total_steps = total_rl_steps(cfg, len(prompts))
    minis = cfg.per_device_generation_batch_size // (cfg.per_device_training_batch_size * cfg.gradient_accumulation_steps)
    total_updates = total_steps * cfg.ppo_epochs * minis
    ptx = (PretrainMix(cfg.ptx_data, cfg.max_prompt_seq_len + cfg.max_answer_seq_len,
                       cfg.per_device_training_batch_size, cfg.seed) if cfg.ptx_data else None)
    engines = build_engines(cfg, tokenizer, precision, total_updates)
    save_config(cfg, run_dir / "config.json", extra={
        "step": "ppo", "world_size": get_world_size(), "precision": precision.name, "parameters": engines.parameters,
        "total_steps": total_steps, "optimizer_steps_per_ppo_step": cfg.ppo_epochs * minis,
        "train_prompts": len(prompts), "eval_prompts": len(evals), "generation_path": engines.switch.path})
    log.info("PPO: actor %.2fM, critic %.2fM parameters; %d prompts, %d PPO steps, %s", engines.parameters["actor"] / 1e6,
             engines.parameters["critic"] / 1e6, len(prompts), total_steps, precision.name)
    summary = PPOTrainer(cfg, run_dir, engines, tokenizer, prompts, evals, precision, total_steps, ptx).fit()
    export_hf(engines.actor.module, run_dir / "final", zero_stage=cfg.actor_zero_stage, tokenizer=tokenizer,
              lora_scale=cfg.lora_scale("actor"))
    export_hf(engines.critic.module, run_dir / "critic", zero_stage=cfg.critic_zero_stage, tokenizer=tokenizer,
              lora_scale=cfg.lora_scale("critic"))
    if engines.ema is not None:
        ema_model = load_causal_lm(cfg.actor_model_name_or_path)
        ema_model.load_state_dict(engines.ema.state, strict=False)
        export_hf(ema_model, run_dir / "final_ema", zero_stage=0, tokenizer=tokenizer)
    summary["parameters"] = engines.parameters
    write_done(run_dir, cfg, summary)
    return summary
