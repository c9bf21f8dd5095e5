"""Config dataclasses and the command line generated from them.

Every step declares one dataclass whose fields carry their default and help text (written once, shown
by --help). `parse_config` fills it from, in increasing priority: the defaults, an optional YAML/JSON
file given with --config, and the command-line flags. `validate()` raises UserError naming the flag, the
value and the fix; the resolved config is written next to the run's outputs with `save_config`.

Flag names follow DeepSpeed-Chat where a counterpart exists (--model_name_or_path, --zero_stage, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from utils.errors import UserError, read_json_file

C = TypeVar("C")

DTYPES = ("auto", "fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant")
LONG_INPUTS = ("truncate", "reject")


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) for the generated command line."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def require(ok: bool, name: str, value: Any, fix: str) -> None:
    """Raise a UserError for `--name=value` unless `ok`; `fix` says what a valid value looks like."""
    if not ok:
        raise UserError(f"--{name}={value!r} is invalid: {fix}")


def require_positive(cfg: Any, *names: str) -> None:
    """Each named option must be an integer >= 1."""
    for name in names:
        require(getattr(cfg, name) >= 1, name, getattr(cfg, name), "must be a positive integer")


def require_non_negative(cfg: Any, *names: str) -> None:
    """Each named option must be >= 0."""
    for name in names:
        require(getattr(cfg, name) >= 0, name, getattr(cfg, name), "must be >= 0")


# ----------------------------------------------------------------------------------------------------
# Option groups shared by the training steps


@dataclass
class RunConfig:
    """Options of every training step's run: where it writes, seed, precision, evaluation, checkpoints."""

    output_dir: str = option("", "Where this step writes config.json, metrics, checkpoints and final/.")
    seed: int = option(1234, "Seed for model init, data order and sampling.")
    dtype: str = option("auto", "Training precision; auto picks bf16 where the hardware runs it fast.", choices=DTYPES)
    eval_interval: int = option(100, "Evaluate every N optimizer steps (0 = only at the end).")
    eval_batches: int = option(20, "Held-out batches per evaluation (0 = the whole held-out set).")
    save_interval: int = option(200, "Checkpoint every N optimizer steps (0 = only at the end).")
    keep_last: int = option(2, "Checkpoints kept on disk (older ones are deleted).")
    log_interval: int = option(1, "Write a metrics line every N optimizer steps.")
    resume: bool = option(True, "Resume from the last complete checkpoint in output_dir if there is one.")
    force: bool = option(False, "Run again even if output_dir holds a finished run of the same config "
                                "(its checkpoints and export are deleted first).")
    max_bad_steps: int = option(5, "Abort after this many optimizer steps in a row with NaN/inf loss.")
    enable_tensorboard: bool = option(True, "Write TensorBoard events to output_dir/tb.")
    peak_tflops: float = option(0.0, "Hardware peak TFLOP/s for the MFU figure; 0 = measure/guess.")

    def validate(self) -> None:
        """Check every value; raise UserError naming the first bad flag and the fix."""
        require(bool(self.output_dir), "output_dir", self.output_dir, "give a directory to write to")
        require_positive(self, "keep_last", "log_interval", "max_bad_steps")
        require_non_negative(self, "eval_interval", "save_interval", "eval_batches")
        require(self.peak_tflops >= 0, "peak_tflops", self.peak_tflops, "must be >= 0")

    def model_dirs(self) -> list[tuple[str, str]]:
        """(dir, kind) of each model dir the step reads, kind a key of utils.model.KINDS: the step checks
        them before it touches its output dir, so a bad one leaves no trace there."""
        return []


