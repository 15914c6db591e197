"""Where a run executes: the device, the process group, seeding, and ZeRO-3 parameter gathering."""

from __future__ import annotations

import contextlib
import os
import platform
import random
from collections.abc import Iterable

import numpy as np
import torch
import transformers
from torch import nn


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when there is one, else the CPU; under a launcher, CUDA means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every CUDA device's too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_environment(device: torch.device) -> dict:
    """The versions and the device a run's figures were measured with, for its record."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": name}


def init_distributed() -> tuple[int, int]:
    """DeepSpeed's process group (NCCL on GPU, gloo on CPU); a plain `python -m` run is a world of one."""
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def rank() -> int:
    """This process's rank, 0 outside a process group."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_ranks_finite(value: torch.Tensor) -> bool:
    flag = torch.isfinite(value.detach()).all().float().reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = sorted(metrics)
    stacked = torch.stack([metrics[k].detach().float().reshape(()) for k in keys])
    torch.distributed.all_reduce(stacked)
    return dict(zip(keys, (stacked / torch.distributed.get_world_size()).tolist()))


def zero3_gathered(params: Iterable[nn.Parameter], *, until_step: bool = False):
    """A context in which ZeRO-3 partitioned parameters are whole (read-only) on every rank; every rank must
    enter it. Ordinary parameters, and partitioned ones ZeRO-3 already holds whole (small persistent ones, or
    one its module is using), need nothing, and a list of only those gives a no-op context.

    `until_step` leaves them whole after the block, until DeepSpeed's optimizer step partitions every
    parameter again: autograd accumulates a gradient only into a parameter of the gradient's shape, so a
    backward that reaches parameters other than through their modules (whose backward hooks DeepSpeed
    gathers in) needs them whole until it has run."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    missing = [p for p in partitioned if p.ds_status != ZeroParamStatus.AVAILABLE]
    if not missing:
        return contextlib.nullcontext()
    if until_step:
        return _gathered_until_step(missing)
    return deepspeed.zero.GatheredParameters(missing, modifier_rank=None)


@contextlib.contextmanager
def _gathered_until_step(params: list[nn.Parameter]):
    params[0].all_gather(param_list=params)  # no partition() after: the step's release of all parameters does it
    yield
