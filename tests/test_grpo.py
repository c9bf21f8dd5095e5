"""Step 3, group-relative path: estimators and aggregations against direct loops, invariance to how the
batch is split, the shared prefill, reward functions, learning a rule reward, bad input, resume, 2 ranks."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    assert_rl_resume_is_bit_exact,
    assert_two_processes_match_one,
    nano_sft_dir,
    ragged_mask,
    run_python,
    without_output_dir,
)

from utils.errors import UserError
from utils.generation import SamplingConfig, left_pad, sample_tokens
from utils.log import read_metrics
from utils.rewards import (
    Replies,
    RewardFunction,
    build_reward_functions,
    repeated_ngram_share,
    task_score,
)
from utils.rl import (
    group_advantages,
    k3_kl,
    loss_weights,
    policy_loss,
    zero_variance_groups,
)

GRPO = str(REPO / "step3_rlhf_ppo" / "grpo.py")


# ----------------------------------------------------------------------------------------------------
# The math


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_group_advantages_equal_direct_loops(estimator):
    torch.manual_seed(0)
    g = 4
    rewards = torch.randn(3 * g, dtype=torch.float64)
    rewards[g:2 * g] = 0.5  # a group whose rewards are all equal
    adv = group_advantages(rewards, g, estimator).tolist()
    for start in range(0, len(rewards), g):
        group = rewards[start:start + g].tolist()
        mean = sum(group) / g
        for j, r in enumerate(group):
            if estimator == "grpo":
                expect = (r - mean) / (statistics.stdev(group) + 1e-4)
            elif estimator == "rloo":
                expect = r - (sum(group) - r) / (g - 1)
            else:
                expect = r - mean
            assert adv[start + j] == pytest.approx(expect, abs=1e-9)
    assert adv[g:2 * g] == [0.0] * g
    assert zero_variance_groups(rewards, g).tolist() == [False, True, False]


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_loss_aggregations_equal_direct_loops(aggregation):
    torch.manual_seed(1)
    lengths, width, max_len = [5, 1, 3, 7, 0], 7, 10  # the last row is left out (no tokens)
    mask = ragged_mask(lengths, width)
    loss = torch.randn(5, width)
    weights, units = loss_weights(mask, aggregation, max_len)
    got = (loss * weights).sum().item() / units
    rows = [loss[b, :n].tolist() for b, n in enumerate(lengths) if n]
    if aggregation == "token_mean":
        expect = sum(sum(r) for r in rows) / sum(lengths)
    elif aggregation == "seq_mean_token_mean":
        expect = sum(sum(r) / len(r) for r in rows) / len(rows)
    else:
        expect = sum(sum(r) / max_len for r in rows) / len(rows)
    assert got == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_one_batch_of_8_equals_8_accumulated_micro_batches(aggregation):
    """The trainer's normalisation (units of the whole mini-batch counted first, each micro-batch scaled by
    GAS / units) gives one batch of 8 and 8 micro-batches of 1 the same gradient."""
    torch.manual_seed(2)
    width = 6
    mask = ragged_mask([6, 2, 4, 1, 5, 3, 6, 2], width)
    old = torch.randn(8, width)
    adv = torch.randn(8, 1).expand(-1, width) * mask
    delta = torch.zeros(8, width, requires_grad=True)

    def grad(chunks: int) -> torch.Tensor:
        delta.grad = None
        rows = 8 // chunks
        units = sum(loss_weights(mask[i:i + rows], aggregation, 8)[1] for i in range(0, 8, rows))
        for i in range(0, 8, rows):
            w, _ = loss_weights(mask[i:i + rows], aggregation, 8)
            loss, _ = policy_loss(old[i:i + rows] + delta[i:i + rows], old[i:i + rows], adv[i:i + rows],
                                  mask[i:i + rows], 0.2, 0.28, weights=w)
            (loss * chunks / units / chunks).backward()  # x GAS / units, then DeepSpeed's 1 / GAS
        return delta.grad.clone()

    assert torch.allclose(grad(1), grad(8), atol=1e-7)


def test_a_zero_variance_group_contributes_exactly_zero_gradient():
    g = 4
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.7, 0.7, 0.7, 0.7])
    mask = ragged_mask([3, 2, 4, 1, 4, 3, 2, 4], 4)
    for estimator in ("grpo", "dr_grpo", "rloo", "reinforce_pp"):
        adv = group_advantages(rewards, g, estimator)[:, None] * mask
        logits = torch.randn(8, 4, requires_grad=True)
        loss, _ = policy_loss(logits * 0.1, (logits * 0.1).detach() - 0.05, adv, mask, 0.2, 0.28)
        loss.backward()
        assert logits.grad[g:].abs().max().item() == 0.0, estimator
        assert logits.grad[:g].abs().max().item() > 0.0, estimator


def test_clip_higher_and_k3_by_hand():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.3, 0.3]])  # ratio e^0.3 = 1.35
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = policy_loss(new, old, adv, mask, 0.2, 0.28)
    r = torch.exp(torch.tensor(0.3)).item()
    assert loss.item() == pytest.approx(max(-r, -1.28) + max(r, 1.28), rel=1e-6)  # the upper clip is 1.28
    assert stats["clipfrac"].item() == 1.0
    d = torch.tensor([[0.0, 0.5, -1.0]])
    assert k3_kl(torch.zeros(1, 3), d)[0].tolist() == pytest.approx([0.0, torch.e ** 0.5 - 1.5, torch.e ** -1],
                                                                     rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# Reward functions


def test_task_scores_on_fixed_answers():
    assert task_score("t1_sentiment", "正面", "正面") == 1.0
    assert task_score("t1_sentiment_typed", " 负面 ", "负面") == 1.0
    assert task_score("t1_sentiment", "正面的", "正面") == 0.0
    assert task_score("t2_segmentation", "我 爱 北京", "我 爱 北京") == 1.0
    assert task_score("t2_segmentation", "我爱 北京", "我 爱 北京") == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    # a miscopied word earns nothing, even in the right place; the rest still count
    assert task_score("t2_segmentation", "我 爱 上海", "我 爱 北京") == pytest.approx(2 / 3)
    assert task_score("t2_segmentation", "", "我 爱 北京") == 0.0
    ref = "人名：张三；地名：北京；机构名：无"
    assert task_score("t3_ner", ref, ref) == 1.0
    assert task_score("t3_ner", "人名：张三；地名：无；机构名：无", ref) == pytest.approx(2 / 3)
    assert task_score("t3_ner", "张三 北京", ref) == 0.0  # no field: malformed
    assert task_score("t3_ner", "人名：无；地名：无；机构名：无", "人名：无；地名：无；机构名：无") == 1.0


def test_shaping_rewards_and_a_user_function(tmp_path):
    user = tmp_path / "my_rewards.py"
    user.write_text("def has_good(prompts, completions, rows):\n"
                    "    return [float('好' in c) + rows[i]['bonus'] for i, c in enumerate(completions)]\n"
                    "def wrong_length(prompts, completions, rows):\n    return [1.0]\n"
                    "def broken(prompts, completions, rows):\n    raise KeyError('reference')\n")
    funcs = build_reward_functions(["length", "repetition", f"python:{user}:has_good"], [1.0, 2.0, 0.5], 8)
    replies = Replies(["p", "p"], ["很好很好很好很好", "一般"], [{"bonus": 0.0}, {"bonus": 0.25}],
                      lengths=[8, 5], truncated=[True, False])
    assert funcs[0](replies) == [-1.0, -0.0]  # 0 up to 6 tokens, -1 at the limit of 8
    assert funcs[1](replies) == pytest.approx([-repeated_ngram_share("很好很好很好很好"), 0.0])
    assert repeated_ngram_share("很好很好很好很好") == pytest.approx(1 - 2 / 5)
    assert [f.weight for f in funcs] == [1.0, 2.0, 0.5]
    assert funcs[2](replies) == [1.0, 0.25]
    floor = build_reward_functions(["min_length:4"], [], 8)[0]  # characters of the reply, spaces around it left out
    assert floor(Replies(["p"] * 4, ["很好很好很好很好", " 一般 ", "", "好好好好"], [{}] * 4)) == [0.0, -0.5, -1.0, 0.0]
    for name, message in (("wrong_length", "returned 1 values for 2"), ("broken", "raised KeyError")):
        fn = build_reward_functions([f"python:{user}:{name}"], [], 8)[0]
        with pytest.raises(UserError, match=message):
            fn(replies)
    example = REPO / "docs" / "examples" / "rewards.py"  # the documented example file works as documented
    polite, keyword = build_reward_functions([f"python:{example}:polite_and_brief", f"python:{example}:contains_keyword"],
                                             [], 64)
    rows = [{"keyword": "好", "max_chars": 3}, {"keyword": "差"}]
    assert polite(Replies(["p", "p"], ["谢谢，很好", "一般"], rows)) == pytest.approx([0.5 - 0.02, 0.0])
    assert keyword(Replies(["p", "p"], ["谢谢，很好", "一般"], rows)) == [1.0, 0.0]
    for specs, weights, message in ((["nope"], [], "unknown reward function"), (["task"], [1.0, 2.0], "one weight"),
                                    ([f"python:{user}:missing"], [], "no function missing"),
                                    (["python:/no/such.py:f"], [], "does not exist"),
                                    (["min_length:0"], [], "min_length:N with N a whole number"),
                                    (["min_length:"], [], "min_length:N with N a whole number")):
        with pytest.raises(UserError, match=message):
            build_reward_functions(specs, weights, 8)


# ----------------------------------------------------------------------------------------------------
# Sampling groups with one prefill


@pytest.fixture(scope="module")
def grpo_dirs(chat_tokenizer, tmp_path_factory):
    """A nano 'SFT' model and task rows of the three demo tasks, in the steps' formats."""
    root = tmp_path_factory.mktemp("grpo")
    nano_sft_dir(root, chat_tokenizer)
    rows = [{"prompt": "判断情感：好", "reference": "正面", "task": "t1_sentiment"},
            {"prompt": "分词：我爱北京", "reference": "我 爱 北京", "task": "t2_segmentation"},
            {"prompt": "实体：张三在北京", "reference": "人名：张三；地名：北京；机构名：无", "task": "t3_ner"},
            {"prompt": "判断情感：差", "reference": "负面", "task": "t1_sentiment"}]
    with open(root / "rows.jsonl", "w", encoding="utf-8") as f:
        for r in rows * 4:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return root