@dataclass
class TrainConfig(RunConfig):
    """Options every single-model DeepSpeed training step shares (model, data, optimisation, DeepSpeed)."""

    # model
    model_name_or_path: str = option("", "Hugging Face model dir to start from (the previous step's final/).")
    preset: str = option("", "Model preset when training from scratch: nano, tiny, small or base.")
    tokenizer_path: str = option("", "Tokenizer dir; defaults to the model dir.")
    # data
    data_path: str = option("", "Dataset dir or file this step trains on.")
    max_seq_len: int = option(256, "Maximum tokens per training sequence.")
    long_inputs: str = option("truncate", "Rows longer than --max_seq_len: truncate them (a warning counts "
                                          "them) or reject the data (exit 2 naming the first).",
                              choices=LONG_INPUTS)
    # optimisation
    per_device_train_batch_size: int = option(8, "Micro batch per process (rows).")
    per_device_eval_batch_size: int = option(8, "Batch per process for held-out evaluation.")
    gradient_accumulation_steps: int = option(1, "Micro batches accumulated per optimizer step.")
    learning_rate: float = option(3e-4, "Peak learning rate.")
    weight_decay: float = option(0.1, "AdamW weight decay (not applied to norms and biases).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.95, "AdamW beta2.")
    num_train_epochs: float = option(1.0, "Passes over the training data, fractions allowed (2.5: the last pass "
                                     "stops half way); ignored when --max_steps > 0.")
    max_steps: int = option(0, "Optimizer steps to run; 0 means num_train_epochs passes.")
    lr_scheduler_type: str = option("cosine", "Learning-rate schedule after warmup.", choices=SCHEDULERS)
    num_warmup_steps: int = option(0, "Linear warmup steps.")
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of the peak (cosine and linear).")
    gradient_clipping: float = option(1.0, "Clip the global gradient norm to this value (0 = off).")
    group_by_length: bool = option(True, "Batch rows of similar length together (padded layouts only: pairs, "
                                         "unpacked SFT): less padding, batch order still random.")
    # DeepSpeed / hardware
    zero_stage: int = option(0, "DeepSpeed ZeRO stage: 0, 1, 2 or 3.", choices=(0, 1, 2, 3))
    offload: bool = option(False, "Offload optimizer states (and parameters under ZeRO-3) to CPU memory.")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    # LoRA
    lora_dim: int = option(0, "LoRA rank; 0 trains all weights.")
    lora_alpha: float = option(16.0, "LoRA scaling numerator (scale = alpha / dim).")
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch.")
    lora_module_name: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that get LoRA adapters.",
    )

    def validate(self) -> None:
        super().validate()
        require_positive(self, "per_device_train_batch_size", "per_device_eval_batch_size",
                         "gradient_accumulation_steps", "max_seq_len")
        require(self.num_train_epochs > 0, "num_train_epochs", self.num_train_epochs, "must be > 0, e.g. 2 or 2.5")
        require_non_negative(self, "max_steps", "num_warmup_steps", "lora_dim")
        require(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0, e.g. 3e-4")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(0 <= self.adam_beta1 < 1, "adam_beta1", self.adam_beta1, "must be in [0, 1)")
        require(0 <= self.adam_beta2 < 1, "adam_beta2", self.adam_beta2, "must be in [0, 1)")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(self.gradient_clipping >= 0, "gradient_clipping", self.gradient_clipping, "must be >= 0")
        require(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if self.preset:
            from utils.model import PRESETS  # local import keeps config importable without torch

            require(self.preset in PRESETS, "preset", self.preset, f"choose one of {', '.join(PRESETS)}")
        require(not (self.offload and self.zero_stage == 0), "offload", self.offload,
                "CPU offload needs ZeRO stage 1, 2 or 3 (add --zero_stage 2)")

    def model_dirs(self) -> list[tuple[str, str]]:
        return [(self.model_name_or_path, "causal_lm")] if self.model_name_or_path else []


# ----------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse would print usage and exit 2
        raise UserError(f"{message} (see --help)")


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _field_kind(tp: Any) -> tuple[Any, bool, bool]:
    """(scalar type, is_list, is_optional) for a field annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
        origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _convert(name: str, tp: Any, is_list: bool, value: Any, source: str) -> Any:
    """Coerce a value read from a flag or config file to the field's type, or raise UserError."""
    if value is None:
        return None
    if is_list:  # a list flag given one empty string ("--shaping_funcs ''") is the empty list
        items = [v for v in value if v != ""] if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [_convert(name, tp, False, v, source) for v in items]
    try:
        if tp is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not an integer")
        return tp(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: --{name}={value!r} is not a valid {tp.__name__}") from None


def build_parser(cls: type, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field, plus --config and --local_rank."""
    parser = _Parser(prog=prog, description=(cls.__doc__ or "").strip(),
                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML or JSON file of option values (flags override it).")
    parser.add_argument("--print_config", action="store_true",
                        help="Print the resolved options (defaults < --config < flags) as YAML and exit.")
    parser.add_argument("--local_rank", "--local-rank", type=int, help="Set by the deepspeed launcher; ignored.")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_list, _ = _field_kind(hints[f.name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kwargs: dict[str, Any] = {"help": f"{f.metadata.get('help', '')} [default: {default}]"}
        if tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif is_list:
            kwargs.update(nargs="+", metavar=tp.__name__.upper())
        if f.metadata.get("choices"):
            kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        parser.add_argument(f"--{f.name}", dest=f.name, **kwargs)
    return parser


CONFIG_FILE_FIX = ("write one 'option_name: value' per line (a space after the colon, lists as [a, b], quotes "
                   "around text holding ': ' or ' #'); --help lists the option names")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON mapping of option values; a file that does not parse, or whose top level is not a
    mapping, is a UserError naming the file, the line and the fix (not the parser's multi-line report)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: file not found")
    if p.suffix not in (".yaml", ".yml"):
        data = read_json_file(p, CONFIG_FILE_FIX)
    else:
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"--config {path}: not UTF-8 text: {CONFIG_FILE_FIX}") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
            problem = getattr(err, "problem", None) or type(err).__name__
            raise UserError(f"--config {path}: not valid YAML at {where} ({problem}): {CONFIG_FILE_FIX}") from None
    if not isinstance(data, dict):
        found = "nothing" if data is None else f"a {type(data).__name__}"
        raise UserError(f"--config {path}: holds {found}, not a mapping of option names to values: {CONFIG_FILE_FIX}")
    return data


def parse_config(cls: type[C], argv: list[str] | None = None, prog: str | None = None) -> C:
    """Fill the dataclass `cls` from defaults < --config file < flags, then validate it."""
    parser = build_parser(cls, prog)
    namespace = vars(parser.parse_args(argv))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    source = "command line"
    if namespace.get("config"):
        path = namespace["config"]
        for key, value in load_config_file(path).items():
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise UserError(f"--config {path}: unknown option {key!r}{hint}")
            values[key] = value
        source = f"--config {path}"
    for key in names:
        if key in namespace:
            values[key] = namespace[key]
    for f in dataclasses.fields(cls):
        if f.name in values:
            tp, is_list, _ = _field_kind(hints[f.name])
            src = "command line" if f.name in namespace else source
            values[f.name] = _convert(f.name, tp, is_list, values[f.name], src)
            choices = f.metadata.get("choices")
            if choices and values[f.name] not in choices:
                raise UserError(f"--{f.name}={values[f.name]!r} is invalid: choose one of "
                                f"{', '.join(map(str, choices))}")
    cfg = cls(**values)
    if namespace.get("print_config"):  # before validation: shows what a run would get, even a refused one
        sys.stdout.write(yaml.safe_dump(config_dict(cfg), allow_unicode=True, sort_keys=False))
        raise SystemExit(0)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain JSON-able dict."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config (plus run facts such as world size) as JSON, atomically; rank 0 only (two
    ranks writing the same tmp file raced: one renamed it away under the other)."""
    from utils.dist import is_rank0  # utils.dist imports torch; this module stays torch-free (data_process)

    if not is_rank0():
        return
    payload = {**config_dict(cfg), **(extra or {})}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
