"""Starting from an existing Hugging Face model: a tiny model with its own byte-level BPE tokenizer and a
Llama-3 style header chat template (not ChatML), in two variants:
  pad_is_eot_text: Qwen2 architecture, pad == eos == <|endoftext|> (Qwen2.5 base style), end of turn <|eot_id|>;
  no_pad:          Llama architecture, no pad token, eos == <|eot_id|> (Llama-3 instruct style), so the pad
                   rule makes the end-of-turn token the pad token and every reply ends with the pad id.
                   (Not Qwen2: transformers gives any tokenizer of a Qwen2 model dir a <|endoftext|> pad.)
Checked: the pad rule, assistant-only labels against hand-computed spans, stop tokens from the template,
clear errors for templates that are not prefix-stable, the reward read at the reply's last token, and SFT,
chat.py, the reward model, PPO and DPO running from these models."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PAIRS, REPO, clean_env

from step1_pretrain_sft.main import main as step1_main
from step2_reward_model.main import main as step2_main
from step2_reward_model.rw_eval import main as rw_eval_main
from step3_rlhf_ppo.dpo import main as dpo_main
from step3_rlhf_ppo.main import main as ppo_main
from testkit.chat_tokenizer import train_byte_bpe
from utils.chat import render_chat, render_response
from utils.errors import UserError
from utils.generation import stop_token_ids
from utils.log import read_metrics
from utils.reward import create_reward_model, load_reward_model, score_sequences, sequence_rewards
from utils.tokenizer import load_tokenizer_dir, prepare_tokenizer

SPECIAL = ["<unk>", "<|begin_of_text|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
HEADER_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
VARIANTS = {"pad_is_eot_text": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
            "no_pad": {"eos_token": "<|eot_id|>"}}
ARCHITECTURE = {"pad_is_eot_text": "Qwen2", "no_pad": "Llama"}
CONVERSATIONS = [
    [{"role": "user", "content": "判断情感：房间干净，服务很好"}, {"role": "assistant", "content": "正面"}],
    [{"role": "user", "content": "判断情感：太吵了，不会再来"}, {"role": "assistant", "content": "负面"}],
    [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "写一条好评"},
     {"role": "assistant", "content": "这本书写得很好"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，有什么可以帮你？"},
     {"role": "user", "content": "谢谢"}, {"role": "assistant", "content": "不客气"}],
]


def header_tokenizer(variant: str, template: str = HEADER_TEMPLATE):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=train_byte_bpe(SPECIAL), unk_token="<unk>",
                                  bos_token="<|begin_of_text|>", **VARIANTS[variant],
                                  additional_special_tokens=[t for t in SPECIAL[2:] if t not in VARIANTS[variant].values()])
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module", params=list(VARIANTS))
def base(request, tmp_path_factory) -> Path:
    """A Hugging Face dir as a user would download it: a tiny causal LM and its tokenizer."""
    import transformers

    tok = header_tokenizer(request.param)
    out = tmp_path_factory.mktemp(request.param) / "base"
    torch.manual_seed(0)
    arch = ARCHITECTURE[request.param]
    config = getattr(transformers, f"{arch}Config")(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    getattr(transformers, f"{arch}ForCausalLM")(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def no_pad(base: Path) -> bool:
    return base.parent.name.startswith("no_pad")


def test_pad_rule(base):
    from transformers import AutoTokenizer

    tok = load_tokenizer_dir(base, "--model_name_or_path")
    eos = tok.convert_tokens_to_ids("<|eot_id|>" if no_pad(base) else "<|endoftext|>")
    assert tok.pad_token_id == tok.eos_token_id == eos  # declared (Qwen2.5 base) or mapped (no pad token)
    assert len(tok) == len(AutoTokenizer.from_pretrained(base))  # no token added: the embedding still fits
    bare = header_tokenizer("no_pad")
    bare.eos_token = None
    with pytest.raises(UserError, match="neither a pad nor an eos token"):
        prepare_tokenizer(bare, "x")


def test_labels_mask_exactly_the_assistant_tokens(base):
    tok = load_tokenizer_dir(base, "--model_name_or_path")
    for messages in CONVERSATIONS:
        expected_ids, expected_labels = [tok.bos_token_id], [-100]
        for m in messages:
            header = [tok.convert_tokens_to_ids("<|start_header_id|>"), *ids(tok, m["role"]),
                      tok.convert_tokens_to_ids("<|end_header_id|>"), *ids(tok, "\n"), *ids(tok, "\n")]
            body = ids(tok, m["content"]) + [tok.convert_tokens_to_ids("<|eot_id|>")]
            expected_ids += header + body
            expected_labels += [-100] * len(header) + (body if m["role"] == "assistant" else [-100] * len(body))
        row = render_chat(tok, messages)
        assert row["input_ids"] == expected_ids
        assert row["labels"] == expected_labels


def test_stop_tokens_come_from_the_template(base, chat_tokenizer):
    tok = load_tokenizer_dir(base, "--model_name_or_path")
    eot, end_of_text = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert stop_token_ids(tok) == ([eot] if no_pad(base) else [eot, end_of_text])
    ids_of = chat_tokenizer.convert_tokens_to_ids
    assert stop_token_ids(chat_tokenizer) == [ids_of("<|im_end|>"), ids_of("<|endoftext|>")]  # step0's ChatML
    tok.chat_template = None
    assert stop_token_ids(tok) == [tok.eos_token_id]  # a base model without a template: eos only


def test_templates_that_are_not_prefix_stable_are_one_clear_error():
    strips = HEADER_TEMPLATE.replace("{{ m['content'] | trim }}", "{{ (m['content'].split('</think>')[-1] "
                                     "if m['role'] == 'assistant' and not loop.last else m['content']) | trim }}")
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "<think>想</think>好"},
                {"role": "user", "content": "谢谢"}, {"role": "assistant", "content": "不客气"}]
    with pytest.raises(UserError, match="rewrites earlier turns") as err:
        render_chat(header_tokenizer("no_pad", strips), messages)
    assert "not prefix-stable" in str(err.value) and "--tokenizer_path" in str(err.value)
    other_prompt = HEADER_TEMPLATE.replace("assistant<|end_header_id|>\n\n{% endif %}", "bot:{% endif %}")
    with pytest.raises(UserError, match="add_generation_prompt"):
        render_chat(header_tokenizer("no_pad", other_prompt), messages[:2])


def head_at_last_token(model, row: list[int]) -> float:
    """The score head applied to the unpadded row's last hidden state: the reward by definition."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([row])).last_hidden_state[0, -1]
        return model.score(hidden).item()


