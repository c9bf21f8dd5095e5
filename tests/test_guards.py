"""NaN/inf guard of the training loop, precision choice, and config-file handling."""

from __future__ import annotations

import pytest
import torch

from step1_pretrain_sft.main import Step1Config
from utils import dist as dist_mod
from utils.config import parse_config, save_config
from utils.data import PackedTokens, stack_collate
from utils.dist import choose_precision
from utils.engine import init_engine
from utils.errors import UserError
from utils.lm import CausalLMTask
from utils.log import read_metrics
from utils.model import create_causal_lm
from utils.trainer import LossOutput, Trainer


class PoisonedTask(CausalLMTask):
    """Returns NaN for the micro-batches whose number is in `bad` (counting from 1)."""

    def __init__(self, bad: set[int], *args):
        super().__init__(*args)
        self.bad, self.calls = bad, 0

    def loss(self, model, batch) -> LossOutput:
        self.calls += 1
        out = super().loss(model, batch)
        if self.calls in self.bad:
            return LossOutput(out.loss_sum * float("nan"))
        return out


def run(tmp_path, token_dir, bad: set[int], max_bad: int = 3, steps: int = 6):
    argv = ["--preset", "nano", "--data_path", str(token_dir), "--output_dir", str(tmp_path), "--max_seq_len", "32",
            "--per_device_train_batch_size", "4", "--max_steps", str(steps), "--max_bad_steps", str(max_bad),
            "--eval_interval", "0", "--save_interval", "0", "--enable_tensorboard", "false", "--dtype", "fp32"]
    cfg = parse_config(Step1Config, argv)
    train = PackedTokens(token_dir / "train.bin", 32, "uint16")
    valid = PackedTokens(token_dir / "validation.bin", 32, "uint16")
    engine = init_engine(create_causal_lm("nano", 128, 64, cfg.seed), cfg, choose_precision("fp32"), steps)
    task = PoisonedTask(bad, valid, stack_collate, 4, 2)
    trainer = Trainer(cfg, engine, train, stack_collate, task, precision=choose_precision("fp32"),
                      total_steps=steps, flops_per_token=1.0, run_dir=tmp_path)
    return trainer, trainer.fit()


def test_nan_micro_batches_are_skipped_and_counted(dist, token_dir, tmp_path):
    trainer, summary = run(tmp_path, token_dir, bad={2, 3})
    assert summary["skipped_micro_batches"] == 2 and summary["steps"] == 6
    records = read_metrics(tmp_path, "train")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["skipped"] == 2
    for p in trainer.engine.module.parameters():
        assert torch.isfinite(p).all()


def test_nan_in_a_row_aborts_naming_the_step(dist, token_dir, tmp_path):
    with pytest.raises(UserError, match=r"NaN/inf in 3 micro-batches in a row at optimizer step 2"):
        run(tmp_path, token_dir, bad={2, 3, 4}, max_bad=3)


def test_precision_follows_cpu_capability(monkeypatch):
    monkeypatch.setattr(dist_mod, "cpu_has_fast_bf16", lambda: False)
    assert choose_precision("auto").name == "fp32"
    monkeypatch.setattr(dist_mod, "cpu_has_fast_bf16", lambda: True)
    auto = choose_precision("auto")
    assert auto.name == "bf16" and auto.autocast and auto.deepspeed is None
    assert choose_precision("fp32").name == "fp32"
    with pytest.raises(UserError, match="fp16"):
        choose_precision("fp16")


def test_config_file_flags_override_and_unknown_keys(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 0.01\nzero_stage: 2\npreset: nano\n")
    cfg = parse_config(Step1Config, ["--config", str(tmp_path / "c.yaml"), "--zero_stage", "1",
                                     "--data_path", "d", "--output_dir", "o"])
    assert (cfg.learning_rate, cfg.zero_stage, cfg.preset) == (0.01, 1, "nano")
    save_config(cfg, tmp_path / "config.json")
    again = parse_config(Step1Config, ["--config", str(tmp_path / "config.json")])
    assert again == cfg
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.01\n")
    with pytest.raises(UserError, match="unknown option 'learning_rat' \\(did you mean learning_rate\\?\\)"):
        parse_config(Step1Config, ["--config", str(tmp_path / "bad.yaml")])


def test_finished_run_is_skipped_unless_forced(dist, token_dir, tmp_path):
    from step1_pretrain_sft.main import main as step1_main

    argv = ["--preset", "nano", "--data_path", str(token_dir), "--output_dir", str(tmp_path), "--max_seq_len", "32",
            "--max_steps", "3", "--eval_interval", "0", "--enable_tensorboard", "false", "--dtype", "fp32"]
    first = step1_main(argv)
    stamp = (tmp_path / "final" / "model.safetensors").stat().st_mtime_ns
    again = step1_main(argv)
    assert again["config_hash"] and again["steps"] == first["steps"] == 3
    assert (tmp_path / "final" / "model.safetensors").stat().st_mtime_ns == stamp  # nothing re-run
    step1_main([*argv, "--force"])
    assert (tmp_path / "final" / "model.safetensors").stat().st_mtime_ns != stamp
    assert len(read_metrics(tmp_path, "train")) == 3  # a fresh run, not a resume on top of the old one


def test_finished_run_is_redone_when_its_input_data_changed(dist, token_dir, tmp_path):
    import os
    import shutil

    from step1_pretrain_sft.main import main as step1_main

    data = tmp_path / "tokens"
    shutil.copytree(token_dir, data)
    out = tmp_path / "run"
    argv = ["--preset", "nano", "--data_path", str(data), "--output_dir", str(out), "--max_seq_len", "32",
            "--max_steps", "2", "--eval_interval", "0", "--enable_tensorboard", "false", "--dtype", "fp32"]
    step1_main(argv)
    stamp = (out / "final" / "model.safetensors").stat().st_mtime_ns
    ckpt_stamp = (out / "checkpoints" / "step00000002" / "meta.json").stat().st_mtime_ns
    train = data / "train.bin"
    train.write_bytes(train.read_bytes())  # the data made again: same size, new modification time
    os.utime(train, ns=(stamp + 10**9, stamp + 10**9))
    step1_main(argv)
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns != stamp
    # started afresh (the old checkpoint was removed and written again), not resumed at the old run's end
    assert (out / "checkpoints" / "step00000002" / "meta.json").stat().st_mtime_ns != ckpt_stamp


def test_fractional_epochs_set_the_step_count(tmp_path):
    """--num_train_epochs 2.5 runs two and a half passes (the last stops half way); 0 is refused."""
    from utils.trainer import total_train_steps

    def cfg(*extra):
        return parse_config(Step1Config, ["--preset", "nano", "--data_path", "d", "--output_dir", "o",
                                          "--per_device_train_batch_size", "4", *extra])
    assert total_train_steps(cfg("--num_train_epochs", "2.5"), 40) == 25  # 10 steps per epoch
    assert total_train_steps(cfg("--num_train_epochs", "2"), 41) == 20  # the partial batch is dropped
    assert total_train_steps(cfg("--num_train_epochs", "2.5", "--max_steps", "7"), 40) == 7
    (tmp_path / "c.json").write_text('{"num_train_epochs": 3, "preset": "nano", "data_path": "d", "output_dir": "o"}')
    assert parse_config(Step1Config, ["--config", str(tmp_path / "c.json")]).num_train_epochs == 3  # saved as int
    with pytest.raises(UserError, match="--num_train_epochs=0.0 is invalid: must be > 0"):
        cfg("--num_train_epochs", "0")
