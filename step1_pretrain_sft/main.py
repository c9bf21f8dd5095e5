"""Step 1: pretrain a LLaMA-style model from scratch on step0's packed tokens.

Launch (any of these, from the repo root or from inside step1_pretrain_sft/):
    deepspeed --num_gpus 1 step1_pretrain_sft/main.py --stage pretrain --preset tiny \
        --data_path outputs/demo/step0/tokens --tokenizer_path outputs/demo/step0/tokenizer \
        --output_dir outputs/demo/step1_pretrain
    python step1_pretrain_sft/main.py ...        (no launcher: one process)
    bash training_scripts/step1_pretrain.sh

Algorithm: next-token cross-entropy on fixed windows of --max_seq_len tokens cut from the flat token
file (documents separated by <|endoftext|>), AdamW with warmup + cosine decay, gradient clipping and
accumulation, ZeRO stage from --zero_stage. Every --eval_interval steps: held-out loss, perplexity and
bits per character. Checkpoints every --save_interval steps; an interrupted run resumes on re-launch.
The result is exported to OUTPUT/final/ (AutoModelForCausalLM + tokenizer).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python main.py` / `deepspeed main.py` from inside this folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.checkpoint import export_hf
from utils.config import TrainConfig, option, parse_config, require, save_config
from utils.data import PackedTokens, read_token_meta, stack_collate
from utils.dist import choose_precision, get_world_size, init_distributed
from utils.engine import init_engine
from utils.errors import UserError, main_guard
from utils.lm import CausalLMTask
from utils.log import setup_logging
from utils.model import check_vocab, count_parameters, create_causal_lm, flops_per_token, load_causal_lm
from utils.run import prepare_output_dir, write_done
from utils.trainer import Trainer, total_train_steps

log = logging.getLogger("step1")


@dataclass
class Step1Config(TrainConfig):
    """Step 1: pretraining of a causal language model (DeepSpeed ZeRO)."""

    stage: str = option("pretrain", "Which stage to run.", choices=("pretrain",))

    def validate(self) -> None:
        super().validate()
        require(bool(self.data_path), "data_path", self.data_path, "give step0's tokens/ dir")
        require(bool(self.model_name_or_path) != bool(self.preset), "preset", self.preset,
                "give exactly one of --preset (train from scratch) or --model_name_or_path (continue)")


def load_tokenizer(path: str):
    """The step0 tokenizer (None when no path is given: the export then holds the model only)."""
    if not path:
        return None
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer_config.json").is_file():
        raise UserError(f"--tokenizer_path {path}: no tokenizer_config.json: point it at step0's tokenizer/ dir")
    return AutoTokenizer.from_pretrained(path)


@main_guard
def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Step1Config, argv, prog="step1_pretrain_sft/main.py")
    setup_logging()
    run_dir = prepare_output_dir(cfg.output_dir)
    init_distributed()
    precision = choose_precision(cfg.dtype)

    meta = read_token_meta(cfg.data_path)
    train = PackedTokens(Path(cfg.data_path) / "train.bin", cfg.max_seq_len, meta["dtype"])
    valid = PackedTokens(Path(cfg.data_path) / "validation.bin", cfg.max_seq_len, meta["dtype"])
    tokenizer = load_tokenizer(cfg.tokenizer_path)

    if cfg.model_name_or_path:
        model = load_causal_lm(cfg.model_name_or_path)
    else:
        model = create_causal_lm(cfg.preset, meta["vocab_size"], max(cfg.max_seq_len, 256), cfg.seed)
    check_vocab(model.config.vocab_size, meta["vocab_size"], f"--data_path {cfg.data_path}")
    if tokenizer is not None:
        check_vocab(model.config.vocab_size, len(tokenizer), f"--tokenizer_path {cfg.tokenizer_path}")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = count_parameters(model)
    fpt = flops_per_token(n_params, model.config.num_hidden_layers, model.config.hidden_size, cfg.max_seq_len)
    total_steps = total_train_steps(cfg, len(train))
    save_config(cfg, run_dir / "config.json", extra={"world_size": get_world_size(), "precision": precision.name,
                                                      "parameters": n_params, "total_steps": total_steps})
    log.info("model: %.2fM parameters, %d steps, precision %s", n_params / 1e6, total_steps, precision.name)

    engine = init_engine(model, cfg, precision, total_steps)
    chars = meta.get("num_chars", {}).get("validation")
    tokens = meta.get("num_tokens", {}).get("validation")
    task = CausalLMTask(valid, stack_collate, cfg.per_device_eval_batch_size, cfg.eval_batches,
                        chars_per_token=chars / tokens if chars and tokens else None)
    summary = Trainer(cfg, engine, train, stack_collate, task, precision=precision, total_steps=total_steps,
                      flops_per_token=fpt, run_dir=run_dir).fit()
    export_hf(engine.module, run_dir / "final", zero_stage=cfg.zero_stage, tokenizer=tokenizer)
    summary["parameters"] = n_params
    write_done(run_dir, cfg, summary)
    return summary


if __name__ == "__main__":
    main()