def test_shared_prefill_samples_what_repeated_prompts_sample(grpo_dirs, chat_tokenizer):
    """The G replies of a prompt sampled from one prefill (its KV cache repeated) are token for token the
    replies of the prompt repeated G times, with left padding in the batch."""
    from utils.model import load_causal_lm

    model = load_causal_lm(grpo_dirs / "sft").eval()
    rows = [[2, 5, 9, 30, 3], [2, 7, 3], [2, 11, 12, 13, 14, 15, 16, 3]]
    ids, mask = left_pad(rows, chat_tokenizer.pad_token_id, "cpu")
    g = 4
    sampling = SamplingConfig(12, temperature=1.0, row_seeds=tuple(range(100, 100 + 3 * g)))
    shared = sample_tokens(model, ids, mask, sampling, chat_tokenizer, group_size=g)
    repeated = sample_tokens(model, ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0), sampling, chat_tokenizer)
    assert shared.shape == (3 * g, 12) and torch.equal(shared, repeated)
    assert len({tuple(r.tolist()) for r in shared}) > 3 * g // 2  # the samples of a group differ


# ----------------------------------------------------------------------------------------------------
# Training


def even_token_reward() -> RewardFunction:
    """A rule reward on token ids: the share of even ids in the reply (a nano model can learn it)."""
    def share(replies: Replies) -> list[float]:
        ids, mask = replies.model_inputs["input_ids"], replies.model_inputs["attention_mask"]
        reply = ids[:, -max(replies.lengths):]
        real = mask[:, -reply.shape[1]:] > 0
        return (((reply % 2 == 0) & real).sum(-1) / real.sum(-1).clamp(min=1)).tolist()
    return RewardFunction("even", 1.0, share)


