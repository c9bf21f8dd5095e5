"""Step 3 PPO: the math against direct loops and hand computations, the experience layout (log-probs line up
with the sampled tokens), the generation switch, learning a rule reward, CLI errors and bit-exact resume."""

from __future__ import annotations

import json
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

from utils.generation import SamplingConfig, left_pad, sample_tokens
from utils.rl import (
    KLController,
    degeneration,
    gae,
    kl_penalised_rewards,
    masked_whiten,
    policy_loss,
    token_logprobs,
    value_loss,
)

MAIN = str(REPO / "step3_rlhf_ppo" / "main.py")


# ----------------------------------------------------------------------------------------------------
# The math


def test_gae_equals_a_direct_loop():
    torch.manual_seed(0)
    lengths, width, gamma, lam = [5, 1, 3, 7], 7, 0.9, 0.8
    mask = ragged_mask(lengths, width)
    rewards, values = torch.randn(4, width), torch.randn(4, width)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist()
        expect, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            expect[t] = running
        assert adv[b, :n].tolist() == pytest.approx(expect, rel=1e-5, abs=1e-6)
        assert ret[b, :n].tolist() == pytest.approx([a + x for a, x in zip(expect, v, strict=True)], rel=1e-5, abs=1e-6)
        assert adv[b, n:].abs().sum() == 0 and ret[b, n:].abs().sum() == 0


def test_rewards_fall_on_reply_tokens_with_the_score_at_the_last():
    mask = ragged_mask([3, 1, 2], 3)
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0], [-1.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, -1.0], [-1.0, -3.0, -1.0]])
    scores = torch.tensor([2.0, -10.0, 0.5])
    rewards, kl = kl_penalised_rewards(logp, ref, scores, mask, kl_coef=0.1, clip=5.0)
    expect = [[-0.05, 0.0, 0.1 + 2.0], [-0.05 - 5.0, 0.0, 0.0], [0.0, -0.2 + 0.5, 0.0]]
    assert rewards.tolist() == [pytest.approx(row) for row in expect]
    assert kl.tolist() == [pytest.approx(row) for row in [[0.5, 0.0, -1.0], [0.5, 0.0, 0.0], [0.0, 2.0, 0.0]]]


def test_policy_and_value_losses_match_hand_computation():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    new = old + torch.tensor([[0.5, -0.1, 3.0]])  # ratios e^0.5 (clipped at 1.2), e^-0.1, padding
    adv = torch.tensor([[2.0, -1.0, 7.0]])
    loss, stats = policy_loss(new, old, adv, mask, clip=0.2)
    r1, r2 = torch.exp(torch.tensor(0.5)).item(), torch.exp(torch.tensor(-0.1)).item()
    expect = max(-2.0 * r1, -2.0 * 1.2) + max(1.0 * r2, 1.0 * 0.9)  # both terms: the pessimistic one
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert stats["clipfrac"].item() == 1.0  # token 1 is clipped, token 2 (ratio 0.905 > 0.8) is not
    assert stats["approx_kl"].item() == pytest.approx((r1 - 1 - 0.5) + (r2 - 1 + 0.1), rel=1e-6)

    values, old_v, returns = torch.tensor([[1.0, 0.0, 5.0]]), torch.tensor([[0.5, 0.1, 0.0]]), torch.tensor([[2.0, 1.0, 0.0]])
    vloss, vstats = value_loss(values, old_v, returns, mask, clip=0.2)
    # token 1: unclipped (1-2)^2 = 1, clipped (0.7-2)^2 = 1.69 -> 1.69; token 2: (0-1)^2 = 1 vs (0-1)^2 = 1
    assert vloss.item() == pytest.approx(0.5 * (1.69 + 1.0), rel=1e-6)
    assert vstats["vf_clipfrac"].item() == 1.0


def test_whitening_and_kl_controller():
    torch.manual_seed(1)
    mask = ragged_mask([4, 2, 6], 6)
    x = masked_whiten(torch.randn(3, 6) * 5 + 3, mask)
    real = x[mask > 0]
    assert real.mean().item() == pytest.approx(0, abs=1e-6) and real.std().item() == pytest.approx(1, rel=1e-5)
    assert x[mask == 0].abs().sum() == 0
    fixed = KLController(0.1)
    fixed.update(50.0, 64)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=1000)
    adaptive.update(9.0, 100)  # error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    adaptive.update(5.4, 100)  # error -0.1
    assert adaptive.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))


