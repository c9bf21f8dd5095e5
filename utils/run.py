"""A step's output directory: writability check, resolved config, done marker (with the config hash, so
run_all.sh can skip finished steps) and the summary."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from utils.config import config_dict
from utils.errors import UserError

DONE = "done"
# options that do not change what a step produces
_HASH_EXCLUDE = {"output_dir", "force", "eval_interval", "eval_batches", "save_interval", "keep_last", "log_interval",
                 "resume", "enable_tensorboard", "peak_tflops", "samples_interval"}


def prepare_output_dir(path: str | Path) -> Path:
    """Create the output dir and prove it is writable, or raise UserError before any work is done."""
    out = Path(path).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"--output_dir {path}: not writable ({err.strerror}): choose a directory you can "
                        "write to") from None
    return out


def finished_run(run_dir: Path, cfg: Any) -> dict[str, Any] | None:
    """The done marker's summary if `run_dir` holds a finished run of this config (and --force is off).

    With --force, the previous run's done marker, checkpoints and export are removed so it starts afresh.
    """
    done = run_dir / DONE
    if getattr(cfg, "force", False):
        from utils.dist import barrier, is_rank0

        if is_rank0():
            done.unlink(missing_ok=True)
            for sub in ("checkpoints", "final"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
        barrier()
        return None
    if done.is_file():
        payload = json.loads(done.read_text(encoding="utf-8"))
        if payload.get("config_hash") == config_hash(cfg):
            return payload
    return None


def config_hash(cfg: Any) -> str:
    """Hash of the options that determine the step's result."""
    relevant = {k: v for k, v in config_dict(cfg).items() if k not in _HASH_EXCLUDE}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def write_done(run_dir: Path, cfg: Any, summary: dict[str, Any]) -> None:
    """Mark the step finished: `done` holds the config hash and the summary (rank 0 writes it)."""
    from utils.dist import barrier, is_rank0

    if not is_rank0():
        barrier()
        return
    payload = {"config_hash": config_hash(cfg), **summary}
    tmp = run_dir / (DONE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(run_dir / DONE)
    barrier()
