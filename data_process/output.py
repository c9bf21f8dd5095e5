"""Writing outputs safely: a run builds everything in a temporary directory next to the target and renames
it into place at the end, so a failed run never leaves a half-written output behind. Rows stream straight
into the Arrow files of a save_to_disk layout, so memory stays flat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
from datasets.arrow_writer import ArrowWriter

from utils.errors import UserError

log = logging.getLogger(__name__)

SHARD = "data-00000-of-00001.arrow"
MARKER = "stats.json"  # every output dir this toolkit writes has one; only such dirs are ever replaced

FEATURES = {
    "pretrain": datasets.Features({"text": datasets.Value("string")}),
    "sft": datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "task": datasets.Value("string"),
    }),
    "preference": datasets.Features({name: datasets.Value("string")
                                     for name in ("prompt", "chosen", "rejected", "kind")}),
    "prompts": datasets.Features({"prompt": datasets.Value("string")}),
    "rl": datasets.Features({name: datasets.Value("string") for name in ("prompt", "reference", "task")}),
}
SPLITS = {"pretrain": ("train", "validation"), "sft": ("train", "validation"),
          "preference": ("train", "validation"), "prompts": ("train",), "rl": ("train",)}


def setup_logging() -> None:
    """INFO lines with a timestamp on stderr; quiet third-party loggers (no torch import needed here)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("datasets", "transformers", "filelock", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    datasets.disable_progress_bars()


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_output_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary dir beside `target`; on success it replaces `target` (which must be absent,
    empty, or an earlier output of this toolkit), on any error it is deleted."""
    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise UserError(f"--output_dir {target}: is a file; give a directory path")
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise UserError(f"--output_dir {target}: exists, is not empty and was not written by this toolkit; "
                        "choose a new directory or delete it first")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise UserError(f"--output_dir {target}: cannot create it ({err.strerror}); "
                        "choose a writable location") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp made it private; the result is an ordinary directory
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "old")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


class DatasetWriter:
    """Streams the rows of one dataset (pretrain, sft, preference, prompts or rl) into Arrow files laid out
    exactly as `DatasetDict.save_to_disk` lays them out (one shard per split), so memory and RSS stay
    flat however many rows there are (save_to_disk would re-read a memory-mapped copy of everything)."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.dir = root / name
        self.features = FEATURES[name]
        self.counts = dict.fromkeys(SPLITS[name], 0)
        self.writers = {}
        for split in self.counts:
            (self.dir / split).mkdir(parents=True)
            self.writers[split] = ArrowWriter(features=self.features, path=str(self.dir / split / SHARD),
                                              writer_batch_size=1000)

    def add(self, split: str, row: dict[str, Any]) -> None:
        self.writers[split].write(row)
        self.counts[split] += 1

    def finish(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Close the shards, write the save_to_disk metadata and stats.json (`stats` plus count_out)."""
        info = asdict(datasets.DatasetInfo(features=self.features))
        for split, writer in self.writers.items():
            writer.finalize()
            writer.close()
            state = {"_data_files": [{"filename": SHARD}], "_fingerprint": f"{self.name}-{split}-{self.counts[split]}",
                     "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                     "_output_all_columns": False, "_split": None}
            write_json(self.dir / split / "state.json", state)
            write_json(self.dir / split / "dataset_info.json", info)
        write_json(self.dir / "dataset_dict.json", {"splits": list(self.counts)})
        stats = {**stats, "count_out": dict(self.counts)}
        write_json(self.dir / "stats.json", stats)
        log.info("%s: %s", self.name, stats["count_out"])
        if not all(self.counts.values()):
            log.warning("%s: empty split(s) %s: give more data before a step trains on them", self.name,
                        [s for s, n in self.counts.items() if n == 0])
        return stats


class EvalWriter:
    """eval/<task>.jsonl files of rows {"task", "prompt", "reference"} (plus "kind" for preference rows)."""

    def __init__(self, root: Path):
        self.dir = root / "eval"
        self.dir.mkdir(parents=True)
        self.files: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, file: str, row: dict[str, Any]) -> None:
        if file not in self.files:
            self.files[file] = open(self.dir / f"{file}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
            self.counts[file] = 0
        self.files[file].write(json.dumps(row, ensure_ascii=False) + "\n")
        self.counts[file] += 1

    def finish(self, stats: dict[str, Any]) -> dict[str, Any]:
        for handle in self.files.values():
            handle.close()
        stats = {**stats, "count_out": dict(sorted(self.counts.items()))}
        write_json(self.dir / "stats.json", stats)
        log.info("eval: %s", stats["count_out"])
        return stats
