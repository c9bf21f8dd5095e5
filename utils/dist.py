"""Distributed start-up, rank helpers, and the device/precision choice.

`init_distributed()` works under the deepspeed launcher, torchrun, or plain `python main.py` (it fills in
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR and a free MASTER_PORT, otherwise DeepSpeed falls back to mpi4py
and fails). On CPU it uses gloo and disables DeepSpeed's shm_comm op, whose first use JIT-compiles for
~44 s. Precision follows the hardware: CUDA bf16 where supported (fp16 otherwise); CPU bf16 autocast only
where the CPU has native bf16 (AVX512_BF16 or AMX), since AVX2-only CPUs run bf16 ~20x slower than fp32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from dataclasses import dataclass

import torch

from utils.errors import UserError

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_launcher_defaults() -> None:
    """Give a launcher-less process the environment of a 1-process job."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed() -> None:
    """Start torch.distributed through DeepSpeed (idempotent)."""
    import deepspeed  # DeepSpeed (~0.5 s more than torch) only when a process group starts

    set_launcher_defaults()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl")
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")


def get_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(value: float | torch.Tensor) -> float:
    """Sum a number over all ranks (a no-op with one process)."""
    tensor = torch.as_tensor(value, dtype=torch.float64, device=get_device()).clone()
    if get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.item()


def all_reduce_max(value: float) -> float:
    """Max of a number over all ranks: used for stop/skip flags every rank must agree on."""
    tensor = torch.tensor(float(value), dtype=torch.float64, device=get_device())
    if get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.item()


def get_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512_BF16 or AMX), so bf16 beats fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class Precision:
    """How a step computes: `dtype` for activations; `deepspeed` is the DS config's precision section
    ("bf16"/"fp16" on CUDA, None on CPU where weights stay fp32 and `autocast` does the casting)."""

    name: str  # fp32 | bf16 | fp16
    device_type: str  # cpu | cuda
    deepspeed: str | None
    autocast: bool

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast_context(self) -> contextlib.AbstractContextManager:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def choose_precision(flag: str = "auto") -> Precision:
    """Resolve --dtype (auto|fp32|bf16|fp16) against the hardware; see the module docstring."""
    if torch.cuda.is_available():
        name = flag
        if flag == "auto":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return Precision(name, "cuda", None if name == "fp32" else name, False)
    if flag == "fp16":
        raise UserError("--dtype=fp16 is invalid on CPU: use fp32 or bf16 (or auto)")
    name = flag
    if flag == "auto":
        name = "bf16" if cpu_has_fast_bf16() else "fp32"
    elif flag == "bf16" and not cpu_has_fast_bf16():
        log.warning("--dtype bf16 on a CPU without native bf16: expect it to be far slower than fp32")
    return Precision(name, "cpu", None, name == "bf16")