def test_degeneration_says_which_limit_the_held_out_replies_broke():
    first = {"eval_repetition": 0.02, "eval_length": 20.0}
    assert degeneration({"eval_repetition": 0.09, "eval_length": 12.0}, first, 0.1, 0.6) == ""
    assert degeneration({"eval_repetition": 0.5, "eval_length": 2.0}, first, 0.0, 0.0) == ""  # both off
    assert "repeated 4-grams 0.110 > --stop_repetition 0.1" in degeneration(
        {"eval_repetition": 0.11, "eval_length": 30.0}, first, 0.1, 0.6)
    assert "mean length 11.9 tokens < --stop_length_ratio 0.6 x 20.0" in degeneration(
        {"eval_repetition": 0.0, "eval_length": 11.9}, first, 0.1, 0.6)


# ----------------------------------------------------------------------------------------------------
# Nano models


@pytest.fixture(scope="module")
def ppo_dirs(chat_tokenizer, tmp_path_factory):
    """A nano 'SFT' model, a reward model on top of it, and a prompt file, in the steps' export formats."""
    from utils.reward import create_reward_model

    root = tmp_path_factory.mktemp("ppo")
    nano_sft_dir(root, chat_tokenizer)
    rm = create_reward_model(root / "sft", chat_tokenizer.pad_token_id, seed=1)
    rm.save_pretrained(root / "rm")
    chat_tokenizer.save_pretrained(root / "rm")
    prompts = ["好", "评价一下。", "写评论。", "说说看法。", "酒店", "续写：很", "书", "电脑怎么样"]
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
        for p in prompts * 4:
            f.write(json.dumps({"prompt": p}, ensure_ascii=False) + "\n")
    return root


def test_logprobs_line_up_with_the_sampled_tokens(ppo_dirs, chat_tokenizer):
    """The experience layout scores token j of the reply from position P + j - 1: the same log-probs
    generate computed when it sampled them (the off-by-one test), with prompts of different lengths."""
    from utils.chat import prompt_ids
    from utils.generation import stop_token_ids
    from utils.model import load_causal_lm
    from utils.rl_trainer import Experience, position_ids, reply_logits, reply_mask

    model = load_causal_lm(ppo_dirs / "sft").eval()
    rows = [prompt_ids(chat_tokenizer, [{"role": "user", "content": p}]) for p in ("好", "说说你对这家酒店的看法。")]
    ids, mask = left_pad(rows, chat_tokenizer.pad_token_id, "cpu")
    torch.manual_seed(3)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, max_new_tokens=12,
                         eos_token_id=stop_token_ids(chat_tokenizer), pad_token_id=chat_tokenizer.pad_token_id,
                         output_logits=True, return_dict_in_generate=True)
    sampled = out.sequences[:, ids.shape[1]:]
    actions, action_mask = reply_mask(sampled, stop_token_ids(chat_tokenizer), chat_tokenizer.pad_token_id)
    full_mask = torch.cat([mask, action_mask.long()], 1)
    exp = Experience(ids.shape[1], torch.cat([ids, actions], 1), full_mask, position_ids(full_mask), action_mask,
                     *(torch.empty(0),) * 4)
    with torch.no_grad():
        ours = token_logprobs(reply_logits(model, exp), actions, 0.8)
    generated = torch.stack(out.logits, 1)[:, :actions.shape[1]]  # raw logits of each decoding step
    theirs = token_logprobs(generated, actions, 0.8)
    assert action_mask.sum() >= 4
    assert torch.allclose(ours * action_mask, theirs * action_mask, atol=1e-4)


@pytest.mark.parametrize("stage", [0, 3])
def test_own_generation_path_matches_model_generate(ppo_dirs, chat_tokenizer, dist, stage):
    from utils.config import TrainConfig
    from utils.dist import choose_precision
    from utils.engine import init_engine
    from utils.hybrid import GenerationSwitch
    from utils.model import load_causal_lm

    plain = load_causal_lm(ppo_dirs / "sft").eval()
    cfg = TrainConfig(output_dir="x", zero_stage=stage, per_device_train_batch_size=2)
    engine = init_engine(load_causal_lm(ppo_dirs / "sft"), cfg, choose_precision("fp32"), 10)
    switch = GenerationSwitch(engine, chat_tokenizer, stage, use_hybrid_engine=False, lora_scale=None)
    rows = [[2, 5, 9, 30, 3], [2, 7, 3]]
    ids, mask = left_pad(rows, chat_tokenizer.pad_token_id, "cpu")
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=11)
    ours = switch.generate(ids, mask, sampling)
    theirs = sample_tokens(plain, ids, mask, sampling, chat_tokenizer)
    assert torch.equal(ours, theirs) and engine.module.training and switch.seconds > 0


