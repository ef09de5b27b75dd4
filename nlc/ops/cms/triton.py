"""The CMS `objective = task` chunk write as one Triton kernel per weight: fold the pieces' gradients into the
chunk's pending sum and, when the chunk is complete, write it (gd or momentum), in one pass over memory.
Same contract as `naive.chunk_update`; README.md beside this file has the maths and the traffic it saves.

One program per BLOCK elements of the flattened weight `[B, 1, out, in]`; the flags select what is read and
written:

    HAS_PENDING  acc = pending (else 0)
    N_GRADS      acc += g_0 + ... + g_{N-1}                      (up to MAX_PIECES pieces per launch)
    WRITE        gd:        delta' = delta - lr acc
                 momentum:  S' = beta S - lr acc,  delta' = delta + S'
                 else       pending' = acc

lr and beta are compile-time constants (a level's rates are fixed by its config: one compilation per level),
so that, as in the PyTorch ops, they enter float32 arithmetic rounded to float32 and float64 arithmetic exact.
"""

import os
from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from nlc.ops.cms.naive import Weights

NAME = "cms.triton"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_PIECES = 4  # gradient pointers per launch; more pieces take more launches, the pending sum carried between them
BLOCK = 1024
DTYPES = (torch.float32, torch.float64)  # the CMS state's dtypes (16-bit models keep it in float32)


@triton.jit
def _chunk_update_kernel(
    delta_ptr, momentum_ptr, pending_ptr, g0_ptr, g1_ptr, g2_ptr, g3_ptr,
    delta_out, momentum_out, pending_out,
    numel,
    LR: tl.constexpr, BETA: tl.constexpr, N_GRADS: tl.constexpr,
    HAS_PENDING: tl.constexpr, WRITE: tl.constexpr, MOMENTUM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offsets = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]; int64: B out in may pass 2^31
    mask = offsets < numel
    if HAS_PENDING:
        acc = tl.load(pending_ptr + offsets, mask=mask, other=0.0)
    else:
        acc = tl.zeros([BLOCK], dtype=delta_ptr.dtype.element_ty)
    # the pieces in order, as the PyTorch fold adds them
    if N_GRADS > 0:
        acc += tl.load(g0_ptr + offsets, mask=mask, other=0.0)
    if N_GRADS > 1:
        acc += tl.load(g1_ptr + offsets, mask=mask, other=0.0)
    if N_GRADS > 2:
        acc += tl.load(g2_ptr + offsets, mask=mask, other=0.0)
    if N_GRADS > 3:
        acc += tl.load(g3_ptr + offsets, mask=mask, other=0.0)
    if WRITE:
        delta = tl.load(delta_ptr + offsets, mask=mask, other=0.0)
        if MOMENTUM:
            momentum = BETA * tl.load(momentum_ptr + offsets, mask=mask, other=0.0) - LR * acc
            tl.store(momentum_out + offsets, momentum, mask=mask)
            delta = delta + momentum
        else:
            delta = delta - LR * acc
        tl.store(delta_out + offsets, delta, mask=mask)
    else:
        tl.store(pending_out + offsets, acc, mask=mask)


@torch.library.custom_op("nlc::cms_chunk_update", mutates_args=())
def chunk_update_weight(
    delta: Tensor,
    momentum: Optional[Tensor],  # noqa: UP045
    pending: Optional[Tensor],  # noqa: UP045
    grads: list[Tensor],
    lr: float,
    beta: float,
    write_chunk: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One weight: fold grads (oldest first) into pending and, with write_chunk, write the chunk. Returns new tensors
    (delta', momentum', pending'), each empty (`[0]`) where it does not change or does not exist: with write_chunk
    delta' and momentum' (pending is then empty), else pending'. The inputs are never modified."""
    if not grads and pending is None:
        raise ValueError("nlc::cms_chunk_update: nothing to fold or write (no gradients and no pending sum)")
    if any(t.shape != delta.shape or t.dtype != delta.dtype for t in (momentum, pending, *grads) if t is not None):
        raise ValueError("nlc::cms_chunk_update: delta, momentum, pending and every gradient must share one shape and dtype")
    delta = delta.contiguous()
    pending = None if pending is None else pending.contiguous()
    numel = delta.numel()
    grid = (triton.cdiv(numel, BLOCK),)
    batches = [grads[i : i + MAX_PIECES] for i in range(0, len(grads), MAX_PIECES)] or [[]]
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        write = write_chunk and last
        batch = [g.contiguous() for g in batch]
        slots = batch + [delta] * (MAX_PIECES - len(batch))  # unread pointers when N_GRADS < MAX_PIECES
        delta_out = torch.empty_like(delta) if write else _nothing(delta)
        momentum_out = torch.empty_like(delta) if write and momentum is not None else _nothing(delta)
        pending_out = _nothing(delta) if write else torch.empty_like(delta)
        _chunk_update_kernel[grid](
            delta, delta if momentum is None else momentum.contiguous(), delta if pending is None else pending, *slots,
            delta_out, momentum_out, pending_out,
            numel,
            lr, beta if momentum is not None else 0.0, len(batch), pending is not None, write, momentum is not None, BLOCK,
            num_warps=1 if INTERPRETED else 4,
        )  # fmt: skip
        if write:
            return delta_out, momentum_out, pending_out
        pending = pending_out
    return _nothing(delta), _nothing(delta), pending


def _nothing(like: Tensor) -> Tensor:
    """An output that does not change or does not exist (a fresh one each time: outputs may not alias)."""
    return like.new_empty(0)


@chunk_update_weight.register_fake
def _(delta, momentum, pending, grads, lr, beta, write_chunk):
    if write_chunk:
        return torch.empty_like(delta), _nothing(delta) if momentum is None else torch.empty_like(delta), _nothing(delta)
    return _nothing(delta), _nothing(delta), torch.empty_like(delta)


def supports(delta: Weights, momentum: Weights | None, pending: Weights | None, pieces: Sequence[Weights]) -> bool:
    """CUDA tensors of one dtype (float32 or float64) and, weight by weight, one shape (never chosen on CPU, not
    even when interpreted)."""
    for index, d in enumerate(delta):
        others = [None if momentum is None else momentum[index], None if pending is None else pending[index], *(p[index] for p in pieces)]
        if not d.is_cuda or d.dtype not in DTYPES:
            return False
        if any(t is not None and (not t.is_cuda or t.dtype != d.dtype or t.shape != d.shape) for t in others):
            return False
    return True


def chunk_update(
    delta: Weights,
    momentum: Weights | None,
    pending: Weights | None,
    pieces: Sequence[Weights],
    lr: float,
    beta: float,
    write_chunk: bool,
) -> tuple[Weights, Weights | None, Weights | None]:
    """`naive.chunk_update` with one kernel launch per weight (per MAX_PIECES pieces)."""
    if not pieces and (pending is None or not write_chunk):
        return delta, momentum, pending
    outs = []  # (delta', momentum', pending') per weight
    for index, d in enumerate(delta):
        m = None if momentum is None else momentum[index]
        p = None if pending is None else pending[index]
        outs.append(chunk_update_weight(d, m, p, [grads[index] for grads in pieces], lr, beta, write_chunk))
    if write_chunk:
        return tuple(o[0] for o in outs), None if momentum is None else tuple(o[1] for o in outs), None
    return delta, momentum, tuple(o[2] for o in outs)
