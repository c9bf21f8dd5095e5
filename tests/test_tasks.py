"""Scorers of the verifiable demo tasks."""

from __future__ import annotations

import pytest

from utils.tasks import parse_entities, score_ner, score_segmentation, score_sentiment, word_spans


def test_sentiment_exact_match():
    assert score_sentiment(["正面", " 负面\n", "正面。"], ["正面", "负面", "正面"]) == {"sentiment_acc": pytest.approx(2 / 3)}


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
