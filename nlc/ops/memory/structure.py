"""The function a memory stores: weight shapes, the forward pass M(x), and Newton-Schulz.

Everything is per head and batched over `[B, H]`: a weight is `[B, H, out, in]`, an input `[B, H, N, in]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nlc.ops.memory.rule import Structure, StructureParams

NORM_EPS = 1e-5  # layer and rms norm of a network memory's output
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz coefficients
NS_EPS = 1e-7


def hidden_width(structure: Structure, d_in: int) -> int:
    return round(structure.expand * d_in)


def weight_shapes(structure: Structure, d_in: int, d_out: int) -> list[tuple[int, int]]:
    """The `(out, in)` shape of each weight matrix, in the order they are applied."""
    if structure.residual and d_in != d_out:
        raise ValueError(f"a residual structure needs equal input and output widths, got {d_in} -> {d_out}")
    if structure.kind in ("matrix", "linear"):
        return [(d_out, d_in)]
    if structure.kind != "mlp":
        raise ValueError(f"unknown structure kind {structure.kind!r}")
    if structure.depth < 1:
        raise ValueError(f"mlp depth must be at least 1, got {structure.depth}")
    hidden = hidden_width(structure, d_in)
    # swiglu computes act(W_gate h) * (W_up h): both halves live in one stacked weight
    rows = 2 * hidden if structure.act == "swiglu" else hidden
    widths = [d_in] + [hidden] * (structure.depth - 1)
    return [(rows, w) for w in widths[:-1]] + [(d_out, widths[-1])]


def activation(structure: Structure, z: Tensor) -> Tensor:
    if structure.act == "gelu":
        return F.gelu(z)
    if structure.act == "silu":
        return F.silu(z)
    if structure.act == "relu":
        return F.relu(z)
    if structure.act == "swiglu":
        gate, up = z.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(f"unknown activation {structure.act!r}")


def output_norm(structure: Structure, y: Tensor, sparams: StructureParams | None) -> Tensor:
    """Parameter-free norm over the output width, then the per-head outer scale (and shift for layer)."""
    if structure.norm == "none":
        return y
    if structure.norm == "layer":
        y = F.layer_norm(y, y.shape[-1:], eps=NORM_EPS)
    elif structure.norm == "rms":
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + NORM_EPS)
    else:
        raise ValueError(f"unknown norm {structure.norm!r}")
    if sparams is not None and sparams.norm_weight is not None:
        y = y * sparams.norm_weight[None, :, None, :]  # [H, d_out] -> [1, H, 1, d_out]
    if structure.norm == "layer" and sparams is not None and sparams.norm_bias is not None:
        y = y + sparams.norm_bias[None, :, None, :]
    return y


def apply_structure(
    structure: Structure,
    weights: tuple[Tensor, ...] | list[Tensor],
    x: Tensor,
    sparams: StructureParams | None = None,
    return_inputs: bool = False,
    on_preactivation=None,
):
    """M(x) per head: weights `[B, H, out, in]` each, x `[B, H, N, d_in]` -> `[B, H, N, d_out]`.

    With `return_inputs`, also returns the input each weight matrix sees, `[B, H, N, in]` per weight.
    `on_preactivation(i, h, z)`, when given, sees each weight's input h and its product z = h W_i^T.
    """
    inputs = []
    h = x
    last = len(weights) - 1
    for i, w in enumerate(weights):
        inputs.append(h)
        z = h @ w.transpose(-1, -2)  # [B, H, N, in] @ [B, H, in, out] -> [B, H, N, out]
        if on_preactivation is not None:
            on_preactivation(i, h, z)
        h = z
        if structure.kind == "mlp" and i < last:
            h = activation(structure, h)
    if structure.kind != "matrix":
        h = output_norm(structure, h, sparams)
        if structure.residual:
            h = h + x
    return (h, inputs) if return_inputs else h


def newton_schulz(G: Tensor, steps: int) -> Tensor:
    """`steps` quintic Newton-Schulz iterations on `[..., m, n]`, approximately orthogonalising G (Muon)."""
    a, b, c = NS_COEFFS
    X = G / (torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True) + NS_EPS)
    transposed = G.shape[-2] > G.shape[-1]
    if transposed:
        X = X.transpose(-1, -2)  # iterate on the wide side: X X^T is the smaller Gram matrix
    for _ in range(steps):
        A = X @ X.transpose(-1, -2)  # [..., m, m]
        X = a * X + (b * A + c * A @ A) @ X
    return X.transpose(-1, -2) if transposed else X
