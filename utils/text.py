"""The one character normalisation of the toolkit: what data_process applies to every text it writes, what
step 0 trains the tokenizer on, and what the exported tokenizer applies to whatever a user types (it is the
tokenizer's own `normalizer`, so chat.py, serve.py and every AutoTokenizer user get it too).

The rule, in order:
1. Unicode NFKC, except for the Chinese punctuation marks NFKC would turn into ASCII (，！？：；（）～ and
   the ellipsis …): full-width digits and Latin letters fold to ASCII (People's Daily's "１９９８" and a
   review's "1998" become one string), the ideographic space becomes a space, and ，！？ stay as Chinese
   text has them.
2. An ASCII , ! ? : ; right after a Chinese character or a Chinese punctuation mark becomes its full-width
   form ("好!" and "好！" are one string), so the model sees one form of each mark in Chinese text, and a
   user's half-width or mixed typing reaches it as it was trained. Elsewhere (English, numbers such as
   "3,000" or "10:30") ASCII punctuation stays ASCII. A run of such marks converts up to four of them and
   drops the rest ("好!!!!!!" -> "好！！！！"), which keeps the rule idempotent: normalising twice changes
   nothing, so the tokenizer meets data_process's output unchanged.

Each step only looks at a character and the one before it, so normalising a text and normalising its
prefix agree on the prefix (chat rendering relies on that), and every step maps one character to one
character except NFKC's own expansions, which the tokenizer's offsets track.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from tokenizers import Regex, normalizers

# the Chinese punctuation every tokenizer trained on normalised text gets a piece for, however rare in its corpus
CJK_PUNCTUATION = "，。！？：；、“”‘’（）《》【】「」『』…—～·"
# full-width marks NFKC would fold to ASCII, each parked on a private-use code point while NFKC runs
KEPT_MARKS = "，！？：；（）～…"
_PARKED = [chr(0xE000 + i) for i in range(len(KEPT_MARKS))]
# ASCII mark -> the full-width one it becomes after Chinese text
TO_FULL_WIDTH = {",": "，", "!": "！", "?": "？", ":": "：", ";": "；"}
# what counts as "Chinese text" before a mark: Han characters, CJK symbols and punctuation (、。《》「」【】…),
# the kept full-width marks, Chinese quotes, dashes and the ellipsis
_CJK_BEFORE = r"[\p{Han}\x{3000}-\x{303F}\x{FF01}-\x{FF5E}\x{2018}\x{2019}\x{201C}\x{201D}\x{2014}\x{2026}]"
# a run of marks ("好!!!") converts one mark per pass, each pass seeing the previous one's output
MARK_RUN_PASSES = 4


def _width_steps() -> list[normalizers.Normalizer]:
    """Rule 1: NFKC with the kept marks parked on private-use code points meanwhile."""
    steps: list[normalizers.Normalizer] = [normalizers.Replace(m, p) for m, p in zip(KEPT_MARKS, _PARKED, strict=True)]
    steps.append(normalizers.NFKC())
    return steps + [normalizers.Replace(p, m) for m, p in zip(KEPT_MARKS, _PARKED, strict=True)]


def _mark_steps() -> list[normalizers.Normalizer]:
    """Rule 2: ASCII marks after Chinese text to full width, one more mark of a run per pass, the rest of a
    longer run dropped."""
    steps = [normalizers.Replace(Regex(f"(?<={_CJK_BEFORE}){re.escape(ascii_mark)}"), full)
             for _ in range(MARK_RUN_PASSES) for ascii_mark, full in TO_FULL_WIDTH.items()]
    ascii_marks = re.escape("".join(TO_FULL_WIDTH))
    steps.append(normalizers.Replace(Regex(f"(?<=[{''.join(TO_FULL_WIDTH.values())}])[{ascii_marks}]+"), ""))
    return steps


@functools.cache
def text_normalizer() -> normalizers.Normalizer:
    """The normaliser as a `tokenizers` object: serialisable into tokenizer.json, applied by the Rust
    tokenizer before splitting, and callable from Python through `normalize_str`."""
    return normalizers.Sequence(_width_steps() + _mark_steps())


@functools.cache
def _split_normalizers() -> tuple[normalizers.Normalizer, normalizers.Normalizer]:
    return normalizers.Sequence(_width_steps()), normalizers.Sequence(_mark_steps())


# an ASCII mark after any non-ASCII character: a superset of what rule 2 rewrites (its lookbehind class is
# non-ASCII), so where this finds nothing the rule-2 steps are the identity and can be skipped
_MAYBE_MARK_AFTER_CJK = re.compile(f"[^\x00-\x7f][{re.escape(''.join(TO_FULL_WIDTH))}]")


_KEPT = re.compile(f"[{KEPT_MARKS}]")
_PARKING = re.compile(f"[{''.join(_PARKED)}]")  # typed private-use code points: rule 1 turns them into marks


def fold_characters(text: str) -> str:
    """`text` under the toolkit's character normalisation (see the module docstring): the same steps as
    `text_normalizer` (tested equal), each skipped on text it cannot change: rule 1 where the text without
    the kept marks is NFKC already (a kept mark is parked on a starter while NFKC runs, so it splits the
    text into pieces NFKC treats alone), rule 2 where no ASCII mark follows a non-ASCII character."""
    width, marks = _split_normalizers()
    if _PARKING.search(text) or not unicodedata.is_normalized("NFKC", _KEPT.sub("", text)):
        text = width.normalize_str(text)
    return marks.normalize_str(text) if _MAYBE_MARK_AFTER_CJK.search(text) else text
