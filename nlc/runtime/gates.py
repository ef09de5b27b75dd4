"""Gate values (lr, beta, alpha, lambda, huber delta): constants, learned scalars per head, data-dependent
gates and the squash of adaptive (memory) gates. Every gate returns squashed values `[B, H, T]`
(per head) or `[B, H, T, d_k]` (per channel)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlc.runtime.config import GateSpec

GateName = str  # "lr", "beta", "alpha", "lam", "delta"


def gradients_per_step(rule) -> int:
    """How many tokens' gradients one write adds up at one point: a mini-batch's (or a chunk's) tokens, each
    with its window's `window` tokens."""
    return max(rule.batch, rule.every) * rule.window


def default_value(name: GateName, network: bool, group: int = 1) -> float:
    """Initial value (after the squash) of a gate the spec does not give one for. A network memory starts
    with a small learning rate (momentum multiplies it by up to 1 / (1 - beta)) and a weak weight decay,
    under which a deep memory's weights are not driven to zero, where its gradient vanishes (README.md).
    When a write adds up `group` tokens' gradients taken at one point (`gradients_per_step`: mini-batches,
    chunks, windows), the default lr is divided by `group`: alike tokens then move the memory as far as one
    token does (undivided, Titans' 64-token mini-batches diverged on real text, and OmegaNet's 4-token
    windows on poly(2) keys at its first forward)."""
    lr = (0.05 if network else 0.5) / max(group, 1)
    return {"lr": lr, "beta": 0.9, "alpha": 0.99, "lam": 0.001, "delta": 1.0}[name]


def default_squash(spec: GateSpec, name: GateName) -> str:
    if spec.squash is not None:
        return spec.squash
    if spec.kind == "learned" and name in ("lr", "delta"):
        return "softplus"  # positive and unbounded: lr: 1 or a large huber threshold are reachable
    return "sigmoid"


def squash(kind: str, x: Tensor) -> Tensor:
    return torch.sigmoid(x) if kind == "sigmoid" else F.softplus(x)


def unsquash(kind: str, value: float) -> float:
    """The pre-squash value that squashes to `value`."""
    if kind == "sigmoid":
        value = min(max(value, 1e-6), 1 - 1e-6)
        return math.log(value / (1 - value))
    return math.log(math.expm1(max(value, 1e-6)))


class Gate(nn.Module):
    """One gate of one memory. `forward(x, pre=None)`: x `[B, T, dim]`; for a memory gate, `pre` is the
    inner memory's read `[B, H, T]`."""

    def __init__(self, spec: GateSpec, name: GateName, dim: int, heads: int, d_k: int, network: bool, group: int = 1):
        super().__init__()
        self.spec, self.heads = spec, heads
        self.squash_kind = default_squash(spec, name)
        init = spec.value if spec.value is not None else default_value(name, network, group)
        self.width = d_k if spec.per == "channel" else 1
        if spec.kind == "learned":
            self.pre = nn.Parameter(torch.full((heads,), unsquash(self.squash_kind, init)))
        elif spec.kind == "gate":
            self.proj = nn.Linear(dim, heads * self.width)
            nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(dim) * 0.1)
            nn.init.constant_(self.proj.bias, unsquash(self.squash_kind, init))
        elif spec.kind == "memory":
            # the inner memory starts near 0, the bias sets the gate's initial value
            self.bias = nn.Parameter(torch.full((heads,), unsquash(self.squash_kind, init)))

    def forward(self, x: Tensor, dtype: torch.dtype, pre: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        kind = self.spec.kind
        if kind == "constant":
            return torch.full((B, self.heads, T), float(self.spec.value), dtype=dtype, device=x.device)
        if kind == "learned":
            return squash(self.squash_kind, self.pre.to(dtype))[None, :, None].expand(B, self.heads, T)  # [B, H, T]
        if kind == "gate":
            g = self.proj(x).to(dtype).view(B, T, self.heads, self.width)  # [B, T, H, w]
            g = squash(self.squash_kind, g).permute(0, 2, 1, 3)  # [B, H, T, w]
            return g if self.spec.per == "channel" else g[..., 0]
        return squash(self.squash_kind, pre.to(dtype) + self.bias.to(dtype)[None, :, None])  # [B, H, T]
