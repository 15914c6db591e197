"""What the kernel modules share on the host side: the exp2/log2 constants, the interpreter check, and the
preparation of tl.dot operands."""

from __future__ import annotations

import os

import torch

LOG2E = 1.4426950408889634  # the kernels keep base-2 log-sum-exps: exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels on the CPU. It reads the variable when a kernel is defined, so it
    must be set before the kernel modules are imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but a unit one on the last dimension."""
    return x if x.stride(-1) == 1 else x.contiguous()


def common_dtype(*xs: torch.Tensor) -> list[torch.Tensor]:
    """tl.dot needs matching operand dtypes: promote a set that differs."""
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x if x.dtype == dtype else x.to(dtype) for x in xs]
