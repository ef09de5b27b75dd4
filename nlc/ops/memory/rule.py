"""What a memory computes, as plain data: the contract between layers, the oracle and the fast paths.

Every op in `nlc.ops` takes per-head tensors laid out `[batch, heads, time, width]`, a `Rule`
(the static choices of LANGUAGE.md §3.3), `Gates` (the per-token gate values, already squashed)
and a `MemoryState` (everything needed to continue the stream), and returns the reads and the
new state. Nothing here imports the front end.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

StructureKind = Literal["matrix", "linear", "mlp"]
Objective = Literal["dot", "l2", "lp", "huber", "task"]
Retention = Literal["none", "decay", "weight_decay"]
Update = Literal["gd", "momentum", "dgd", "muon"]


@dataclass(frozen=True)
class Structure:
    """The function a memory stores, per head.

    matrix: M(x) = M x with M: [d_out, d_in].
    linear: M(x) = norm(W x) (+ x when residual), W: [d_out, d_in].
    mlp:    M(x) = norm(W_L act(... act(W_1 x))) (+ x when residual); hidden width round(expand * d_in);
            with act = swiglu each hidden layer is act(W_gate h) * (W_up h), W_gate and W_up stacked as one
            [2 * hidden, d_in] weight. No biases anywhere: a memory's state is its weight matrices.
    norm is parameter-free (layer or rms over the output width) followed by a per-head outer-level
    scale (and shift for layer), passed to the ops in `StructureParams`, never written in context.
    """

    kind: StructureKind = "matrix"
    depth: int = 2  # mlp only: number of weight matrices
    expand: float = 4.0  # mlp only: hidden width = round(expand * d_in)
    act: Literal["gelu", "silu", "relu", "swiglu"] = "gelu"
    residual: bool = False
    norm: Literal["none", "layer", "rms"] = "none"


@dataclass(frozen=True)
class Rule:
    """The static part of LANGUAGE.md §4 for one memory."""

    structure: Structure = field(default_factory=Structure)
    objective: Objective = "l2"
    p: float = 3.0  # lp(p) only
    window: int = 1  # Omega rule: the objective sums the last `window` tokens
    targets: Literal["values", "self"] = "values"
    retention: Retention = "none"
    update: Update = "gd"
    ns_steps: int = 5  # muon only: Newton-Schulz iterations
    batch: int = 1  # mini-batch size B: gradients at the state from before the mini-batch
    every: int = 1  # chunk size C: one write per chunk, reads see the previous chunk's state
    grad: Literal["full", "stop"] = "full"  # stop: writes detached from the outer graph


@dataclass
class Gates:
    """Per-token gate values, already squashed: `[B, H, T]` (per head) or `[B, H, T, d_k]` (per channel,
    matrix memories only, acting on the key dimension). A gate the rule does not use is None."""

    lr: Tensor | None = None  # eta_t, every rule
    beta: Tensor | None = None  # momentum / muon
    alpha: Tensor | None = None  # retention = decay
    lam: Tensor | None = None  # retention = weight_decay
    delta: Tensor | None = None  # objective = huber


@dataclass
class StructureParams:
    """Outer-level parameters of a network structure that are not memory state: the output norm's
    per-head scale and shift, `[H, d_out]` each (None when the structure has no norm)."""

    norm_weight: Tensor | None = None
    norm_bias: Tensor | None = None


@dataclass
class MemoryState:
    """Everything needed to continue a stream. Weights are `[B, H, ...]` per tensor: one `[B, H, d_v, d_k]`
    for a matrix memory, the layer weights `[B, H, out, in]` in order for a network memory.

    pos:      tokens seen so far (mini-batches and chunks are counted from the start of the stream)
    momentum: S, same shapes as weights (momentum and muon), else None
    anchor:   batch > 1: the weights at the start of the current mini-batch (the gradient point)
    pending:  every > 1: the accumulated sum of eta_t g_t of the current, unfinished chunk
    last:     every > 1: the gates of the last token seen (beta, alpha, lam; lr for muon), used when the chunk
              is written
    recent:   window > 1: the last window - 1 tokens' keys "k", values "v" (and huber thresholds "delta"),
              `[B, H, n, ...]` with n <= window - 1, which the next tokens' objectives still sum over
    """

    weights: tuple[Tensor, ...]
    pos: int = 0
    momentum: tuple[Tensor, ...] | None = None
    anchor: tuple[Tensor, ...] | None = None
    pending: tuple[Tensor, ...] | None = None
    last: dict[str, Tensor] = field(default_factory=dict)
    recent: dict[str, Tensor] = field(default_factory=dict)

    def replace(self, **changes) -> MemoryState:
        return replace(self, **changes)


def detach_state(state: MemoryState) -> MemoryState:
    """The same state cut from the autograd graph (between documents, or for truncated backprop)."""

    def cut(ts):
        return None if ts is None else tuple(t.detach() for t in ts)

    return MemoryState(
        weights=cut(state.weights),
        pos=state.pos,
        momentum=cut(state.momentum),
        anchor=cut(state.anchor),
        pending=cut(state.pending),
        last={k: v.detach() for k, v in state.last.items()},
        recent={k: v.detach() for k, v in state.recent.items()},
    )


def zeros_like_weights(weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(torch.zeros_like(w) for w in weights)
