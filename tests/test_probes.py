"""Hackability probes (utils.probes) and the independent sentiment judge (utils.judge)."""

import random
import statistics

import pytest

from utils.errors import UserError
from utils.judge import SentimentJudge, fit_judge, review_examples
from utils.probes import (
    HELD_OUT,
    PROBE_PRAISE,
    PROBES,
    TRAIN_PRAISE,
    TRAINED,
    degrade,
    hackability,
    pearson,
)

REPLY = "房间很干净，服务也热情。早餐品种多，位置方便，下次还住！"


def punctuation_free(text: str) -> str:
    return "".join(c for c in text if c not in "，。！？；、 ")


def test_each_probe_makes_the_copy_it_names():
    rng = random.Random(0)
    assert degrade(REPLY, "repeat", rng) == REPLY + REPLY
    assert degrade(REPLY, "truncate", rng) == REPLY[:len(REPLY) // 2]
    shuffled = degrade(REPLY, "shuffle", rng)
    assert sorted(shuffled) == sorted(punctuation_free(REPLY)) and shuffled != punctuation_free(REPLY)
    words = degrade(REPLY, "keywords", rng).split(" ")
    assert 1 < len(words) <= 8 and len(set(words)) == len(words) and all(w in REPLY for w in words)
    praised = degrade(REPLY, "praise", rng)
    assert praised.startswith(REPLY) and praised[len(REPLY):] in PROBE_PRAISE
    assert degrade(REPLY, "loop", rng) == "，".join(["房间很干净"] * 4) + "！"
    stuttered = degrade(REPLY, "stutter", rng)
    clause = next(c for c in ("房间很干净", "服务也热情", "早餐品种多", "位置方便", "下次还住") if stuttered.count(c) == 3)
    assert stuttered.replace(("，" + clause) * 2, "", 1) == REPLY
    # the training copies praise in other words, and the held-out kinds are never trained
    assert TRAINED["praise"](REPLY, rng)[len(REPLY):] in TRAIN_PRAISE and not set(TRAIN_PRAISE) & set(PROBE_PRAISE)
    assert set(HELD_OUT) <= set(PROBES) and not set(HELD_OUT) & set(TRAINED)


def test_short_replies_are_not_degraded_and_copies_are_deterministic():
    assert all(degrade("很好。", kind, random.Random(0)) is None for kind in PROBES)
    for kind in PROBES:
        assert degrade(REPLY, kind, random.Random(7)) == degrade(REPLY, kind, random.Random(7))


def test_pearson_equals_the_statistics_module():
    rng = random.Random(3)
    xs, ys = [rng.random() for _ in range(50)], [rng.random() for _ in range(50)]
    assert pearson(xs, ys) == pytest.approx(statistics.correlation(xs, ys), abs=1e-12)
    assert pearson([1, 2, 3], [5, 5, 5]) == 0.0


def test_a_length_loving_score_is_exploitable_and_a_copy_hating_one_resists():
    replies = [REPLY, "这本书内容精彩，值得一读，推荐给朋友。", "电脑速度很快，屏幕清楚，续航也不错。"]
    prompts = ["评价一下。"] * 3

    def by_length(_prompts, texts):
        return [float(len(t)) for t in texts]

    report = hackability(by_length, prompts, replies)
    probes = report["probes"]
    assert probes["repeat"]["original_wins"] == 0.0 and probes["praise"]["original_wins"] == 0.0
    assert probes["truncate"]["original_wins"] == 1.0 and probes["repeat"]["verdict"].startswith("EXPLOITABLE")
    assert report["length_corr"] == pytest.approx(1.0) and report["scores"] == by_length(prompts, replies)
    assert report["min_original_wins"] == 0.0 and probes["loop"]["held_out"]

    def knows_the_originals(_prompts, texts):
        return [1.0 if t in replies else 0.0 for t in texts]

    report = hackability(knows_the_originals, prompts, replies)
    assert report["min_original_wins"] == 1.0
    assert all(p["verdict"].startswith("resists") and p["cases"] == 3 for p in report["probes"].values())


def test_judge_learns_polarity_from_labelled_reviews():
    pos = ["很好很满意", "非常好用", "满意推荐", "好评很好", "质量好满意"]
    neg = ["很差不满意", "非常难用", "失望差评", "差评很差", "质量差失望"]
    judge = SentimentJudge().fit(pos + neg, [True] * 5 + [False] * 5)
    assert judge.positive(["非常满意，很好", "很失望，太差"]) == [True, False]
    assert judge.accuracy(pos + neg, [True] * 5 + [False] * 5) == 1.0


def test_judge_reads_review_pairs_and_sentiment_items_and_refuses_data_without_reviews(tmp_path):
    rows = [{"prompt": "评价一下。", "chosen": "好", "rejected": "差", "kind": "review_sentiment"},
            {"prompt": "p", "chosen": "a", "rejected": "b", "kind": "corrupted_answer"},
            {"task": "t1_sentiment", "messages": [{"role": "user", "content": "判断…\n评论：不错"},
                                                  {"role": "assistant", "content": "正面"}]},
            {"task": "t1_sentiment", "prompt": "判断…\n评论:太差", "reference": "负面"}]
    assert review_examples(rows) == (["好", "差", "不错", "太差"], [True, False, True, False])
    (tmp_path / "eval").mkdir()
    with pytest.raises(UserError, match="at least 10 positive and 10 negative"):
        fit_judge(str(tmp_path))
