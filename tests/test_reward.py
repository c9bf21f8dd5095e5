"""Step 2: the pairwise loss, where the reward is read, training to accuracy 1.0, rw_eval, reload, 2 processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PAIRS, REPO, clean_env

from step2_reward_model.main import main as step2_main
from step2_reward_model.rw_eval import length_split
from step2_reward_model.rw_eval import main as rw_eval_main
from utils.chat import render_response
from utils.log import read_metrics
from utils.losses import pairwise_reward_loss
from utils.preference import Pair


def test_loss_matches_hand_computation():
    rc, rr = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.5])
    margin = torch.tensor([0.5, 0.0, 1.0])
    expected = [-math.log(1 / (1 + math.exp(-(c - r - m)))) + 0.1 * (c + r) ** 2
                for c, r, m in zip(rc.tolist(), rr.tolist(), margin.tolist(), strict=True)]
    got = pairwise_reward_loss(rc, rr, margin, center_coef=0.1)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert pairwise_reward_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))


@pytest.fixture(scope="module")
def rm_inputs(chat_tokenizer, tmp_path_factory):
    import datasets

    from utils.model import create_causal_lm

    root = tmp_path_factory.mktemp("rm")
    base = root / "base"
    create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).save_pretrained(base)
    chat_tokenizer.save_pretrained(base)
    cols = {k: [p[i] for p in PAIRS] for i, k in enumerate(("prompt", "chosen", "rejected", "kind"))}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols),
                          "validation": datasets.Dataset.from_dict(cols)}).save_to_disk(root / "pairs")
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as f:
        for p in PAIRS:
            f.write(json.dumps({"task": "preference", "prompt": p[0], "reference": {"chosen": p[1], "rejected": p[2]},
                                "kind": p[3]}, ensure_ascii=False) + "\n")
    return base, root / "pairs", root / "pairs.jsonl"


def test_reward_read_at_last_real_token_left_and_right_padding(chat_tokenizer, rm_inputs):
    from utils.reward import create_reward_model, sequence_rewards

    model = create_reward_model(rm_inputs[0], chat_tokenizer.pad_token_id, seed=0).eval()
    seqs = [render_response(chat_tokenizer, p[0], p[1]) for p in PAIRS[:3]]
    assert seqs[0][-1] == chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    width, pad = max(map(len, seqs)), chat_tokenizer.pad_token_id
    with torch.no_grad():
        alone = [sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item()
                 for s in seqs]
        for side in ("right", "left"):
            ids = torch.full((3, width), pad)
            mask = torch.zeros(3, width, dtype=torch.long)
            for i, s in enumerate(seqs):
                sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
                ids[i, sl], mask[i, sl] = torch.tensor(s), 1
            batched = sequence_rewards(model, ids, mask).tolist()
            assert batched == pytest.approx(alone, abs=1e-5), side


def train_rm(out: Path, base: Path, data: Path, eval_pairs: Path, *extra: str) -> dict:
    return step2_main(["--model_name_or_path", str(base), "--data_path", str(data), "--eval_pairs", str(eval_pairs),
                       "--output_dir", str(out), "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                       "--lr_scheduler_type", "constant", "--dtype", "fp32", "--eval_interval", "20",
                       "--save_interval", "0", "--enable_tensorboard", "false", "--max_seq_len", "96", *extra])


@pytest.fixture(scope="module")
def trained_rm(dist, rm_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_run")
    train_rm(out, *rm_inputs, "--max_steps", "40")
    return out


def test_nano_rm_reaches_accuracy_1(trained_rm):
    final = read_metrics(trained_rm, "eval")[-1]
    assert final["accuracy"] == 1.0 and final["eval/accuracy"] == 1.0
    assert final["review_sentiment/accuracy"] == 1.0 and final["corrupted_answer/accuracy"] == 1.0
    assert final["margin"] > 0 and final["loss"] < 0.3
    first = read_metrics(trained_rm, "eval")[0]
    assert first["step"] == 0 and first["loss"] > final["loss"]


def test_rw_eval_matches_independent_computation_and_reload(trained_rm, rm_inputs, chat_tokenizer, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    report = rw_eval_main(["--model", str(trained_rm / "final"), "--pairs", str(rm_inputs[2]), "--out",
                           str(tmp_path / "r.json")])
    model = AutoModelForSequenceClassification.from_pretrained(trained_rm / "final").eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for p in PAIRS:  # one unpadded sequence at a time
            for side, store in ((p[1], chosen), (p[2], rejected)):
                ids = torch.tensor([render_response(chat_tokenizer, p[0], side)])
                store.append(model(input_ids=ids).logits[0, 0].item())
    acc = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(PAIRS)
    overall = report["by_kind"]["all"]
    assert overall["accuracy"] == acc == 1.0
    assert overall["reward_chosen"] == pytest.approx(sum(chosen) / 8, abs=1e-5)
    assert overall["margin"] == pytest.approx((sum(chosen) - sum(rejected)) / 8, abs=1e-5)
    assert [s["chosen"] for s in report["scores"]] == pytest.approx(chosen, abs=1e-5)
    # the training-time evaluation at the last step saw the same model
    assert read_metrics(trained_rm, "eval")[-1]["eval/margin"] == pytest.approx(overall["margin"], abs=1e-4)
    assert "hardest" in capsys.readouterr().out


def test_length_split_says_which_way_a_model_pays():
    """rw_eval's accuracy over pairs whose chosen reply is the longer / similar / the shorter (ratio 1.25),
    degraded copies left out, and its verdict: a gap above 10 points pays for shortness or length."""
    longer = [Pair("p", "好" * 20, "差" * 10)] * 25  # chosen 2x the rejected's length
    shorter = [Pair("p", "好" * 10, "差" * 20)] * 25
    similar = [Pair("p", "好" * 10, "差" * 11)] * 4 + [Pair("p", "好" * 40, "差", "degraded_copy")] * 3
    pairs = longer + shorter + similar
    chosen = [1.0] * len(pairs)
    rejected = [0.0] * 10 + [2.0] * 15 + [0.0] * 25 + [2.0, 0.0, 0.0, 0.0] + [0.0] * 3  # longer: right in 10 of 25
    split = length_split(pairs, chosen, rejected)
    assert split["chosen_longer"] == {"pairs": 25, "accuracy": 0.4} and split["chosen_shorter"] == {"pairs": 25, "accuracy": 1.0}
    assert split["similar"] == {"pairs": 4, "accuracy": 0.75}  # the degraded copies are not counted
    assert split["gap"] == pytest.approx(0.6) and split["verdict"].startswith("PAYS FOR SHORTNESS: right in 100%")
    flipped = length_split(shorter + longer, chosen[:50], rejected[:50])
    assert flipped["gap"] == pytest.approx(-0.6) and flipped["verdict"].startswith("PAYS FOR LENGTH")
    assert length_split(pairs, chosen, [0.0] * len(pairs))["verdict"].startswith("length-neutral")
    assert "gap" not in length_split(longer[:19] + shorter, chosen[:44], rejected[:44])  # under 20 on a side


def test_rw_eval_scores_prompt_rows_sorted(trained_rm, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p[0], "response": r}, ensure_ascii=False) + "\n"
                            for p in PAIRS[:2] for r in (p[1], p[2])), encoding="utf-8")
    report = rw_eval_main(["--model", str(trained_rm / "final"), "--prompts", str(rows)])
    rewards = [r["reward"] for r in report["scored"]]
    assert rewards == sorted(rewards, reverse=True) and len(rewards) == 4


def test_rw_eval_rejects_a_causal_lm(rm_inputs):
    proc = subprocess.run([sys.executable, "step2_reward_model/rw_eval.py", "--model", str(rm_inputs[0]),
                           "--pairs", str(rm_inputs[2])], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "causal language model" in last and "needs a reward model" in last


def test_two_processes_match_one(rm_inputs, tmp_path):
    base, data, pairs = rm_inputs
    args = ["--model_name_or_path", str(base), "--data_path", str(data), "--max_steps", "4", "--dtype", "fp32",
            "--learning_rate", "3e-3", "--eval_interval", "0", "--enable_tensorboard", "false", "--max_seq_len", "96"]
    one = subprocess.run([sys.executable, "step2_reward_model/main.py", *args, "--per_device_train_batch_size", "4",
                          "--output_dir", str(tmp_path / "one")], cwd=REPO, env=clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "29617",
                          "step2_reward_model/main.py", *args, "--per_device_train_batch_size", "2",
                          "--output_dir", str(tmp_path / "two")], cwd=REPO, env=clean_env(OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    a, b = read_metrics(tmp_path / "one", "train"), read_metrics(tmp_path / "two", "train")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["accuracy"] - y["accuracy"]) < 1e-9
    ea, eb = read_metrics(tmp_path / "one", "eval")[-1], read_metrics(tmp_path / "two", "eval")[-1]
    assert ea["accuracy"] == eb["accuracy"] and abs(ea["margin"] - eb["margin"]) < 1e-4
