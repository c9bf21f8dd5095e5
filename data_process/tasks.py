"""The demo tasks: prompt templates, gold answers and corrupted answers (../shared/DEMO_DATA.md, T1-T6, P1-P2).

Prompts are bare user instructions; the tokenizer's ChatML template is applied by the training steps.
Everything here is a pure function of its inputs plus a seeded `random.Random`, so a build is repeatable.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

T1 = "判断下面这条商品或酒店评论的情感倾向，只回答“正面”或“负面”。\n评论：{review}"
T2 = "请对下面的句子进行分词，词与词之间用一个空格隔开。\n句子：{sentence}"
T3 = ("找出下面句子中的人名、地名和机构名，按“人名：…；地名：…；机构名：…”的格式回答，没有的写“无”。\n"
      "句子：{sentence}")
T4 = ("写一条关于{x}的好评。", "请为{x}写一段正面的评价。", "用几句话夸一夸{x}。")
T5 = ("写一条关于{x}的评论。", "评价一下{x}。", "说说你对{x}的看法。")
T6 = "续写下面这条评论：{prefix}"

TASKS = ("t1_sentiment", "t2_segmentation", "t3_ner", "t4_positive_review", "t5_review", "t6_continue")
LABELS = {"pos": "正面", "neg": "负面"}
CATEGORY_TOPIC = {"hotel": "这家酒店", "book": "这本书", "laptop": "这台笔记本电脑"}
_CATEGORY_WORDS = {
    "hotel": ("酒店", "宾馆", "房间", "前台", "入住", "服务员", "早餐", "客房", "携程", "床"),
    "laptop": ("电脑", "笔记本", "本本", "屏幕", "键盘", "系统", "电池", "散热", "驱动", "硬盘", "内存", "京东",
               "机器", "显卡", "风扇", "XP", "vista"),
    "book": ("书", "作者", "读", "小说", "故事", "出版", "当当", "翻译", "作品", "文字"),
}
BRANDS = ("ThinkPad", "联想", "戴尔", "惠普", "华硕", "宏碁", "东芝", "索尼", "三星", "神舟", "苹果", "方正", "海尔",
          "明基", "IBM", "Dell", "HP", "Acer", "Lenovo")
_TITLE = re.compile(r"《([^《》]{1,20})》")
SENTENCE_END = ("。", "！", "？")  # after utils.text: an ASCII ! or ? after Chinese text is full-width
ENTITY_TYPES = (("nr", "人名"), ("ns", "地名"), ("nt", "机构名"))
# the half-width key a user may type for each Chinese mark
HALF_WIDTH = {"，": ",", "：": ":", "；": ";", "！": "!", "？": "?", "（": "(", "）": ")", "“": '"', "”": '"', "。": "."}


def category(review: str) -> str | None:
    """hotel, book or laptop by keyword counts; None when no keyword or a tie."""
    scores = {cat: sum(review.count(w) for w in words) for cat, words in _CATEGORY_WORDS.items()}
    best = max(scores.values())
    winners = [cat for cat, s in scores.items() if s == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


def specific_topic(review: str, cat: str) -> str:
    """The T4/T5 topic: names the book or the laptop brand when the review does, else the category."""
    if cat == "book" and (m := _TITLE.search(review)):
        return f"《{m.group(1)}》这本书"
    if cat == "laptop":
        for brand in BRANDS:
            if brand in review:
                return f"这台{brand}笔记本电脑"
    return CATEGORY_TOPIC[cat]


def as_typed(prompt: str, rng: random.Random) -> str:
    """A T1-T3 `prompt` as a user might type it: the instruction and the label before the text (评论：, 句子：)
    with every Chinese mark half-width, or each mark half- or full-width at random (the style drawn per
    prompt), the way people switch input modes while typing; the review or sentence itself stays as it is,
    as when it is pasted."""
    head, newline, last = prompt.rpartition("\n")
    label, colon, text = last.partition("：")
    typed = head + newline + label + colon
    every = rng.random() < 0.5
    return "".join(HALF_WIDTH[ch] if ch in HALF_WIDTH and (every or rng.random() < 0.5) else ch
                   for ch in typed) + text


def review_prompt(templates: tuple[str, ...], topic: str, rng: random.Random) -> str:
    return rng.choice(templates).format(x=topic)


def continuation(review: str, rng: random.Random, min_rest: int = 8) -> tuple[str, str] | None:
    """(T6 prompt, the rest of the review) with a 6-12 character prefix; None for too short a review."""
    cut = rng.randint(6, 12)
    if len(review) < cut + min_rest:
        return None
    return T6.format(prefix=review[:cut]), review[cut:]


# ---------------------------------------------------------------------------------------------------------
# People's Daily: sentences, segmentation and named entities


@dataclass(frozen=True)
class Sentence:
    """A sentence of tagged words (word, PKU tag), normalised by data_process.text.normalize."""

    words: tuple[tuple[str, str], ...]

    @property
    def text(self) -> str:
        return "".join(w for w, _ in self.words)

    @property
    def segmented(self) -> str:
        """The T2 answer: words separated by one space."""
        return " ".join(w for w, _ in self.words)

    def entities(self) -> list[tuple[str, str]]:
        """Distinct (type, text) in order of appearance; consecutive nr words merge into one person."""
        out: list[tuple[str, str]] = []
        i = 0
        while i < len(self.words):
            word, tag = self.words[i]
            if tag == "nr":
                while i + 1 < len(self.words) and self.words[i + 1][1] == "nr":
                    i += 1
                    word += self.words[i][0]
            if tag in ("nr", "ns", "nt") and (tag, word) not in out:
                out.append((tag, word))
            i += 1
        return out


def split_sentences(words: list[tuple[str, str]], min_chars: int = 8, max_chars: int = 80) -> list[Sentence]:
    """Sentences ending in 。！？ of min_chars..max_chars characters (a trailing fragment is dropped)."""
    out, current = [], []
    for word, tag in words:
        current.append((word, tag))
        if word in SENTENCE_END:
            sentence = Sentence(tuple(current))
            if min_chars <= len(sentence.text) <= max_chars:
                out.append(sentence)
            current = []
    return out


def render_entities(entities: list[tuple[str, str]]) -> str:
    """The T3 answer format: 人名：…；地名：…；机构名：… with 无 for an empty type."""
    parts = []
    for tag, name in ENTITY_TYPES:
        found = [text for t, text in entities if t == tag]
        parts.append(f"{name}：{'、'.join(found) if found else '无'}")
    return "；".join(parts)


def t2_example(s: Sentence) -> tuple[str, str]:
    return T2.format(sentence=s.text), s.segmented


def t3_example(s: Sentence) -> tuple[str, str]:
    return T3.format(sentence=s.text), render_entities(s.entities())


# ---------------------------------------------------------------------------------------------------------
# P2: plausible corruptions of a gold answer


def corrupt_segmentation(s: Sentence, rng: random.Random) -> str:
    """One to three merged or split words; never equal to the gold segmentation."""
    words = [w for w, _ in s.words]
    gold = list(words)
    for _ in range(10):
        words = list(gold)
        for _ in range(rng.randint(1, 3)):
            splittable = [i for i, w in enumerate(words) if len(w) >= 2]
            if len(words) >= 2 and (not splittable or rng.random() < 0.5):
                i = rng.randrange(len(words) - 1)
                words[i:i + 2] = [words[i] + words[i + 1]]
            elif splittable:
                i = rng.choice(splittable)
                cut = rng.randint(1, len(words[i]) - 1)
                words[i:i + 1] = [words[i][:cut], words[i][cut:]]
        if words != gold:
            break
    return " ".join(words)


def corrupt_entities(s: Sentence, rng: random.Random) -> str:
    """A dropped entity, a wrong type, a boundary error or a spurious span; never equal to the gold."""
    gold = s.entities()
    candidates = [w for w, t in s.words if t not in ("nr", "ns", "nt", "w") and len(w) >= 2]
    for _ in range(10):
        ents = list(gold)
        ops = (["drop", "type", "boundary"] if ents else []) + (["spurious"] if candidates else [])
        if not ops:
            break
        op = rng.choice(ops)
        if op == "drop":
            ents.pop(rng.randrange(len(ents)))
        elif op == "type":
            i = rng.randrange(len(ents))
            ents[i] = (rng.choice([t for t, _ in ENTITY_TYPES if t != ents[i][0]]), ents[i][1])
        elif op == "boundary":
            i = rng.randrange(len(ents))
            tag, text = ents[i]
            ents[i] = (tag, text[:-1] if len(text) >= 3 else text + s.text[s.text.find(text) + len(text):][:1])
        else:
            ents.insert(rng.randrange(len(ents) + 1), (rng.choice(ENTITY_TYPES)[0], rng.choice(candidates)))
        if render_entities(ents) != render_entities(gold):
            return render_entities(ents)
    return render_entities([*gold, ("nt", "新华社" if ("nt", "新华社") not in gold else "人民日报社")])
