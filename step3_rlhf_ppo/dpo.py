"""Step 3, the DPO path: train the SFT model directly on preference pairs, no reward model.

Launch (from the repo root or from inside step3_rlhf_ppo/ as `dpo.py`):
    deepspeed --num_gpus 1 step3_rlhf_ppo/dpo.py --model_name_or_path OUT/step1_sft/final \
        --data_path OUT/data/preference --eval_pairs OUT/data/eval/preference.jsonl --output_dir OUT/step3_dpo
    python step3_rlhf_ppo/dpo.py ...           (one process, no launcher)
    bash training_scripts/step3_dpo.sh          (trains, then compares with SFT under the step 2 reward model)

Each pair is rendered as two conversations with the tokenizer's chat template (user: prompt, assistant: chosen /
rejected); the policy scores both in one forward and sums log-probs over the reply tokens only (prompt,
template and padding masked, utils.chat). By default (--share_prompt) the pair is one row, prompt + chosen + rejected, with
position ids and a block mask that give each reply exactly the logits of its own conversation, so the
prompt is computed once (SharedPromptCollator); --share_prompt false uses two padded rows per pair. --loss_type picks DPO (beta), cDPO (--label_smoothing), IPO or SimPO (--simpo_gamma,
reference-free, length-normalised); the equations are in utils.losses. --rpo_alpha adds the chosen
reply's per-token NLL to any of them (RPO), which keeps DPO's replies fluent. The reference is the SFT model:
with --precompute_ref_logps (default) its log-probs are computed once before training and stored in
OUTPUT/ref_logps.safetensors (reused on resume); otherwise a frozen reference engine scores every batch
(--offload_reference_model puts its weights in CPU memory under ZeRO-3).
Metrics: loss, rewards/chosen, rewards/rejected, accuracy, margin, nll_chosen, logps of chosen and rejected (a warning
when both fall, a known DPO failure), on train and held-out pairs. Checkpoints, resume and the HF export
are the shared ones (utils.trainer, utils.checkpoint).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from utils.chat import PaddedCollator, render_chat
from utils.config import TrainConfig, option, require
from utils.data import check_lengths, sharded_eval_batches
from utils.dist import barrier, get_device, get_rank, get_world_size, is_rank0
from utils.engine import frozen_engine
from utils.errors import UserError, main_guard
from utils.log import read_metrics
from utils.losses import IGNORE_INDEX, preference_loss, sequence_logps
from utils.model import load_causal_lm
from utils.preference import Pair, load_pairs
from utils.step import load_tokenizer, prepare_model, start, train_and_export
from utils.trainer import LossOutput

log = logging.getLogger("dpo")

LOSS_TYPES = ("dpo", "cdpo", "ipo", "simpo")
REF_FILE = "ref_logps.safetensors"


@dataclass
class DPOConfig(TrainConfig):
    """Step 3 DPO path: direct preference optimisation of the SFT model (DeepSpeed ZeRO)."""

    eval_pairs: str = option("", "Extra held-out pairs (JSONL) evaluated at every evaluation.")
    loss_type: str = option("dpo", "Preference loss.", choices=LOSS_TYPES)
    beta: float = option(0.1, "Strength of the KL regularisation to the reference (inverse temperature).")
    label_smoothing: float = option(0.1, "cDPO: probability that a preference label is flipped.")
    simpo_gamma: float = option(0.5, "SimPO: target reward margin gamma.")
    rpo_alpha: float = option(0.0, "Weight of an NLL term on the chosen reply (per-token mean), added to the "
                              "preference loss (RPO, Pang et al. 2024): keeps the chosen replies likely, against "
                              "the degeneration of plain DPO. 0 = off.")
    precompute_ref_logps: bool = option(True, "Score the reference once before training instead of every batch.")
    share_prompt: bool = option(True, "Score each pair in one row (prompt once, then both replies, a mask "
                                "keeping the replies apart) instead of two rows that both hold the prompt.")
    offload_reference_model: bool = option(False, "Keep the frozen reference engine's weights in CPU memory (ZeRO-3).")

    def validate(self) -> None:
        super().validate()
        require(bool(self.model_name_or_path), "model_name_or_path", self.model_name_or_path,
                "give the SFT export (OUT/step1_sft/final)")
        require(bool(self.data_path), "data_path", self.data_path, "give data_process's preference/ dir")
        require(self.beta > 0, "beta", self.beta, "must be > 0, e.g. 0.1")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "must be in [0, 0.5)")
        require(self.simpo_gamma >= 0, "simpo_gamma", self.simpo_gamma, "must be >= 0")
        require(self.rpo_alpha >= 0, "rpo_alpha", self.rpo_alpha, "must be >= 0, e.g. 0.2 (0 = off)")


def encode_pair(tokenizer, pair: Pair, max_len: int | None = None) -> dict:
    """Both conversations with reply-only labels (utils.chat.render_chat). Too long: the start is cut
    (the prompt's beginning), never the reply's end, so every pair keeps a reply to score."""
    def side(response: str) -> dict:
        row = render_chat(tokenizer, [{"role": "user", "content": pair.prompt},
                                      {"role": "assistant", "content": response}])
        return {k: v[-max_len:] for k, v in row.items()} if max_len else row
    return {"chosen": side(pair.chosen), "rejected": side(pair.rejected)}


def encode_dpo_pairs(tokenizer, pairs: list[Pair], cfg: DPOConfig, where: str) -> list[dict]:
    """encode_pair for every pair, after the --long_inputs check of the pairs longer than --max_seq_len."""
    rows = [encode_pair(tokenizer, p) for p in pairs]
    lengths = [max(len(r["chosen"]["input_ids"]), len(r["rejected"]["input_ids"])) for r in rows]
    check_lengths(lengths, cfg.max_seq_len, cfg.long_inputs, where, action="cut at the start of the prompt")
    return [{side: {k: v[-cfg.max_seq_len:] for k, v in r[side].items()} for side in r} for r in rows]


class DPOCollator:
    """Batch layout: input_ids / attention_mask / labels (2P, T), the P chosen rows then the P rejected rows,
    right-padded; ref_chosen / ref_rejected (P,) when the rows carry precomputed reference log-probs."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = PaddedCollator(self.pad_token_id)([r["chosen"] for r in rows] + [r["rejected"] for r in rows])
        return _with_reference(batch, rows)

    @staticmethod
    def length(row: dict) -> int:
        """The padded width this row asks of its batch (Trainer's grouping by length)."""
        return max(len(row["chosen"]["input_ids"]), len(row["rejected"]["input_ids"]))


def _with_reference(batch: dict[str, torch.Tensor], rows: list[dict]) -> dict[str, torch.Tensor]:
    if "ref_chosen" in rows[0]:
        batch["ref_chosen"] = torch.tensor([r["ref_chosen"] for r in rows], dtype=torch.float64)
        batch["ref_rejected"] = torch.tensor([r["ref_rejected"] for r in rows], dtype=torch.float64)
    return batch


def shared_prefix(chosen: dict, rejected: dict) -> int:
    """Length of the common start of both rows that carries no label: the prompt and assistant header."""
    n = 0
    for a, b, la, lb in zip(chosen["input_ids"], rejected["input_ids"], chosen["labels"], rejected["labels"],
                              strict=False):  # stops at the shorter row
        if a != b or la != IGNORE_INDEX or lb != IGNORE_INDEX:
            break
        n += 1
    return n


class SharedPromptCollator:
    """Batch layout with the prompt computed once per pair: row p is prompt + chosen reply + rejected reply
    (right-padded to T). position_ids restart the rejected reply at the prompt's end; attention_mask is a
    (P, 1, T, T) boolean mask (True = may attend) in which reply tokens see the prompt and their own reply
    only, so each reply's logits equal those of its own conversation. score_from / score_labels (P, 2, S):
    the position whose logits predict each reply token of the chosen (0) and rejected (1) side, and that
    token (-100 on padding); the first rejected token is predicted from the prompt's last position.
    token_mask (P, T) marks real tokens."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    @staticmethod
    def length(row: dict) -> int:
        """The padded width this row asks of its batch (Trainer's grouping by length)."""
        chosen, rejected = row["chosen"], row["rejected"]
        return len(chosen["input_ids"]) + len(rejected["input_ids"]) - shared_prefix(chosen, rejected)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs, positions, segments, sources, targets = [], [], [], [], []
        for row in rows:
            chosen, rejected = row["chosen"], row["rejected"]
            n = shared_prefix(chosen, rejected)  # 0 when the cuts of a too-long prompt differ: then nothing shared
            nc, nr = len(chosen["input_ids"]), len(rejected["input_ids"])
            seqs.append(chosen["input_ids"] + rejected["input_ids"][n:])
            positions.append(list(range(nc)) + list(range(n, nr)))
            segments.append([0] * n + [1] * (nc - n) + [2] * (nr - n))
            # token k of a side is predicted from the position holding its predecessor
            at = {k: k for k in range(nc)}, {k: (k if k < n else nc + k - n) for k in range(nr)}
            side_sources, side_targets = [], []
            for part, where in ((chosen, at[0]), (rejected, at[1])):
                keep = [k for k in range(1, len(part["labels"])) if part["labels"][k] != IGNORE_INDEX]
                side_sources.append([where[k - 1] for k in keep])
                side_targets.append([part["labels"][k] for k in keep])
            sources.append(side_sources)
            targets.append(side_targets)
        width = max(len(s) for s in seqs)
        scored = max(len(t) for pair in targets for t in pair)
        batch = len(rows)
        ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros((batch, width), dtype=torch.long)
        seg = torch.full((batch, width), -1, dtype=torch.long)  # -1: padding
        score_from = torch.zeros((batch, 2, scored), dtype=torch.long)
        score_labels = torch.full((batch, 2, scored), IGNORE_INDEX, dtype=torch.long)
        for b in range(batch):
            ids[b, :len(seqs[b])] = torch.tensor(seqs[b])
            pos[b, :len(seqs[b])] = torch.tensor(positions[b])
            seg[b, :len(seqs[b])] = torch.tensor(segments[b])
            for side in range(2):
                k = len(targets[b][side])
                score_from[b, side, :k] = torch.tensor(sources[b][side], dtype=torch.long)
                score_labels[b, side, :k] = torch.tensor(targets[b][side], dtype=torch.long)
        q, kv = seg[:, :, None], seg[:, None, :]  # (P, T, 1) query, (P, 1, T) key segments
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = causal & (kv >= 0) & ((kv == 0) | (kv == q))
        mask |= torch.eye(width, dtype=torch.bool)  # padding queries see themselves: no empty softmax row
        return _with_reference({"input_ids": ids, "position_ids": pos, "attention_mask": mask[:, None],
                                "score_from": score_from, "score_labels": score_labels, "token_mask": seg >= 0},
                               rows)


def policy_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logps, rejected logps, chosen lengths, rejected lengths), each (P,), from one forward.

    Two-row layout (DPOCollator): only positions from the first one that predicts a reply token in any row
    get logits (transformers' logits_to_keep): the LM head and the softmax skip the common prompt part.
    Shared-prompt layout (SharedPromptCollator): the model gives logits at the score_from positions only
    (logits_to_keep as a (P, 2S) index; the prompt's last position twice, padding entries at position 0),
    and they score score_labels."""
    if "score_from" in batch:
        pairs, _, scored = batch["score_from"].shape
        labels = batch["score_labels"].view(pairs, 2 * scored)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False,  # (P, 2S, V): the head runs only there
                       logits_to_keep=batch["score_from"].view(pairs, 2 * scored)).logits
        token_logps = -F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="none").view(pairs, 2, scored)
        logps, lengths = token_logps.sum(-1), (batch["score_labels"] != IGNORE_INDEX).sum(-1)
        return logps[:, 0], logps[:, 1], lengths[:, 0], lengths[:, 1]
    labels = batch["labels"]
    scored = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    first = int(scored[0]) if len(scored) else labels.shape[1] - 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   logits_to_keep=labels.shape[1] - first).logits  # positions first .. T-1
    logps, lengths = sequence_logps(logits, labels[:, first:])  # (2P,)
    n = logps.shape[0] // 2
    return logps[:n], logps[n:], lengths[:n], lengths[n:]


@torch.no_grad()
def reference_logps(model, rows: list[dict], collate: DPOCollator | SharedPromptCollator, batch_size: int) -> torch.Tensor:
    """(N, 2) reference log-probs (chosen, rejected) of every row; ranks split the rows and share results."""
    world, rank = get_world_size(), get_rank()
    mine = list(range(rank, len(rows), world))
    out = torch.zeros(len(rows), 2, dtype=torch.float64)
    device = next(model.parameters()).device
    for first in range(0, len(mine), batch_size):
        idx = mine[first:first + batch_size]
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx]).items()}
        chosen, rejected, _, _ = policy_logps(model, batch)
        out[idx, 0], out[idx, 1] = chosen.double().cpu(), rejected.double().cpu()
    if world > 1:
        torch.distributed.all_reduce(out)
    return out


class DPOTask:
    """Loss units are pairs; the same metrics on train batches and on each held-out set."""

    def __init__(self, cfg: DPOConfig, eval_sets: dict[str, list], collate: DPOCollator | SharedPromptCollator, reference=None):
        self.cfg, self.eval_sets, self.collate, self.reference = cfg, eval_sets, collate, reference

    def units(self, batch) -> int:
        return int(batch["score_from"].shape[0] if "score_from" in batch else batch["input_ids"].shape[0] // 2)

    def tokens(self, batch) -> int:
        return int(batch["token_mask" if "token_mask" in batch else "attention_mask"].sum().item())

    def _compute(self, model, batch):
        chosen, rejected, chosen_len, rejected_len = policy_logps(model, batch)
        if "ref_chosen" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen"].to(chosen.dtype), batch["ref_rejected"].to(chosen.dtype)
        elif self.cfg.loss_type == "simpo":
            ref_chosen = ref_rejected = torch.zeros_like(chosen)
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected, _, _ = policy_logps(self.reference, batch)
        losses, r_chosen, r_rejected = preference_loss(
            self.cfg.loss_type, chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len,
            self.cfg.beta, self.cfg.label_smoothing, self.cfg.simpo_gamma)
        nll_chosen = -chosen / chosen_len.clamp(min=1)
        if self.cfg.rpo_alpha:
            losses = losses + self.cfg.rpo_alpha * nll_chosen
        metrics = {"nll_chosen": nll_chosen.detach().sum().item(),"rewards_chosen": r_chosen.sum().item(), "rewards_rejected": r_rejected.sum().item(),
                   "accuracy": (r_chosen > r_rejected).sum().item(),
                   "margin": (r_chosen - r_rejected).sum().item(),
                   "logps_chosen": chosen.detach().sum().item(), "logps_rejected": rejected.detach().sum().item()}
        return losses, metrics

    def loss(self, model, batch) -> LossOutput:
        losses, metrics = self._compute(model, batch)
        return LossOutput(losses.sum(), metrics)

    def evaluate(self, model, step: int) -> dict[str, float]:
        device = next(model.parameters()).device
        result: dict[str, float] = {}
        for name, rows in self.eval_sets.items():
            sums: dict[str, float] = {}
            for batch, real in sharded_eval_batches(rows, self.collate, self.cfg.per_device_eval_batch_size,
                                                    self.cfg.eval_batches, device):
                losses, metrics = self._compute(model, batch)
                if real:
                    metrics = {"loss": losses.sum().item(), "pairs": float(losses.shape[0]), **metrics}
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + v
            keys = sorted(sums)
            totals = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64)
            if get_world_size() > 1:
                torch.distributed.all_reduce(totals)
            totals_by_key = dict(zip(keys, totals.tolist(), strict=True))
            n = max(totals_by_key.pop("pairs", 0.0), 1.0)
            prefix = "" if name == "validation" else f"{name}/"
            result.update({f"{prefix}{k}": v / n for k, v in totals_by_key.items()})
        return result


def warn_if_both_logps_fall(run_dir: Path) -> None:
    """Both chosen and rejected log-probs falling since the first evaluation is a known DPO failure mode
    (probability mass moves to responses outside the data)."""
    evals = [r for r in read_metrics(run_dir, "eval") if "logps_chosen" in r]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        if last["logps_chosen"] < first["logps_chosen"] and last["logps_rejected"] < first["logps_rejected"]:
            log.warning("held-out log-probs of both chosen (%.2f -> %.2f) and rejected (%.2f -> %.2f) replies "
                        "fell: the policy is moving mass away from both; consider a larger --beta or fewer steps",
                        first["logps_chosen"], last["logps_chosen"], first["logps_rejected"], last["logps_rejected"])


def attach_reference(cfg: DPOConfig, run_dir: Path, train: list[dict], evals: dict[str, list],
                     collate: DPOCollator | SharedPromptCollator, precision):
    """Precomputed reference log-probs written into the rows (returns None), or a frozen reference engine."""
    if cfg.loss_type == "simpo":
        return None
    if not cfg.precompute_ref_logps:
        return frozen_engine(load_causal_lm(cfg.model_name_or_path), cfg.per_device_train_batch_size,
                             cfg.zero_stage, cfg.offload_reference_model, precision)
    path = run_dir / REF_FILE
    sets = {"train": train, **evals}
    if path.is_file():
        stored = load_file(str(path))
    else:
        reference = load_causal_lm(cfg.model_name_or_path).eval().to(get_device())
        stored = {}
        with precision.autocast_context():
            for name, rows in sets.items():
                stored[name] = reference_logps(reference, rows, collate, cfg.per_device_eval_batch_size)
        if is_rank0():
            save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
        barrier()
    for name, rows in sets.items():
        if stored[name].shape[0] != len(rows):
            raise UserError(f"{path}: holds reference log-probs for {stored[name].shape[0]} {name} pairs, the data "
                            f"has {len(rows)}: delete the file (or use a new --output_dir) after changing the data")
        for row, (c, r) in zip(rows, stored[name].tolist(), strict=True):
            row["ref_chosen"], row["ref_rejected"] = c, r
    return None


@main_guard
def main(argv: list[str] | None = None) -> dict:
    cfg, run_dir, precision, finished = start(DPOConfig, argv, "step3_rlhf_ppo/dpo.py")
    if finished is not None:
        return finished
    tokenizer = load_tokenizer(cfg)
    train = encode_dpo_pairs(tokenizer, load_pairs(cfg.data_path, "train"), cfg, f"--data_path {cfg.data_path} (train)")
    evals = {"validation": encode_dpo_pairs(tokenizer, load_pairs(cfg.data_path, "validation", required=False), cfg,
                                        f"--data_path {cfg.data_path} (validation)")}
    if cfg.eval_pairs:
        evals["eval"] = encode_dpo_pairs(tokenizer, load_pairs(cfg.eval_pairs, "train"), cfg, f"--eval_pairs {cfg.eval_pairs}")
    evals = {name: rows for name, rows in evals.items() if rows}
    collate = (SharedPromptCollator if cfg.share_prompt else DPOCollator)(tokenizer.pad_token_id)
    reference = attach_reference(cfg, run_dir, train, evals, collate, precision)
    model = prepare_model(load_causal_lm(cfg.model_name_or_path), cfg, tokenizer)
    summary = train_and_export(cfg, run_dir, model, tokenizer, train, collate, DPOTask(cfg, evals, collate, reference),
                               precision, f"DPO ({cfg.loss_type})", extra={"step": "dpo"})
    warn_if_both_logps_fall(run_dir)
    return summary


if __name__ == "__main__":
    main()
