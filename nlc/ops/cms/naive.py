"""The CMS `objective = task` chunk write in PyTorch ops: the reference the kernel is tested against, and the
path `CmsLayer.learn` takes off CUDA.

A level's state is a tuple of tensors per weight, `[B, 1, out, in]` each: `delta = W - W0`, the momentum `S`
(momentum levels only) and `pending`, the summed dL/dW of the current, unfinished chunk (None when empty).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

Weights = tuple[Tensor, ...]


def fold(pending: Weights | None, grads: Weights) -> Weights:
    """pending + grads, weight by weight; the grads themselves when nothing is pending."""
    return grads if pending is None else tuple(p + g for p, g in zip(pending, grads))


def write(delta: Weights, momentum: Weights | None, pending: Weights, lr: float, beta: float) -> tuple[Weights, Weights | None]:
    """The chunk's write with the level's update rule: gd when momentum is None, else momentum with decay beta.

    gd:        delta <- delta - lr * pending
    momentum:  S <- beta * S - lr * pending;  delta <- delta + S
    """
    if momentum is not None:
        momentum = tuple(beta * m - lr * p for m, p in zip(momentum, pending))
        return tuple(d + m for d, m in zip(delta, momentum)), momentum
    return tuple(d - lr * p for d, p in zip(delta, pending)), momentum


def chunk_update(
    delta: Weights,
    momentum: Weights | None,
    pending: Weights | None,
    pieces: Sequence[Weights],
    lr: float,
    beta: float,
    write_chunk: bool,
) -> tuple[Weights, Weights | None, Weights | None]:
    """Fold the gradients of `pieces` (read pieces of one chunk, oldest first) into pending, then, with
    write_chunk, write the chunk and empty pending. Returns (delta, momentum, pending)."""
    for grads in pieces:
        pending = fold(pending, grads)
    if write_chunk and pending is not None:
        delta, momentum = write(delta, momentum, pending, lr, beta)
        pending = None
    return delta, momentum, pending
