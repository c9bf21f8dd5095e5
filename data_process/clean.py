"""The cleaning pipeline: normalise, drop boilerplate and bad lengths, exclude reserved texts, remove
exact and near duplicates, counting what every filter removed.

Memory does not grow with the input: documents stream through one at a time, and everything that must
remember the whole input (how often each line occurs, which documents were already kept, the near-duplicate
index's LSH bands and signatures) lives in files on disk: 64-bit keys in SQLite files with a fixed page
cache, and a flat file of MinHash signatures (see `NearDuplicateIndex`).

Boilerplate needs the line counts of the whole input before the first document can be judged, so the
input is read twice: `count_lines` (pass 1), then `run` (pass 2).
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from datasketch import MinHash, MinHashLSH

from data_process.text import content_key, normalize, reserved_hash
from utils.text import fold_characters

log = logging.getLogger(__name__)

_URL = re.compile(r"(?:https?://|www\.)[\w./?%&=#:~+-]+", re.IGNORECASE)

_DOUBLE_SPACE = re.compile(" {2,}")  # left behind where a pattern was stripped

FILTERS = ("empty", "pattern", "boilerplate", "too_short", "too_long", "reserved", "exact_duplicate",
           "near_duplicate")


@dataclass
class CleanOptions:
    """The filter settings (main.py's config fills them from flags)."""

    min_chars: int = 5
    max_chars: int = 20_000
    boilerplate_max_repeats: int = 5
    drop_line_patterns: list[str] = field(default_factory=list)
    strip_patterns: list[str] = field(default_factory=list)
    simplified: bool = False
    near_dup_threshold: float = 0.7
    near_dup_num_perm: int = 64
    near_dup_ngram: int = 3
    reserved_hashes: frozenset[str] = frozenset()


@dataclass
class Doc:
    """A document on its way through the pipeline: its text plus where it came from (for error messages,
    the reserved-line check and the task builders, which keep e.g. the word/tag tokens in `extra`)."""

    text: str
    source: str
    line: int
    extra: Any = None


def scratch_db(path: Path, cache_mb: int) -> sqlite3.Connection:
    """An SQLite work file with a fixed page cache and no journal (it is thrown away after the run)."""
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA cache_size=-{cache_mb * 1024}")
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA locking_mode=EXCLUSIVE")  # one process owns it: no file lock taken per statement
    return db


class KeyTable:
    """A set (with counts) of 64-bit keys in an SQLite file: memory stays at the page cache size however
    many keys go in, which is what lets exact dedup stream inputs larger than RAM."""

    def __init__(self, path: Path, cache_mb: int = 8):
        self.db = scratch_db(path, cache_mb)
        self.db.execute("CREATE TABLE IF NOT EXISTS k (key INTEGER PRIMARY KEY, n INTEGER NOT NULL)")

    def add(self, key: int) -> bool:
        """Insert `key`; True when it was new."""
        return self.db.execute("INSERT OR IGNORE INTO k VALUES (?, 1)", (key,)).rowcount == 1

    def count(self, keys: Iterable[int]) -> None:
        """Add one to the count of each key."""
        self.db.executemany("INSERT INTO k VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET n = n + 1",
                            ((k,) for k in keys))

    def get(self, key: int) -> int:
        row = self.db.execute("SELECT n FROM k WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def close(self) -> None:
        self.db.close()


class NearDuplicateIndex:
    """MinHash LSH over character n-gram shingles: a document whose estimated Jaccard similarity to an
    already kept one reaches `threshold` is a near duplicate. LSH candidates are checked against their
    stored signature: band collisions alone let through pairs near 0.45 (e.g. two news items about the same
    delegation), the check keeps those.

    The index lives on disk so that memory stays flat however large the input: each of datasketch's bands
    (its choice of b bands of r rows for the threshold) is reduced to a 64-bit key and stored with the
    document number in an SQLite table, and the signatures (num_perm x 8 bytes per kept document) are
    appended to a flat file and read back only for candidates. Its verdicts equal an in-memory
    `datasketch.MinHashLSH` with the same signature check (tested); a collision of two 64-bit band keys would
    only add a candidate, which the signature check then judges.
    """

    def __init__(self, threshold: float, num_perm: int, ngram: int, workdir: Path, cache_mb: int = 8):
        self.ngram = ngram
        self.threshold = threshold
        self.bands = MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges  # datasketch's (b, r) choice
        self.minhash = MinHash(num_perm=num_perm, hashfunc=xxhash.xxh32_intdigest, seed=1)  # reused per document
        self.empty = self.minhash.hashvalues.copy()
        self.db = scratch_db(workdir / "near_dup.sqlite", cache_mb)
        self.db.execute("CREATE TABLE IF NOT EXISTS band (key INTEGER NOT NULL, doc INTEGER NOT NULL, "
                        "PRIMARY KEY (key, doc)) WITHOUT ROWID")
        self._query = f"SELECT DISTINCT doc FROM band WHERE key IN ({','.join('?' * len(self.bands))})"
        self.signatures = open(workdir / "signatures.u64", "w+b", buffering=0)  # noqa: SIM115 (closed in close())
        self.signature_bytes = num_perm * 8
        self.size = 0

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature (num_perm values) of the text's character n-gram set."""
        n = self.ngram
        shingles = {text[i:i + n] for i in range(max(1, len(text) - n + 1))}
        self.minhash.hashvalues = self.empty.copy()  # a fresh MinHash without building one (and its permutations)
        self.minhash.update_batch([s.encode("utf-8") for s in shingles])
        return self.minhash.hashvalues

    def band_keys(self, hashvalues: np.ndarray) -> list[int]:
        """One signed 64-bit key per band (seeded by the band's number, so equal rows in different bands
        do not meet)."""
        return [xxhash.xxh64_intdigest(hashvalues[lo:hi].tobytes(), seed=band) - (1 << 63)
                for band, (lo, hi) in enumerate(self.bands)]

    def stored_signature(self, doc: int) -> np.ndarray:
        raw = os.pread(self.signatures.fileno(), self.signature_bytes, doc * self.signature_bytes)
        return np.frombuffer(raw, dtype=np.uint64)

    def add_if_new(self, text: str) -> bool:
        """Index `text` and return True unless it is a near duplicate of an indexed text."""
        values = self.signature(text)
        keys = self.band_keys(values)
        for (doc,) in self.db.execute(self._query, keys):
            if np.mean(self.stored_signature(doc) == values) >= self.threshold:
                return False
        self.db.executemany("INSERT OR IGNORE INTO band VALUES (?, ?)", ((key, self.size) for key in keys))
        self.signatures.write(values.astype(np.uint64).tobytes())
        self.size += 1
        return True

    def close(self) -> None:
        self.db.close()
        self.signatures.close()


class Cleaner:
    """Runs documents through every filter in a fixed order and counts what each one removed.

    Duplicates are judged on `doc.text` (for structured rows the caller joins their fields into it and
    keeps the row in `doc.extra`). Work files live in `workdir`.
    """

    def __init__(self, opts: CleanOptions, workdir: Path):
        self.opts = opts
        self.removed: Counter[str] = Counter()
        self.count_in = 0
        self.count_out = 0
        self._drop = [re.compile(p) for p in opts.drop_line_patterns]
        self._strip = [re.compile(p) for p in [_URL.pattern, *opts.strip_patterns]]
        workdir.mkdir(parents=True, exist_ok=True)
        self.line_counts = KeyTable(workdir / "line_counts.sqlite")
        self.seen = KeyTable(workdir / "seen.sqlite")
        self.near = (NearDuplicateIndex(opts.near_dup_threshold, opts.near_dup_num_perm, opts.near_dup_ngram,
                                        workdir) if opts.near_dup_threshold > 0 else None)

    def _lines(self, text: str) -> list[str]:
        text = normalize(text, self.opts.simplified)
        for pattern in self._strip:
            stripped = pattern.sub("", text)
            if stripped != text:  # what was cut may leave a mark right after Chinese text ("好<URL>!")
                text = fold_characters(stripped)
        return [_DOUBLE_SPACE.sub(" ", line).strip() for line in text.split("\n")]

    def count_lines(self, docs: Iterable[Doc]) -> None:
        """Pass 1: count every normalised line, so pass 2 can tell boilerplate (lines repeated more than
        boilerplate_max_repeats times) from content."""
        if self.opts.boilerplate_max_repeats <= 0:
            return
        for doc in docs:
            self.line_counts.count(content_key(line) for line in self._lines(doc.text) if line)

    def clean_text(self, text: str) -> tuple[str, str | None]:
        """Normalised text without pattern or boilerplate lines, plus the filter that emptied it (if one did)."""
        kept, reason = [], "empty"
        for line in self._lines(text):
            if not line:
                kept.append(line)
            elif any(p.search(line) for p in self._drop):
                reason = "pattern"
            elif 0 < self.opts.boilerplate_max_repeats < self.line_counts.get(content_key(line)):
                reason = "boilerplate"
            else:
                kept.append(line)
        cleaned = "\n".join(kept).strip()
        cleaned = re.sub(r"\n{3,}", "\n\n", cleaned)
        return cleaned, (None if cleaned else reason)

    def run(self, docs: Iterable[Doc]) -> Iterator[Doc]:
        """Pass 2: yield the documents that survive every filter, their text cleaned."""
        for doc in docs:
            if self.keep(doc):
                yield doc
        self.log_summary()

    def keep(self, doc: Doc) -> bool:
        """Clean `doc.text` in place and say whether the document survives every filter."""
        self.count_in += 1
        opts = self.opts
        raw_reserved = opts.reserved_hashes and reserved_hash(doc.text) in opts.reserved_hashes
        doc.text, reason = self.clean_text(doc.text)
        if raw_reserved:
            reason = "reserved"
        if reason is None:
            reason = self._judge(doc)
        if reason is not None:
            self.removed[reason] += 1
            return False
        self.count_out += 1
        return True

    def log_summary(self) -> None:
        log.info("cleaning: %d in, %d out, removed %s (near-dup index: %d docs)", self.count_in,
                 self.count_out, dict(self.removed), self.near.size if self.near else 0)

    def _judge(self, doc: Doc) -> str | None:
        opts = self.opts
        if len(doc.text) < opts.min_chars:
            return "too_short"
        if len(doc.text) > opts.max_chars:
            return "too_long"
        if opts.reserved_hashes and reserved_hash(doc.text) in opts.reserved_hashes:
            return "reserved"
        if not self.seen.add(content_key(doc.text)):
            return "exact_duplicate"
        if self.near is not None and not self.near.add_if_new(doc.text):
            return "near_duplicate"
        return None

    def stats(self) -> dict[str, Any]:
        """count in, removed by each filter (every filter listed, zeros included), count out."""
        return {"count_in": self.count_in, "removed": {name: self.removed[name] for name in FILTERS},
                "count_out": self.count_out}

    def close(self) -> None:
        self.line_counts.close()
        self.seen.close()
        if self.near is not None:
            self.near.close()

