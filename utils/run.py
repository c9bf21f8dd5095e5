"""A step's output directory: writability check, resolved config, done marker (with the config hash, so
run_all.sh can skip finished steps) and the summary."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from utils.config import config_dict
from utils.errors import UserError

log = logging.getLogger(__name__)

DONE = "done"
# input options whose names say neither "path" nor "dir"
_INPUT_KEYS = {"eval_pairs", "eval_prompts", "ptx_data", "input", "reserved_lines"}
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

    With --force, or when the finished run read other inputs (data, model or tokenizer files rebuilt since),
    the previous run's done marker, checkpoints and export are removed so it starts afresh. A finished run
    whose options changed (say, more steps) resumes from its last checkpoint instead.
    """
    done = run_dir / DONE
    payload = json.loads(done.read_text(encoding="utf-8")) if done.is_file() else None
    inputs = input_fingerprints(cfg)
    changed = [k for k in inputs if payload and "inputs" in payload and payload["inputs"].get(k) != inputs[k]]
    if changed and not getattr(cfg, "force", False):
        log.warning("%s: the inputs of the finished run have changed since (%s): starting afresh", run_dir,
                    ", ".join(f"--{k}" for k in changed))
    if getattr(cfg, "force", False) or changed:
        # utils.dist imports torch; data_process uses this module without it
        from utils.dist import barrier, is_rank0

        if is_rank0():
            done.unlink(missing_ok=True)
            for sub in ("checkpoints", "final"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
        barrier()
        return None
    if payload is not None and payload.get("config_hash") == config_hash(cfg, inputs):
        return payload
    return None


def already_done(output_dir: str | Path, cfg: Any) -> bool:
    """For the steps that write their output dir atomically in one go (data_process, step0): whether it holds
    a finished run of this config and inputs (then say so and skip)."""
    out = Path(output_dir)
    if not out.is_dir() or finished_run(out, cfg) is None:
        return False
    log.info("%s already holds a finished run of this config: skipped (--force to redo)", out)
    return True


def input_fingerprints(cfg: Any) -> dict[str, str]:
    """For each option that names an input file or dir (a data, model or tokenizer path): a digest of the
    names, sizes and modification times of the files in it, so a step whose inputs were rebuilt (say, the
    data made again with other settings) is not taken for finished."""
    prints = {}
    for key, value in config_dict(cfg).items():
        if key == "output_dir" or not value or not ("path" in key or "dir" in key or key in _INPUT_KEYS):
            continue
        files = {}
        for item in value if isinstance(value, list) else [value]:
            path = Path(str(item))
            if path.is_file():
                files[str(path)] = path
            elif path.is_dir():
                files.update({str(p): p for p in sorted(path.rglob("*")) if p.is_file()})
        if files:
            digest = hashlib.sha256()
            for name, f in files.items():
                stat = f.stat()
                digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
            prints[key] = digest.hexdigest()[:16]
    return prints


def config_hash(cfg: Any, inputs: dict[str, str] | None = None) -> str:
    """Hash of the options that determine the step's result, and of the inputs they name (`inputs`: their
    input_fingerprints, when the caller has them already)."""
    relevant = {k: v for k, v in config_dict(cfg).items() if k not in _HASH_EXCLUDE}
    relevant["inputs"] = input_fingerprints(cfg) if inputs is None else inputs
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def write_done(run_dir: Path, cfg: Any, summary: dict[str, Any]) -> None:
    """Mark the step finished: summary.json holds the run's final figures, `done` the config hash and the
    summary (rank 0 writes both; `done` last, so a run marked done always has its summary)."""
    from utils.dist import barrier, is_rank0  # torch: see finished_run

    if not is_rank0():
        barrier()
        return
    summary = {**summary, "commit": code_commit()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp = run_dir / (DONE + ".tmp")
    tmp.write_text(json.dumps(done_payload(cfg, summary), indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(run_dir / DONE)
    barrier()


def code_commit() -> str | None:
    """The git commit of the toolkit's checkout ("c1b07d1", with "+changes" when tracked files differ from
    it), so a result can be traced to its code; None outside a git checkout or without git."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        if head.returncode != 0:
            return None
        changes = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if changes.stdout.strip() else "")


def done_payload(cfg: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """What a done marker holds: the config hash, the fingerprints of the inputs, and the summary."""
    inputs = input_fingerprints(cfg)  # walks the input dirs: once
    return {"config_hash": config_hash(cfg, inputs), "inputs": inputs, **summary}