def grpo_trainer(dirs: Path, out: Path, tokenizer, extra: list[str], funcs: list[RewardFunction]):
    from step3_rlhf_ppo.grpo import GRPOConfig
    from step3_rlhf_ppo.grpo_trainer import GRPOTrainer
    from utils.config import parse_config
    from utils.dist import choose_precision
    from utils.rewards import load_rl_rows
    from utils.rl_trainer import build_actor, encode_prompts

    cfg = parse_config(GRPOConfig, [
        "--actor_model_name_or_path", str(dirs / "sft"), "--data_path", str(dirs / "rows.jsonl"), "--output_dir",
        str(out), "--dtype", "fp32", "--num_generations", "4", "--per_device_generation_batch_size", "4",
        "--per_device_training_batch_size", "8", "--max_answer_seq_len", "6", "--actor_learning_rate", "3e-3",
        "--lr_scheduler_type", "constant", "--eval_interval", "0", "--save_interval", "0",
        "--enable_tensorboard", "false", "--samples_interval", "0", *extra])
    precision = choose_precision("fp32")
    rows = load_rl_rows(cfg.data_path, "train", [], "--data_path")
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows], 64, "test", extra=rows)
    actor, switch, _ = build_actor(cfg, tokenizer, precision, total_updates=100)
    return GRPOTrainer(cfg, out, actor, switch, None, tokenizer, prompts, [], precision, cfg.max_steps, funcs)


