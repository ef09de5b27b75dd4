"""Keys/values/queries pipelines: a source, then transforms (LANGUAGE.md §3.3).

Tensors travel as `[B, T, H, d]` so per-head transforms act on the last axis and the causal
convolution acts on the flattened channels `H * d`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlc.runtime.config import Pipeline, Source, Transform


def poly_width(d: int, p: int) -> int:
    """Width of the degree-p polynomial feature map of a d-wide vector: 1 + d + d^2 + ... + d^p."""
    return sum(d**i for i in range(p + 1))


class CausalConv(nn.Module):
    """Depthwise causal convolution of width w. The last w - 1 inputs (the tail) are carried in the
    state so that a stream cut anywhere gives the same outputs as one call."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        if tail is None:
            tail = x.new_zeros(B, self.width - 1, C)
        xx = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, w - 1 + T, C]
        new_tail = xx[:, xx.shape[1] - (self.width - 1) :]
        if x.device.type != "cpu":
            y = F.conv1d(xx.transpose(1, 2), self.weight.to(x.dtype), groups=C)  # [B, C, T]
            return y.transpose(1, 2), new_tail
        # on CPU, w shifted multiply-adds cost less than conv1d's depthwise kernel, forward and backward (a
        # third less on the 16-token segments of a layer with adaptive projections, no more on long calls)
        taps = self.weight.to(x.dtype)[:, 0].t()  # [w, C]
        y = xx[:, :T] * taps[0]
        for j in range(1, self.width):
            y = y + xx[:, j : j + T] * taps[j]  # [B, T, C]
        return y, new_tail


class PolyFeatures(nn.Module):
    """Atlas' polynomial feature map phi(x) = [a_0, a_1 x, a_2 (x ⊗ x), ..., a_p x^{⊗p}], flattened, with
    learnable a_i initialised to 1/i!. A d-wide head becomes poly_width(d, p) wide (the full tensor powers,
    not their symmetric reduction). When both keys and queries go through the same map,
    phi(q)ᵀ phi(k) = Σ_i a_i² (qᵀk)^i."""

    def __init__(self, degree: int):
        super().__init__()
        self.degree = degree
        self.coef = nn.Parameter(torch.tensor([1.0 / math.factorial(i) for i in range(degree + 1)]))

    def forward(self, x: Tensor) -> Tensor:
        coef = self.coef.to(x.dtype)
        power = torch.ones_like(x[..., :1])  # [..., 1]
        parts = [coef[0] * power]
        for i in range(1, self.degree + 1):
            power = (power.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)  # [..., d^i]
            parts.append(coef[i] * power)
        return torch.cat(parts, dim=-1)  # [..., poly_width(d, p)]


def apply_pointwise(name: str, arg: float | None, x: Tensor) -> Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    if name == "elu1":
        return F.elu(x) + 1.0
    if name == "l2norm":
        return F.normalize(x, dim=-1, eps=1e-6)
    if name == "rmsnorm":
        return F.rms_norm(x, (x.shape[-1],), eps=1e-6)
    if name == "scale":
        return x * arg
    raise ValueError(f"unknown transform {name!r}")


class SourceProjection(nn.Module):
    """input / linear / lowrank sources: [B, T, dim] -> [B, T, H, d]. Adaptive (memory) sources are
    computed by the memory layer, which owns their state."""

    def __init__(self, source: Source, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.kind, self.heads, self.head_dim = source.kind, heads, head_dim
        if source.kind == "linear":
            self.proj = nn.Linear(dim, heads * head_dim, bias=False)
        elif source.kind == "lowrank":
            self.down = nn.Linear(dim, source.rank, bias=False)
            self.up = nn.Linear(source.rank, heads * head_dim, bias=False)
        elif source.kind == "input" and heads * head_dim != dim:
            raise ValueError("an `input` source needs heads * head_dim == dim")

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        if self.kind == "linear":
            x = self.proj(x)
        elif self.kind == "lowrank":
            x = self.up(self.down(x))
        return x.view(B, T, self.heads, self.head_dim)  # [B, T, H, d]


class Transforms(nn.Module):
    """The transforms of one pipeline. `forward(s, tails)` maps a source output [B, T, H, d] to
    [B, T, H, d_out] and returns the new conv tails (one per conv, in order)."""

    def __init__(self, transforms: tuple[Transform, ...], heads: int, head_dim: int, shared_poly: PolyFeatures | None = None):
        super().__init__()
        self.steps = list(transforms)
        self.convs = nn.ModuleList()
        self.poly = None
        width = head_dim
        for t in self.steps:
            if t.name == "conv":
                self.convs.append(CausalConv(heads * width, int(t.arg)))
            elif t.name == "poly":
                if self.poly is not None:
                    raise ValueError("a pipeline may hold one poly transform")
                self.poly = PolyFeatures(int(t.arg))
                width = poly_width(width, int(t.arg))
        # keys -> poly(p) without a poly on the queries: the queries go through the keys' map (shared_poly)
        # at the end of their pipeline so that they can read a memory whose key width is poly_width(d, p).
        self.shared_poly = shared_poly if self.poly is None else None
        if self.shared_poly is not None:
            width = poly_width(width, self.shared_poly.degree)
        self.out_width = width

    def forward(self, s: Tensor, tails: tuple[Tensor | None, ...] | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        tails = tails if tails is not None else (None,) * len(self.convs)
        new_tails, conv_index = [], 0
        for t in self.steps:
            if t.name == "conv":
                B, T, H, d = s.shape
                y, tail = self.convs[conv_index](s.reshape(B, T, H * d), tails[conv_index])  # [B, T, H*d]
                s = y.view(B, T, H, d)
                new_tails.append(tail)
                conv_index += 1
            elif t.name == "poly":
                s = self.poly(s)
            else:
                s = apply_pointwise(t.name, t.arg, s)
        if self.shared_poly is not None:
            s = self.shared_poly(s)
        return s, tuple(new_tails)


def has_poly(p: Pipeline) -> int | None:
    return next((int(t.arg) for t in p.transforms if t.name == "poly"), None)
