"""Choosing how a CMS task-objective chunk write is computed: the Triton kernel for CUDA tensors it supports
when Triton is importable, else the PyTorch ops of `naive.py` (always on CPU)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType

from nlc.ops.cms import naive
from nlc.ops.cms.naive import Weights
from nlc.ops.memory.dispatch import optional_module

KERNEL = "nlc.ops.cms.triton"


@functools.cache
def kernel_module() -> ModuleType | None:
    """The Triton module, imported on first use, or None without CUDA or Triton."""
    return optional_module(KERNEL, gpu_only=True)


def find_path(delta: Weights, momentum: Weights | None, pending: Weights | None, pieces: Sequence[Weights]) -> ModuleType:
    kernel = kernel_module()
    if kernel is not None and kernel.supports(delta, momentum, pending, pieces):
        return kernel
    return naive


def chunk_update(
    delta: Weights,
    momentum: Weights | None,
    pending: Weights | None,
    pieces: Sequence[Weights],
    lr: float,
    beta: float,
    write_chunk: bool,
) -> tuple[Weights, Weights | None, Weights | None]:
    """`naive.chunk_update` computed by the path `find_path` picks."""
    path = find_path(delta, momentum, pending, pieces)
    return path.chunk_update(delta, momentum, pending, pieces, lr, beta, write_chunk)