def test_row_seeded_sampling_draws_from_the_filtered_softmax():
    from utils.generation import RowSeededSampling

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    n = 4000
    scores = logits.expand(n, -1).clone()
    picks = RowSeededSampling(SamplingConfig(temperature=0.8, row_seeds=tuple(range(n))))(None, scores).argmax(-1)
    freq = torch.bincount(picks, minlength=5).float() / n
    assert torch.allclose(freq, torch.softmax(logits / 0.8, -1), atol=0.03), freq
    top2 = RowSeededSampling(SamplingConfig(temperature=1.0, top_k=2, row_seeds=tuple(range(n))))(None, scores)
    assert set(top2.argmax(-1).tolist()) == {0, 1}
    again = RowSeededSampling(SamplingConfig(temperature=0.8, row_seeds=tuple(range(n))))(None, scores).argmax(-1)
    assert torch.equal(picks, again)


def test_row_seeded_reply_does_not_depend_on_the_batch(ppo_dirs, chat_tokenizer):
    """A prompt's reply under its seed is the same alone and inside a batch with longer prompts."""
    from utils.model import load_causal_lm

    model = load_causal_lm(ppo_dirs / "sft").eval()
    rows = [[2, 5, 9, 30, 3], [2, 7, 3], [2, 11, 12, 13, 14, 15, 16, 3]]
    seeds = (101, 202, 303)
    ids, mask = left_pad(rows, chat_tokenizer.pad_token_id, "cpu")
    batch = sample_tokens(model, ids, mask, SamplingConfig(12, temperature=1.0, row_seeds=seeds), chat_tokenizer)
    for i, row in enumerate(rows):
        ids1, mask1 = left_pad([row], chat_tokenizer.pad_token_id, "cpu")
        alone = sample_tokens(model, ids1, mask1, SamplingConfig(12, temperature=1.0, row_seeds=(seeds[i],)),
                              chat_tokenizer)[0]
        n = alone.shape[0]
        assert torch.equal(batch[i, :n], alone) and (batch[i, n:] == chat_tokenizer.pad_token_id).all()
    assert len({tuple(r.tolist()) for r in batch}) == 3


class EvenTokenReward(torch.nn.Module):
    """A fixed-rule reward model: 10 x the share of even token ids after the last <|im_start|> (the
    assistant header and the reply). Stands in for the step 2 model to show that PPO optimises a reward;
    like a real one it has a `score` head (here the identity) whose output at the last token is read."""

    def __init__(self):
        super().__init__()
        self.score = torch.nn.Identity()

    def forward(self, input_ids, attention_mask, **_):
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        header = torch.where(input_ids == 2, positions, -1).max(-1, keepdim=True).values
        region = (positions > header) & (attention_mask > 0)
        share = ((input_ids % 2 == 0) & region).sum(-1) / region.sum(-1).clamp(min=1)
        return self.score(share.float()[:, None, None].expand(-1, input_ids.shape[1], 1) * 10)  # (B, T, 1)


def test_ppo_raises_a_rule_reward(ppo_dirs, chat_tokenizer, dist, tmp_path):
    from step3_rlhf_ppo.main import PPOConfig
    from step3_rlhf_ppo.ppo_trainer import PPOTrainer, build_engines
    from utils.config import parse_config
    from utils.dist import choose_precision
    from utils.log import read_metrics
    from utils.preference import load_prompts
    from utils.rl_trainer import encode_prompts

    cfg = parse_config(PPOConfig, [
        "--actor_model_name_or_path", str(ppo_dirs / "sft"), "--critic_model_name_or_path", str(ppo_dirs / "rm"),
        "--data_path", str(ppo_dirs / "prompts.jsonl"), "--output_dir", str(tmp_path), "--dtype", "fp32",
        "--per_device_generation_batch_size", "8", "--per_device_training_batch_size", "4", "--max_answer_seq_len", "8",
        "--actor_learning_rate", "3e-3", "--critic_learning_rate", "3e-3", "--lr_scheduler_type", "constant",
        "--init_kl_coef", "0.01", "--max_steps", "30", "--eval_interval", "0", "--save_interval", "0",
        "--enable_tensorboard", "false", "--samples_interval", "0", "--max_approx_kl", "0"])
    precision = choose_precision("fp32")
    prompts = encode_prompts(chat_tokenizer, load_prompts(cfg.data_path), cfg.max_prompt_seq_len, "test")
    engines = build_engines(cfg, chat_tokenizer, precision, total_updates=60)
    engines.reward = EvenTokenReward()
    PPOTrainer(cfg, tmp_path, engines, chat_tokenizer, prompts, [], precision, 30, None).fit()
    scores = [r["score_mean"] for r in read_metrics(tmp_path, "train")]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 1.0, scores


