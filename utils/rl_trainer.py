"""The RL machinery step 3's on-policy paths share (PPO and the group-relative family): prompts, sampling
through the generation switch, the experience batch, the mini-batch update loop with its loss
normalisation and NaN guard, samples.jsonl, checkpoints with exact resume, and the run loop with its
eval/save/log cadence. An algorithm subclasses `RLTrainer` and supplies what differs: how a batch of
experience is made and scored, the loss of one mini-batch, the held-out evaluation and the metrics.

Layout of experience tensors: prompts left-padded to width P, replies right-padded to width R, one row
input_ids (B, P + R); response token j sits at position P + j and is scored from position P + j - 1.
Every forward passes position_ids counted over the attention mask, so left padding does not shift RoPE
positions (generate counts them the same way, which the log-prob alignment test checks).

Loss normalisation (as in utils.trainer): before an optimizer step the loop counts the loss units of all
micro-batches of the global mini-batch on all ranks (U); each micro-batch backpropagates its loss sum
times GAS * world / U, so 1 process and several, and 8x1 and 1x8 with accumulation, give one gradient.
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
from utils.checkpoint import CheckpointManager
from utils.data import MicroBatchPlan, check_lengths, sharded_eval_batches
from utils.dist import Precision, all_reduce_max, all_reduce_sum, get_rank, get_world_size, is_rank0
from utils.engine import init_engine
from utils.errors import UserError
from utils.generation import SamplingConfig, left_pad, stop_token_ids
from utils.hybrid import GenerationSwitch, hybrid_engine_section, hybrid_engine_supported
from utils.log import MetricsLogger, peak_gpu_mib, peak_rss_mib, progress
from utils.model import count_parameters, load_causal_lm
from utils.rewards import Replies, RewardFunction
from utils.rl import degeneration, entropy_from_logits, token_logprobs
from utils.step import prepare_model
from utils.tokenizer import load_tokenizer_dir
from utils.trainer import LoopState, MicroBatchStream

log = logging.getLogger(__name__)

SAMPLES = "samples.jsonl"


# ----------------------------------------------------------------------------------------------------
# Experience


@dataclass
class Experience:
    """A batch of sampled replies and what an algorithm derives from it (layout in the module docstring)."""

    prompt_width: int
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor  # (B, P + R)
    mask: torch.Tensor  # (B, R) float, 1 on reply tokens (end marker included)
    logprobs: torch.Tensor | None  # (B, R) actor, at sampling time (None: not needed, see GRPO)
    entropy: torch.Tensor | None  # (B, R)
    ref_logprobs: torch.Tensor | None = None  # (B, R) frozen reference (None without one)
    scores: torch.Tensor | None = None  # (B,) reward of each reply
    shaping: torch.Tensor | None = None  # (B,) rule rewards added to the clipped score (PPO's --shaping_funcs)
    advantages: torch.Tensor | None = None  # (B, R)
    values: torch.Tensor | None = None  # (B, R) critic (PPO)
    rewards: torch.Tensor | None = None  # (B, R) per-token rewards (PPO)
    returns: torch.Tensor | None = None  # (B, R) (PPO)

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

    def select(self, keep: torch.Tensor) -> Experience:
        """The rows where the bool (B,) `keep` is true."""
        cut = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{k: v[keep] if isinstance(v, torch.Tensor) else v for k, v in cut.items()})


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


def reply_logits(model, exp: Experience) -> torch.Tensor:
    """(B, R, V) logits that score each reply token (from the position before it)."""
    width = exp.actions.shape[1]
    logits = model(**exp.model_inputs(), use_cache=False, logits_to_keep=width + 1).logits
    return logits[:, :-1]


# ----------------------------------------------------------------------------------------------------
# Engines and prompts


def build_actor(cfg, tokenizer, precision: Precision, total_updates: int,
                ) -> tuple[Any, GenerationSwitch, dict[str, int]]:
    """The actor as a trained engine (its ZeRO stage, LoRA, schedule: cfg.role("actor")), the generation
    switch on it (DeepSpeed's Hybrid Engine where it runs, else our own path) and its parameter counts."""
    role = cfg.role("actor")
    model = prepare_model(load_causal_lm(cfg.actor_model_name_or_path), role, tokenizer)
    limit = model.config.max_position_embeddings
    if cfg.max_prompt_seq_len + cfg.max_answer_seq_len > limit:
        raise UserError(f"--max_prompt_seq_len {cfg.max_prompt_seq_len} + --max_answer_seq_len "
                        f"{cfg.max_answer_seq_len} exceeds the actor's {limit} positions: lower them")
    use_he, why = hybrid_engine_supported(model, cfg.enable_hybrid_engine)
    section = hybrid_engine_section(cfg.max_prompt_seq_len + cfg.max_answer_seq_len) if use_he else None
    counts = {"actor": count_parameters(model), "actor_trainable": count_parameters(model, trainable_only=True)}
    actor = init_engine(model, role, precision, total_updates, hybrid_engine=section)
    switch = GenerationSwitch(actor, tokenizer, cfg.actor_zero_stage, use_he, cfg.lora_scale("actor"))
    log.info("generation path: %s (%s)", switch.path, why)
    return actor, switch, counts


def check_same_tokenizer(tokenizer, other_dir: str, what: str, flag: str) -> None:
    """The actor and a reward model must read the same ids (both trained with one tokenizer)."""
    if not (Path(other_dir) / "tokenizer_config.json").is_file():
        return
    other = load_tokenizer_dir(other_dir, flag)
    if other.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{other_dir}: the {what}'s tokenizer differs from the actor's: train both from the same "
                        "tokenizer (step0's or the base model's)")