def test_grpo_raises_a_rule_reward(grpo_dirs, chat_tokenizer, dist, tmp_path):
    grpo_trainer(grpo_dirs, tmp_path, chat_tokenizer, ["--max_steps", "40"], [even_token_reward()]).fit()
    rewards = [r["reward_mean"] for r in read_metrics(tmp_path, "train")]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.3, rewards


def test_one_update_per_batch_reuses_the_training_forward_for_the_ratio(grpo_dirs, chat_tokenizer, dist, tmp_path):
    """With one optimizer step per batch of experience the sampling policy is the trained one, so the old
    log-probs are the training forward's own, detached: the same updates as a separate forward gives,
    without that forward."""
    runs = []
    for reuse in (True, False):
        trainer = grpo_trainer(grpo_dirs, tmp_path / str(reuse), chat_tokenizer,
                               ["--max_steps", "3", "--per_device_training_batch_size", "16"], [even_token_reward()])
        assert trainer.reuse_logprobs
        trainer.reuse_logprobs = reuse
        trainer.fit()
        runs.append(({k: v.clone() for k, v in trainer.actor.module.state_dict().items()},
                     read_metrics(tmp_path / str(reuse), "train")))
    (wa, ma), (wb, mb) = runs
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert [m["reward_mean"] for m in ma] == [m["reward_mean"] for m in mb]
    assert [m["entropy"] for m in ma] == pytest.approx([m["entropy"] for m in mb], rel=1e-5)
    assert "time_actor_forward" not in ma[-1] and "time_actor_forward" in mb[-1]


def test_steps_without_signal_stop_with_one_error(grpo_dirs, chat_tokenizer, dist, tmp_path):
    constant = RewardFunction("constant", 1.0, lambda replies: [1.0] * len(replies.completions))
    trainer = grpo_trainer(grpo_dirs, tmp_path, chat_tokenizer, ["--max_steps", "5", "--max_no_signal_steps", "3"],
                           [constant])
    before = {k: v.clone() for k, v in trainer.actor.module.state_dict().items()}
    with pytest.raises(UserError, match="3 GRPO steps in a row had no group with different rewards"):
        trainer.fit()
    after = trainer.actor.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no optimizer step moved the weights
    assert [r["zero_variance_share"] for r in read_metrics(tmp_path, "train")] == [1.0, 1.0]