def test_shaping_rewards_add_to_the_reward_models_score(ppo_dirs, chat_tokenizer, dist, tmp_path):
    from step3_rlhf_ppo.main import PPOConfig
    from step3_rlhf_ppo.ppo_trainer import PPOTrainer, build_engines
    from utils.config import parse_config
    from utils.dist import choose_precision
    from utils.preference import load_prompts
    from utils.reward import sequence_rewards
    from utils.rewards import repeated_ngram_share
    from utils.rl_trainer import PromptCollator, encode_prompts

    cfg = parse_config(PPOConfig, [
        "--actor_model_name_or_path", str(ppo_dirs / "sft"), "--critic_model_name_or_path", str(ppo_dirs / "rm"),
        "--data_path", str(ppo_dirs / "prompts.jsonl"), "--output_dir", str(tmp_path), "--dtype", "fp32",
        "--per_device_generation_batch_size", "8", "--per_device_training_batch_size", "4",
        "--max_answer_seq_len", "16", "--temperature", "1.5", "--shaping_funcs", "repetition", "length",
        "--shaping_weights", "2", "0.5", "--enable_tensorboard", "false"])
    precision = choose_precision("fp32")
    prompts = encode_prompts(chat_tokenizer, load_prompts(cfg.data_path), cfg.max_prompt_seq_len, "test")
    engines = build_engines(cfg, chat_tokenizer, precision, total_updates=2)
    trainer = PPOTrainer(cfg, tmp_path, engines, chat_tokenizer, prompts, [], precision, 1, None)
    batch = PromptCollator(chat_tokenizer.pad_token_id)(prompts[:8])
    exp = trainer.rollout(batch, key=1)
    with torch.no_grad():
        rm = sequence_rewards(engines.reward, **exp.model_inputs())
    lengths = exp.mask.sum(-1).tolist()
    length = [-min(max(n - 12, 0) / 4, 1.0) for n in lengths]  # the last quarter of 16 tokens
    expected = [-2 * repeated_ngram_share(r) + 0.5 * p for r, p in zip(trainer.texts(exp)[1], length, strict=True)]
    assert exp.shaping.tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(exp.scores, rm) and min(length) < 0  # some replies hit the limit
    # the per-token rewards hold the clipped score plus the unclipped shaping at each reply's last token
    exp = trainer.make_experience(batch, key=1)
    last = exp.mask.sum(-1).long() - 1
    kl = (exp.logprobs - exp.ref_logprobs)[torch.arange(8), last]
    at_last = exp.rewards[torch.arange(8), last] + cfg.init_kl_coef * kl
    assert torch.allclose(at_last, rm.clamp(-5, 5) + exp.shaping, atol=1e-5)


