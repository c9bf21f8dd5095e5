"""Step 1: pretrain a LLaMA-style model from scratch, then fine-tune it on conversations (SFT).

Launch (from the repo root or from inside step1_pretrain_sft/ as `main.py`):
    deepspeed --num_gpus 1 step1_pretrain_sft/main.py --stage pretrain --preset tiny \
        --data_path OUT/step0/tokens --tokenizer_path OUT/step0/tokenizer --output_dir OUT/step1_pretrain
    deepspeed --num_gpus 1 step1_pretrain_sft/main.py --stage sft --model_name_or_path OUT/step1_pretrain/final \
        --data_path OUT/data/sft --eval_task_dir OUT/data/eval --output_dir OUT/step1_sft
    python step1_pretrain_sft/main.py ...            (one process, no launcher)
    bash training_scripts/step1_pretrain.sh, bash training_scripts/step1_sft.sh

pretrain: next-token cross-entropy on fixed windows of --max_seq_len tokens cut from step0's flat token
  file (documents separated by <|endoftext|>). Evaluation: held-out loss, perplexity, bits per character,
  and a few sampled continuations.
sft: conversations rendered with the tokenizer's chat template (step0's ChatML or an existing model's); loss
  only on assistant replies and the end-of-turn token after each (<|im_end|> in ChatML; utils.chat). Rows are right-padded, or packed several per row with --packing (no attention
  across conversations). --loss_weighting conversation averages the loss over conversations instead of reply
  tokens, so short answers (a sentiment label) are not drowned by long ones; --loss_weighting task gives each
  task (the data's 'task' column) the share of its conversations, with equal tokens within a task. Optional
  LoRA (--lora_dim), merged into the weights on export. Evaluation: held-out loss and greedy-decoding scores
  of the verifiable tasks in --eval_task_dir (for sentiment also the share of 正面 answers and the AUC of the
  first-token margin log p(正) - log p(负)).
Both: AdamW, warmup + cosine, clipping, accumulation, ZeRO from --zero_stage, checkpoints every
--save_interval steps and resume on re-launch (utils.trainer), export to OUTPUT/final/.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python main.py` / `deepspeed main.py` from inside this folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from step1_pretrain_sft.data import load_sft_split, render_rows
from utils.chat import PackedCollator, PaddedCollator, pack_rows, with_conversation_weights, with_task_weights
from utils.config import TrainConfig, option, require
from utils.data import PackedTokens, read_token_meta, stack_collate
from utils.dist import get_world_size
from utils.errors import main_guard
from utils.generation import SamplingConfig, generate_ids
from utils.lm import CausalLMTask
from utils.model import check_vocab, create_causal_lm, load_causal_lm
from utils.step import load_tokenizer, prepare_model, start, train_and_export
from utils.tasks import evaluate_tasks, load_task_evals

log = logging.getLogger("step1")

SAMPLE_STARTS = ("中国", "这家酒店", "今天", "这本书")


@dataclass
class Step1Config(TrainConfig):
    """Step 1: pretraining (--stage pretrain) or supervised fine-tuning (--stage sft) of a causal LM."""

    stage: str = option("pretrain", "Which stage to run.", choices=("pretrain", "sft"))
    packing: bool = option(False, "SFT: pack several conversations per row (no attention across them).")
    loss_weighting: str = option("token", "SFT: how the loss averages: over reply tokens; over "
                                 "conversations (each conversation's reply tokens share one unit, so a "
                                 "2-token answer weighs as much as a 100-token one); or by task (each "
                                 "task, from the data's 'task' column, weighs as many units as it has "
                                 "conversations, spread evenly over its reply tokens; rows without a task "
                                 "form one task).",
                                 choices=("token", "conversation", "task"))
    eval_task_dir: str = option("", "SFT: dir of held-out task files (<task>.jsonl) scored by generation.")
    eval_task_samples: int = option(100, "SFT: prompts per held-out task scored at each evaluation.")
    eval_max_new_tokens: int = option(96, "SFT: token limit of each generated held-out answer.")

    def validate(self) -> None:
        super().validate()
        require(bool(self.data_path), "data_path", self.data_path,
                "give step0's tokens/ dir (pretrain) or data_process's sft/ dir (sft)")
        require(self.eval_task_samples >= 0, "eval_task_samples", self.eval_task_samples, "must be >= 0")
        if self.stage == "pretrain":
            require(bool(self.model_name_or_path) != bool(self.preset), "preset", self.preset,
                    "give exactly one of --preset (train from scratch) or --model_name_or_path (continue)")
        else:
            require(bool(self.model_name_or_path), "model_name_or_path", self.model_name_or_path,
                    "SFT starts from a model: give the pretraining export (OUT/step1_pretrain/final)")
            require(not self.preset, "preset", self.preset, "SFT starts from --model_name_or_path, not a preset")
        if self.stage == "pretrain":
            require(not self.packing, "packing", self.packing, "packs SFT conversations; pretraining data from "
                    "step0 is packed already: drop --packing or use --stage sft")
            require(not self.eval_task_dir, "eval_task_dir", self.eval_task_dir, "scores SFT answers: drop it "
                    "or use --stage sft")
            require(self.loss_weighting == "token", "loss_weighting", self.loss_weighting,
                    "weighs SFT conversations; pretraining windows have none: drop it or use --stage sft")


class PretrainTask(CausalLMTask):
    """Held-out loss/ppl/bits-per-char plus sampled continuations of a few fixed starts."""

    def __init__(self, tokenizer, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer = tokenizer

    def evaluate(self, model, step: int) -> dict:
        result: dict = super().evaluate(model, step)
        if self.tokenizer is not None:
            prompts = [self.tokenizer(s, add_special_tokens=False)["input_ids"] for s in SAMPLE_STARTS]
            replies = generate_ids(model, self.tokenizer, prompts, SamplingConfig(48, 0.8, 50, 0.95, 1.0, 0),
                                   synced_gpus=get_world_size() > 1)
            result["samples"] = [s + self.tokenizer.decode(r) for s, r in zip(SAMPLE_STARTS, replies, strict=True)]
            for sample in result["samples"]:
                log.info("sample: %s", sample.replace("\n", "⏎"))
        return result


class SFTTask(CausalLMTask):
    """Held-out loss plus greedy-decoding scores on the verifiable held-out tasks."""

    def __init__(self, tokenizer, task_sets, cfg: Step1Config, *args):
        super().__init__(*args)
        self.tokenizer, self.task_sets, self.cfg = tokenizer, task_sets, cfg

    def evaluate(self, model, step: int) -> dict:
        result = super().evaluate(model, step) if len(self.eval_dataset) else {}
        if self.task_sets and step > 0:  # the pretrained start cannot follow instructions: skip the slow part
            result.update(evaluate_tasks(model, self.tokenizer, self.task_sets, self.cfg.per_device_eval_batch_size,
                                         self.cfg.eval_max_new_tokens))
        return result


def build_model(cfg: Step1Config, vocab_size: int):
    """The pretraining start (a preset, or a model dir to continue) or the SFT start (a model dir)."""
    if cfg.model_name_or_path:
        model = load_causal_lm(cfg.model_name_or_path)
    else:
        model = create_causal_lm(cfg.preset, vocab_size, max(cfg.max_seq_len, 2048), cfg.seed)
    check_vocab(model.config.vocab_size, vocab_size, f"--data_path {cfg.data_path}")
    return model


def pretrain_data(cfg: Step1Config, tokenizer):
    meta = read_token_meta(cfg.data_path)
    train = PackedTokens(Path(cfg.data_path) / "train.bin", cfg.max_seq_len, meta["dtype"])
    valid = PackedTokens(Path(cfg.data_path) / "validation.bin", cfg.max_seq_len, meta["dtype"])
    chars, tokens = meta.get("num_chars", {}).get("validation"), meta.get("num_tokens", {}).get("validation")
    task = PretrainTask(tokenizer, valid, stack_collate, cfg.per_device_eval_batch_size, cfg.eval_batches,
                        chars_per_token=chars / tokens if chars and tokens else None)
    return train, stack_collate, task, meta["vocab_size"]


def sft_data(cfg: Step1Config, tokenizer):
    where = f"--data_path {cfg.data_path}"
    conversations, tasks = load_sft_split(cfg.data_path, "train")
    train = render_rows(conversations, tokenizer, cfg.max_seq_len, "train", cfg.long_inputs, where, tasks)
    valid_rows, _ = load_sft_split(cfg.data_path, "validation", required=False)
    valid = (render_rows(valid_rows, tokenizer, cfg.max_seq_len, "validation", cfg.long_inputs, where)
             if valid_rows else [])
    if cfg.loss_weighting == "conversation":
        train = [with_conversation_weights(row) for row in train]
    elif cfg.loss_weighting == "task":
        if all(row["task"] is None for row in train):
            log.warning("--loss_weighting task: the train rows of %s name no 'task', so they form one task and "
                        "the weighting equals token weighting", where)
        train = with_task_weights(train, [row["task"] for row in train])
    train = [{k: v for k, v in row.items() if k != "task"} for row in train]
    if cfg.packing:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        train = pack_rows([train[i] for i in order], cfg.max_seq_len)
        collate = PackedCollator(tokenizer.pad_token_id)
        valid = pack_rows(valid, cfg.max_seq_len)
    else:
        collate = PaddedCollator(tokenizer.pad_token_id)
    task_sets = load_task_evals(cfg.eval_task_dir, cfg.eval_task_samples) if cfg.eval_task_dir else {}
    task = SFTTask(tokenizer, task_sets, cfg, valid, collate, cfg.per_device_eval_batch_size, cfg.eval_batches)
    return train, collate, task, len(tokenizer)


@main_guard
def main(argv: list[str] | None = None) -> dict:
    cfg, run_dir, precision, finished = start(Step1Config, argv, "step1_pretrain_sft/main.py")
    if finished is not None:
        return finished
    tokenizer = load_tokenizer(cfg) if cfg.tokenizer_path or cfg.stage == "sft" else None
    if cfg.stage == "pretrain":
        train, collate, task, vocab_size = pretrain_data(cfg, tokenizer)
    else:
        train, collate, task, vocab_size = sft_data(cfg, tokenizer)
    model = prepare_model(build_model(cfg, vocab_size), cfg, tokenizer)
    return train_and_export(cfg, run_dir, model, tokenizer, train, collate, task, precision, cfg.stage,
                            extra={"step": cfg.stage})


if __name__ == "__main__":
    main()
