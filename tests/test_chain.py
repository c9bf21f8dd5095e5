"""The chain at nano size on a slice of the demo data: every hand-off between steps, in order.

Each later step appends its stage here (reward model, PPO, DPO, GRPO), reading only the previous steps'
output directories, exactly as the training scripts do.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_process.main import main as data_main
from step0_tokenizer.main import main as step0_main
from step1_pretrain_sft.main import main as step1_main
from step1_pretrain_sft.score_tasks import main as score_tasks_main
from step2_reward_model.main import main as step2_main
from step2_reward_model.rw_eval import main as rw_eval_main
from step3_rlhf_ppo.dpo import main as dpo_main
from step3_rlhf_ppo.evaluate import main as policy_eval_main
from step3_rlhf_ppo.grpo import main as grpo_main
from step3_rlhf_ppo.main import main as ppo_main
from utils.generation import SamplingConfig, generate_replies
from utils.log import read_metrics
from utils.probes import PROBES
from utils.tasks import read_jsonl

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
                "--eval_pairs", str(out / "data" / "eval" / "preference.jsonl"), "--output_dir", str(out / "step2_reward"),
                "--max_steps", "15", "--learning_rate", "2e-3", "--eval_interval", "15", "--save_interval", "0",
                "--per_device_train_batch_size", "8", *COMMON])
    dpo_main(["--model_name_or_path", str(out / "step1_sft" / "final"), "--data_path", str(out / "data" / "preference"),
              "--eval_pairs", str(out / "data" / "eval" / "preference.jsonl"), "--output_dir", str(out / "step3_dpo"),
              "--max_steps", "10", "--learning_rate", "1e-3", "--eval_interval", "10", "--save_interval", "0",
              "--per_device_train_batch_size", "8", *COMMON])
    ppo_main(["--actor_model_name_or_path", str(out / "step1_sft" / "final"),
              "--critic_model_name_or_path", str(out / "step2_reward" / "final"), "--data_path", str(out / "data" / "prompts"),
              "--eval_prompts", str(out / "data" / "eval" / "prompts.jsonl"), "--output_dir", str(out / "step3_ppo"),
              "--max_steps", "4", "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "2",
              "--max_answer_seq_len", "12", "--eval_interval", "4", "--eval_batches", "1", "--save_interval", "0",
              "--samples_interval", "2", "--enable_ema", "--dtype", "fp32", "--enable_tensorboard", "false"])
    eval_dir = out / "data" / "eval"
    grpo_main(["--actor_model_name_or_path", str(out / "step1_sft" / "final"), "--data_path", str(out / "data" / "rl"),
               "--eval_data", *(str(eval_dir / f"{t}.jsonl") for t in ("t1_sentiment", "t2_segmentation", "t3_ner")),
               "--output_dir", str(out / "step3_grpo"), "--max_steps", "3", "--num_generations", "4",
               "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "4",
               "--max_answer_seq_len", "12", "--eval_interval", "3", "--eval_batches", "1",
               "--per_device_eval_batch_size", "6", "--save_interval", "0", "--samples_interval", "1",
               "--kl_coef", "0.05", "--reward_funcs", "task", "repetition", "--dtype", "fp32",
               "--enable_tensorboard", "false"])
    score_tasks_main(["--model", str(out / "step3_grpo" / "final"), "--eval_task_dir", str(eval_dir), "--samples", "4",
                      "--max_new_tokens", "16", "--batch_size", "8", "--out", str(out / "step3_grpo" / "tasks.json")])
    for policy in ("step3_ppo", "step3_dpo", "step3_grpo"):
        policy_eval_main(["--policy", str(out / policy / "final"), "--baseline", str(out / "step1_sft" / "final"),
                          "--reward_model", str(out / "step2_reward" / "final"), "--prompts",
                          str(out / "data" / "eval" / "prompts.jsonl"), "--num_prompts", "6", "--max_new_tokens", "12",
                          "--judge_data", str(out / "data"), "--out", str(out / policy / "eval.json")])
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
    assert {"loss", "sentiment_acc", "sentiment_auc", "segmentation_f1", "ner_f1"} <= set(evals[-1])
    # score_tasks.py on the export reproduces the final evaluation of the training run
    scores = score_tasks_main(["--model", str(chain / "step1_sft" / "final"), "--eval_task_dir",
                               str(chain / "data" / "eval"), "--samples", "4", "--max_new_tokens", "16",
                               "--batch_size", "8", "--out", str(chain / "step1_sft" / "tasks.json")])
    for key in ("sentiment_acc", "sentiment_pos_rate", "sentiment_auc", "segmentation_f1", "ner_f1"):
        assert scores[key] == pytest.approx(evals[-1][key], abs=1e-9, nan_ok=True), key
    items = json.loads((chain / "step1_sft" / "tasks.json").read_text())["answers"]["t1_sentiment"]
    right = sum(item["answer"].strip() == item["reference"] for item in items)
    assert len(items) == 4 and right / 4 == pytest.approx(scores["sentiment_acc"])
    assert evals[0]["step"] == 0 and evals[-1]["loss"] < evals[0]["loss"]  # held-out loss (train losses are noisy)
    final = chain / "step1_sft" / "final"
    model, tok = AutoModelForCausalLM.from_pretrained(final).eval(), AutoTokenizer.from_pretrained(final)
    replies = generate_replies(model, tok, [[{"role": "user", "content": "写一条关于这家酒店的评论。"}]],
                               SamplingConfig(max_new_tokens=8))
    assert len(replies) == 1 and isinstance(replies[0], str)


def test_reward_model_trains_and_rw_eval_reads_the_export(chain):
    evals = read_metrics(chain / "step2_reward", "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 15
    assert {"accuracy", "margin", "eval/accuracy", "eval/review_sentiment/accuracy"} <= set(evals[-1])
    assert all(0.0 <= evals[-1][k] <= 1.0 for k in evals[-1] if k.endswith("accuracy"))
    report = rw_eval_main(["--model", str(chain / "step2_reward" / "final"),
                           "--pairs", str(chain / "data" / "eval" / "preference.jsonl"), "--max_seq_len", "128"])
    assert report["by_kind"]["all"]["accuracy"] == pytest.approx(evals[-1]["eval/accuracy"], abs=1e-9)
    hack = report["hackability"]  # on the held-out review pairs' chosen replies
    reviews = [p for p in read_jsonl(chain / "data" / "eval" / "preference.jsonl") if p["kind"] == "review_sentiment"]
    assert hack["replies"] == len(reviews) and set(hack["probes"]) == set(PROBES)
    assert all(0.0 <= p["original_wins"] <= 1.0 and p["cases"] > 0 for p in hack["probes"].values())


def test_dpo_trains_from_sft_and_is_compared_under_the_reward_model(chain):
    evals = read_metrics(chain / "step3_dpo", "eval")
    assert evals[0]["step"] == 0 and evals[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    # learning itself is tested on pairs a nano model can fit (tests/test_dpo.py); here: the policy moved
    assert evals[-1]["loss"] != pytest.approx(0.6931, abs=1e-4) and evals[-1]["margin"] != 0.0
    report = json.loads((chain / "step3_dpo" / "eval.json").read_text(encoding="utf-8"))
    assert 0.0 <= report["win_rate"] <= 1.0 and len(report["samples"]) == 6
    assert report["judge"]["train_reviews"] > 100 and 0.5 < report["judge"]["heldout_accuracy"] <= 1.0
    for side in ("baseline", "policy"):
        m = report["models"][side]
        assert {"reward_mean", "distinct_2", "repeat_4gram_share"} <= set(m) and 0.0 <= m["positive_share"] <= 1.0
        assert m["hackability"]["replies"] == 6 and m["hackability"]["score_mean"] == pytest.approx(m["reward_mean"])


def test_ppo_trains_from_sft_and_reward_model_and_exports(chain):
    from transformers import AutoModelForSequenceClassification

    run = chain / "step3_ppo"
    train, evals = read_metrics(run, "train"), read_metrics(run, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 4]
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first batch is sampled by the reference itself
    for key in ("score_mean", "kl", "entropy", "response_length", "clipfrac", "approx_kl", "value_loss",
                "policy_loss", "advantages_mean", "returns_mean", "tok_per_s", "gen_share", "kl_coef"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert 0.0 < train[-1]["gen_share"] < 1.0
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {s["step"] for s in samples} == {1, 2, 4} and all("response" in s for s in samples)
    actor = AutoModelForCausalLM.from_pretrained(run / "final")
    ema = AutoModelForCausalLM.from_pretrained(run / "final_ema")
    sft = AutoModelForCausalLM.from_pretrained(chain / "step1_sft" / "final")
    critic = AutoModelForSequenceClassification.from_pretrained(run / "critic")
    assert critic.config.num_labels == 1
    moved = [(a - s).abs().max().item() for a, s in zip(actor.parameters(), sft.parameters(), strict=True)]
    ema_moved = [(e - s).abs().max().item() for e, s in zip(ema.parameters(), sft.parameters(), strict=True)]
    assert max(moved) > 0 and 0 < max(ema_moved) < max(moved)  # EMA trails the actor
    report = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    # the policy's log-probs differ from the SFT model's; the sign of this sampled KL estimate is noise after
    # 4 nano steps (it averages log p - log p_ref over 6 sampled replies of 12 tokens)
    kl = report["models"]["policy"]["kl_mean"]
    assert 0.0 <= report["win_rate"] <= 1.0 and math.isfinite(kl) and kl != 0.0
    # same prompts and seed: the SFT answers of both evaluations agree, so the report can line them up
    dpo = json.loads((chain / "step3_dpo" / "eval.json").read_text(encoding="utf-8"))
    assert [s["baseline"] for s in report["samples"]] == [s["baseline"] for s in dpo["samples"]]


def test_grpo_trains_from_sft_on_the_task_items_and_exports(chain):
    run = chain / "step3_grpo"
    train, evals = read_metrics(run, "train"), read_metrics(run, "eval")
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [0, 3]
    for key in ("reward_mean", "reward_task", "reward_repetition", "zero_variance_share", "kl", "kl_k3", "entropy",
                "response_length", "truncated_share", "clipfrac", "time_generate", "time_actor_train"):
        assert all(math.isfinite(r.get(key, 0.0)) for r in train) and key in train[-1], key
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first batch is sampled by the reference itself
    assert 0.0 <= evals[-1]["eval_reward_task"] <= 1.0 and evals[-1]["eval_length"] > 0
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {s["step"] for s in samples} == {1, 2, 3} and len(samples) == 3 * 2 * 4
    assert all(s["prompt"] and "reward" in s and "advantage" in s for s in samples)
    actor = AutoModelForCausalLM.from_pretrained(run / "final")
    sft = AutoModelForCausalLM.from_pretrained(chain / "step1_sft" / "final")
    assert max((a - s).abs().max().item() for a, s in zip(actor.parameters(), sft.parameters(), strict=True)) > 0
    tasks = json.loads((run / "tasks.json").read_text(encoding="utf-8"))
    assert {"sentiment_acc", "segmentation_f1", "ner_f1", "typed_sentiment_acc"} <= set(tasks)


def test_report_card_from_the_outputs(chain):
    from utils.report import build_report

    build_report(chain)
    md = (chain / "report.md").read_text(encoding="utf-8")
    for title in ("Data and tokenizer", "Step 1: pretraining", "Step 1: supervised fine-tuning",
                  "Step 2: reward model", "Step 3: PPO", "Step 3: DPO", "Step 3: GRPO (verifiable task rewards)",
                  "The same prompts"):
        assert f"## {title}" in md, title
    images = sorted(p.name for p in (chain / "report").glob("*.png"))
    assert {"step1_pretrain_loss.png", "step2_reward_accuracy.png", "step3_ppo_kl.png",
            "step3_dpo_margin.png", "step3_grpo_reward_mean.png", "step3_grpo_eval.png"} <= set(images)
    assert "| sentiment_acc |" in md.split("## Step 3: GRPO")[1]  # the task table beside SFT's scores
    ppo = md.split("## Step 3: PPO")[1].split("## ")[0]  # the probes on both models' answers, loop held out
    assert "The reward model on each model's answers" in ppo and "| loop* |" in ppo and "| repeat |" in ppo
    assert "| baseline |" in ppo and "| policy |" in ppo
    page = (chain / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(images) and "<table>" in page


def test_report_results_table_holds_each_runs_figures(chain):
    """The report's opening table (the README's results table) gives each run's wall time and headline
    figures as the runs wrote them, and the commit of the code that made them."""
    from utils.log import read_metrics
    from utils.report import build_report
    from utils.run import code_commit

    build_report(chain)
    md = (chain / "report.md").read_text(encoding="utf-8")
    results = md.split("## Results")[1].split("## ")[0]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in results.splitlines()
            if line.startswith("| Step")}
    assert list(rows) == ["Step 1: pretraining", "Step 1: supervised fine-tuning", "Step 2: reward model",
                          "Step 3: PPO", "Step 3: DPO", "Step 3: GRPO (verifiable task rewards)"]
    sft = read_metrics(chain / "step1_sft", "eval")[-1]
    assert f"sentiment {sft['sentiment_acc']:.3f}, segmentation F1 {sft['segmentation_f1']:.3f}" in rows[
        "Step 1: supervised fine-tuning"][1]
    rm = read_metrics(chain / "step2_reward", "eval")[-1]
    assert f"held-out pair accuracy {rm['eval/accuracy']:.3f}" in rows["Step 2: reward model"][1]
    dpo = json.loads((chain / "step3_dpo" / "eval.json").read_text(encoding="utf-8"))
    assert f"win-rate {dpo['win_rate']:.2f} vs SFT" in rows["Step 3: DPO"][1]
    tasks = json.loads((chain / "step3_grpo" / "tasks.json").read_text(encoding="utf-8"))
    assert f"NER F1 {sft['ner_f1']:.3f} -> {tasks['ner_f1']:.3f}" in rows["Step 3: GRPO (verifiable task rewards)"][1]
    wall = json.loads((chain / "step1_pretrain" / "summary.json").read_text(encoding="utf-8"))["wall_seconds"]
    assert rows["Step 1: pretraining"][0] == f"{wall / 60:.0f} min"
    assert f"commit {code_commit() or 'unknown'};" in results  # the fixture chain's runs were made by this code


def test_report_finds_runs_by_the_step_they_declare(chain, tmp_path):
    """A run under any dir name is reported as the step its config.json declares (the report knows no
    folder names); a dir that is not a run is left out."""
    from utils.report import build_report

    for name in ("data", "step0", "step1_sft"):
        (tmp_path / name).symlink_to(chain / name)
    shutil.copytree(chain / "step3_dpo", tmp_path / "dpo_beta_0.3", ignore=shutil.ignore_patterns("final", "checkpoints"))
    (tmp_path / "notes").mkdir()
    build_report(tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    assert titles[:4] == ["## Results", "## Data and tokenizer", "## Step 1: supervised fine-tuning",
                          "## Step 3: DPO (dpo_beta_0.3)"]
    assert "| Step 3: DPO (dpo_beta_0.3) |" in md.split("## Data and tokenizer")[0]  # its row in the results
    assert not any("pretraining" in t or "PPO" in t for t in titles)
    assert (tmp_path / "report" / "dpo_beta_0.3_margin.png").is_file()


def test_report_says_where_rl_stopped_on_degenerated_replies(chain, tmp_path):
    from utils.report import build_report

    run = tmp_path / "ppo_guarded"
    shutil.copytree(chain / "step3_ppo", run, ignore=shutil.ignore_patterns("final*", "critic", "checkpoints"))
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    summary["stopped_degenerated"] = {"step": 4, "exported_step": 2, "eval": {},
                                      "reason": "mean length 3.0 tokens < --stop_length_ratio 0.5 x 8.0 before training"}
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    build_report(tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert ("| stopped early: held-out replies degenerated | at step 4 (mean length 3.0 tokens < --stop_length_ratio "
            "0.5 x 8.0 before training); exported the weights of step 2 |") in md


def test_gpu_check_table_and_base_check_on_cpu(chain, tmp_path, monkeypatch):
    """bench/gpu_check.py's two halves on CPU: the table reads each run of the chain (ok, tokens/s from its
    summary, no GPU memory here) and reports the base check missing as failed; the base check itself, on the
    nano preset, trains and generates and writes figures the table shows."""
    from bench.gpu_check import base_check, table

    text, ok = table(chain)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in text.splitlines()[2:]}
    assert not ok and rows["Step 3: DPO"][0] == "ok" and rows["Step 3: PPO"][2] == "-"
    ppo = json.loads((chain / "step3_ppo" / "summary.json").read_text(encoding="utf-8"))
    assert ppo["peak_gpu_mib"] is None  # no CUDA here: recorded as unknown, not as 0
    sft = json.loads((chain / "step1_sft" / "summary.json").read_text(encoding="utf-8"))
    assert rows["Step 1: supervised fine-tuning"][1] == f"{sft['tok_per_s']:,.0f}"
    assert rows["base preset: training steps"][0] == "failed"

    monkeypatch.setenv("GPU_CHECK_PRESET", "nano")
    result = base_check(tmp_path, steps=2)
    assert result["preset"] == "nano" and result["precision"] == "fp32" and math.isfinite(result["final_loss"])
    assert result["train_tok_per_s"] > 0 and result["generate_tok_per_s"] > 0 and result["peak_gpu_mib"] is None
    (chain / "base.json").write_text(json.dumps(result))
    text, ok = table(chain)
    assert "| nano preset: training steps | ok |" in text and "| nano preset: generation" in text
    (chain / "base.json").unlink()
