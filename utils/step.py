"""The skeleton every training step shares, so each main.py only states what differs:

    cfg, run_dir, precision, finished = start(ConfigClass, argv, prog)   # parse, output dir, dist, done?
    tokenizer = load_tokenizer(...)                                        # step's data and model ...
    model = prepare_model(model, cfg)                                      # gradient checkpointing, LoRA
    summary = train_and_export(cfg, run_dir, model, tokenizer, train, collate, task, precision, ...)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar

from utils.checkpoint import export_hf
from utils.config import parse_config, save_config
from utils.dist import Precision, choose_precision, get_world_size, init_distributed
from utils.engine import init_engine
from utils.errors import UserError
from utils.log import setup_logging
from utils.model import apply_lora, check_model_dir, check_vocab, count_parameters, flops_per_token
from utils.run import finished_run, prepare_output_dir, write_done
from utils.tokenizer import load_tokenizer_dir
from utils.trainer import Trainer, total_train_steps

C = TypeVar("C")
log = logging.getLogger("step")


def start(cls: type[C], argv: list[str] | None, prog: str) -> tuple[C, Path, Precision, dict | None]:
    """Parse and validate the config, check the model dirs it names, make the output dir, start distributed,
    and say whether this exact run already finished (then the step returns that summary instead of training
    again). A bad model dir fails before the output dir is touched: a finished run there is not started
    afresh over it."""
    cfg = parse_config(cls, argv, prog=prog)
    for path, kind in cfg.model_dirs():
        check_model_dir(path, kind)
    setup_logging()
    run_dir = prepare_output_dir(cfg.output_dir)
    init_distributed()
    finished = finished_run(run_dir, cfg)
    if finished is not None:
        log.info("%s already holds a finished run of this config: skipped (--force to redo)", run_dir)
    return cfg, run_dir, choose_precision(cfg.dtype), finished


def load_tokenizer(cfg_or_path: Any, flag: str = "--tokenizer_path"):
    """The tokenizer in a dir (or, given a step config, of --tokenizer_path, else the one saved beside
    --model_name_or_path), with a pad token (utils.tokenizer's rule); a UserError naming `flag` when the dir
    holds none."""
    path = cfg_or_path
    if not isinstance(cfg_or_path, str):
        path = cfg_or_path.tokenizer_path or cfg_or_path.model_name_or_path
    return load_tokenizer_dir(path, flag)


def prepare_model(model, cfg: Any, tokenizer=None, always_train: tuple[str, ...] = ()):
    """Vocabulary check, gradient checkpointing and LoRA (parameters named in `always_train`, e.g. a new
    head, stay trainable next to the adapters)."""
    if tokenizer is not None:
        check_vocab(model.config.vocab_size, len(tokenizer), "the tokenizer")
    limit = model.config.max_position_embeddings
    if cfg.max_seq_len > limit:
        raise UserError(f"--max_seq_len={cfg.max_seq_len} is longer than the model's {limit} positions "
                        "(max_position_embeddings): lower --max_seq_len")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora_dim:
        model = apply_lora(model, cfg.lora_dim, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_module_name)
        for name, p in model.named_parameters():
            if any(f".{key}." in f".{name}" for key in always_train):
                p.requires_grad_(True)
    return model


def train_and_export(cfg: Any, run_dir: Path, model, tokenizer, train: Any, collate, task, precision: Precision,
                     what: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write config.json, wrap the model in DeepSpeed, run the shared loop, export final/, mark done."""
    n_params = count_parameters(model)
    config = model.config
    fpt = flops_per_token(n_params, config.num_hidden_layers, config.hidden_size, cfg.max_seq_len)
    total_steps = total_train_steps(cfg, len(train))
    save_config(cfg, run_dir / "config.json", extra={
        "world_size": get_world_size(), "precision": precision.name, "parameters": n_params,
        "trainable_parameters": count_parameters(model, trainable_only=True), "total_steps": total_steps,
        "train_rows": len(train), **(extra or {})})
    log.info("%s: %.2fM parameters, %d training rows, %d steps, %s", what, n_params / 1e6, len(train), total_steps,
             precision.name)
    engine = init_engine(model, cfg, precision, total_steps)
    summary = Trainer(cfg, engine, train, collate, task, precision=precision, total_steps=total_steps,
                      flops_per_token=fpt, run_dir=run_dir).fit()
    export_hf(engine.module, run_dir / "final", zero_stage=cfg.zero_stage, tokenizer=tokenizer,
              lora_scale=cfg.lora_alpha / cfg.lora_dim if cfg.lora_dim else None)
    summary["parameters"] = n_params
    write_done(run_dir, cfg, summary)
    return summary
