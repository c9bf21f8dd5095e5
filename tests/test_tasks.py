"""Scorers of the verifiable demo tasks."""

from __future__ import annotations

import math

import pytest
import torch

from utils.tasks import parse_entities, roc_auc, score_ner, score_segmentation, score_sentiment, word_spans


def test_sentiment_exact_match_and_answer_split():
    scores = score_sentiment(["正面", " 负面\n", "正面。", "正面"], ["正面", "负面", "正面", "负面"])
    assert scores == {"sentiment_acc": pytest.approx(2 / 4), "sentiment_pos_rate": pytest.approx(2 / 4)}


def test_roc_auc_counts_ordered_pairs():
    # positives 0.9, 0.3 against negatives 0.8, 0.1: 3 of the 4 pairs ordered right
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [True, False, True, False]) == pytest.approx(3 / 4)
    assert roc_auc([1.0, 1.0], [True, False]) == pytest.approx(1 / 2)  # a tie counts one half
    assert roc_auc([2.0, 1.0, 0.0], [False, True, True]) == 0.0
    assert math.isnan(roc_auc([1.0], [True]))


def test_first_token_margins_match_unpadded_forwards(chat_tokenizer):
    """Left-padded batches give each prompt the margin a forward of that prompt alone gives."""
    from utils.chat import prompt_ids
    from utils.generation import first_token_margins
    from utils.model import create_causal_lm

    tok = chat_tokenizer
    model = create_causal_lm("nano", len(tok), 256, 0).eval()
    prompts = [prompt_ids(tok, [{"role": "user", "content": text}]) for text in ("好", "这家酒店很干净，服务也好。")]
    assert len(prompts[0]) != len(prompts[1])
    batched = first_token_margins(model, tok, prompts, ("正面", "负面"), batch_size=2)
    a, b = (tok("正面", add_special_tokens=False)["input_ids"][0], tok("负面", add_special_tokens=False)["input_ids"][0])
    for prompt, margin in zip(prompts, batched, strict=True):
        with torch.no_grad():
            logp = model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
        assert margin == pytest.approx((logp[a] - logp[b]).item(), abs=1e-5)


def test_segmentation_span_f1():
    assert word_spans("叶利钦 总统 和") == {(0, 3), (3, 5), (5, 6)}
    gold = "叶利钦 总统 和 克林顿 总统"
    assert score_segmentation([gold], [gold])["segmentation_f1"] == 1.0
    # one merge: "总统和" replaces "总统" "和": 3 of 4 predicted spans right, 3 of 5 gold found
    pred = "叶利钦 总统和 克林顿 总统"
    f1 = score_segmentation([pred], [gold])["segmentation_f1"]
    assert f1 == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))


def test_ner_parse_and_micro_f1():
    gold = "人名：叶利钦、克林顿；地名：赫尔辛基；机构名：无"
    assert parse_entities(gold) == {("PER", "叶利钦"), ("PER", "克林顿"), ("LOC", "赫尔辛基")}
    pred = "人名：叶利钦；地名：赫尔辛基；机构名：新华社"
    scores = score_ner([pred, gold], [gold, gold])
    tp, n_pred, n_gold = 2 + 3, 3 + 3, 3 + 3
    p, r = tp / n_pred, tp / n_gold
    assert scores["ner_f1"] == pytest.approx(2 * p * r / (p + r))
    assert scores["ner_f1_LOC"] == 1.0 and scores["ner_f1_ORG"] == 0.0
    assert score_ner(["乱七八糟"], ["人名：无；地名：无；机构名：无"])["ner_f1"] == 1.0
