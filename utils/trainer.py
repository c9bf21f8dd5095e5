"""The one training loop (pretraining, SFT and the reward model all run it).

A step plugs in a `TrainTask`: how many loss units a micro-batch holds (label tokens, pairs), the loss
*sum* of a micro-batch, and a held-out evaluation. The loop owns everything else: the data order
(utils.data.MicroBatchPlan), gradient accumulation through the DeepSpeed engine, NaN/inf guarding,
periodic evaluation and checkpoints, metrics (loss, lr, grad norm, tok/s, MFU), exact resume.

Loss normalisation: before an optimizer step, the loop counts the units of all its micro-batches on all
ranks (U). Each micro-batch backpropagates loss_sum * (GAS * world / U); DeepSpeed divides by GAS and
averages over ranks, so the gradient is that of sum(all losses) / U: the mean over every unit of the
global batch, however it is split across ranks and accumulation steps (8x1 == 1x8 with GAS == 2x4).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from utils.checkpoint import CheckpointManager
from utils.data import MicroBatchPlan
from utils.dist import Precision, all_reduce_max, all_reduce_sum, get_rank, get_world_size
from utils.errors import UserError
from utils.log import MetricsLogger, peak_gpu_mib, peak_rss_mib, progress

log = logging.getLogger(__name__)


@dataclass
class LossOutput:
    """What a task's loss returns for one micro-batch."""

    loss_sum: torch.Tensor  # scalar with grad: sum of per-unit losses (0, not NaN, when it has no units)
    metrics: dict[str, float] = field(default_factory=dict)  # extra per-micro-batch sums, averaged by units


class TrainTask(Protocol):
    """The part of training that differs between steps."""

    def units(self, batch: dict[str, torch.Tensor]) -> float:
        """Number of loss units in the micro-batch (label tokens for LM losses, pairs for the RM; the sum
        of the loss weights when an LM batch carries them)."""

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens processed (for tokens/s and MFU)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Forward pass and loss sum of one micro-batch."""

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Held-out metrics after `step` optimizer steps (0: the starting model); called on every rank in
        eval mode under no_grad, results from rank 0 logged."""


