"""Crash-safe checkpoints on DeepSpeed's save/load_checkpoint, and the Hugging Face export.

Layout of `run_dir/checkpoints/`:
    step00000010/          DeepSpeed files (or one subdir per named engine) + client_rank{R}.json (loop
                           state, RNG states) + optional tensors.safetensors + meta.json
    latest                 name of the newest complete checkpoint (written last, atomically)
A checkpoint is written as `tmp-step...`, fsynced, given meta.json (the list of files and their sizes)
and only then renamed into place; so a directory named step* with a meta.json that matches its files is
complete. A crash mid-write leaves a tmp-* dir (or a mismatching one), which loading skips with a warning.
A write that fails (disk full, file-size limit) removes its tmp dir and stops the run with one error line
(`failed_write`); the checkpoints already complete stay, so the same command resumes once there is room.
Client state is JSON, never pickle.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from utils.dist import barrier, get_rank, get_world_size, is_rank0
from utils.engine import full_state_dict
from utils.errors import UserError, is_storage_error
from utils.generation import stop_token_ids
from utils.model import merge_lora_state_dict

log = logging.getLogger(__name__)

META = "meta.json"
LATEST = "latest"
TENSORS = "tensors.safetensors"


# ----------------------------------------------------------------------------------------------------
# Failed writes

@contextlib.contextmanager
def failed_write(tmp: Path, what: str, resume_hint: str):
    """Around the writing of `tmp`: on any error remove it; a storage error (disk full, file too large)
    becomes a UserError naming `what`, the cause and how to go on."""
    try:
        yield
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and is_storage_error(err):
            reason = (err.strerror if isinstance(err, OSError) and err.strerror
                      else "the write was cut short: disk full or a file-size limit")
            raise UserError(f"writing {what} failed ({reason}): free disk space in {tmp.parent} and run the same "
                            f"command again; {resume_hint}") from None
        raise


# ----------------------------------------------------------------------------------------------------
# RNG state as JSON


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states, JSON-serialisable."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().cpu().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    if "cuda" in state and torch.cuda.is_available():
        raw = np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy()
        torch.cuda.set_rng_state(torch.from_numpy(raw))


# ----------------------------------------------------------------------------------------------------
# Atomic file helpers


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` and the directories themselves to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write, fsync, then rename over `path`: readers see the old or the new file, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, ensure_ascii=False, indent=1))


def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != META}


# ----------------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointManager:
    """Save, find and load complete checkpoints of a DeepSpeed engine under `directory`."""

    def __init__(self, directory: str | Path, keep_last: int = 2):
        self.directory = Path(directory)
        self.keep_last = keep_last

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step:08d}"

    def save(self, engine, step: int, loop_state: dict[str, Any],
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Write checkpoint `step` (all ranks call this). `loop_state` is this rank's JSON-able state.

        `engine` is one DeepSpeed engine, or a dict of named engines (step3 PPO's actor and critic), each
        then saved in its own subdirectory; `tensors` (the same on every rank, e.g. EMA weights) go to
        tensors.safetensors. Either way the checkpoint is complete only once all of it is on disk."""
        final = self.directory / self.tag(step)
        tmp_tag = f"tmp-{self.tag(step)}"
        tmp = self.directory / tmp_tag
        if is_rank0():
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        barrier()
        previous = self.complete_checkpoints()
        hint = (f"it resumes from {previous[-1].name}" if previous
                else "it starts from the beginning (no checkpoint was complete yet)")
        with failed_write(tmp, f"checkpoint {self.tag(step)}", hint):
            self._write(engine, tmp, tmp_tag, step, loop_state, tensors)
        if is_rank0():
            if final.exists():  # a re-run of the same step after a resume: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            write_text_atomic(self.directory / LATEST, final.name)  # DeepSpeed's format; written last
            self._prune()
        barrier()
        return final

    def _write(self, engine, tmp: Path, tmp_tag: str, step: int, loop_state: dict[str, Any],
               tensors: dict[str, torch.Tensor] | None) -> None:
        if isinstance(engine, dict):
            for name, one in engine.items():
                one.save_checkpoint(str(tmp), tag=name, client_state={}, save_latest=False)
        else:
            engine.save_checkpoint(str(self.directory), tag=tmp_tag, client_state={}, save_latest=False)
        if tensors and is_rank0():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        client = {"step": step, "world_size": get_world_size(), "loop": loop_state, "rng": rng_state()}
        write_json_atomic(tmp / f"client_rank{get_rank()}.json", client)
        barrier()
        if is_rank0():
            fsync_tree(tmp)
            write_json_atomic(tmp / META, {"step": step, "world_size": get_world_size(), "files": _file_sizes(tmp)})

    def _prune(self) -> None:
        complete = self.complete_checkpoints()
        for old in complete[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob("tmp-step*"):
            shutil.rmtree(stale, ignore_errors=True)

    def is_complete(self, path: Path) -> bool:
        meta_file = path / META
        if not meta_file.is_file():
            return False
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return False
        return meta.get("files") == _file_sizes(path)

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first; incomplete ones are reported and ignored."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.iterdir()):
            if not path.is_dir():
                continue
            if path.name.startswith("tmp-"):
                log.warning("ignoring %s: a checkpoint cut off mid-write", path)
            elif self.is_complete(path):
                found.append(path)
            else:
                log.warning("ignoring %s: its files do not match its meta.json (incomplete or damaged)", path)
        return found

    def latest(self) -> Path | None:
        """The newest complete checkpoint (the `latest` pointer is a hint, completeness decides)."""
        complete = self.complete_checkpoints()
        if not complete:
            return None
        pointer = self.directory / LATEST
        named = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
        if named != complete[-1].name:
            log.warning("checkpoint pointer says %s; resuming from %s, the newest complete checkpoint",
                        named, complete[-1].name)
        return complete[-1]

    def load(self, engine, path: Path) -> dict[str, Any]:
        """Restore weights, optimizer, schedule (of one engine or a dict of named engines, as saved) and
        this rank's RNG; return its loop state."""
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        if meta["world_size"] != get_world_size():
            raise UserError(f"{path}: saved with {meta['world_size']} processes, resuming with "
                            f"{get_world_size()}: use the same number of processes or a new --output_dir")
        engines = engine.items() if isinstance(engine, dict) else [(None, engine)]
        for name, one in engines:
            load_path, _ = one.load_checkpoint(str(path) if name else str(self.directory), tag=name or path.name,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
            if load_path is None:
                raise UserError(f"{path}: DeepSpeed could not load this checkpoint; delete it to resume from an "
                                "earlier one")
        client = json.loads((path / f"client_rank{get_rank()}.json").read_text(encoding="utf-8"))
        set_rng_state(client["rng"])
        return client["loop"]


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The extra tensors a checkpoint holds (empty if none were saved)."""
    file = path / TENSORS
    return load_file(str(file)) if file.is_file() else {}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------
# Hugging Face export


def set_special_token_ids(model: torch.nn.Module, tokenizer: Any) -> None:
    """Write `tokenizer`'s token ids into the model's config (and generation config, where it generates), so
    the tools users already have stop where chat.py stops: transformers' pipeline and generate, and servers
    that read generation_config.json, end a reply at every id of utils.generation.stop_token_ids (the
    end-of-turn token first), pad with the tokenizer's pad id, and find bos only where the tokenizer has one
    (step0's has none; LlamaConfig's default ids 1 and 2 name other tokens of our vocabularies)."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stop_token_ids(tokenizer),
           "pad_token_id": tokenizer.pad_token_id}
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            for key, value in ids.items():
                setattr(config, key, value)


def export_hf(model: torch.nn.Module, out_dir: str | Path, *, zero_stage: int, tokenizer: Any = None,
              lora_scale: float | None = None) -> Path:
    """Save `model` (the engine's module) as a Hugging Face dir that from_pretrained loads.

    Gathers ZeRO-3 weights, merges LoRA adapters into the base weights when `lora_scale` is given, writes
    safetensors + config (+ tokenizer, whose token ids the configs then name: set_special_token_ids) to
    `out_dir`.tmp and renames it into place. All ranks call this.
    """
    out = Path(out_dir)
    state = full_state_dict(model, zero_stage, rank0_fp32_cpu=True)
    if is_rank0():
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if lora_scale is not None:
            state = merge_lora_state_dict(state, lora_scale)
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        fresh = type(base)(copy.deepcopy(base.config))  # a plain copy on CPU receives the gathered weights
        if getattr(base, "generation_config", None) is not None:  # a start model's own sampling defaults stay
            fresh.generation_config = copy.deepcopy(base.generation_config)
        if tokenizer is not None:
            set_special_token_ids(fresh, tokenizer)
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        # tied lm_head is absent from state dicts of tied models; anything else is a real mismatch
        missing = [k for k in missing if not (k == "lm_head.weight" and base.config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"export: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with failed_write(tmp, f"the export {out}", "the training itself resumes from its last checkpoint"):
            fresh.save_pretrained(str(tmp), safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    barrier()
    return out
