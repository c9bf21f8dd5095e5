"""PPO for the chat model: four engines, experience, the clipped updates, and the run loop.

One PPO step:
  1. experience: the actor samples replies to a batch of prompts (utils.hybrid.GenerationSwitch); one
     forward each of actor, reference, critic and reward model gives log-probs, reference log-probs,
     per-token values and the score; utils.rl turns them into KL-penalised per-token rewards and GAE
     advantages (whitened over the whole batch on all ranks).
  2. update: --ppo_epochs passes over the batch in mini-batches; each optimizer step trains the actor on
     the clipped policy loss (+ the pretraining loss with --ptx_data) and the critic on the clipped value
     loss, both normalised by the response tokens of the whole global mini-batch, so one process and
     several give the same gradients. A pass stops early once a mini-batch's approx KL passes
     --max_approx_kl.
Layout of experience tensors: prompts left-padded to width P, replies right-padded to width R, one row
input_ids (B, P + R); response token j sits at position P + j and is scored from position P + j - 1.
Every forward passes position_ids counted over the attention mask, so left padding does not shift RoPE
positions (generate counts them the same way, which the log-prob alignment test checks).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.chat import prompt_ids
from utils.checkpoint import CheckpointManager, export_hf, load_tensors
from utils.data import MicroBatchPlan, PackedTokens, check_lengths, read_token_meta, sharded_eval_batches
from utils.dist import Precision, all_reduce_max, all_reduce_sum, get_rank, get_world_size, is_rank0
from utils.errors import UserError
from utils.generation import SamplingConfig, left_pad, stop_token_ids
from utils.hybrid import GenerationSwitch, hybrid_engine_section, hybrid_engine_supported, merged_weights
from utils.log import MetricsLogger, peak_rss_mib, progress
from utils.losses import count_label_tokens, next_token_loss_sum
from utils.model import count_parameters, load_causal_lm
from utils.preference import load_prompts
from utils.reward import load_reward_model, score_head, sequence_rewards, token_values
from utils.rl import (
    KLController,
    entropy_from_logits,
    gae,
    kl_penalised_rewards,
    masked_whiten,
    policy_loss,
    token_logprobs,
    value_loss,
)
from utils.run import write_done
from utils.tokenizer import load_tokenizer_dir
from utils.trainer import LoopState, MicroBatchStream

log = logging.getLogger("ppo")

SAMPLES = "samples.jsonl"


# ----------------------------------------------------------------------------------------------------
# Experience


@dataclass
class Experience:
    """A batch of sampled replies and everything PPO derives from it (layout in the module docstring)."""

    prompt_width: int
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor  # (B, P + R)
    mask: torch.Tensor  # (B, R) float, 1 on reply tokens (end marker included)
    logprobs: torch.Tensor  # (B, R) actor, at sampling time
    ref_logprobs: torch.Tensor  # (B, R)
    entropy: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,) reward model
    values: torch.Tensor | None = None  # (B, R) critic
    rewards: torch.Tensor | None = None  # (B, R) KL-penalised, score at the last token
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)

    @property
    def actions(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width:]

    @property
    def seq_kl(self) -> torch.Tensor:
        """(B,) per-reply KL estimate to the reference: sum over reply tokens of logp - logp_ref."""
        return ((self.logprobs - self.ref_logprobs) * self.mask).sum(-1)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}

    def rows(self, start: int, end: int) -> Experience:
        """The mini-batch of rows start..end (same widths)."""
        cut = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{k: v[start:end] if isinstance(v, torch.Tensor) else v for k, v in cut.items()})


def reply_mask(tokens: torch.Tensor, stops: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row's sampled tokens up to and including its first stop token: (tokens with pad after it,
    float mask of the kept ones), trimmed to the longest reply."""
    is_stop = torch.isin(tokens, torch.tensor(stops, device=tokens.device))
    after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # strictly after the first stop
    tokens = tokens.masked_fill(after, pad_id)
    mask = (~after).float()
    width = max(int(mask.sum(-1).max().item()), 1)
    return tokens[:, :width], mask[:, :width]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens (0 at each row's first one), as generate computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def reply_values(critic, head: torch.nn.Module, exp: Experience) -> torch.Tensor:
    """(B, R) critic values of the states each reply token is taken from (aligned like reply_logits)."""
    values = token_values(critic, head, **exp.model_inputs())
    return values[:, exp.prompt_width - 1:exp.prompt_width - 1 + exp.actions.shape[1]]


def reply_logits(model, exp: Experience) -> torch.Tensor:
    """(B, R, V) logits that score each reply token (from the position before it)."""
    width = exp.actions.shape[1]
    logits = model(**exp.model_inputs(), use_cache=False, logits_to_keep=width + 1).logits
    return logits[:, :-1]


# ----------------------------------------------------------------------------------------------------
# Engines


def _frozen_engine(model, cfg, zero_stage: int, offload: bool, precision: Precision):
    import deepspeed

    from utils.ds_config import inference_ds_config

    ds = inference_ds_config(micro_batch=cfg.per_device_generation_batch_size, world_size=get_world_size(),
                             zero_stage=zero_stage, offload=offload, precision=precision)
    engine, *_ = deepspeed.initialize(model=model.eval(), config=ds)
    return engine


class EMA:
    """Exponential moving average of the actor's (LoRA-merged) weights, the same on every rank:
    ema <- decay * ema + (1 - decay) * weights after each PPO step (DeepSpeed-Chat uses decay 0.992)."""

    def __init__(self, state: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.state = {k: v.detach().float().clone() for k, v in state.items()}

    def update(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.state[key].mul_(self.decay).add_(value.detach().float(), alpha=1.0 - self.decay)


def _check_same_tokenizer(tokenizer, other_dir: str, what: str) -> None:
    """The actor and the reward model must read the same ids (both trained with one tokenizer)."""
    if not (Path(other_dir) / "tokenizer_config.json").is_file():
        return
    other = load_tokenizer_dir(other_dir, "--reward_model_name_or_path")
    if other.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{other_dir}: the {what}'s tokenizer differs from the actor's: train both from the same "
                        "tokenizer (step0's or the base model's)")


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
    from utils.engine import init_engine
    from utils.step import prepare_model

    actor_cfg, critic_cfg = cfg.role("actor"), cfg.role("critic")
    reward_dir = cfg.reward_model_name_or_path or cfg.critic_model_name_or_path
    _check_same_tokenizer(tokenizer, reward_dir, "reward model")
    actor_model = prepare_model(load_causal_lm(cfg.actor_model_name_or_path), actor_cfg, tokenizer)
    limit = actor_model.config.max_position_embeddings
    if cfg.max_prompt_seq_len + cfg.max_answer_seq_len > limit:
        raise UserError(f"--max_prompt_seq_len {cfg.max_prompt_seq_len} + --max_answer_seq_len "
                        f"{cfg.max_answer_seq_len} exceeds the actor's {limit} positions: lower them")
    use_he, why = hybrid_engine_supported(actor_model, cfg.enable_hybrid_engine)
    section = hybrid_engine_section(cfg.max_prompt_seq_len + cfg.max_answer_seq_len) if use_he else None
    actor = init_engine(actor_model, actor_cfg, precision, total_updates, hybrid_engine=section)
    critic_model = prepare_model(load_reward_model(cfg.critic_model_name_or_path), critic_cfg, tokenizer,
                                 always_train=("score",))
    critic = init_engine(critic_model, critic_cfg, precision, total_updates)
    reference = _frozen_engine(load_causal_lm(cfg.actor_model_name_or_path), cfg, cfg.actor_zero_stage,
                               cfg.offload_reference_model, precision)
    reward = _frozen_engine(load_reward_model(reward_dir), cfg, cfg.critic_zero_stage, False, precision)
    actor_scale = cfg.lora_scale("actor")
    switch = GenerationSwitch(actor, tokenizer, cfg.actor_zero_stage, use_he, actor_scale)
    log.info("generation path: %s (%s)", switch.path, why)
    ema = EMA(merged_weights(actor.module, cfg.actor_zero_stage, actor_scale), cfg.ema_decay) if cfg.enable_ema else None
    parameters = {"actor": count_parameters(actor_model), "critic": count_parameters(critic_model),
                  "actor_trainable": count_parameters(actor_model, trainable_only=True),
                  "critic_trainable": count_parameters(critic_model, trainable_only=True)}
    return Engines(actor, reference, critic, reward, switch, score_head(critic.module), ema, parameters)


# ----------------------------------------------------------------------------------------------------
# Prompts and the pretraining mix


def encode_prompts(tokenizer, prompts: list[str], max_len: int, where: str, long_inputs: str = "truncate",
                   ) -> list[dict[str, Any]]:
    """Chat-template ids of each prompt (with the assistant header) and its row number, which seeds its
    sampling. Prompts longer than max_len are left out (a prompt cut at the start would be a different
    question), or are a UserError with `long_inputs` "reject"."""
    rows = [{"prompt_ids": prompt_ids(tokenizer, [{"role": "user", "content": p}])} for p in prompts]
    check_lengths([len(r["prompt_ids"]) for r in rows], max_len, long_inputs, where, "--max_prompt_seq_len",
                  action="left out")
    kept = [{**r, "row": i} for i, r in enumerate(r for r in rows if len(r["prompt_ids"]) <= max_len)]
    if not kept:
        raise UserError(f"{where}: every prompt is longer than --max_prompt_seq_len {max_len}: raise it")
    return kept


@dataclass
class PromptCollator:
    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = left_pad([r["prompt_ids"] for r in rows], self.pad_token_id, "cpu")
        return {"input_ids": ids, "attention_mask": mask, "row_ids": torch.tensor([r["row"] for r in rows])}


def row_seeds(seed: int, key: int, row_ids: torch.Tensor) -> tuple[int, ...]:
    """One sampling seed per prompt, from the run's seed, a key (the PPO step; 0 for evaluation) and the
    prompt's row: the same prompt at the same step samples the same reply on any rank at any world size."""
    return tuple(int(np.random.SeedSequence([seed, key, row]).generate_state(1)[0]) for row in row_ids.tolist())


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


def _global_mean(total: float, count: float) -> float:
    count = all_reduce_sum(count)
    return all_reduce_sum(total) / count if count else math.nan


def _global_std(values: torch.Tensor) -> float:
    stats = torch.tensor([values.sum().item(), (values.double() ** 2).sum().item(), values.numel()],
                         dtype=torch.float64)
    if get_world_size() > 1:
        torch.distributed.all_reduce(stats)
    total, total_sq, n = stats.tolist()
    mean = total / max(n, 1)
    return math.sqrt(max(total_sq / max(n, 1) - mean * mean, 0.0))


class PPOTrainer:
    def __init__(self, cfg, run_dir: Path, engines: Engines, tokenizer, prompts: list[dict], evals: list[dict],
                 precision: Precision, total_steps: int, ptx: PretrainMix | None):
        self.cfg, self.run_dir, self.e, self.tokenizer = cfg, run_dir, engines, tokenizer
        self.prompts, self.evals, self.precision, self.total_steps, self.ptx = prompts, evals, precision, total_steps, ptx
        self.collate = PromptCollator(tokenizer.pad_token_id)
        self.stops = stop_token_ids(tokenizer)
        self.device = engines.actor.device
        self.state = LoopState()
        self.kl = KLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.plan = MicroBatchPlan(len(prompts), cfg.per_device_generation_batch_size, get_world_size(), get_rank(),
                                   cfg.seed)
        self.checkpoints = CheckpointManager(run_dir / "checkpoints", cfg.keep_last)
        self.clock: collections.defaultdict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def timed(self, part: str):
        """Adds the wall time of the block to `self.clock[part]` (the step's time breakdown in metrics)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.clock[part] += time.perf_counter() - start

    def sampling(self, seeds: tuple[int, ...]) -> SamplingConfig:
        return SamplingConfig(self.cfg.max_answer_seq_len, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p, 1.0,
                              row_seeds=seeds)

    # -- experience -----------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, batch: dict[str, torch.Tensor], key: int) -> Experience:
        """Sample replies (seeded per prompt row and `key`) and score them with the actor, the reference and
        the reward model."""
        prompts, prompt_mask = batch["input_ids"], batch["attention_mask"]
        seeds = row_seeds(self.cfg.seed, key, batch["row_ids"])
        with self.timed("generate"):
            sampled = self.e.switch.generate(prompts, prompt_mask, self.sampling(seeds))
        actions, mask = reply_mask(sampled, self.stops, self.tokenizer.pad_token_id)
        input_ids = torch.cat([prompts, actions], dim=1)
        attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
        exp = Experience(prompts.shape[1], input_ids, attention_mask, position_ids(attention_mask), mask,
                         *(torch.empty(0),) * 4)
        t = self.cfg.temperature
        with self.precision.autocast_context():
            with self.timed("actor_forward"):
                self.e.actor.eval()
                logits = reply_logits(self.e.actor, exp)
                self.e.actor.train()
                exp.logprobs = token_logprobs(logits, actions, t) * mask
                exp.entropy = entropy_from_logits(logits, t) * mask
                del logits
            with self.timed("reference_forward"):
                exp.ref_logprobs = token_logprobs(reply_logits(self.e.reference, exp), actions, t) * mask
            with self.timed("reward_forward"):
                exp.scores = sequence_rewards(self.e.reward, **exp.model_inputs())
        return exp

    @torch.no_grad()
    def make_experience(self, batch: dict[str, torch.Tensor], key: int) -> Experience:
        exp = self.rollout(batch, key)
        with self.precision.autocast_context(), self.timed("critic_forward"):
            self.e.critic.eval()
            exp.values = reply_values(self.e.critic, self.e.value_head, exp) * exp.mask
            self.e.critic.train()
        exp.rewards, _ = kl_penalised_rewards(exp.logprobs, exp.ref_logprobs, exp.scores, exp.mask, self.kl.value,
                                              self.cfg.reward_clip)
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

    def _backward_step(self, engine, loss: torch.Tensor, what: str) -> bool:
        """Backward and step, unless the loss is NaN/inf on some rank (then skipped on all ranks)."""
        if all_reduce_max(0.0 if torch.isfinite(loss).item() else 1.0) > 0:
            self.state.bad_in_row += 1
            self.state.skipped += 1
            log.warning("non-finite %s loss at PPO step %d: micro-batch skipped (%d in a row)", what,
                        self.state.step + 1, self.state.bad_in_row)
            if self.state.bad_in_row >= self.cfg.max_bad_steps:
                raise UserError(f"{what} loss was NaN/inf in {self.state.bad_in_row} micro-batches in a row at PPO "
                                f"step {self.state.step + 1}: lower the learning rates or train in --dtype fp32")
            return False
        self.state.bad_in_row = 0
        engine.backward(loss)
        engine.step()
        return True

    def update(self, exp: Experience) -> dict[str, float]:
        """--ppo_epochs passes of clipped policy and value updates over the experience."""
        cfg, world = self.cfg, get_world_size()
        micro, gas = cfg.per_device_training_batch_size, cfg.gradient_accumulation_steps
        n_rows = exp.input_ids.shape[0]
        sums: dict[str, float] = {}
        steps, stopped, units_total = 0, False, 0.0
        for _ in range(cfg.ppo_epochs):
            for first in range(0, n_rows, micro * gas):
                group = [exp.rows(s, s + micro) for s in range(first, first + micro * gas, micro)]
                units = all_reduce_sum(sum(mb.mask.sum().item() for mb in group))
                scale = gas * world / max(units, 1.0)
                approx_kl = 0.0
                for mb in group:
                    with self.timed("actor_train"):
                        with self.precision.autocast_context():
                            actor_loss, a_stats = self._actor_loss(mb, units, scale)
                        self._backward_step(self.e.actor, actor_loss, "policy")
                    with self.timed("critic_train"):
                        with self.precision.autocast_context():
                            critic_loss, c_stats = self._critic_loss(mb, scale)
                        self._backward_step(self.e.critic, critic_loss, "value")
                    approx_kl += a_stats["approx_kl"]
                    for key, value in {**a_stats, **c_stats}.items():
                        sums[key] = sums.get(key, 0.0) + value
                units_total += units
                steps += 1
                if cfg.max_approx_kl and all_reduce_sum(approx_kl) / max(units, 1.0) > cfg.max_approx_kl:
                    stopped = True
                    break
            if stopped:
                break
        out = {k: all_reduce_sum(v) / max(units_total, 1.0) for k, v in sums.items()}
        out.update(optimizer_steps=steps, early_stopped=float(stopped))
        return out

    # -- one step, evaluation, samples ----------------------------------------------------------------

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], Experience]:
        cfg = self.cfg
        t0, gen0 = time.perf_counter(), self.e.switch.seconds
        self.clock.clear()
        exp = self.make_experience(batch, key=self.state.step + 1)
        raw_adv = exp.advantages
        if cfg.whiten_advantages:
            exp.advantages = masked_whiten(exp.advantages, exp.mask)
        t1 = time.perf_counter()
        record = self.update(exp)
        t2 = time.perf_counter()
        mask, n_tokens = exp.mask, exp.mask.sum().item()
        n_rows = all_reduce_sum(float(mask.shape[0]))
        record.update(
            score_mean=all_reduce_sum(exp.scores.sum().item()) / n_rows, score_std=_global_std(exp.scores),
            reward_mean=all_reduce_sum(exp.rewards.sum().item()) / n_rows,
            kl=all_reduce_sum(exp.seq_kl.sum().item()) / n_rows, kl_coef=self.kl.value,
            entropy=_global_mean((exp.entropy * mask).sum().item(), n_tokens),
            response_length=all_reduce_sum(n_tokens) / n_rows,
            advantages_mean=_global_mean(raw_adv.sum().item(), n_tokens), advantages_std=_global_std(raw_adv[mask > 0]),
            returns_mean=_global_mean(exp.returns.sum().item(), n_tokens),
            values_mean=_global_mean(exp.values.sum().item(), n_tokens),
            lr_actor=self.e.actor.get_lr()[0], lr_critic=self.e.critic.get_lr()[0])
        tokens = all_reduce_sum(float(exp.attention_mask.sum().item()))
        gen_seconds = self.e.switch.seconds - gen0
        record.update(tokens=tokens, tok_per_s=tokens / (t2 - t0), gen_share=gen_seconds / (t2 - t0),
                      experience_seconds=t1 - t0, train_seconds=t2 - t1,
                      **{f"time_{part}": seconds for part, seconds in self.clock.items()})
        self.kl.update(record["kl"], int(n_rows))
        if self.e.ema is not None:
            self.e.ema.update(merged_weights(self.e.actor.module, cfg.actor_zero_stage, cfg.lora_scale("actor")))
        return record, exp

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out prompts sampled with a fixed seed: reward-model score, KL to the reference, length."""
        if not self.evals:
            return {}
        sums = {"score": 0.0, "kl": 0.0, "length": 0.0, "n": 0.0}
        batches = sharded_eval_batches(self.evals, self.collate, self.cfg.per_device_eval_batch_size,
                                       self.cfg.eval_batches, self.device)
        for batch, real in batches:
            exp = self.rollout(batch, key=0)
            if real:
                sums["score"] += exp.scores.sum().item()
                sums["kl"] += exp.seq_kl.sum().item()
                sums["length"] += exp.mask.sum().item()
                sums["n"] += exp.mask.shape[0]
        totals = {k: all_reduce_sum(v) for k, v in sums.items()}
        n = max(totals.pop("n"), 1.0)
        return {f"eval_{k}": v / n for k, v in totals.items()}

    def write_samples(self, step: int, exp: Experience) -> None:
        if not is_rank0():
            return
        seq_kl = exp.seq_kl.tolist()
        with open(self.run_dir / SAMPLES, "a", encoding="utf-8") as f:
            for i in range(exp.input_ids.shape[0]):
                prompt = exp.input_ids[i, :exp.prompt_width][exp.attention_mask[i, :exp.prompt_width] > 0]
                reply = exp.actions[i][exp.mask[i] > 0].tolist()
                f.write(json.dumps({
                    "step": step, "prompt": self.tokenizer.decode(prompt.tolist(), skip_special_tokens=True),
                    "response": self.tokenizer.decode(reply, skip_special_tokens=True),
                    "score": round(exp.scores[i].item(), 4),
                    "kl": round(seq_kl[i], 4)},
                    ensure_ascii=False) + "\n")

    def _truncate_samples(self, step: int) -> None:
        """Drop samples of steps after `step` (they run again after a resume; -1 on a fresh start)."""
        path = self.run_dir / SAMPLES
        if is_rank0() and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            keep = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")

    # -- checkpoints ----------------------------------------------------------------------------------

    def _engines(self) -> dict[str, Any]:
        return {"actor": self.e.actor, "critic": self.e.critic}

    def save(self) -> None:
        state = {"loop": asdict(self.state), "kl_coef": self.kl.value,
                 "ptx_drawn": self.ptx.drawn if self.ptx else 0}
        tensors = {f"ema.{k}": v for k, v in self.e.ema.state.items()} if self.e.ema else None
        self.checkpoints.save(self._engines(), self.state.step, state, tensors)

    def resume(self) -> bool:
        path = self.checkpoints.latest() if self.cfg.resume else None
        if path is None:
            return False
        state = self.checkpoints.load(self._engines(), path)
        self.state = LoopState(**state["loop"])
        self.kl.value = state["kl_coef"]
        if self.ptx:
            self.ptx.drawn = state["ptx_drawn"]
        if self.e.ema is not None:
            saved = load_tensors(path)
            self.e.ema.state = {k.removeprefix("ema."): v for k, v in saved.items() if k.startswith("ema.")}
        log.info("resumed from %s (PPO step %d)", path, self.state.step)
        return True

    # -- the loop -------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self.resume()
        metrics = MetricsLogger(self.run_dir, cfg.enable_tensorboard, resume_step=self.state.step if resumed else None)
        self._truncate_samples(self.state.step if resumed else -1)
        stream = MicroBatchStream(self.prompts, self.collate, self.plan, self.state, self.device)
        bar = progress(self.total_steps, self.state.step, desc="ppo")
        last_eval: dict[str, float] = {}
        first_eval: dict[str, float] = {}
        record: dict[str, Any] = {}
        wall_start, gen_total, step_total = time.perf_counter(), 0.0, 0.0
        if not resumed and cfg.eval_interval:
            first_eval = last_eval = self.evaluate()
            metrics.log({"step": 0, "kind": "eval", **last_eval})
        while self.state.step < self.total_steps:
            t0, g0 = time.perf_counter(), self.e.switch.seconds
            record, exp = self.train_step(next(stream))
            self.state.step += 1
            self.state.tokens += int(record["tokens"])
            step, dt = self.state.step, time.perf_counter() - t0
            step_total += dt
            gen_total += self.e.switch.seconds - g0
            record.update(step=step, kind="train", epoch=self.state.epoch, skipped=self.state.skipped)
            if step % cfg.log_interval == 0 or step == self.total_steps:
                metrics.log(record)
            if cfg.samples_interval and (step % cfg.samples_interval == 0 or step == 1):
                self.write_samples(step, exp)
            bar.update(1)
            bar.set_postfix(score=f"{record['score_mean']:.3f}", kl=f"{record['kl']:.3f}",
                            len=f"{record['response_length']:.1f}", gen=f"{record['gen_share']:.2f}")
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == self.total_steps:
                last_eval = self.evaluate()
                if last_eval:
                    metrics.log({"step": step, "kind": "eval", **last_eval})
                    log.info("step %d eval: %s", step, json.dumps({k: round(v, 4) for k, v in last_eval.items()}))
            if (cfg.save_interval and step % cfg.save_interval == 0) or step == self.total_steps:
                self.save()
        bar.close()
        metrics.close()
        return {"steps": self.state.step, "tokens": self.state.tokens, "skipped_micro_batches": self.state.skipped,
                "wall_seconds": round(time.perf_counter() - wall_start, 3),
                "generation_share": gen_total / step_total if step_total else math.nan, "peak_rss_mib": peak_rss_mib(),
                "final_train": {k: v for k, v in record.items() if isinstance(v, float)},
                "first_eval": first_eval, "final_eval": last_eval, "kl_coef": self.kl.value}


def total_ppo_steps(cfg, num_prompts: int) -> int:
    per_epoch = num_prompts // (cfg.per_device_generation_batch_size * get_world_size())
    if per_epoch == 0:
        raise UserError(f"--data_path {cfg.data_path}: {num_prompts} prompts cannot fill one generation batch of "
                        f"{cfg.per_device_generation_batch_size} x {get_world_size()} processes: lower "
                        "--per_device_generation_batch_size or add prompts")
    return cfg.max_steps or per_epoch * cfg.num_train_epochs


def run_ppo(cfg, run_dir: Path, precision: Precision) -> dict[str, Any]:
    """Load data and models, train, export final/ (actor), final_ema/ and critic/, mark done."""
    from utils.config import save_config
    from utils.step import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer_path or cfg.actor_model_name_or_path, "--tokenizer_path")
    prompts = encode_prompts(tokenizer, load_prompts(cfg.data_path, "train"), cfg.max_prompt_seq_len,
                             f"--data_path {cfg.data_path}", cfg.long_inputs)
    evals = (encode_prompts(tokenizer, load_prompts(cfg.eval_prompts, "train"), cfg.max_prompt_seq_len,
                            f"--eval_prompts {cfg.eval_prompts}", cfg.long_inputs) if cfg.eval_prompts else [])
    total_steps = total_ppo_steps(cfg, len(prompts))
    minis = cfg.per_device_generation_batch_size // (cfg.per_device_training_batch_size * cfg.gradient_accumulation_steps)
    total_updates = total_steps * cfg.ppo_epochs * minis
    ptx = (PretrainMix(cfg.ptx_data, cfg.max_prompt_seq_len + cfg.max_answer_seq_len,
                       cfg.per_device_training_batch_size, cfg.seed) if cfg.ptx_data else None)
    engines = build_engines(cfg, tokenizer, precision, total_updates)
    save_config(cfg, run_dir / "config.json", extra={
        "world_size": get_world_size(), "precision": precision.name, "parameters": engines.parameters,
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
    if is_rank0():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    write_done(run_dir, cfg, summary)
    return summary
