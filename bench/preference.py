"""Benchmark suites of the preference steps against TRL (a bench-only dependency: `pip install -e .[bench]`).

  rm    reward-model training pairs/s: our step 2 (RewardTask through utils.trainer on a DeepSpeed ZeRO-0
        engine) against TRL's RewardTrainer, same tiny model, 8 pairs of 2 x 256 random tokens per step.
  dpo   DPO training pairs/s: our dpo.py task in its default layout (shared prompt: one row of prompt +
        chosen + rejected per pair) with the reference scored on the fly (a frozen DeepSpeed engine) and
        with precomputed reference log-probs, against TRL's DPOTrainer in both modes; 4 pairs of a 64-token
        prompt and 192-token chosen/rejected replies per step (TRL appends an end token to each reply: 193).

Both sides start from the same saved model, train in fp32 with torch AdamW, one micro-batch per optimizer
step; TRL runs through transformers' Trainer.training_step, as the train suite's Trainer baseline does.
Ours and TRL's windows alternate (bench.common.interleaved_windows) and each ratio is the median of the
per-round ratios, so drift of the machine between windows cancels.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bench.common import (
    bench_model,
    hf_args,
    hf_style_step_fn,
    interleaved_windows,
    our_loop_step_fn,
    paired_ratio,
)
from step2_reward_model.main import RewardTask, Step2Config
from step3_rlhf_ppo.dpo import DPOCollator, DPOConfig, DPOTask, SharedPromptCollator, attach_reference
from utils.dist import choose_precision
from utils.model import load_causal_lm
from utils.preference import PairCollator
from utils.reward import create_reward_model

PAD = 4  # outside the random ids (5..8191)
RM_PAIRS, RM_LEN = 8, 256
DPO_PAIRS, PROMPT, REPLY = 4, 64, 192


def _ids(n: int, length: int, seed: int) -> list[list[int]]:
    return torch.randint(5, 8192, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()


def _saved_tiny(root: Path) -> Path:
    """The tiny model saved as a causal-LM export (what step 2 and DPO start from)."""
    out = root / "tiny"
    bench_model().save_pretrained(out)
    return out


def word_tokenizer():
    """A tokenizer whose words "w0".."w8191" are the ids 0..8191, so that text built from random ids
    tokenises back to exactly those ids (TRL's DPOTrainer takes text only); pad "w4", eos "w1"."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(8192)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1", pad_token="w4")


def as_text(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


# ----------------------------------------------------------------------------------------------------
# Reward model


def rm_rows(n: int = 64) -> list[dict]:
    chosen, rejected = _ids(n, RM_LEN, 1), _ids(n, RM_LEN, 2)
    return [{"chosen": c, "rejected": r, "margin": 0.0, "kind": 0} for c, r in zip(chosen, rejected, strict=True)]


def our_rm_step_fn(root: Path) -> Callable[[], float]:
    cfg = Step2Config(output_dir=str(root / "ours-rm"), model_name_or_path=str(root / "tiny"), data_path="-",
                      per_device_train_batch_size=RM_PAIRS, max_seq_len=RM_LEN, eval_interval=0, save_interval=0,
                      enable_tensorboard=False, dtype="fp32")
    collate = PairCollator(PAD)
    model = create_reward_model(root / "tiny", PAD, seed=0)
    step = our_loop_step_fn(model, RewardTask(cfg, {}, collate, ["p"]), rm_rows(), collate, cfg)
    return lambda: (step(), float(RM_PAIRS))[1]


def trl_rm_step_fn(root: Path) -> Callable[[], float]:
    from trl import RewardConfig, RewardTrainer  # trl: installed by make bench only

    model = create_reward_model(root / "tiny", PAD, seed=0)
    data = Dataset.from_list([{"chosen_ids": r["chosen"], "rejected_ids": r["rejected"]} for r in rm_rows()])
    args = hf_args(RewardConfig, str(root / "trl-rm"), RM_PAIRS, max_length=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer())
    return hf_style_step_fn(trainer, trainer.model, float(RM_PAIRS))


def suite_rm(args) -> dict:
    kw = {"steps": args.steps, "windows": args.windows, "warmup": 2, "max_foreign": args.max_foreign}
    out: dict = {"config": {"preset": "tiny", "pairs_per_step": RM_PAIRS, "tokens_per_side": RM_LEN, "dtype": "fp32"}}
    with tempfile.TemporaryDirectory(prefix="bench-rm-") as tmp:
        root = Path(tmp)
        _saved_tiny(root)
        out.update(interleaved_windows({"ours_zero0": our_rm_step_fn(root),
                                        "trl_reward_trainer": trl_rm_step_fn(root)}, **kw))
    out["ratio_ours_vs_trl"] = paired_ratio(out["ours_zero0"], out["trl_reward_trainer"])
    return out


# ----------------------------------------------------------------------------------------------------
# DPO


def dpo_rows(n: int = 32) -> list[dict]:
    prompts, chosen, rejected = _ids(n, PROMPT, 3), _ids(n, REPLY, 4), _ids(n, REPLY, 5)
    rows = []
    for p, c, r in zip(prompts, chosen, rejected, strict=True):
        rows.append({side: {"input_ids": p + reply, "labels": [-100] * PROMPT + reply}
                     for side, reply in (("chosen", c), ("rejected", r))})
    return rows


def our_dpo_step_fn(root: Path, precompute: bool, share_prompt: bool = True) -> Callable[[], float]:
    """Our DPO step in dpo.py's default layout (shared prompt: one row per pair) or the two-row one."""
    run_dir = root / f"ours-dpo-{precompute}-{share_prompt}"
    run_dir.mkdir()
    cfg = DPOConfig(output_dir=str(run_dir), model_name_or_path=str(root / "tiny"), data_path="-",
                    per_device_train_batch_size=DPO_PAIRS, per_device_eval_batch_size=DPO_PAIRS,
                    max_seq_len=PROMPT + REPLY, eval_interval=0, save_interval=0, enable_tensorboard=False,
                    dtype="fp32", loss_type="dpo", label_smoothing=0.0, precompute_ref_logps=precompute)
    collate, rows = (SharedPromptCollator if share_prompt else DPOCollator)(PAD), dpo_rows()
    reference = attach_reference(cfg, run_dir, rows, {}, collate, choose_precision("fp32"))
    task = DPOTask(cfg, {}, collate, reference)
    step = our_loop_step_fn(load_causal_lm(root / "tiny"), task, rows, collate, cfg)
    return lambda: (step(), float(DPO_PAIRS))[1]


def trl_dpo_step_fn(root: Path, precompute: bool) -> Callable[[], float]:
    from trl import DPOConfig, DPOTrainer  # trl: installed by make bench only

    model = load_causal_lm(root / "tiny")
    data = Dataset.from_list([{"prompt": as_text(r["chosen"]["input_ids"][:PROMPT]),
                               "chosen": " " + as_text(r["chosen"]["input_ids"][PROMPT:]),
                               "rejected": " " + as_text(r["rejected"]["input_ids"][PROMPT:])} for r in dpo_rows()])
    args = hf_args(DPOConfig, str(root / f"trl-dpo-{precompute}"), DPO_PAIRS, max_length=None,
                   precompute_ref_log_probs=precompute, beta=0.1, loss_type=["sigmoid"])
    ref = None if precompute else copy.deepcopy(model).eval()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=word_tokenizer())
    return hf_style_step_fn(trainer, trainer.model, float(DPO_PAIRS))


def suite_dpo(args) -> dict:
    # 5 rounds at least: the 2.0x target sits close to the measured ratio, and its spread needs the rounds
    kw = {"steps": max(args.steps // 2, 2), "windows": max(args.windows, 5), "warmup": 2,
          "max_foreign": args.max_foreign}
    out: dict = {"config": {"preset": "tiny", "pairs_per_step": DPO_PAIRS, "prompt": PROMPT, "reply": REPLY,
                            "loss": "sigmoid, beta 0.1", "dtype": "fp32",
                            "our_layout": "shared prompt (SharedPromptCollator)"}}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        root = Path(tmp)
        _saved_tiny(root)
        for precompute in (False, True):
            mode = "precomputed_ref" if precompute else "ref_on_the_fly"
            out.update(interleaved_windows({f"ours_{mode}": our_dpo_step_fn(root, precompute),
                                            f"trl_{mode}": trl_dpo_step_fn(root, precompute)}, **kw))
            out[f"ratio_{mode}"] = paired_ratio(out[f"ours_{mode}"], out[f"trl_{mode}"])
    return out
