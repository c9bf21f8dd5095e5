"""Step 3 DPO path: the losses against hand computations, masking, init values, training, reference modes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import PAIRS

from step3_rlhf_ppo.dpo import (
    DPOCollator,
    DPOConfig,
    DPOTask,
    SharedPromptCollator,
    encode_pair,
    policy_logps,
)
from step3_rlhf_ppo.dpo import main as dpo_main
from utils.config import parse_config
from utils.log import read_metrics
from utils.losses import preference_loss, sequence_logps
from utils.preference import Pair


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_losses_match_hand_computation():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.5])
    lc, lr = torch.tensor([5, 2]), torch.tensor([4, 3])
    beta, eps, gamma = 0.5, 0.2, 0.3
    h = [(a - c) - (b - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True)]
    expect = {
        "dpo": [-math.log(sig(beta * x)) for x in h],
        "cdpo": [-(1 - eps) * math.log(sig(beta * x)) - eps * math.log(sig(-beta * x)) for x in h],
        "ipo": [(x - 1 / (2 * beta)) ** 2 for x in h],
        "simpo": [-math.log(sig(beta * a / n - beta * b / m - gamma))
                  for a, b, n, m in zip(pc.tolist(), pr.tolist(), lc.tolist(), lr.tolist(), strict=True)],
    }
    for kind, values in expect.items():
        loss, r_c, r_r = preference_loss(kind, pc, pr, rc, rr, lc, lr, beta, eps, gamma)
        assert loss.tolist() == pytest.approx(values, rel=1e-6), kind
    _, r_c, r_r = preference_loss("dpo", pc, pr, rc, rr, lc, lr, beta)
    assert r_c.tolist() == pytest.approx([beta * 1.0, beta * 0.5]) and r_r.tolist() == pytest.approx([-0.5 * beta, beta * 0.5])


def test_long_prompts_are_cut_at_the_start_not_the_reply(chat_tokenizer):
    row = encode_pair(chat_tokenizer, Pair("很长的问题" * 40, "很好", "很差"), 32)
    reply = chat_tokenizer("很好<|im_end|>", add_special_tokens=False)["input_ids"]
    assert len(row["chosen"]["input_ids"]) == 32 and [t for t in row["chosen"]["labels"] if t != -100] == reply


def test_prompt_tokens_are_masked_and_logps_sum_the_reply(chat_tokenizer):
    row = encode_pair(chat_tokenizer, Pair("评价一下这家酒店。", "很好", "很差"), 256)["chosen"]
    ids, labels = row["input_ids"], row["labels"]
    reply = chat_tokenizer("很好<|im_end|>", add_special_tokens=False)["input_ids"]
    assert [t for t in labels if t != -100] == reply
    first = labels.index(reply[0])
    assert ids[first:first + len(reply)] == reply and all(t == -100 for t in labels[:first])
    torch.manual_seed(0)
    logits = torch.randn(1, len(ids), len(chat_tokenizer))
    logp, n = sequence_logps(logits, torch.tensor([labels]))
    direct = sum(torch.log_softmax(logits[0, t - 1], -1)[ids[t]].item() for t in range(first, first + len(reply)))
    assert logp.item() == pytest.approx(direct, rel=1e-5) and n.item() == len(reply)


def test_policy_logps_from_the_kept_logits_equal_the_full_forward(chat_tokenizer):
    """policy_logps computes logits only from the first position that predicts a reply token; the log-probs
    equal those of the full logits (prompts of different lengths, right padding)."""
    from utils.model import create_causal_lm

    model = create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).eval()
    batch = DPOCollator(chat_tokenizer.pad_token_id)([encode_pair(chat_tokenizer, Pair(*p[:3]), 128) for p in PAIRS])
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected, lengths = sequence_logps(full, batch["labels"])
        chosen, rejected, n_chosen, n_rejected = policy_logps(model, batch)
    assert torch.allclose(torch.cat([chosen, rejected]), expected, atol=1e-4)
    assert torch.cat([n_chosen, n_rejected]).tolist() == lengths.tolist()
    first_label = (batch["labels"] != -100).float().argmax(1).min().item()
    assert first_label > 5  # the prompt part really is skipped


@pytest.mark.parametrize("cut", [None, 20])
def test_shared_prompt_layout_gives_the_two_row_logps_and_gradients(chat_tokenizer, cut):
    """One row per pair (prompt once, both replies kept apart by the mask) scores every reply exactly as
    its own conversation does, gradients included; with prompts cut to 20 tokens the two sides no longer
    share a start, and the layout still holds."""
    from utils.model import create_causal_lm

    model = create_causal_lm("nano", len(chat_tokenizer), 256, seed=0)
    rows = [encode_pair(chat_tokenizer, Pair(*p[:3]), cut) for p in PAIRS]
    grads = []
    results = []
    for collate in (DPOCollator(chat_tokenizer.pad_token_id), SharedPromptCollator(chat_tokenizer.pad_token_id)):
        model.zero_grad()
        chosen, rejected, n_chosen, n_rejected = policy_logps(model, collate(rows))
        (chosen.sum() - 2 * rejected.sum()).backward()
        results.append((chosen.detach(), rejected.detach(), n_chosen, n_rejected))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    (c2, r2, nc2, nr2), (c1, r1, nc1, nr1) = results
    assert torch.allclose(c1, c2, atol=1e-4) and torch.allclose(r1, r2, atol=1e-4)
    assert nc1.tolist() == nc2.tolist() and nr1.tolist() == nr2.tolist()
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    shared = SharedPromptCollator(chat_tokenizer.pad_token_id)(rows)
    two = DPOCollator(chat_tokenizer.pad_token_id)(rows)
    saved = two["attention_mask"].sum() - shared["token_mask"].sum()
    assert (saved > 0) if cut is None else (saved >= 0)


@pytest.mark.parametrize("cut", [None, 20])
def test_collators_say_the_width_a_row_asks_for(chat_tokenizer, cut):
    """length(row), which the trainer groups rows by, is the width of a batch of that row alone."""
    from utils.preference import PairCollator

    rows = [encode_pair(chat_tokenizer, Pair(*p[:3]), cut) for p in PAIRS]
    pad = chat_tokenizer.pad_token_id
    for collate in (DPOCollator(pad), SharedPromptCollator(pad)):
        assert [collate.length(r) for r in rows] == [collate([r])["input_ids"].shape[1] for r in rows]
    pairs = [{"chosen": r["chosen"]["input_ids"], "rejected": r["rejected"]["input_ids"], "margin": 0.0, "kind": 0}
             for r in rows]
    assert [PairCollator.length(r) for r in pairs] == [PairCollator(pad)([r])["input_ids"].shape[1] for r in pairs]


def test_at_init_loss_is_log2_and_rewards_zero(chat_tokenizer):
    from utils.model import create_causal_lm

    model = create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).eval()
    cfg = parse_config(DPOConfig, ["--model_name_or_path", "x", "--data_path", "x", "--output_dir", "x"])
    collate = DPOCollator(chat_tokenizer.pad_token_id)
    batch = collate([encode_pair(chat_tokenizer, Pair(*p[:3]), 128) for p in PAIRS])
    with torch.no_grad():
        losses, metrics = DPOTask(cfg, {}, collate, reference=model)._compute(model, batch)
    assert losses.tolist() == pytest.approx([math.log(2)] * len(PAIRS), abs=1e-6)
    assert metrics["rewards_chosen"] == pytest.approx(0, abs=1e-6) and metrics["margin"] == pytest.approx(0, abs=1e-6)


def test_rpo_alpha_adds_the_chosen_replys_mean_token_nll(chat_tokenizer):
    from utils.model import create_causal_lm

    model = create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).eval()
    collate = DPOCollator(chat_tokenizer.pad_token_id)
    batch = collate([encode_pair(chat_tokenizer, Pair(*p[:3]), 128) for p in PAIRS])
    out = {}
    for alpha in ("0", "0.5"):
        cfg = parse_config(DPOConfig, ["--model_name_or_path", "x", "--data_path", "x", "--output_dir", "x",
                                       "--rpo_alpha", alpha])
        with torch.no_grad():
            out[alpha] = DPOTask(cfg, {}, collate, reference=model)._compute(model, batch)
    chosen, _, chosen_len, _ = policy_logps(model, batch)
    nll = -chosen / chosen_len
    assert out["0.5"][0].tolist() == pytest.approx((out["0"][0] + 0.5 * nll).tolist(), abs=1e-6)
    assert out["0"][1]["nll_chosen"] == pytest.approx(nll.sum().item(), rel=1e-6) and nll.min() > 0


@pytest.fixture(scope="module")
def dpo_inputs(chat_tokenizer, tmp_path_factory):
    """A nano 'SFT' model that already saw the replies a little, and the 8 pairs as a dataset."""
    import datasets

    from step1_pretrain_sft.main import main as step1_main

    root = tmp_path_factory.mktemp("dpo")
    from utils.model import create_causal_lm

    create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).save_pretrained(root / "base")
    chat_tokenizer.save_pretrained(root / "base")
    cols = {k: [p[i] for p in PAIRS] for i, k in enumerate(("prompt", "chosen", "rejected", "kind"))}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols),
                          "validation": datasets.Dataset.from_dict(cols)}).save_to_disk(root / "pairs")
    convs = [[{"role": "user", "content": p[0]}, {"role": "assistant", "content": r}] for p in PAIRS for r in p[1:3]]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"messages": convs})}).save_to_disk(root / "sft_data")
    step1_main(["--stage", "sft", "--model_name_or_path", str(root / "base"), "--data_path", str(root / "sft_data"),
                "--output_dir", str(root / "sft"), "--max_steps", "10", "--per_device_train_batch_size", "4",
                "--learning_rate", "3e-3", "--eval_interval", "0", "--enable_tensorboard", "false", "--dtype", "fp32"])
    return root / "sft" / "final", root / "pairs"


def dpo(out: Path, sft: Path, pairs: Path, *extra: str) -> dict:
    return dpo_main(["--model_name_or_path", str(sft), "--data_path", str(pairs), "--output_dir", str(out),
                     "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--lr_scheduler_type",
                     "constant", "--dtype", "fp32", "--eval_interval", "10", "--save_interval", "0",
                     "--enable_tensorboard", "false", "--max_seq_len", "128", *extra])


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "simpo"])
def test_nano_policy_reaches_accuracy_1(dist, dpo_inputs, tmp_path, loss_type):
    dpo(tmp_path, *dpo_inputs, "--max_steps", "80", "--loss_type", loss_type, "--beta", "0.5", "--eval_interval", "40")
    evals = read_metrics(tmp_path, "eval")
    assert evals[-1]["accuracy"] == 1.0 and evals[-1]["margin"] > evals[0]["margin"]
    if loss_type == "dpo":
        assert evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert (tmp_path / "ref_logps.safetensors").is_file()


def test_shared_prompt_training_equals_two_row_training(dist, dpo_inputs, tmp_path):
    dpo(tmp_path / "shared", *dpo_inputs, "--max_steps", "5")
    dpo(tmp_path / "two_rows", *dpo_inputs, "--max_steps", "5", "--share_prompt", "false")
    la, lb = read_metrics(tmp_path / "shared", "train"), read_metrics(tmp_path / "two_rows", "train")
    assert len(la) == 5 and max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb, strict=True)) < 1e-5
    assert max(abs(x["margin"] - y["margin"]) for x, y in zip(la, lb, strict=True)) < 1e-5


def test_precomputed_reference_equals_frozen_engine(dist, dpo_inputs, tmp_path):
    a = dpo(tmp_path / "pre", *dpo_inputs, "--max_steps", "5")
    b = dpo(tmp_path / "live", *dpo_inputs, "--max_steps", "5", "--precompute_ref_logps", "false")
    la, lb = read_metrics(tmp_path / "pre", "train"), read_metrics(tmp_path / "live", "train")
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb, strict=True)) < 1e-6
    assert max(abs(x["margin"] - y["margin"]) for x, y in zip(la, lb, strict=True)) < 1e-6
    assert a["steps"] == b["steps"] == 5 and not (tmp_path / "live" / "ref_logps.safetensors").exists()