def test_zero3_lora_reference_and_reward_model_path(grpo_dirs, chat_tokenizer, dist, tmp_path):
    """The less travelled paths together: ZeRO-3 actor with LoRA (generation from the gathered copy), a
    ZeRO-3 reference for the k3 KL, a step 2 reward model as a reward function (rm:DIR) beside the task
    reward, Dr. GRPO with its constant normaliser and zero-variance groups dropped; the export reloads."""
    from safetensors.torch import load_file

    from step3_rlhf_ppo.grpo import main as grpo_main
    from utils.log import read_metrics
    from utils.reward import create_reward_model

    rm = create_reward_model(grpo_dirs / "sft", chat_tokenizer.pad_token_id, seed=1)
    rm.save_pretrained(tmp_path / "rm")
    chat_tokenizer.save_pretrained(tmp_path / "rm")
    args = cli_args(grpo_dirs, tmp_path / "run")
    args[args.index("--reward_funcs") + 1:args.index("--reward_funcs") + 3] = ["task", f"rm:{tmp_path / 'rm'}"]
    args[args.index("--advantage_estimator") + 1] = "dr_grpo"
    grpo_main([*args, "--max_steps", "2", "--actor_zero_stage", "3", "--actor_lora_dim", "4", "--eval_interval", "0",
               "--save_interval", "0", "--loss_aggregation", "seq_mean_token_sum_norm", "--drop_zero_variance_groups",
               "--reward_weights", "1.0", "0.5"])
    run = tmp_path / "run"
    train = read_metrics(run, "train")
    assert len(train) == 2 and all(r["kl_k3"] >= 0 and f"reward_rm:{tmp_path / 'rm'}" in r for r in train)
    config = json.loads((run / "config.json").read_text())
    assert config["generation_path"].startswith("own (weights gathered")
    actor, sft = load_file(run / "final" / "model.safetensors"), load_file(grpo_dirs / "sft" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert actor.keys() == sft.keys() and (actor[key] - sft[key]).abs().max() > 0  # LoRA merged into the export


# ----------------------------------------------------------------------------------------------------
# The command line


def cli_args(dirs: Path, out: Path) -> list[str]:
    return ["--actor_model_name_or_path", str(dirs / "sft"), "--data_path", str(dirs / "rows.jsonl"),
            "--eval_data", str(dirs / "rows.jsonl"), "--output_dir", str(out), "--dtype", "fp32",
            "--num_generations", "4", "--per_device_generation_batch_size", "2", "--per_device_training_batch_size",
            "4", "--max_answer_seq_len", "6", "--actor_learning_rate", "1e-3", "--enable_tensorboard", "false",
            "--eval_batches", "1", "--per_device_eval_batch_size", "4", "--samples_interval", "2", "--ppo_epochs", "2",
            "--reward_funcs", "task", "repetition", "--kl_coef", "0.05", "--advantage_estimator", "reinforce_pp"]


@pytest.mark.parametrize("extra, rows, expected, subprocess_run", [
    (["--reward_funcs", "bleu"], None, "unknown reward function", True),
    (["--num_generations", "1"], None, "at least 2", False),
    ([], {"prompt": "判断情感：好", "task": "t1_sentiment"}, "needs a string field 'reference'", False),
    (["--reward_funcs", "python:{dir}/r.py:f"], None, "returned 3 values for", False),
])
def test_bad_input_one_line_exit_2(grpo_dirs, tmp_path, capsys, dist, extra, rows, expected, subprocess_run):
    """One error line, exit 2, no final/: through the real command line once, in this process for the rest
    (the same main(), without paying for a Python start each)."""
    from step3_rlhf_ppo.grpo import main as grpo_main

    args = cli_args(grpo_dirs, tmp_path / "run")
    (tmp_path / "r.py").write_text("def f(prompts, completions, rows):\n    return [0.0, 1.0, 2.0]\n")
    if rows is not None:
        (tmp_path / "rows.jsonl").write_text(json.dumps(rows, ensure_ascii=False) + "\n", encoding="utf-8")
        args[args.index("--data_path") + 1] = str(tmp_path / "rows.jsonl")
    args += [e.format(dir=tmp_path) for e in extra]
    if subprocess_run:
        r = run_python([GRPO, *args], timeout=120)
        code, stderr = r.returncode, r.stderr
    else:
        with pytest.raises(SystemExit) as exit_info:
            grpo_main(args)
        code, stderr = exit_info.value.code, capsys.readouterr().err
    assert code == 2, stderr[-2000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in stderr, stderr[-2000:]
    assert not (tmp_path / "run" / "final").exists()


def test_sigkill_then_resume_is_bit_exact(grpo_dirs, tmp_path):
    args = [*without_output_dir(cli_args(grpo_dirs, tmp_path)), "--max_steps", "8", "--save_interval", "2",
            "--eval_interval", "3"]
    metrics = assert_rl_resume_is_bit_exact(GRPO, args, tmp_path, 8, ("final",))
    assert {"reward_task", "reward_repetition", "kl_k3", "zero_variance_share", "eval_reward_task"} <= {
        k for m in metrics for k in m}


def test_two_processes_match_one(grpo_dirs, tmp_path):
    """deepspeed --num_gpus 2 with 1 prompt (4 replies) per rank == 1 process with 2 prompts (8 replies) in
    one mini-batch: replies are seeded by prompt row and sample, REINFORCE++'s global rescaling and the loss
    normaliser are all-reduced, so rewards, losses and trained weights agree."""
    one = [*without_output_dir(cli_args(grpo_dirs, tmp_path)), "--max_steps", "3", "--save_interval", "0",
           "--eval_interval", "3"]
    one[one.index("--per_device_training_batch_size") + 1] = "8"
    two = list(one)
    for flag, value in (("--per_device_generation_batch_size", "1"), ("--per_device_eval_batch_size", "2"),
                        ("--per_device_training_batch_size", "4")):
        two[two.index(flag) + 1] = value
    assert_two_processes_match_one(GRPO, one, two, tmp_path, 29619, ("final",))
