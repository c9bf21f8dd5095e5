"""Writing outputs safely: a run builds everything in a temporary directory next to the target and renames
it into place at the end, so a failed run never leaves a half-written output behind. Rows stream to
JSON-lines files first and become Hugging Face datasets (save_to_disk) at the end, so memory stays flat.
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
from pathlib import Path
from typing import Any

import datasets

from utils.errors import UserError

log = logging.getLogger(__name__)

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
}
SPLITS = {"pretrain": ("train", "validation"), "sft": ("train", "validation"),
          "preference": ("train", "validation"), "prompts": ("train",)}


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
    """Collects the rows of one dataset (pretrain, sft, preference or prompts) split by split in JSON-lines
    files, then saves them as a DatasetDict with the dataset's fixed columns."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.counts = dict.fromkeys(SPLITS[name], 0)
        self.files = {split: open(self.dir / f".{split}.jsonl", "w", encoding="utf-8") for split in self.counts}  # noqa: SIM115 (closed in finish)

    def add(self, split: str, row: dict[str, Any]) -> None:
        self.files[split].write(json.dumps(row, ensure_ascii=False) + "\n")
        self.counts[split] += 1

    def finish(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Write the DatasetDict and its stats.json (`stats` plus count_out per split); return the stats."""
        features = FEATURES[self.name]
        cache = self.dir / ".cache"
        splits = {}
        for split, handle in self.files.items():
            handle.close()
            path = self.dir / f".{split}.jsonl"
            if self.counts[split]:
                splits[split] = datasets.Dataset.from_json(str(path), features=features, cache_dir=str(cache))
            else:
                splits[split] = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
        datasets.DatasetDict(splits).save_to_disk(str(self.dir / "data"))
        for split in self.files:
            (self.dir / f".{split}.jsonl").unlink()
        shutil.rmtree(cache, ignore_errors=True)
        # save_to_disk wants an empty target: write to data/, then lift its contents up one level
        for item in (self.dir / "data").iterdir():
            os.replace(item, self.dir / item.name)
        (self.dir / "data").rmdir()
        stats = {**stats, "count_out": dict(self.counts)}
        write_json(self.dir / "stats.json", stats)
        log.info("%s: %s", self.name, stats["count_out"])
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