def test_reward_is_read_at_the_replys_last_token(base):
    tok = load_tokenizer_dir(base, "--model_name_or_path")
    model = create_reward_model(base, tok.pad_token_id, seed=0).eval()
    pad = tok.pad_token_id
    rows = [render_response(tok, p[0], p[1]) for p in PAIRS[:2]]
    rows += [rows[0] + [pad], rows[1][:5] + [pad] + rows[1][5:]]  # the pad id last, and inside a row
    assert rows[2][-1] == pad and pad in rows[3][:-1]
    expected = [head_at_last_token(model, r) for r in rows]
    width = max(map(len, rows))
    with torch.no_grad():
        for side in ("right", "left"):
            batch = torch.full((len(rows), width), pad)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                cut = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
                batch[i, cut], mask[i, cut] = torch.tensor(r), 1
            assert sequence_rewards(model, batch, mask).tolist() == pytest.approx(expected, abs=1e-5), side
        assert score_sequences(model, pad, rows, batch_size=4) == pytest.approx(expected, abs=1e-5)
        # transformers' own pooling (last token that is not the pad id) misses the row that ends with it
        right = torch.full((len(rows), width), pad)
        for i, r in enumerate(rows):
            right[i, :len(r)] = torch.tensor(r)
        assert model(input_ids=right).logits[2, 0].item() != pytest.approx(expected[2], abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# The steps, run from the foreign model


@pytest.fixture(scope="module")
def chain(dist, base) -> dict[str, Path]:
    """SFT (overfit on the 4 conversations), then a reward model on it, and the prompt and pair data."""
    import datasets

    root = base.parent
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"messages": CONVERSATIONS * 4})}).save_to_disk(root / "sft_data")
    cols = {k: [p[i] for p in PAIRS] for i, k in enumerate(("prompt", "chosen", "rejected", "kind"))}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols),
                          "validation": datasets.Dataset.from_dict(cols)}).save_to_disk(root / "pairs")
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
        for p in PAIRS:
            f.write(json.dumps({"prompt": p[0]}, ensure_ascii=False) + "\n")
    common = ["--dtype", "fp32", "--eval_interval", "0", "--save_interval", "0", "--enable_tensorboard", "false",
              "--per_device_train_batch_size", "4", "--lr_scheduler_type", "constant"]
    step1_main(["--stage", "sft", "--model_name_or_path", str(base), "--data_path", str(root / "sft_data"),
                "--output_dir", str(root / "sft"), "--max_steps", "100", "--learning_rate", "1e-2", *common])
    step2_main(["--model_name_or_path", str(root / "sft" / "final"), "--data_path", str(root / "pairs"),
                "--output_dir", str(root / "rm"), "--max_steps", "6", "--learning_rate", "3e-3", "--max_seq_len", "96",
                *common, "--eval_interval", "6"])
    return {"sft": root / "sft" / "final", "rm": root / "rm" / "final", "pairs": root / "pairs",
            "prompts": root / "prompts.jsonl", "root": root}