def test_ppo_with_pretraining_mix_lora_and_zero3(ppo_dirs, chat_tokenizer, token_dir, dist, tmp_path):
    """The less travelled paths run together: ZeRO-3 actor (generation from the gathered copy) with LoRA,
    ZeRO-2 critic, the ptx loss on step0-style tokens, EMA; exports reload and the EMA trails the actor."""
    from safetensors.torch import load_file

    from step3_rlhf_ppo.main import main as ppo_main
    from utils.log import read_metrics

    args = base_args(ppo_dirs, tmp_path)
    ppo_main([*args, "--max_steps", "2", "--actor_zero_stage", "3", "--critic_zero_stage", "2", "--actor_lora_dim", "4",
              "--ptx_data", str(token_dir), "--ptx_coef", "0.5", "--enable_ema", "--ema_decay", "0.5",
              "--eval_interval", "0", "--save_interval", "0"])
    train = read_metrics(tmp_path, "train")
    assert len(train) == 2 and all(r["ptx_loss"] > 0 for r in train)
    assert json.loads((tmp_path / "config.json").read_text())["generation_path"].startswith("own (weights gathered")
    actor, ema = (load_file(tmp_path / d / "model.safetensors") for d in ("final", "final_ema"))
    sft = load_file(ppo_dirs / "sft" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    moved, ema_moved = (actor[key] - sft[key]).abs().max(), (ema[key] - sft[key]).abs().max()
    assert 0 < ema_moved < moved  # LoRA merged into the export; the EMA lags behind it


# ----------------------------------------------------------------------------------------------------
# The command line: errors and resume


def base_args(dirs: Path, out: Path) -> list[str]:
    return ["--actor_model_name_or_path", str(dirs / "sft"), "--critic_model_name_or_path", str(dirs / "rm"),
            "--data_path", str(dirs / "prompts.jsonl"), "--eval_prompts", str(dirs / "prompts.jsonl"),
            "--output_dir", str(out), "--dtype", "fp32", "--per_device_generation_batch_size", "4",
            "--per_device_training_batch_size", "2", "--max_answer_seq_len", "8", "--actor_learning_rate", "1e-3",
            "--critic_learning_rate", "1e-3", "--enable_tensorboard", "false", "--eval_batches", "1",
            "--per_device_eval_batch_size", "4", "--samples_interval", "2", "--ppo_epochs", "2"]


@pytest.mark.parametrize("swap, extra, expected, subprocess_run", [
    (True, [], "reward", True),  # a reward model where the actor is expected
    (False, ["--per_device_generation_batch_size", "5"], "multiple of", False),
    (False, ["--offload_reference_model"], "actor_zero_stage 3", False),
    (False, ["--stop_repetition", "0.1", "--eval_interval", "0"], "needs held-out prompts", False),
    (False, ["--stop_length_ratio", "0.5", "--eval_interval", "2", "--save_interval", "3"], "checkpoints must fall", False),
])
def test_bad_input_one_line_exit_2(ppo_dirs, tmp_path, capsys, swap, extra, expected, subprocess_run):
    """One error line, exit 2, no final/: through the real command line once, in this process for the rest."""
    from step3_rlhf_ppo.main import main as ppo_main

    args = base_args(ppo_dirs, tmp_path / "run")
    if swap:
        args[1] = str(ppo_dirs / "rm")
    if subprocess_run:
        r = run_python([MAIN, *args, *extra], timeout=120)
        code, stderr = r.returncode, r.stderr
    else:
        with pytest.raises(SystemExit) as exit_info:
            ppo_main([*args, *extra])
        code, stderr = exit_info.value.code, capsys.readouterr().err
    assert code == 2, stderr[-2000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in stderr
    assert not (tmp_path / "run" / "final").exists()


def test_degenerated_replies_stop_training_and_export_the_last_good_weights(ppo_dirs, tmp_path):
    """A length floor no reply can reach (100 x the first evaluation's) fails the first evaluation after
    training: PPO stops there and exports the weights saved at the evaluation before it, the SFT model's."""
    from safetensors.torch import load_file

    from step3_rlhf_ppo.main import main as ppo_main
    from utils.log import read_metrics

    summary = ppo_main([*base_args(ppo_dirs, tmp_path), "--max_steps", "6", "--eval_interval", "2",
                        "--save_interval", "0", "--stop_length_ratio", "100"])
    stop = summary["stopped_degenerated"]
    assert stop["step"] == 2 and stop["exported_step"] == 0 and "--stop_length_ratio 100" in stop["reason"]
    assert summary["steps"] == 2 and summary["final_eval"] == summary["first_eval"]
    assert [r["step"] for r in read_metrics(tmp_path, "eval")] == [0, 2]
    sft, final = load_file(ppo_dirs / "sft" / "model.safetensors"), load_file(tmp_path / "final" / "model.safetensors")
    assert sft.keys() == final.keys() and all(torch.equal(sft[k], final[k]) for k in sft)
    assert len(read_metrics(tmp_path, "train")) == 2 and (tmp_path / "done").is_file()


def test_sigkill_then_resume_is_bit_exact(ppo_dirs, tmp_path):
    args = [*base_args(ppo_dirs, tmp_path), "--max_steps", "6", "--save_interval", "2", "--eval_interval", "3"]
    assert_rl_resume_is_bit_exact(MAIN, without_output_dir(args), tmp_path, 6, ("final", "critic"))


def test_two_processes_match_one(ppo_dirs, tmp_path):
    """deepspeed --num_gpus 2 with 2 prompts per rank == 1 process with 4: every prompt samples from its
    own seeded generator and mini-batches are cut the same way, so replies, rewards, losses and the
    trained weights agree (up to float summation order)."""
    steps = ["--max_steps", "3", "--save_interval", "0", "--eval_interval", "3"]
    one = [*without_output_dir(base_args(ppo_dirs, tmp_path)), *steps]
    two = list(one)
    for flag, value in (("--per_device_generation_batch_size", "2"), ("--per_device_training_batch_size", "1"),
                        ("--per_device_eval_batch_size", "2")):
        two[two.index(flag) + 1] = value
    assert_two_processes_match_one(MAIN, one, two, tmp_path, 29613, ("final", "critic"))