@dataclass
class LoopState:
    """Everything besides weights/optimizer that exact resume needs (saved as JSON in checkpoints)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    cursor: int = 0  # micro-batches of `epoch` already consumed
    bad_in_row: int = 0  # consecutive micro-batches with NaN/inf loss
    skipped: int = 0  # micro-batches skipped for NaN/inf loss in total
    tokens: int = 0  # tokens trained on, all ranks


class MicroBatchStream:
    """Micro-batches in plan order across epoch boundaries, remembering its position in `state`."""

    def __init__(self, dataset: Any, collate: Callable, plan: MicroBatchPlan, state: LoopState, device):
        self.dataset, self.collate, self.plan, self.state, self.device = dataset, collate, plan, state, device
        self._iter = self._generate()

    def _generate(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            for k, rows in self.plan.iterate(self.state.epoch, self.state.cursor):
                batch = self.collate([self.dataset[i] for i in rows])
                self.state.cursor = k + 1
                yield {key: value.to(self.device) for key, value in batch.items()}
            self.state.epoch += 1
            self.state.cursor = 0

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self._iter)


def _grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the gradients (before clipping)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


def length_groups(cfg: Any, dataset: Any, collate: Callable, block_rows: int) -> dict[str, Any]:
    """MicroBatchPlan's grouping by length (--group_by_length), for collators that pad to the longest row
    (they say how long a row is): chunks of 50 optimizer steps' rows (`block_rows` each), sorted by length,
    dealt out a step's rows at a time. Empty (plain shuffle) otherwise.

    A chunk never holds more than a quarter of the data: one holding all of it would be sorted into the
    same batches every epoch (on a few rows, batches of near-copies), so small sets are grouped in smaller
    chunks, and one a step's rows long is no grouping at all."""
    if not getattr(cfg, "group_by_length", False) or not hasattr(collate, "length"):
        return {}
    blocks = max(1, min(50, len(dataset) // (4 * block_rows)))
    return {"lengths": np.array([collate.length(row) for row in dataset]), "group_rows": blocks * block_rows,
            "block_rows": block_rows}


def steps_per_epoch(num_rows: int, micro_batch: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over `num_rows` rows (partial global batches are dropped)."""
    return num_rows // (micro_batch * world_size) // grad_accum


def total_train_steps(cfg: Any, num_rows: int) -> int:
    """--max_steps, or num_train_epochs passes; a UserError when the data cannot fill one global batch."""
    per_epoch = steps_per_epoch(num_rows, cfg.per_device_train_batch_size, get_world_size(),
                                cfg.gradient_accumulation_steps)
    if per_epoch == 0:
        global_batch = cfg.per_device_train_batch_size * get_world_size() * cfg.gradient_accumulation_steps
        raise UserError(f"--data_path {cfg.data_path}: {num_rows} training rows cannot fill one global batch "
                        f"of {global_batch}: lower --per_device_train_batch_size or "
                        "--gradient_accumulation_steps, or add data")
    return cfg.max_steps or max(1, round(per_epoch * cfg.num_train_epochs))


def measure_peak_flops(device: torch.device, trials: int = 5, seconds: float = 0.1) -> float:
    """A rough fp32 matmul peak (FLOP/s) of this device, for the MFU figure when --peak_tflops is not
    given: the best of a few short windows (another process taking CPU time only lowers a window)."""
    n = 1024
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (and exact resume) alone
    a = torch.randn(n, n, device=device, generator=gen)
    b = torch.randn(n, n, device=device, generator=gen)
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best


class Trainer:
    """Runs `task` on `engine` over `dataset` for `total_steps` optimizer steps, resuming if it can."""

    def __init__(self, cfg: Any, engine, dataset: Any, collate: Callable, task: TrainTask, *,
                 precision: Precision, total_steps: int, flops_per_token: float, run_dir: str | Path):
        self.cfg, self.engine, self.dataset, self.collate, self.task = cfg, engine, dataset, collate, task
        self.precision, self.total_steps, self.flops_per_token = precision, total_steps, flops_per_token
        self.run_dir = Path(run_dir)
        self.world = get_world_size()
        self.gas = cfg.gradient_accumulation_steps
        block = cfg.per_device_train_batch_size * self.world * self.gas  # rows per optimizer step
        self.plan = MicroBatchPlan(len(dataset), cfg.per_device_train_batch_size, self.world, get_rank(), cfg.seed,
                                   **length_groups(cfg, dataset, collate, block))
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.keep_last)
        self.state = LoopState()

    # -- pieces ---------------------------------------------------------------------------------------

    def _resume(self) -> bool:
        if not self.cfg.resume:
            return False
        path = self.checkpoints.latest()
        if path is None:
            return False
        self.state = LoopState(**self.checkpoints.load(self.engine, path))
        log.info("resumed from %s (step %d)", path, self.state.step)
        return True

    def _peak_flops(self) -> float:
        if self.cfg.peak_tflops > 0:
            return self.cfg.peak_tflops * 1e12
        return measure_peak_flops(self.engine.device)

    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        with torch.no_grad(), self.precision.autocast_context():
            result = self.task.evaluate(self.engine, self.state.step)
        self.engine.train()
        return result

    def _train_step(self, stream: MicroBatchStream) -> dict[str, float]:
        """One optimizer step: GAS accepted micro-batches, each backpropagated and stepped."""
        pending = [next(stream) for _ in range(self.gas)]
        units = all_reduce_sum(sum(self.task.units(b) for b in pending))
        scale = self.gas * self.world / units if units > 0 else 0.0
        loss_sum, tokens, sums, grad_norm = 0.0, 0, {}, None
        lr = self.engine.get_lr()[0]
        accepted = 0
        while accepted < self.gas:
            batch = pending.pop(0) if pending else next(stream)
            with self.precision.autocast_context():
                out = self.task.loss(self.engine, batch)
            # every rank must take the same branch, or the collectives in backward/step would hang
            if all_reduce_max(0.0 if torch.isfinite(out.loss_sum).item() else 1.0) > 0:
                self.state.bad_in_row += 1
                self.state.skipped += 1
                log.warning("non-finite loss at step %d: micro-batch skipped (%d in a row)",
                            self.state.step + 1, self.state.bad_in_row)
                if self.state.bad_in_row >= self.cfg.max_bad_steps:
                    raise UserError(f"loss was NaN/inf in {self.state.bad_in_row} micro-batches in a row at "
                                    f"optimizer step {self.state.step + 1}: lower --learning_rate, check the "
                                    "data, or train in --dtype fp32")
                continue
            self.state.bad_in_row = 0
            self.engine.backward(out.loss_sum * scale)
            if self.engine.is_gradient_accumulation_boundary() and self.engine.zero_optimization_stage() == 0:
                grad_norm = _grad_norm(self.engine.module)  # DeepSpeed tracks it only under ZeRO
            self.engine.step()
            accepted += 1
            loss_sum += out.loss_sum.item()
            tokens += self.task.tokens(batch)
            for key, value in out.metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        self.state.step += 1
        total_tokens = int(all_reduce_sum(tokens))
        self.state.tokens += total_tokens
        metrics = {"loss": all_reduce_sum(loss_sum) / max(units, 1), "lr": lr, "tokens": total_tokens}
        for key, value in sums.items():
            metrics[key] = all_reduce_sum(value) / max(units, 1)
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    def _save(self) -> None:
        self.checkpoints.save(self.engine, self.state.step, asdict(self.state))

    # -- the loop -------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to `total_steps`; returns the run's final figures (the step writes them with its done
        marker, utils.run.write_done)."""
        resumed = self._resume()
        metrics_log = MetricsLogger(self.run_dir, self.cfg.enable_tensorboard,
                                    resume_step=self.state.step if resumed else None)
        peak = self._peak_flops()
        stream = MicroBatchStream(self.dataset, self.collate, self.plan, self.state, self.engine.device)
        bar = progress(self.total_steps, self.state.step)
        self.engine.train()
        last_eval: dict[str, float] = {}
        train_time, start_tokens, wall_start = 0.0, self.state.tokens, time.perf_counter()
        record: dict[str, Any] = {}
        if not resumed and self.cfg.eval_interval:  # the baseline every later evaluation is compared with
            last_eval = self.evaluate()
            metrics_log.log({"step": 0, "kind": "eval", **last_eval})
        while self.state.step < self.total_steps:
            t0 = time.perf_counter()
            record = self._train_step(stream)
            dt = time.perf_counter() - t0
            train_time += dt
            step = self.state.step
            tok_s = record["tokens"] / dt
            record.update(step=step, kind="train", epoch=self.state.epoch, tok_per_s=tok_s,
                          mfu=tok_s * self.flops_per_token / (peak * self.world), skipped=self.state.skipped)
            if step % self.cfg.log_interval == 0 or step == self.total_steps:
                metrics_log.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:.0f}")
            if (self.cfg.eval_interval and step % self.cfg.eval_interval == 0) or step == self.total_steps:
                last_eval = self.evaluate()
                metrics_log.log({"step": step, "kind": "eval", **last_eval})
                log.info("step %d eval: %s", step, json.dumps({k: round(v, 4) for k, v in last_eval.items()
                                                                  if isinstance(v, float)}, ensure_ascii=False))
            if (self.cfg.save_interval and step % self.cfg.save_interval == 0) or step == self.total_steps:
                self._save()
        bar.close()
        metrics_log.close()
        trained_tokens = self.state.tokens - start_tokens
        summary = {
            "steps": self.state.step,
            "tokens": self.state.tokens,
            "skipped_micro_batches": self.state.skipped,
            "train_seconds": round(train_time, 3),
            "wall_seconds": round(time.perf_counter() - wall_start, 3),
            "tok_per_s": trained_tokens / train_time if train_time > 0 else math.nan,
            "peak_flops": peak,
            "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": peak_gpu_mib(),
            "final_train_loss": record.get("loss", math.nan),
            "final_eval": last_eval,
        }
        return summary