def test_sft_then_chat_answers_and_stops_at_the_end_of_turn(chain):
    from utils.generation import SamplingConfig, generate_ids
    from utils.model import load_for_inference

    model, tok = load_for_inference(chain["sft"])
    assert tok.pad_token_id == tok.eos_token_id  # the export names the pad token it trained with
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    prompts = chain["root"] / "chat_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": c[0]["content"], "n": i}, ensure_ascii=False) + "\n"
                               for i, c in enumerate(CONVERSATIONS[:2])), encoding="utf-8")
    out = chain["root"] / "answers.jsonl"
    proc = subprocess.run([sys.executable, "step1_pretrain_sft/chat.py", "--model", str(chain["sft"]), "--greedy",
                           "--prompts", str(prompts), "--out", str(out)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [a["response"] for a in answers] == ["正面", "负面"] and [a["n"] for a in answers] == [0, 1]
    # generation stops at the template's <|eot_id|>: it is the token sampled right after the reply
    from utils.chat import prompt_ids
    from utils.generation import left_pad, sample_tokens

    row = prompt_ids(tok, CONVERSATIONS[0][:1])
    raw = sample_tokens(model, *left_pad([row], tok.pad_token_id, "cpu"), SamplingConfig(max_new_tokens=8), tok)[0]
    reply = generate_ids(model, tok, [row], SamplingConfig(max_new_tokens=8))[0]
    assert tok.decode(reply) == "正面" and raw[len(reply)].item() == eot


def test_reward_model_export_and_rw_eval(chain, tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer_dir(chain["rm"], "--model")
    model = AutoModelForSequenceClassification.from_pretrained(chain["rm"]).eval()
    arch = ARCHITECTURE["no_pad" if no_pad(chain["root"] / "base") else "pad_is_eot_text"]
    assert type(model).__name__ == f"{arch}ForSequenceClassification" and model.config.pad_token_id == tok.pad_token_id
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p[0], "chosen": p[1], "rejected": p[2]}, ensure_ascii=False) + "\n"
                             for p in PAIRS), encoding="utf-8")
    report = rw_eval_main(["--model", str(chain["rm"]), "--pairs", str(pairs)])
    expected = [head_at_last_token(model, render_response(tok, p[0], p[1])) for p in PAIRS]
    assert [s["chosen"] for s in report["scores"]] == pytest.approx(expected, abs=1e-5)
    evals = read_metrics(chain["rm"].parent, "eval")
    assert evals[-1]["step"] == 6 and math.isfinite(evals[-1]["loss"])


def test_ppo_scores_the_replys_last_token_and_trains(chain, tmp_path):
    from safetensors.torch import load_file

    from step3_rlhf_ppo.main import PPOConfig
    from step3_rlhf_ppo.ppo_trainer import PPOTrainer, build_engines
    from utils.config import parse_config
    from utils.dist import choose_precision
    from utils.preference import load_prompts
    from utils.rl_trainer import encode_prompts

    args = ["--actor_model_name_or_path", str(chain["sft"]), "--critic_model_name_or_path", str(chain["rm"]),
            "--data_path", str(chain["prompts"]), "--output_dir", str(tmp_path), "--dtype", "fp32",
            "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "2",
            "--max_answer_seq_len", "8", "--actor_learning_rate", "1e-3",
            "--critic_learning_rate", "1e-3", "--enable_tensorboard", "false", "--eval_interval", "0",
            "--save_interval", "0", "--samples_interval", "1", "--max_steps", "2"]
    tok = load_tokenizer_dir(chain["sft"], "--tokenizer_path")
    cfg = parse_config(PPOConfig, args)
    engines = build_engines(cfg, tok, choose_precision("fp32"), total_updates=4)
    prompts = encode_prompts(tok, load_prompts(cfg.data_path), cfg.max_prompt_seq_len, "test")
    trainer = PPOTrainer(cfg, tmp_path, engines, tok, prompts, [], choose_precision("fp32"), 2, None)
    exp = trainer.rollout(trainer.collate(prompts[:4]), key=1)
    reward = load_reward_model(chain["rm"]).eval()  # the frozen reward model's weights, unwrapped
    for i in range(4):
        real = exp.input_ids[i][exp.attention_mask[i] > 0].tolist()
        assert exp.scores[i].item() == pytest.approx(head_at_last_token(reward, real), abs=1e-4)
    summary = ppo_main(args)
    assert summary["steps"] == 2 and len(read_metrics(tmp_path, "train")) == 2
    actor, start = (load_file(d / "model.safetensors") for d in (tmp_path / "final", chain["sft"]))
    assert any(not torch.equal(actor[k], start[k]) for k in start)


def test_dpo_runs_from_the_foreign_model(chain, tmp_path):
    dpo_main(["--model_name_or_path", str(chain["sft"]), "--data_path", str(chain["pairs"]), "--output_dir",
              str(tmp_path), "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--lr_scheduler_type",
              "constant", "--dtype", "fp32", "--eval_interval", "5", "--save_interval", "0", "--enable_tensorboard",
              "false", "--max_seq_len", "128", "--max_steps", "5"])
    evals = read_metrics(tmp_path, "eval")
    assert evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the start
    assert evals[-1]["step"] == 5 and evals[-1]["loss"] < evals[0]["loss"]
