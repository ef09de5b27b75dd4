"""Counting matmul FLOPs for the benchmarks' GFLOP/s columns."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def _inplace_baddbmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    batch, rows, inner = a_shape
    return 2 * batch * rows * inner * b_shape[-1]


def _inplace_addmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def matmul_flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode, which counts `baddbmm` and `addmm` but not their in-place forms (the hand-written
    backwards accumulate with them): those are added here."""
    inplace = {torch.ops.aten.baddbmm_: _inplace_baddbmm, torch.ops.aten.addmm_: _inplace_addmm}
    return FlopCounterMode(display=False, custom_mapping=inplace)
