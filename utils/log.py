"""Logging for every step: `logging` set up once per process (quiet on ranks > 0), metrics as JSON lines
plus TensorBoard events on rank 0, and a tqdm bar on rank 0. Other ranks get a logger whose methods do
nothing, so callers never branch on rank."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from utils.dist import is_rank0


def setup_logging(level: int = logging.INFO) -> None:
    """Rank 0 logs INFO to stderr; other ranks only warnings. Silences chatty third-party loggers."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if is_rank0() else logging.WARNING)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsLogger:
    """Append one JSON object per step/eval to metrics.jsonl and mirror scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = is_rank0()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            # TensorBoard (~0.5 s) only with --enable_tensorboard
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)

    def _truncate_after(self, step: int | None) -> None:
        """On resume, drop lines of steps after the checkpoint: they are about to be run again."""
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        keep = [ln for ln in lines if ln.strip() and step is not None and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        """`record` holds "step" and "kind" (train/eval/...) plus scalar metrics."""
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.writer is not None:
            kind = record.get("kind", "train")
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_gpu_mib() -> float | None:
    """The peak GPU memory torch allocated in this process so far, in MiB (None without CUDA)."""
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, optionally only one kind."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def progress(total: int, initial: int = 0, desc: str = "train"):
    """A tqdm bar on rank 0 (disabled elsewhere and when stderr is not a terminal and CI is set)."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not is_rank0(), dynamic_ncols=True,
                mininterval=1.0)
