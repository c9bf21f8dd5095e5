"""Step 1 SFT: the label mask token by token, overfitting and exact answers, packing, LoRA, resume, chat.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, clean_env
from safetensors.torch import load_file

from step1_pretrain_sft.main import main as step1_main
from utils.chat import (
    PackedCollator,
    PaddedCollator,
    pack_rows,
    render_chat,
    with_conversation_weights,
    with_task_weights,
)
from utils.lm import CausalLMTask
from utils.log import read_metrics
from utils.losses import count_label_tokens, next_token_loss_sum

CONVERSATIONS = [
    [{"role": "user", "content": "判断情感：房间干净，服务很好"}, {"role": "assistant", "content": "正面"}],
    [{"role": "user", "content": "判断情感：太吵了，不会再来"}, {"role": "assistant", "content": "负面"}],
    [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "写一条好评"},
     {"role": "assistant", "content": "这本书写得很好，值得一读"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，有什么可以帮你？"},
     {"role": "user", "content": "谢谢"}, {"role": "assistant", "content": "不客气"}],
]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_mask_token_by_token(chat_tokenizer):
    tok = chat_tokenizer
    messages = CONVERSATIONS[2] + [{"role": "user", "content": "再写一条"}, {"role": "assistant", "content": "很好"}]
    expected_ids, expected_labels = [], []
    for m in messages:
        header = ids(tok, "<|im_start|>") + ids(tok, f"{m['role']}\n")
        body = ids(tok, m["content"]) + ids(tok, "<|im_end|>")
        newline = ids(tok, "\n")
        expected_ids += header + body + newline
        learn = m["role"] == "assistant"
        expected_labels += [-100] * len(header) + (body if learn else [-100] * len(body)) + [-100] * len(newline)
    row = render_chat(tok, messages)
    assert row["input_ids"] == expected_ids
    assert row["labels"] == expected_labels
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for t in row["labels"] if t == im_end) == 2  # both replies' end markers carry loss


def test_collators_layout(chat_tokenizer):
    rows = [render_chat(chat_tokenizer, c) for c in CONVERSATIONS]
    batch = PaddedCollator(chat_tokenizer.pad_token_id)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    packed = pack_rows(rows, max_len=max(lengths) * 2)
    assert sum(len(p["input_ids"]) for p in packed) == sum(lengths) and len(packed) < len(rows)
    pb = PackedCollator(chat_tokenizer.pad_token_id)(packed)
    assert "attention_mask" not in pb and pb["position_ids"][0, 0] == 0


def test_packed_rows_do_not_attend_across_conversations(chat_tokenizer):
    """Logits of a packed row equal the logits of each conversation run on its own."""
    from utils.model import create_causal_lm

    model = create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).eval()
    rows = [render_chat(chat_tokenizer, c) for c in CONVERSATIONS[:3]]
    packed = PackedCollator(chat_tokenizer.pad_token_id)(pack_rows(rows, 10_000))
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for r in rows:
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            assert torch.allclose(together[start:start + len(r["input_ids"])], alone, atol=1e-5)
            start += len(r["input_ids"])


def assert_weighted_loss(tok, model, rows: list[dict], expected: float) -> CausalLMTask:
    """Weighted rows give loss sum `expected` and one unit per conversation, packed and padded alike."""
    task = CausalLMTask([], None, 1, 0)
    for batch in (PackedCollator(tok.pad_token_id)(pack_rows(rows, 10_000)), PaddedCollator(tok.pad_token_id)(rows)):
        assert task.units(batch) == pytest.approx(len(rows))
        with torch.no_grad():
            assert task.loss(model, batch).loss_sum.item() == pytest.approx(expected, rel=1e-5)
    return task


def test_conversation_weighting_averages_per_conversation(chat_tokenizer):
    """--loss_weighting conversation: the loss sum is the sum over conversations of each one's mean token
    loss, its units are conversations, and the weights survive packing and padding unchanged."""
    from utils.model import create_causal_lm

    rows = [with_conversation_weights(render_chat(chat_tokenizer, c)) for c in CONVERSATIONS]
    for r in rows:
        scored = [j for j in range(1, len(r["labels"])) if r["labels"][j] != -100]
        assert sum(r["loss_weights"]) == pytest.approx(1.0)
        assert [j for j, w in enumerate(r["loss_weights"]) if w] == scored
        assert len({r["loss_weights"][j] for j in scored}) == 1  # equal shares within a conversation
    model = create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).eval()
    expected = 0.0
    with torch.no_grad():
        for r in rows:  # each conversation alone, plain per-token mean
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits
            labels = torch.tensor([r["labels"]])
            expected += (next_token_loss_sum(logits, labels) / (labels[:, 1:] != -100).sum()).item()
    task = assert_weighted_loss(chat_tokenizer, model, rows, expected)
    # without weights the same rows give the token-weighted sum, a different number
    plain = PaddedCollator(chat_tokenizer.pad_token_id)([render_chat(chat_tokenizer, c) for c in CONVERSATIONS])
    assert task.units(plain) == sum(len([t for t in r["labels"][1:] if t != -100]) for r in rows)


def test_task_weighting_gives_each_task_its_conversation_share(chat_tokenizer):
    """--loss_weighting task: a task's weights sum to its number of conversations, every token of a task
    weighs the same, and the loss is the sum over tasks of (conversations / tokens) x the task's token
    loss sum, packed or padded."""
    from utils.model import create_causal_lm

    tasks = ["a", "a", "b", "a"]
    plain = [render_chat(chat_tokenizer, c) for c in CONVERSATIONS]
    rows = with_task_weights(plain, tasks)
    scored = [[j for j in range(1, len(r["labels"])) if r["labels"][j] != -100] for r in rows]
    for name, conversations in (("a", 3), ("b", 1)):
        mine = [i for i, t in enumerate(tasks) if t == name]
        assert sum(sum(rows[i]["loss_weights"]) for i in mine) == pytest.approx(conversations)
        assert len({rows[i]["loss_weights"][j] for i in mine for j in scored[i]}) == 1
    assert all([j for j, w in enumerate(r["loss_weights"]) if w] == s for r, s in zip(rows, scored, strict=True))
    model = create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).eval()
    sums, tokens = {"a": 0.0, "b": 0.0}, {"a": 0, "b": 0}
    with torch.no_grad():
        for r, t in zip(plain, tasks, strict=True):
            labels = torch.tensor([r["labels"]])
            sums[t] += next_token_loss_sum(model(input_ids=torch.tensor([r["input_ids"]])).logits, labels).item()
            tokens[t] += int((labels[:, 1:] != -100).sum())
    expected = 3 / tokens["a"] * sums["a"] + 1 / tokens["b"] * sums["b"]
    task = assert_weighted_loss(chat_tokenizer, model, rows, expected)
    # rows without a task form one task: the mean loss is the token-weighted one
    one, plain_batch = (PaddedCollator(chat_tokenizer.pad_token_id)(r)
                        for r in (with_task_weights(plain, [None] * len(plain)), plain))
    with torch.no_grad():
        mean_one = task.loss(model, one).loss_sum.item() / task.units(one)
        mean_plain = task.loss(model, plain_batch).loss_sum.item() / task.units(plain_batch)
    assert mean_one == pytest.approx(mean_plain, rel=1e-5)


def test_loss_runs_the_head_only_on_scored_positions(chat_tokenizer):
    """CausalLMTask.loss hands the model a logits_to_keep mask: the LM head sees only positions that score a
    label, and the loss and every gradient equal the full-logits computation, packed and padded, with and
    without loss weights."""
    from utils.model import create_causal_lm

    model = create_causal_lm("nano", len(chat_tokenizer), 256, seed=0)
    plain = [render_chat(chat_tokenizer, c) for c in CONVERSATIONS]
    task, pad = CausalLMTask([], None, 1, 0), chat_tokenizer.pad_token_id
    head_rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[:-1].numel()))
    for rows in (plain, with_task_weights(plain, ["a", "a", "b", "a"])):
        for batch in (PackedCollator(pad)(pack_rows(rows, 10_000)), PaddedCollator(pad)(rows)):
            head_rows.clear()
            model.zero_grad()
            task.loss(model, batch).loss_sum.backward()
            mine = [p.grad.clone() for p in model.parameters()]
            assert head_rows == [count_label_tokens(batch["labels"])]
            model.zero_grad()
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
            full = next_token_loss_sum(model(**inputs, use_cache=False).logits, batch["labels"], batch.get("loss_weights"))
            full.backward()
            assert head_rows[-1] == batch["input_ids"].numel()
            assert task.loss(model, batch).loss_sum.item() == pytest.approx(full.item(), rel=1e-6)
            for a, p in zip(mine, model.parameters(), strict=True):
                assert torch.allclose(a, p.grad, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def sft_inputs(chat_tokenizer, tmp_path_factory):
    """A nano base model dir (with tokenizer) and an SFT dataset dir of the 4 conversations."""
    import datasets

    from utils.model import create_causal_lm

    root = tmp_path_factory.mktemp("sft")
    base = root / "base"
    create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).save_pretrained(base)
    chat_tokenizer.save_pretrained(base)
    data = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"messages": CONVERSATIONS * 4}),
                                 "validation": datasets.Dataset.from_dict({"messages": CONVERSATIONS})})
    data.save_to_disk(root / "sft")
    return base, root / "sft"


def sft(out: Path, base: Path, data: Path, *extra: str) -> dict:
    return step1_main(["--stage", "sft", "--model_name_or_path", str(base), "--data_path", str(data),
                       "--output_dir", str(out), "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
                       "--lr_scheduler_type", "constant", "--dtype", "fp32", "--eval_interval", "0",
                       "--save_interval", "0", "--enable_tensorboard", "false", *extra])


def test_overfit_then_answer_exactly(dist, sft_inputs, tmp_path, chat_tokenizer):
    from utils.generation import SamplingConfig, generate_replies
    from utils.model import load_causal_lm

    base, data = sft_inputs
    sft(tmp_path, base, data, "--max_steps", "150")
    assert read_metrics(tmp_path, "train")[-1]["loss"] < 0.1
    assert read_metrics(tmp_path, "eval")[-1]["loss"] < 0.1
    model = load_causal_lm(tmp_path / "final").eval()
    prompts = [c[:-1] for c in CONVERSATIONS]
    replies = generate_replies(model, chat_tokenizer, prompts, SamplingConfig(max_new_tokens=40), batch_size=4)
    assert replies == [c[-1]["content"] for c in CONVERSATIONS]


def test_packing_trains_too(dist, sft_inputs, tmp_path):
    base, data = sft_inputs
    sft(tmp_path, base, data, "--max_steps", "60", "--packing", "--max_seq_len", "128",
        "--per_device_train_batch_size", "1")
    losses = [r["loss"] for r in read_metrics(tmp_path, "train")]
    assert losses[-1] < losses[0] / 3


def test_lora_trains_only_adapters_and_merges_exactly(dist, sft_inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    from step1_pretrain_sft.main import Step1Config
    from utils.checkpoint import CheckpointManager
    from utils.config import parse_config
    from utils.dist import choose_precision
    from utils.engine import init_engine
    from utils.model import apply_lora, load_causal_lm

    base, data = sft_inputs
    args = ["--lora_dim", "4", "--lora_alpha", "8", "--lora_module_name", "q_proj", "v_proj", "up_proj"]
    sft(tmp_path, base, data, "--max_steps", "20", *args)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["trainable_parameters"] < config["parameters"] / 5
    # base + adapter, rebuilt from the last checkpoint
    cfg = parse_config(Step1Config, ["--stage", "sft", "--model_name_or_path", str(base), "--data_path", "x",
                                     "--output_dir", str(tmp_path), *args])
    original = load_causal_lm(base)
    peft_model = apply_lora(load_causal_lm(base), 4, 8, 0.0, ["q_proj", "v_proj", "up_proj"])
    engine = init_engine(peft_model, cfg, choose_precision("fp32"), 20)
    manager = CheckpointManager(tmp_path / "checkpoints")
    manager.load(engine, manager.latest())
    trained = dict(engine.module.named_parameters())
    for name, p in original.named_parameters():  # base weights untouched
        key = next(k for k in trained if k.endswith(name.replace(".weight", ".base_layer.weight"))
                   or k.endswith("model." + name))
        assert torch.equal(trained[key], p), name
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    ids_ = torch.randint(0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    engine.eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids_).logits, engine(input_ids=ids_).logits, atol=1e-5)


def test_resume_mid_sft_is_bit_exact(dist, sft_inputs, tmp_path):
    base, data = sft_inputs
    steps = ["--max_steps", "12", "--save_interval", "6", "--keep_last", "3"]
    sft(tmp_path / "full", base, data, *steps)
    sft(tmp_path / "cut", base, data, *steps)
    cut = tmp_path / "cut"
    shutil.rmtree(cut / "checkpoints" / "step00000012")  # as if the run died after step 6's checkpoint
    shutil.rmtree(cut / "final")
    (cut / "done").unlink()
    sft(cut, base, data, *steps)
    wa = load_file(tmp_path / "full" / "final" / "model.safetensors")
    wb = load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    drop = ("tok_per_s", "mfu")
    ma = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "full")]
    mb = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(cut)]
    assert ma == mb and len(ma) == 13


def test_chat_cli_answers_and_exits_on_eof(dist, sft_inputs, tmp_path):
    base, data = sft_inputs
    sft(tmp_path, base, data, "--max_steps", "150")
    proc = subprocess.run([sys.executable, "step1_pretrain_sft/chat.py", "--model", str(tmp_path / "final"),
                           "--greedy"], input="判断情感：房间干净，服务很好\n/reset\n你好\n", cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "助手> 正面\n" in proc.stdout and "history cleared" in proc.stdout
    assert "助手> 你好，有什么可以帮你？\n" in proc.stdout
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "谢谢", "id": 7}, ensure_ascii=False) + "\n")
    out = tmp_path / "a.jsonl"
    proc = subprocess.run([sys.executable, "step1_pretrain_sft/chat.py", "--model", str(tmp_path / "final"),
                           "--greedy", "--prompts", str(prompts), "--out", str(out)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["id"] == 7 and row["prompt"] == "谢谢" and isinstance(row["response"], str)


def test_chat_rejects_a_reward_model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}))
    proc = subprocess.run([sys.executable, "step1_pretrain_sft/chat.py", "--model", str(tmp_path)], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "reward model" in proc.stderr