def encode_prompts(tokenizer, prompts: list[str], max_len: int, where: str, long_inputs: str = "truncate",
                   extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Chat-template ids of each prompt (with the assistant header), its row number, which seeds its
    sampling, and its entry of `extra` (the data row, for reward functions). Prompts longer than max_len are
    left out (a prompt cut at the start would be a different question), or are a UserError with
    `long_inputs` "reject"."""
    rows = [{"prompt_ids": prompt_ids(tokenizer, [{"role": "user", "content": p}]),
             "data": extra[i] if extra else None} for i, p in enumerate(prompts)]
    check_lengths([len(r["prompt_ids"]) for r in rows], max_len, long_inputs, where, "--max_prompt_seq_len",
                  action="left out")
    kept = [{**r, "row": i} for i, r in enumerate(r for r in rows if len(r["prompt_ids"]) <= max_len)]
    if not kept:
        raise UserError(f"{where}: every prompt is longer than --max_prompt_seq_len {max_len}: raise it")
    return kept


@dataclass
class PromptCollator:
    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = left_pad([r["prompt_ids"] for r in rows], self.pad_token_id, "cpu")
        return {"input_ids": ids, "attention_mask": mask, "row_ids": torch.tensor([r["row"] for r in rows])}


def row_seeds(seed: int, key: int, row_ids: torch.Tensor, group_size: int = 1) -> tuple[int, ...]:
    """One sampling seed per reply, from the run's seed, a key (the RL step; 0 for evaluation), the prompt's
    row and (with groups) the sample's index in its group: the same prompt at the same step samples the
    same replies on any rank at any world size."""
    def one(*entropy: int) -> int:
        return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    if group_size == 1:
        return tuple(one(seed, key, row) for row in row_ids.tolist())
    return tuple(one(seed, key, row, j) for row in row_ids.tolist() for j in range(group_size))


def total_rl_steps(cfg, num_prompts: int) -> int:
    """RL steps of a run: --max_steps, or --num_train_epochs passes over the prompts in generation batches."""
    per_epoch = num_prompts // (cfg.per_device_generation_batch_size * get_world_size())
    if per_epoch == 0:
        raise UserError(f"--data_path {cfg.data_path}: {num_prompts} prompts cannot fill one generation batch of "
                        f"{cfg.per_device_generation_batch_size} x {get_world_size()} processes: lower "
                        "--per_device_generation_batch_size or add prompts")
    return cfg.max_steps or per_epoch * cfg.num_train_epochs


def global_mean(total: float, count: float) -> float:
    count = all_reduce_sum(count)
    return all_reduce_sum(total) / count if count else math.nan


def global_std(values: torch.Tensor) -> float:
    """Standard deviation (population) of `values` over all ranks."""
    stats = torch.tensor([values.sum().item(), (values.double() ** 2).sum().item(), values.numel()],
                         dtype=torch.float64)
    if get_world_size() > 1:
        torch.distributed.all_reduce(stats)
    total, total_sq, n = stats.tolist()
    mean = total / max(n, 1)
    return math.sqrt(max(total_sq / max(n, 1) - mean * mean, 0.0))


# ----------------------------------------------------------------------------------------------------
# The trainer


class RLTrainer:
    """The loop every on-policy algorithm runs. Subclasses implement `train_step` (experience + `update`),
    `loss_units` and `train_micro_batch` (one mini-batch's backward passes), `evaluate`, and optionally
    `extra_state` / `load_extra_state` / `extra_tensors` for their checkpoints."""

    name = "rl"
    postfix: dict[str, str] = {}  # progress-bar label -> metric key

    def __init__(self, cfg, run_dir: Path, actor, switch: GenerationSwitch, tokenizer, prompts: list[dict],
                 evals: list[dict], precision: Precision, total_steps: int):
        self.cfg, self.run_dir, self.actor, self.switch, self.tokenizer = cfg, run_dir, actor, switch, tokenizer
        self.prompts, self.evals, self.precision, self.total_steps = prompts, evals, precision, total_steps
        self.collate = PromptCollator(tokenizer.pad_token_id)
        self.stops = stop_token_ids(tokenizer)
        self.device = actor.device
        self.state = LoopState()
        self.evals_seen: dict[str, dict[str, float]] = {"first": {}, "passed": {}}  # before training; the last within limits
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

    # -- experience -----------------------------------------------------------------------------------

    def sampling(self, seeds: tuple[int, ...], greedy: bool = False) -> SamplingConfig:
        cfg = self.cfg
        return SamplingConfig(cfg.max_answer_seq_len, 0.0 if greedy else cfg.temperature, cfg.top_k, cfg.top_p, 1.0,
                              row_seeds=seeds)

    @torch.no_grad()
    def sample(self, batch: dict[str, torch.Tensor], key: int, group_size: int = 1, greedy: bool = False,
               score: bool = True) -> Experience:
        """Sample `group_size` replies per prompt (seeded per prompt row, sample and `key`) and, with `score`,
        the actor's log-probs and entropies of them (else both are None); rows g*G .. g*G + G - 1 answer
        prompt g."""
        prompts, prompt_mask = batch["input_ids"], batch["attention_mask"]
        seeds = row_seeds(self.cfg.seed, key, batch["row_ids"], group_size)
        with self.timed("generate"):
            sampled = self.switch.generate(prompts, prompt_mask, self.sampling(seeds, greedy), group_size)
        actions, mask = reply_mask(sampled, self.stops, self.tokenizer.pad_token_id)
        if group_size > 1:
            prompts, prompt_mask = prompts.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0)
        input_ids = torch.cat([prompts, actions], dim=1)
        attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
        exp = Experience(prompts.shape[1], input_ids, attention_mask, position_ids(attention_mask), mask, None, None)
        if not score:
            return exp
        t = self.cfg.temperature
        with self.precision.autocast_context(), self.timed("actor_forward"):
            self.actor.eval()
            logits = reply_logits(self.actor, exp)
            self.actor.train()
            exp.logprobs = token_logprobs(logits, actions, t) * mask
            exp.entropy = entropy_from_logits(logits, t) * mask
        return exp

    def reference_logprobs(self, reference, exp: Experience) -> torch.Tensor:
        with torch.no_grad(), self.precision.autocast_context(), self.timed("reference_forward"):
            return token_logprobs(reply_logits(reference, exp), exp.actions, self.cfg.temperature) * exp.mask

    def texts(self, exp: Experience) -> tuple[list[str], list[str]]:
        """(prompts, replies) of the experience as text (special tokens and the end marker dropped)."""
        prompts, replies = [], []
        for i in range(exp.input_ids.shape[0]):
            prompt = exp.input_ids[i, :exp.prompt_width][exp.attention_mask[i, :exp.prompt_width] > 0]
            prompts.append(self.tokenizer.decode(prompt.tolist(), skip_special_tokens=True))
            replies.append(self.tokenizer.decode(exp.actions[i][exp.mask[i] > 0].tolist(), skip_special_tokens=True))
        return prompts, replies

    def function_rewards(self, exp: Experience, rows: list[dict[str, Any]], funcs: list[RewardFunction],
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F) reward of each reply under each reward function (utils.rewards), and (B,) bool: the reply
        was cut at the length limit (it has no stop token). `rows` are the replies' data rows."""
        completions = self.texts(exp)[1]
        cut = ~torch.isin(exp.actions, torch.tensor(self.stops, device=exp.actions.device)).any(-1)
        replies = Replies([r["prompt"] for r in rows], completions, rows, lengths=exp.mask.sum(-1).long().tolist(),
                          truncated=cut.tolist(), model_inputs=exp.model_inputs())
        with self.timed("rewards"):
            values = torch.tensor([fn(replies) for fn in funcs], dtype=torch.float32)
        return values.T.reshape(len(rows), len(funcs)), cut

    # -- update ---------------------------------------------------------------------------------------

    def loss_units(self, mb: Experience) -> float:
        """Loss units of a micro-batch (reply tokens unless the algorithm says otherwise)."""
        return mb.mask.sum().item()

    def train_micro_batch(self, mb: Experience, units: float, scale: float) -> dict[str, float]:
        """Forward, loss * scale and `backward_step` for each trained engine; returns stat sums (keys ending
        in _loss are divided by the loss units, the rest by the reply tokens)."""
        raise NotImplementedError

    def backward_step(self, engine, loss: torch.Tensor, what: str) -> bool:
        """Backward and step, unless the loss is NaN/inf on some rank (then skipped on all ranks)."""
        if all_reduce_max(0.0 if torch.isfinite(loss).item() else 1.0) > 0:
            self.state.bad_in_row += 1
            self.state.skipped += 1
            log.warning("non-finite %s loss at %s step %d: micro-batch skipped (%d in a row)", what, self.name,
                        self.state.step + 1, self.state.bad_in_row)
            if self.state.bad_in_row >= self.cfg.max_bad_steps:
                raise UserError(f"{what} loss was NaN/inf in {self.state.bad_in_row} micro-batches in a row at "
                                f"{self.name} step {self.state.step + 1}: lower the learning rates or train in "
                                "--dtype fp32")
            return False
        self.state.bad_in_row = 0
        engine.backward(loss)
        engine.step()
        return True

    def update(self, exp: Experience, max_approx_kl: float = 0.0) -> dict[str, float]:
        """--ppo_epochs passes over the experience in mini-batches of micro x GAS rows per process; a pass
        stops early once a mini-batch's approx KL per token passes `max_approx_kl` (0 = never)."""
        cfg, world = self.cfg, get_world_size()
        micro, gas = cfg.per_device_training_batch_size, cfg.gradient_accumulation_steps
        n_rows = exp.input_ids.shape[0]
        sums: dict[str, float] = {}
        steps, stopped, units_total, tokens_total = 0, False, 0.0, 0.0
        for _ in range(cfg.ppo_epochs):
            for first in range(0, n_rows, micro * gas):
                group = [exp.rows(s, s + micro) for s in range(first, first + micro * gas, micro)]
                units = all_reduce_sum(sum(self.loss_units(mb) for mb in group))
                tokens = all_reduce_sum(sum(mb.mask.sum().item() for mb in group))
                scale = gas * world / max(units, 1e-12)
                approx_kl = 0.0
                for mb in group:
                    stats = self.train_micro_batch(mb, units, scale)
                    approx_kl += stats.get("approx_kl", 0.0)
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + value
                units_total += units
                tokens_total += tokens
                steps += 1
                if max_approx_kl and all_reduce_sum(approx_kl) / max(tokens, 1.0) > max_approx_kl:
                    stopped = True
                    break
            if stopped:
                break
        out = {k: all_reduce_sum(v) / max(units_total if k.endswith("_loss") else tokens_total, 1e-12)
               for k, v in sums.items()}
        out.update(optimizer_steps=steps, early_stopped=float(stopped))
        return out

    # -- the algorithm's part -------------------------------------------------------------------------

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], Experience]:
        """One RL step on a batch of prompts: (metrics record, the experience for samples.jsonl)."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (eval_* keys); {} without held-out prompts."""
        raise NotImplementedError

    def sample_fields(self, exp: Experience) -> dict[str, list]:
        """Per-row values written beside prompt and response in samples.jsonl."""
        return {}

    def engines(self) -> dict[str, Any]:
        return {"actor": self.actor}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any], path: Path) -> None:
        """Restore what `extra_state` (and extra tensors) saved in checkpoint `path`."""

    def extra_tensors(self) -> dict[str, torch.Tensor] | None:
        return None

    def summary(self) -> dict[str, Any]:
        return {}

    def degeneration_limits(self) -> tuple[float, float]:
        """(max repeated-4-gram share, min length ratio to the first evaluation) of the held-out replies past
        which training stops and the last evaluation's weights that passed are exported; 0 = no limit."""
        return 0.0, 0.0

    def eval_batches(self):
        """The held-out prompts in rank-sharded batches: (batch, real) pairs (utils.data)."""
        return sharded_eval_batches(self.evals, self.collate, self.cfg.per_device_eval_batch_size,
                                    self.cfg.eval_batches, self.device)

    # -- samples and checkpoints ----------------------------------------------------------------------

    def write_samples(self, step: int, exp: Experience) -> None:
        extra = self.sample_fields(exp)
        if not is_rank0():
            return
        prompts, replies = self.texts(exp)
        with open(self.run_dir / SAMPLES, "a", encoding="utf-8") as f:
            for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
                row = {"step": step, "prompt": prompt, "response": reply}
                row.update({k: round(float(v[i]), 4) for k, v in extra.items()})
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def _truncate_samples(self, step: int) -> None:
        """Drop samples of steps after `step` (they run again after a resume; -1 on a fresh start)."""
        path = self.run_dir / SAMPLES
        if is_rank0() and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            keep = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")

    def save(self) -> None:
        self.checkpoints.save(self.engines(), self.state.step, {"loop": asdict(self.state), "evals": self.evals_seen,
                                                                **self.extra_state()}, self.extra_tensors())

    def load(self, path: Path) -> dict[str, Any]:
        state = self.checkpoints.load(self.engines(), path)
        self.evals_seen = state.get("evals", {"first": {}, "passed": {}})
        self.load_extra_state(state, path)
        return state

    def resume(self) -> bool:
        path = self.checkpoints.latest() if self.cfg.resume else None
        if path is None:
            return False
        self.state = LoopState(**self.load(path)["loop"])
        log.info("resumed from %s (%s step %d)", path, self.name, self.state.step)
        return True

    def stop_degenerated(self, step: int, evaluation: dict[str, float]) -> dict[str, Any] | None:
        """None while the held-out replies stay within `degeneration_limits`; else the engines go back to the
        latest checkpoint (saved at the last evaluation that passed) and the stop is described."""
        why = degeneration(evaluation, self.evals_seen["first"], *self.degeneration_limits())
        if not why:
            self.evals_seen["passed"] = evaluation
            return None
        back = self.load(self.checkpoints.latest())["loop"]["step"]
        log.warning("step %d: the held-out replies degenerated (%s): training stops, and the weights of step %d, the "
                    "last evaluation within the limits, are exported", step, why, back)
        return {"step": step, "reason": why, "exported_step": back, "eval": evaluation}

    # -- the loop -------------------------------------------------------------------------------------

    def run_step(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], Experience]:
        """`train_step` with its throughput, generation share and time breakdown (time_* keys) added."""
        t0, g0 = time.perf_counter(), self.switch.seconds
        self.clock.clear()
        record, exp = self.train_step(batch)
        dt = time.perf_counter() - t0
        record.update(tok_per_s=record["tokens"] / dt, gen_share=(self.switch.seconds - g0) / dt, step_seconds=dt,
                      **{f"time_{part}": seconds for part, seconds in self.clock.items()})
        return record, exp

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self.resume()
        metrics = MetricsLogger(self.run_dir, cfg.enable_tensorboard, resume_step=self.state.step if resumed else None)
        self._truncate_samples(self.state.step if resumed else -1)
        stream = MicroBatchStream(self.prompts, self.collate, self.plan, self.state, self.device)
        bar = progress(self.total_steps, self.state.step, desc=self.name)
        record: dict[str, Any] = {}
        stopped: dict[str, Any] | None = None
        wall_start, gen_total, step_total = time.perf_counter(), 0.0, 0.0
        guarded = bool(self.evals) and cfg.eval_interval > 0 and any(self.degeneration_limits())
        if not resumed and cfg.eval_interval:
            self.evals_seen = {"first": self.evaluate()}
            self.evals_seen["passed"] = self.evals_seen["first"]
            metrics.log({"step": 0, "kind": "eval", **self.evals_seen["first"]})
            if guarded:  # the weights to go back to if the first evaluation after training fails
                self.save()
        last_eval = self.evals_seen["passed"]
        while self.state.step < self.total_steps:
            record, exp = self.run_step(next(stream))
            self.state.step += 1
            self.state.tokens += int(record["tokens"])
            step = self.state.step
            step_total += record["step_seconds"]
            gen_total += record["gen_share"] * record["step_seconds"]
            record.update(step=step, kind="train", epoch=self.state.epoch, skipped=self.state.skipped)
            if step % cfg.log_interval == 0 or step == self.total_steps:
                metrics.log(record)
            if cfg.samples_interval and (step % cfg.samples_interval == 0 or step == 1):
                self.write_samples(step, exp)
            bar.update(1)
            bar.set_postfix({label: f"{record[key]:.3f}" for label, key in self.postfix.items()})
            evaluated = (cfg.eval_interval and step % cfg.eval_interval == 0) or step == self.total_steps
            if evaluated:
                last_eval = self.evaluate()
                if last_eval:
                    metrics.log({"step": step, "kind": "eval", **last_eval})
                    log.info("step %d eval: %s", step, json.dumps({k: round(v, 4) for k, v in last_eval.items()}))
                if guarded and (stopped := self.stop_degenerated(step, last_eval)):
                    last_eval = self.evals_seen["passed"]
                    break
            if (cfg.save_interval and step % cfg.save_interval == 0) or step == self.total_steps or (guarded and evaluated):
                self.save()
        bar.close()
        metrics.close()
        return {"steps": self.state.step, "tokens": self.state.tokens, "skipped_micro_batches": self.state.skipped,
                "wall_seconds": round(time.perf_counter() - wall_start, 3),
                "generation_share": gen_total / step_total if step_total else math.nan, "peak_rss_mib": peak_rss_mib(),
                "peak_gpu_mib": peak_gpu_mib(), "final_train": {k: v for k, v in record.items() if isinstance(v, float)},
                "first_eval": self.evals_seen["first"], "final_eval": last_eval, "stopped_degenerated": stopped,
                **self.summary()}
