"""The chain at nano size on a slice of the demo data: every hand-off between steps, in order.

Each later step appends its stage here (reward model, PPO, DPO), reading only the previous steps'
output directories, exactly as the training scripts do.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_process.main import main as data_main
from step0_tokenizer.main import main as step0_main
from step1_pretrain_sft.main import main as step1_main
from step2_reward_model.main import main as step2_main
from step2_reward_model.rw_eval import main as rw_eval_main
from step3_rlhf_ppo.dpo import main as dpo_main
from step3_rlhf_ppo.evaluate import main as policy_eval_main
from utils.generation import SamplingConfig, generate_replies
from utils.log import read_metrics

COMMON = ["--dtype", "fp32", "--enable_tensorboard", "false", "--max_seq_len", "128"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, dist):
    """Runs the stages once; the tests below check each hand-off."""
    out = tmp_path_factory.mktemp("chain")
    data_main(["--output_dir", str(out / "data"), "--demo_scale", "0.03"])
    step0_main(["--data_path", str(out / "data"), "--output_dir", str(out / "step0"), "--vocab_size", "600"])
    step1_main(["--stage", "pretrain", "--preset", "nano", "--data_path", str(out / "step0" / "tokens"),
                "--tokenizer_path", str(out / "step0" / "tokenizer"), "--output_dir", str(out / "step1_pretrain"),
                "--max_steps", "40", "--learning_rate", "3e-3", "--eval_interval", "20", "--save_interval", "20",
                "--per_device_train_batch_size", "8", *COMMON])
    step1_main(["--stage", "sft", "--model_name_or_path", str(out / "step1_pretrain" / "final"),
                "--data_path", str(out / "data" / "sft"), "--eval_task_dir", str(out / "data" / "eval"),
                "--eval_task_samples", "4", "--eval_max_new_tokens", "16", "--output_dir", str(out / "step1_sft"),
                "--max_steps", "20", "--learning_rate", "2e-3", "--eval_interval", "20", "--save_interval", "10",
                "--per_device_train_batch_size", "8", *COMMON])
    step2_main(["--model_name_or_path", str(out / "step1_sft" / "final"), "--data_path", str(out / "data" / "preference"),
                "--eval_pairs", str(out / "data" / "eval" / "preference.jsonl"), "--output_dir", str(out / "step2"),
                "--max_steps", "15", "--learning_rate", "2e-3", "--eval_interval", "15", "--save_interval", "0",
                "--per_device_train_batch_size", "8", *COMMON])
    dpo_main(["--model_name_or_path", str(out / "step1_sft" / "final"), "--data_path", str(out / "data" / "preference"),
              "--eval_pairs", str(out / "data" / "eval" / "preference.jsonl"), "--output_dir", str(out / "step3_dpo"),
              "--max_steps", "10", "--learning_rate", "1e-3", "--eval_interval", "10", "--save_interval", "0",
              "--per_device_train_batch_size", "8", *COMMON])
    return out


def test_data_to_tokenizer(chain):
    tok = AutoTokenizer.from_pretrained(chain / "step0" / "tokenizer")
    meta = json.loads((chain / "step0" / "tokens" / "meta.json").read_text())
    assert meta["vocab_size"] == len(tok) and meta["eos_token_id"] == tok.eos_token_id
    assert meta["num_tokens"]["train"] > 10_000


def test_pretraining_learns_and_exports(chain):
    train = read_metrics(chain / "step1_pretrain", "train")
    evals = read_metrics(chain / "step1_pretrain", "eval")
    assert len(train) == 40 and evals[0]["step"] == 0 and evals[-1]["loss"] < evals[0]["loss"] - 0.5
    assert evals[-1]["bits_per_char"] > 0 and len(evals[-1]["samples"]) == 4
    model = AutoModelForCausalLM.from_pretrained(chain / "step1_pretrain" / "final")
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(chain / "step1_pretrain" / "final"))


def test_sft_scores_tasks_and_chats(chain):
    evals = read_metrics(chain / "step1_sft", "eval")
    assert {"loss", "sentiment_acc", "segmentation_f1", "ner_f1"} <= set(evals[-1])
    train = read_metrics(chain / "step1_sft", "train")
    assert train[-1]["loss"] < train[0]["loss"]
    final = chain / "step1_sft" / "final"
    model, tok = AutoModelForCausalLM.from_pretrained(final).eval(), AutoTokenizer.from_pretrained(final)
    replies = generate_replies(model, tok, [[{"role": "user", "content": "写一条关于这家酒店的评论。"}]],
                               SamplingConfig(max_new_tokens=8))
    assert len(replies) == 1 and isinstance(replies[0], str)


def test_reward_model_trains_and_rw_eval_reads_the_export(chain):
    evals = read_metrics(chain / "step2", "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 15
    assert {"accuracy", "margin", "eval/accuracy", "eval/review_sentiment/accuracy"} <= set(evals[-1])
    assert all(0.0 <= evals[-1][k] <= 1.0 for k in evals[-1] if k.endswith("accuracy"))
    report = rw_eval_main(["--model", str(chain / "step2" / "final"),
                           "--pairs", str(chain / "data" / "eval" / "preference.jsonl"), "--max_seq_len", "128"])
    assert report["by_kind"]["all"]["accuracy"] == pytest.approx(evals[-1]["eval/accuracy"], abs=1e-9)


def test_dpo_trains_from_sft_and_is_compared_under_the_reward_model(chain):
    evals = read_metrics(chain / "step3_dpo", "eval")
    assert evals[0]["step"] == 0 and evals[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    # learning itself is tested on pairs a nano model can fit (tests/test_dpo.py); here: the policy moved
    assert evals[-1]["loss"] != pytest.approx(0.6931, abs=1e-4) and evals[-1]["margin"] != 0.0
    report = policy_eval_main(["--policy", str(chain / "step3_dpo" / "final"), "--baseline",
                               str(chain / "step1_sft" / "final"), "--reward_model", str(chain / "step2" / "final"),
                               "--prompts", str(chain / "data" / "eval" / "prompts.jsonl"), "--num_prompts", "6",
                               "--max_new_tokens", "12"])
    assert 0.0 <= report["win_rate"] <= 1.0 and len(report["samples"]) == 6
    for side in ("baseline", "policy"):
        assert {"reward_mean", "positive_share", "distinct_2", "repeat_4gram_share"} <= set(report["models"][side])
