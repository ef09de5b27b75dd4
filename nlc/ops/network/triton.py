"""Triton kernels for the Titans / TTT-MLP hot loop: a 2-layer MLP memory (gelu, silu, relu or swiglu, the
CMS levels' default) written in mini-batches (`batch = B`, the dual form) or in chunks (`every = C`, a CMS
level's chunk update), with gd or momentum and none / weight_decay / decay retention. Same contract, maths
and state format as `chunk.py` (README.md beside this file, "batch = B: the dual form", "every = C: chunk
writes" and "Triton kernels").

Forward, one program per (batch, head): W1 `[hidden, d_k]`, W2 `[d_v, hidden]` (and their momentum)
stay in registers while a loop runs over the groups (mini-batches or chunks) of the sequence. Per group
of n tokens, everything with `tl.dot`:

    forward at the gradient point:  Z1 = K W1^T, H = act(Z1), Z2 = H W2^T, e = out(Z2, K) - V
    per-token gradients:            D2 = out'(Z2)^T e, D1 = act'(Z1) * (D2 W2)      (g_t = sum_l D_l[t] H_l[t]^T)
    swiglu:                         H = silu(Z_gate) * Z_up from W1 = [W_gate; W_up], two W1 tiles; W1's per-token
                                    gradient is still D1[t] k_t^T, D1 = [silu'(Z_gate) Z_up; silu(Z_gate)] * (D2 W2)
    scan coefficients:              A, c, Bc [n], G, Gs [n, n] from cumulative log gates
    reads (batch):                  Z = A * (X W_s^T) + c * (X S_s^T) - (G * X H^T) D   per layer, causal
    reads (every):                  the state before the chunk, M_s(q)
    end state:                      W = A_n W_s + c_n S_s - D^T (G[n] * H),  S = Bc_n S_s - D^T (Gs[n] * H)

Backward, one program per (batch, head): the forward stores the state entering every group, and a reverse
loop over groups recomputes each group from it and carries dL/d(W1, W2, S1, S2) leaving it: through the
reads, the end state, the per-token gradients (second order: act'' and the norm's second derivative, as
D1 = act'(Z1) * (D2 W2) and D2 = J(Z2)^T (w * e) depend on the weights; for swiglu both halves of D1) and
the scan coefficients back to the gates in log space. With grad = stop only the reads are on the graph: a
lighter kernel gives q, M_0 and the read norm their gradients. The ops are `torch.library.custom_op`s with registered fakes and an
autograd formula, so `torch.compile` keeps them as graph nodes.
"""

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from nlc.ops.memory.rule import Gates, MemoryState, Rule, StructureParams
from nlc.ops.memory.structure import NORM_EPS, hidden_width
from nlc.ops.network import chunk
from nlc.ops.network.twolayer import norm_params

NAME = "network.triton"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ACTS = {"gelu": 0, "silu": 1, "relu": 2, "swiglu": 1}  # swiglu: silu on the gate half, times the up half
NORMS = {"none": 0, "layer": 1, "rms": 2}
MAX_WEIGHT_TILE = 128 * 128  # padded W1 rows (both swiglu halves) x d_k: W1, W2 and their momentum live in registers; beyond it, the chunk path
LOG_FLOOR = 1e-30  # a gate of exactly 0 enters the log-space scans as 1e-30


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # gelu (erf form, as F.gelu)
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 1:
        return z * tl.sigmoid(z)
    else:
        return tl.maximum(z, 0.0)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 1:
        sig = tl.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))
    else:
        return tl.where(z > 0, 1.0, 0.0)


@triton.jit
def _output(z, x, norm_w, norm_b, mask_v, DV: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, EPS: tl.constexpr):
    """The memory's output from its last pre-activation z `[N, BV]` for input x `[N, BK]` (BK = BV when residual)."""
    y = z
    if NORM == 1:
        centred = tl.where(mask_v[None, :], z - tl.sum(z, 1)[:, None] / DV, 0.0)
        y = centred * tl.rsqrt(tl.sum(centred * centred, 1) / DV + EPS)[:, None] * norm_w[None, :] + norm_b[None, :]
    elif NORM == 2:
        y = z * tl.rsqrt(tl.sum(z * z, 1) / DV + EPS)[:, None] * norm_w[None, :]
    if RESIDUAL:
        y = y + x
    return y


@triton.jit
def _output_backward(z, grad_y, norm_w, mask_v, DV: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr):
    """d loss / d z `[N, BV]` from d loss / d output (the residual adds nothing to the weights' gradient)."""
    if NORM == 0:
        return grad_y
    g = grad_y * norm_w[None, :]
    if NORM == 1:
        z = tl.where(mask_v[None, :], z - tl.sum(z, 1)[:, None] / DV, 0.0)
    inv = tl.rsqrt(tl.sum(z * z, 1) / DV + EPS)[:, None]  # [N, 1]
    normed = z * inv
    g = g - normed * (tl.sum(g * normed, 1) / DV)[:, None]
    if NORM == 1:
        g = tl.where(mask_v[None, :], g - tl.sum(g, 1)[:, None] / DV, 0.0)
    return g * inv


@triton.jit
def _row(x, rows, r):
    """Row r of a [N, M] block as [M] (a register block cannot be indexed by a runtime scalar)."""
    return tl.sum(tl.where(rows[:, None] == r, x, 0.0), 0)


@triton.jit
def _mlp_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, keep_ptr, beta_ptr,
    w1_ptr, w2_ptr, s1_ptr, s2_ptr, norm_w_ptr, norm_b_ptr,
    o_ptr, w1_out, w2_out, s1_out, s2_out, p1_out, p2_out, w1_starts, w2_starts, s1_starts, s2_starts,
    T, H, GROUP,
    DK: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr, W1_ROWS: tl.constexpr,
    N: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, BV: tl.constexpr,
    ACT: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
    HAS_KEEP: tl.constexpr, MOMENTUM: tl.constexpr, EVERY: tl.constexpr, SAVE_STARTS: tl.constexpr,
    PRECISION: tl.constexpr, EPS: tl.constexpr, FLOOR: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    head = bh % H
    rows = tl.arange(0, N)
    cols_k = tl.arange(0, BK)
    cols_h = tl.arange(0, BH)
    cols_v = tl.arange(0, BV)
    mask_k = cols_k < DK
    mask_h = cols_h < DH
    mask_v = cols_v < DV
    w1_local = cols_h[:, None] * DK + cols_k[None, :]  # [BH, BK]
    w1_offsets = bh * W1_ROWS * DK + w1_local  # swiglu's W1 stacks the gate rows, then the up rows (W1_ROWS = 2 DH)
    w1_mask = mask_h[:, None] & mask_k[None, :]
    w2_local = cols_v[:, None] * DH + cols_h[None, :]  # [BV, BH]
    w2_offsets = bh * DV * DH + w2_local
    w2_mask = mask_v[:, None] & mask_h[None, :]
    causal = rows[:, None] >= rows[None, :]  # [N, N]

    w1 = tl.load(w1_ptr + w1_offsets, mask=w1_mask, other=0.0)  # [BH, BK]
    w2 = tl.load(w2_ptr + w2_offsets, mask=w2_mask, other=0.0)  # [BV, BH]
    s1 = tl.zeros([BH, BK], dtype=w1.dtype)
    s2 = tl.zeros([BV, BH], dtype=w1.dtype)
    w1_up = tl.zeros([BH, BK], dtype=w1.dtype)
    s1_up = tl.zeros([BH, BK], dtype=w1.dtype)
    if GLU:
        w1_up = tl.load(w1_ptr + DH * DK + w1_offsets, mask=w1_mask, other=0.0)  # [BH, BK]
    if MOMENTUM:
        s1 = tl.load(s1_ptr + w1_offsets, mask=w1_mask, other=0.0)
        s2 = tl.load(s2_ptr + w2_offsets, mask=w2_mask, other=0.0)
        if GLU:
            s1_up = tl.load(s1_ptr + DH * DK + w1_offsets, mask=w1_mask, other=0.0)
    norm_w = tl.full([BV], 1.0, w1.dtype)
    norm_b = tl.zeros([BV], dtype=w1.dtype)
    if HAS_NORM_W:
        norm_w = tl.load(norm_w_ptr + head * DV + cols_v, mask=mask_v, other=0.0)
    if HAS_NORM_B:
        norm_b = tl.load(norm_b_ptr + head * DV + cols_v, mask=mask_v, other=0.0)

    n_groups = tl.cdiv(T, GROUP)
    for group in range(n_groups):
        start = group * GROUP
        count = tl.minimum(GROUP, T - start)  # a partial last mini-batch (batch mode only)
        valid = rows < count
        tokens = bh * T + start + rows  # [N]
        k_mask = valid[:, None] & mask_k[None, :]
        v_mask = valid[:, None] & mask_v[None, :]
        q = tl.load(q_ptr + tokens[:, None] * DK + cols_k[None, :], mask=k_mask, other=0.0)  # [N, BK]
        k = tl.load(k_ptr + tokens[:, None] * DK + cols_k[None, :], mask=k_mask, other=0.0)  # [N, BK]
        v = tl.load(v_ptr + tokens[:, None] * DV + cols_v[None, :], mask=v_mask, other=0.0)  # [N, BV]
        lr = tl.load(lr_ptr + tokens, mask=valid, other=0.0)  # [N], 0 on padding: no write
        if SAVE_STARTS:  # the state entering every group, for the backward kernel
            slot = bh * n_groups + group
            tl.store(w1_starts + slot * W1_ROWS * DK + w1_local, w1, mask=w1_mask)
            tl.store(w2_starts + slot * DV * DH + w2_local, w2, mask=w2_mask)
            if GLU:
                tl.store(w1_starts + slot * W1_ROWS * DK + DH * DK + w1_local, w1_up, mask=w1_mask)
            if MOMENTUM:
                tl.store(s1_starts + slot * W1_ROWS * DK + w1_local, s1, mask=w1_mask)
                tl.store(s2_starts + slot * DV * DH + w2_local, s2, mask=w2_mask)
                if GLU:
                    tl.store(s1_starts + slot * W1_ROWS * DK + DH * DK + w1_local, s1_up, mask=w1_mask)

        # per-token gradients at the gradient point (the state at the group start)
        z1 = tl.dot(k, tl.trans(w1), input_precision=PRECISION)  # [N, BH]
        hidden = _act(z1, ACT)
        if GLU:  # H = silu(Z_gate) * Z_up
            z1_up = tl.dot(k, tl.trans(w1_up), input_precision=PRECISION)  # [N, BH]
            gate = hidden
            hidden = gate * z1_up
        z2 = tl.dot(hidden, tl.trans(w2), input_precision=PRECISION)  # [N, BV]
        error = tl.where(v_mask, _output(z2, k, norm_w, norm_b, mask_v, DV, NORM, RESIDUAL, EPS) - v, 0.0)
        d2 = _output_backward(z2, error, norm_w, mask_v, DV, NORM, EPS)  # [N, BV]
        pull = tl.dot(d2, w2, input_precision=PRECISION)  # [N, BH] = D2 W2
        d1 = _act_grad(z1, ACT) * pull  # [N, BH]
        if GLU:  # the two halves of the hidden gradient: D1_gate = silu'(Z_gate) Z_up (D2 W2), D1_up = silu(Z_gate) (D2 W2)
            d1 = d1 * z1_up
            d1_up = gate * pull

        # scan coefficients: the end row (index count - 1) and, for the dual reads, all rows
        if EVERY:
            # one write with the gates of the chunk's last token: W <- a W (+ beta S) - sum eta g
            keep_end = tl.load(keep_ptr + bh * T + start + count - 1) if HAS_KEEP else 1.0
            beta_end = tl.load(beta_ptr + bh * T + start + count - 1) if MOMENTUM else 0.0
            a_end = keep_end
            c_end = beta_end
            b_end = beta_end
            g_end = lr
            gs_end = lr
            x2 = _act(tl.dot(q, tl.trans(w1), input_precision=PRECISION), ACT)  # [N, BH] reads see the previous chunk's state
            if GLU:
                x2 = x2 * tl.dot(q, tl.trans(w1_up), input_precision=PRECISION)
            z2r = tl.dot(x2, tl.trans(w2), input_precision=PRECISION)  # [N, BV]
        else:
            log_keep = tl.zeros([N], dtype=w1.dtype)
            if HAS_KEEP:
                keep = tl.load(keep_ptr + tokens, mask=valid, other=1.0)
                log_keep = tl.log(tl.maximum(keep, FLOOR))
            la = tl.cumsum(log_keep, 0)  # [N] log A_t
            p_keep = tl.where(causal, tl.exp(la[:, None] - la[None, :]), 0.0)  # [N, N] prod_{tau < s <= t} a_s
            a_cum = tl.exp(la)
            if MOMENTUM:
                beta = tl.load(beta_ptr + tokens, mask=valid, other=1.0)
                lb = tl.cumsum(tl.log(tl.maximum(beta, FLOOR)), 0)
                p_beta = tl.where(causal, tl.exp(lb[:, None] - lb[None, :]), 0.0)  # [N, N]
                b_cum = tl.exp(lb)
                c = tl.sum(p_keep * b_cum[None, :], 1)  # [N] sum_r P_keep[t, r] Bc_r
                coeff = tl.dot(p_keep, p_beta, input_precision=PRECISION) * lr[None, :]  # [N, N] G
                coeff_mom = p_beta * lr[None, :]  # [N, N] Gs
                c_end = tl.sum(tl.where(rows == count - 1, c, 0.0), 0)
                b_end = tl.sum(tl.where(rows == count - 1, b_cum, 0.0), 0)
                gs_end = _row(coeff_mom, rows, count - 1)
            else:
                c = tl.zeros([N], dtype=w1.dtype)
                coeff = p_keep * lr[None, :]
                c_end = 0.0
                b_end = 0.0
                gs_end = lr
            a_end = tl.sum(tl.where(rows == count - 1, a_cum, 0.0), 0)
            g_end = _row(coeff, rows, count - 1)

            # dual reads: each layer's state after token t applied to its read input, a causal masked product
            z1r = a_cum[:, None] * tl.dot(q, tl.trans(w1), input_precision=PRECISION)  # [N, BH]
            if MOMENTUM:
                z1r += c[:, None] * tl.dot(q, tl.trans(s1), input_precision=PRECISION)
            gqk = coeff * tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [N, N] G * Q K^T
            z1r -= tl.dot(gqk, d1, input_precision=PRECISION)
            x2 = _act(z1r, ACT)  # [N, BH]
            if GLU:  # the up half is one more layer-1 read, with its own state and D1_up
                z1r_up = a_cum[:, None] * tl.dot(q, tl.trans(w1_up), input_precision=PRECISION)  # [N, BH]
                if MOMENTUM:
                    z1r_up += c[:, None] * tl.dot(q, tl.trans(s1_up), input_precision=PRECISION)
                x2 = x2 * (z1r_up - tl.dot(gqk, d1_up, input_precision=PRECISION))
            z2r = a_cum[:, None] * tl.dot(x2, tl.trans(w2), input_precision=PRECISION)  # [N, BV]
            if MOMENTUM:
                z2r += c[:, None] * tl.dot(x2, tl.trans(s2), input_precision=PRECISION)
            z2r -= tl.dot(coeff * tl.dot(x2, tl.trans(hidden), input_precision=PRECISION), d2, input_precision=PRECISION)
        o = _output(z2r, q, norm_w, norm_b, mask_v, DV, NORM, RESIDUAL, EPS)
        tl.store(o_ptr + tokens[:, None] * DV + cols_v[None, :], o, mask=v_mask)

        if group == n_groups - 1:  # the gradient point of the last group: the anchor of a partial mini-batch
            tl.store(p1_out + w1_offsets, w1, mask=w1_mask)
            tl.store(p2_out + w2_offsets, w2, mask=w2_mask)
            if GLU:
                tl.store(p1_out + DH * DK + w1_offsets, w1_up, mask=w1_mask)
        # end state: W = A_n W_s + c_n S_s - D^T (G[n] * H),  S = Bc_n S_s - D^T (Gs[n] * H)
        new_w1 = a_end * w1 - tl.dot(tl.trans(d1), g_end[:, None] * k, input_precision=PRECISION)  # [BH, BK]
        new_w2 = a_end * w2 - tl.dot(tl.trans(d2), g_end[:, None] * hidden, input_precision=PRECISION)  # [BV, BH]
        if GLU:
            new_w1_up = a_end * w1_up - tl.dot(tl.trans(d1_up), g_end[:, None] * k, input_precision=PRECISION)  # [BH, BK]
        if MOMENTUM:
            new_w1 += c_end * s1
            new_w2 += c_end * s2
            s1 = b_end * s1 - tl.dot(tl.trans(d1), gs_end[:, None] * k, input_precision=PRECISION)
            s2 = b_end * s2 - tl.dot(tl.trans(d2), gs_end[:, None] * hidden, input_precision=PRECISION)
            if GLU:
                new_w1_up += c_end * s1_up
                s1_up = b_end * s1_up - tl.dot(tl.trans(d1_up), gs_end[:, None] * k, input_precision=PRECISION)
        w1 = new_w1
        w2 = new_w2
        if GLU:
            w1_up = new_w1_up

    tl.store(w1_out + w1_offsets, w1, mask=w1_mask)
    tl.store(w2_out + w2_offsets, w2, mask=w2_mask)
    if GLU:
        tl.store(w1_out + DH * DK + w1_offsets, w1_up, mask=w1_mask)
    if MOMENTUM:
        tl.store(s1_out + w1_offsets, s1, mask=w1_mask)
        tl.store(s2_out + w2_offsets, s2, mask=w2_mask)
        if GLU:
            tl.store(s1_out + DH * DK + w1_offsets, s1_up, mask=w1_mask)


@triton.jit
def _act_grad2(z, ACT: tl.constexpr):
    """The activation's second derivative (the per-token gradients depend on the weights through act')."""
    if ACT == 0:
        return tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)
    elif ACT == 1:
        sig = tl.sigmoid(z)
        return sig * (1.0 - sig) * (2.0 + z * (1.0 - 2.0 * sig))
    else:
        return tl.zeros_like(z)


@triton.jit
def _log_gate_grad(d_p, p, d_cum, cum, rows, PRECISION: tl.constexpr):
    """dL/d log a_s `[N]` from the gradients of P[t, tau] = prod_{tau < r <= t} a_r `[N, N]` and of cum_t = prod_{r <= t} a_r:
    a sum over the products that contain a_s (tau < s <= t) only, never a difference of larger sums, whose rounding
    noise a gate near 0 would amplify when the caller divides by a_s."""
    m = d_p * p  # [t, tau]
    strictly_before = tl.where(rows[:, None] < rows[None, :], 1.0, 0.0).to(m.dtype)  # [tau, s]: tau < s
    before = tl.dot(m, strictly_before, input_precision=PRECISION)  # [t, s] = sum_{tau < s} m[t, tau]
    quadrant = tl.cumsum(before, 0, reverse=True)  # [s', s] = sum_{t >= s'} before[t, s]
    diagonal = rows[:, None] == rows[None, :]
    return tl.sum(tl.where(diagonal, quadrant, 0.0), 0) + tl.cumsum(d_cum * cum, 0, reverse=True)


@triton.jit
def _normalized(z, mask_v, DV: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr):
    """The parameter-free norm of z `[N, BV]` (layer: centred first)."""
    if NORM == 1:
        z = tl.where(mask_v[None, :], z - tl.sum(z, 1)[:, None] / DV, 0.0)
    return z * tl.rsqrt(tl.sum(z * z, 1) / DV + EPS)[:, None]


@triton.jit
def _norm_second(z, u, w, mask_v, DV: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr):
    """d <w, J(z)^T u> / dz with u held fixed, J the norm's Jacobian: for rms, J^T u = inv u - inv^3 z mean(u z)
    with inv = (mean(z^2) + eps)^-1/2; layer norm is that on the centred z, centred again."""
    if NORM == 1:
        z = tl.where(mask_v[None, :], z - tl.sum(z, 1)[:, None] / DV, 0.0)
        w = tl.where(mask_v[None, :], w - tl.sum(w, 1)[:, None] / DV, 0.0)
    inv = tl.rsqrt(tl.sum(z * z, 1) / DV + EPS)[:, None]
    inv3 = inv * inv * inv
    mean_uz = tl.sum(u * z, 1)[:, None] / DV
    mean_wz = tl.sum(w * z, 1)[:, None] / DV
    mean_wu = tl.sum(w * u, 1)[:, None] / DV
    dz = (3.0 * mean_uz * mean_wz * inv * inv - mean_wu) * inv3 * z - mean_uz * inv3 * w - mean_wz * inv3 * u
    if NORM == 1:
        dz = tl.where(mask_v[None, :], dz - tl.sum(dz, 1)[:, None] / DV, 0.0)
    return dz


@triton.jit
def _mlp_backward_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, keep_ptr, beta_ptr, w1_starts, w2_starts, s1_starts, s2_starts, norm_w_ptr, norm_b_ptr,
    d_o_ptr, d_w1_end, d_w2_end, d_s1_end, d_s2_end, d_p1_ptr, d_p2_ptr,
    d_q_ptr, d_k_ptr, d_v_ptr, d_lr_ptr, d_keep_ptr, d_beta_ptr, d_w1_ptr, d_w2_ptr, d_s1_ptr, d_s2_ptr,
    d_norm_w_ptr, d_norm_b_ptr,
    T, H, GROUP,
    DK: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr, W1_ROWS: tl.constexpr,
    N: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, BV: tl.constexpr,
    ACT: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
    HAS_KEEP: tl.constexpr, MOMENTUM: tl.constexpr, EVERY: tl.constexpr, PRECISION: tl.constexpr, EPS: tl.constexpr,
    FLOOR: tl.constexpr,
):  # fmt: skip
    """grad = full: the reverse loop over groups recomputes each group from its stored start state and carries
    dL/d(W1, W2, S1, S2) leaving it. Norm parameter gradients are written per (batch, head). With EVERY the
    reads see the chunk's start state (A = 1, c = 0, G = 0 in the read formulas) and the end row holds the
    chunk's last gates."""
    bh = tl.program_id(0)
    head = bh % H
    rows = tl.arange(0, N)
    cols_k = tl.arange(0, BK)
    cols_h = tl.arange(0, BH)
    cols_v = tl.arange(0, BV)
    mask_k = cols_k < DK
    mask_h = cols_h < DH
    mask_v = cols_v < DV
    w1_local = cols_h[:, None] * DK + cols_k[None, :]  # [BH, BK]
    w1_mask = mask_h[:, None] & mask_k[None, :]
    w2_local = cols_v[:, None] * DH + cols_h[None, :]  # [BV, BH]
    w2_mask = mask_v[:, None] & mask_h[None, :]
    causal = rows[:, None] >= rows[None, :]

    w1_offsets = bh * W1_ROWS * DK + w1_local  # swiglu's W1 stacks the gate rows, then the up rows (W1_ROWS = 2 DH)
    d_w1 = tl.load(d_w1_end + w1_offsets, mask=w1_mask, other=0.0)  # [BH, BK] dL/dW1 leaving the group
    d_w2 = tl.load(d_w2_end + bh * DV * DH + w2_local, mask=w2_mask, other=0.0)  # [BV, BH]
    d_s1 = tl.zeros([BH, BK], dtype=d_w1.dtype)
    d_s2 = tl.zeros([BV, BH], dtype=d_w1.dtype)
    d_w1_up = tl.zeros([BH, BK], dtype=d_w1.dtype)
    d_s1_up = tl.zeros([BH, BK], dtype=d_w1.dtype)
    if GLU:
        d_w1_up = tl.load(d_w1_end + DH * DK + w1_offsets, mask=w1_mask, other=0.0)
    if MOMENTUM:
        d_s1 = tl.load(d_s1_end + w1_offsets, mask=w1_mask, other=0.0)
        d_s2 = tl.load(d_s2_end + bh * DV * DH + w2_local, mask=w2_mask, other=0.0)
        if GLU:
            d_s1_up = tl.load(d_s1_end + DH * DK + w1_offsets, mask=w1_mask, other=0.0)

    norm_w = tl.full([BV], 1.0, d_w1.dtype)
    norm_b = tl.zeros([BV], dtype=d_w1.dtype)
    if HAS_NORM_W:
        norm_w = tl.load(norm_w_ptr + head * DV + cols_v, mask=mask_v, other=0.0)
    if HAS_NORM_B:
        norm_b = tl.load(norm_b_ptr + head * DV + cols_v, mask=mask_v, other=0.0)
    d_norm_w = tl.zeros([BV], dtype=d_w1.dtype)
    d_norm_b = tl.zeros([BV], dtype=d_w1.dtype)

    n_groups = tl.cdiv(T, GROUP)
    for i in range(n_groups):
        group = n_groups - 1 - i
        start = group * GROUP
        count = tl.minimum(GROUP, T - start)
        valid = rows < count
        last = rows == count - 1
        tokens = bh * T + start + rows
        k_mask = valid[:, None] & mask_k[None, :]
        v_mask = valid[:, None] & mask_v[None, :]
        q = tl.load(q_ptr + tokens[:, None] * DK + cols_k[None, :], mask=k_mask, other=0.0)  # [N, BK]
        k = tl.load(k_ptr + tokens[:, None] * DK + cols_k[None, :], mask=k_mask, other=0.0)  # [N, BK]
        v = tl.load(v_ptr + tokens[:, None] * DV + cols_v[None, :], mask=v_mask, other=0.0)  # [N, BV]
        d_o = tl.load(d_o_ptr + tokens[:, None] * DV + cols_v[None, :], mask=v_mask, other=0.0)  # [N, BV]
        lr = tl.load(lr_ptr + tokens, mask=valid, other=0.0)
        slot = bh * n_groups + group
        w1_slot = slot * W1_ROWS * DK + w1_local
        w1 = tl.load(w1_starts + w1_slot, mask=w1_mask, other=0.0)  # [BH, BK]
        w2 = tl.load(w2_starts + slot * DV * DH + w2_local, mask=w2_mask, other=0.0)  # [BV, BH]

        # the forward of this group again
        z1 = tl.dot(k, tl.trans(w1), input_precision=PRECISION)  # [N, BH]
        slope = _act_grad(z1, ACT)  # [N, BH] dH/dZ1 (swiglu: dH/dZ_gate = silu'(Z_gate) Z_up, dH/dZ_up = silu(Z_gate))
        hidden = _act(z1, ACT)
        if GLU:
            w1_up = tl.load(w1_starts + DH * DK + w1_slot, mask=w1_mask, other=0.0)  # [BH, BK]
            z1_up = tl.dot(k, tl.trans(w1_up), input_precision=PRECISION)  # [N, BH]
            gate = hidden
            hidden = gate * z1_up
            gate_slope = slope
            slope = gate_slope * z1_up
        z2 = tl.dot(hidden, tl.trans(w2), input_precision=PRECISION)  # [N, BV]
        error = tl.where(v_mask, _output(z2, k, norm_w, norm_b, mask_v, DV, NORM, RESIDUAL, EPS) - v, 0.0)  # [N, BV]
        d2 = _output_backward(z2, error, norm_w, mask_v, DV, NORM, EPS)  # [N, BV] = D2
        pull = tl.dot(d2, w2, input_precision=PRECISION)  # [N, BH] = D2 W2
        d1 = slope * pull  # [N, BH]
        if GLU:
            d1_up = gate * pull  # [N, BH]
        keep = tl.full([N], 1.0, d_w1.dtype)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + tokens, mask=valid, other=1.0)
        if MOMENTUM:
            s1 = tl.load(s1_starts + w1_slot, mask=w1_mask, other=0.0)
            s2 = tl.load(s2_starts + slot * DV * DH + w2_local, mask=w2_mask, other=0.0)
            if GLU:
                s1_up = tl.load(s1_starts + DH * DK + w1_slot, mask=w1_mask, other=0.0)
            beta = tl.load(beta_ptr + tokens, mask=valid, other=1.0)
        if EVERY:
            a_cum = tl.full([N], 1.0, d_w1.dtype)
            coeff = tl.zeros([N, N], dtype=d_w1.dtype)
            c = tl.zeros([N], dtype=d_w1.dtype)
        else:
            la = tl.cumsum(tl.log(tl.maximum(keep, FLOOR)), 0)
            p_keep = tl.where(causal, tl.exp(la[:, None] - la[None, :]), 0.0)  # [N, N]
            a_cum = tl.exp(la)
            if MOMENTUM:
                lb = tl.cumsum(tl.log(tl.maximum(beta, FLOOR)), 0)
                p_beta = tl.where(causal, tl.exp(lb[:, None] - lb[None, :]), 0.0)
                b_cum = tl.exp(lb)
                c = tl.sum(p_keep * b_cum[None, :], 1)
                p_both = tl.dot(p_keep, p_beta, input_precision=PRECISION)  # [N, N]
                coeff = p_both * lr[None, :]
                coeff_mom = p_beta * lr[None, :]
            else:
                coeff = p_keep * lr[None, :]
        qw1 = tl.dot(q, tl.trans(w1), input_precision=PRECISION)  # [N, BH]
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [N, N]
        r1 = a_cum[:, None] * qw1 - tl.dot(coeff * qk, d1, input_precision=PRECISION)
        if MOMENTUM:
            qs1 = tl.dot(q, tl.trans(s1), input_precision=PRECISION)
            r1 += c[:, None] * qs1
        x2 = _act(r1, ACT)  # [N, BH]
        if GLU:  # the up half is one more layer-1 read, with its own state and D1_up
            qw1_up = tl.dot(q, tl.trans(w1_up), input_precision=PRECISION)  # [N, BH]
            r1_up = a_cum[:, None] * qw1_up - tl.dot(coeff * qk, d1_up, input_precision=PRECISION)
            if MOMENTUM:
                qs1_up = tl.dot(q, tl.trans(s1_up), input_precision=PRECISION)
                r1_up += c[:, None] * qs1_up
            read_gate = x2
            x2 = read_gate * r1_up
        x2w2 = tl.dot(x2, tl.trans(w2), input_precision=PRECISION)  # [N, BV]
        x2h = tl.dot(x2, tl.trans(hidden), input_precision=PRECISION)  # [N, N]
        d_r2 = d_o
        if NORM != 0:  # o = norm(R2) * w + b (+ q)
            r2 = a_cum[:, None] * x2w2 - tl.dot(coeff * x2h, d2, input_precision=PRECISION)
            if MOMENTUM:
                r2 += c[:, None] * tl.dot(x2, tl.trans(s2), input_precision=PRECISION)
            d_norm_w += tl.sum(d_o * _normalized(r2, mask_v, DV, NORM, EPS), 0)
            d_norm_b += tl.sum(d_o, 0)
            d_r2 = _output_backward(r2, d_o, norm_w, mask_v, DV, NORM, EPS)

        # reads, second layer: R2 = A (X2 W2^T) + c (X2 S2^T) - (G * X2 H^T) D2
        d_q = d_o if RESIDUAL else tl.zeros([N, BK], dtype=d_w1.dtype)
        psi2 = tl.dot(d_r2, tl.trans(d2), input_precision=PRECISION)  # [N, N]
        d_x2 = a_cum[:, None] * tl.dot(d_r2, w2, input_precision=PRECISION) - tl.dot(coeff * psi2, hidden, input_precision=PRECISION)
        new_d_w2 = tl.dot(tl.trans(a_cum[:, None] * d_r2), x2, input_precision=PRECISION)  # [BV, BH]
        d_a = tl.sum(d_r2 * x2w2, 1)  # [N] dL/dA_t
        d_coeff = -psi2 * x2h  # [N, N] dL/dG
        d_hidden = -tl.dot(tl.trans(coeff * psi2), x2, input_precision=PRECISION)  # [N, BH]
        d_d2 = -tl.dot(tl.trans(coeff * x2h), d_r2, input_precision=PRECISION)  # [N, BV]
        if MOMENTUM:
            d_x2 += c[:, None] * tl.dot(d_r2, s2, input_precision=PRECISION)
            new_d_s2 = tl.dot(tl.trans(c[:, None] * d_r2), x2, input_precision=PRECISION)
            d_c = tl.sum(d_r2 * tl.dot(x2, tl.trans(s2), input_precision=PRECISION), 1)  # [N] dL/dc_t
        # first layer: R1 = A (Q W1^T) + c (Q S1^T) - (G * Q K^T) D1
        d_r1 = _act_grad(r1, ACT) * d_x2  # [N, BH]
        if GLU:
            d_r1 = d_r1 * r1_up
            d_r1_up = read_gate * d_x2  # [N, BH]
        psi1 = tl.dot(d_r1, tl.trans(d1), input_precision=PRECISION)  # [N, N]
        if GLU:
            psi1 += tl.dot(d_r1_up, tl.trans(d1_up), input_precision=PRECISION)
        d_q += a_cum[:, None] * tl.dot(d_r1, w1, input_precision=PRECISION) - tl.dot(coeff * psi1, k, input_precision=PRECISION)
        new_d_w1 = tl.dot(tl.trans(a_cum[:, None] * d_r1), q, input_precision=PRECISION)  # [BH, BK]
        d_a += tl.sum(d_r1 * qw1, 1)
        d_coeff -= psi1 * qk
        d_k = -tl.dot(tl.trans(coeff * psi1), q, input_precision=PRECISION)  # [N, BK]
        d_d1 = -tl.dot(tl.trans(coeff * qk), d_r1, input_precision=PRECISION)  # [N, BH]
        if GLU:
            d_q += a_cum[:, None] * tl.dot(d_r1_up, w1_up, input_precision=PRECISION)
            new_d_w1_up = tl.dot(tl.trans(a_cum[:, None] * d_r1_up), q, input_precision=PRECISION)  # [BH, BK]
            d_a += tl.sum(d_r1_up * qw1_up, 1)
            d_d1_up = -tl.dot(tl.trans(coeff * qk), d_r1_up, input_precision=PRECISION)  # [N, BH]
        if MOMENTUM:
            d_q += c[:, None] * tl.dot(d_r1, s1, input_precision=PRECISION)
            new_d_s1 = tl.dot(tl.trans(c[:, None] * d_r1), q, input_precision=PRECISION)
            d_c += tl.sum(d_r1 * qs1, 1)
            if GLU:
                d_q += c[:, None] * tl.dot(d_r1_up, s1_up, input_precision=PRECISION)
                new_d_s1_up = tl.dot(tl.trans(c[:, None] * d_r1_up), q, input_precision=PRECISION)
                d_c += tl.sum(d_r1_up * qs1_up, 1)

        # end state: W' = A_n W + c_n S - D^T (G[n] * H),  S' = Bc_n S - D^T (Gs[n] * H)
        if EVERY:  # W <- a_last W (+ beta_last S) - sum eta g
            a_end = tl.sum(tl.where(last, keep, 0.0), 0)
            g_end = lr
        else:
            a_end = tl.sum(tl.where(last, a_cum, 0.0), 0)
            g_end = _row(coeff, rows, count - 1)  # [N]
        new_d_w1 += a_end * d_w1
        new_d_w2 += a_end * d_w2
        d_a_end = tl.sum(tl.sum(d_w1 * w1, 1), 0) + tl.sum(tl.sum(d_w2 * w2, 1), 0)
        through1 = tl.dot(d1, d_w1, input_precision=PRECISION)  # [N, BK]
        through2 = tl.dot(d2, d_w2, input_precision=PRECISION)  # [N, BH]
        d_d1 -= g_end[:, None] * tl.dot(k, tl.trans(d_w1), input_precision=PRECISION)
        if GLU:  # W1_up' = A_n W1_up + c_n S1_up - D1_up^T (G[n] * K)
            new_d_w1_up += a_end * d_w1_up
            d_a_end += tl.sum(tl.sum(d_w1_up * w1_up, 1), 0)
            through1 += tl.dot(d1_up, d_w1_up, input_precision=PRECISION)
            d_d1_up -= g_end[:, None] * tl.dot(k, tl.trans(d_w1_up), input_precision=PRECISION)
        d_d2 -= g_end[:, None] * tl.dot(hidden, tl.trans(d_w2), input_precision=PRECISION)
        d_k -= g_end[:, None] * through1
        d_hidden -= g_end[:, None] * through2
        d_g_end = -tl.sum(through1 * k, 1) - tl.sum(through2 * hidden, 1)  # [N]
        if MOMENTUM:
            if EVERY:
                c_end = tl.sum(tl.where(last, beta, 0.0), 0)
                b_end = c_end
                gs_end = lr
            else:
                c_end = tl.sum(tl.where(last, c, 0.0), 0)
                b_end = tl.sum(tl.where(last, b_cum, 0.0), 0)
                gs_end = _row(coeff_mom, rows, count - 1)
            new_d_s1 += c_end * d_w1 + b_end * d_s1
            new_d_s2 += c_end * d_w2 + b_end * d_s2
            d_c_end = tl.sum(tl.sum(d_w1 * s1, 1), 0) + tl.sum(tl.sum(d_w2 * s2, 1), 0)
            d_b_end = tl.sum(tl.sum(d_s1 * s1, 1), 0) + tl.sum(tl.sum(d_s2 * s2, 1), 0)
            through1 = tl.dot(d1, d_s1, input_precision=PRECISION)
            through2 = tl.dot(d2, d_s2, input_precision=PRECISION)
            d_d1 -= gs_end[:, None] * tl.dot(k, tl.trans(d_s1), input_precision=PRECISION)
            if GLU:
                new_d_s1_up += c_end * d_w1_up + b_end * d_s1_up
                d_c_end += tl.sum(tl.sum(d_w1_up * s1_up, 1), 0)
                d_b_end += tl.sum(tl.sum(d_s1_up * s1_up, 1), 0)
                through1 += tl.dot(d1_up, d_s1_up, input_precision=PRECISION)
                d_d1_up -= gs_end[:, None] * tl.dot(k, tl.trans(d_s1_up), input_precision=PRECISION)
            d_d2 -= gs_end[:, None] * tl.dot(hidden, tl.trans(d_s2), input_precision=PRECISION)
            d_k -= gs_end[:, None] * through1
            d_hidden -= gs_end[:, None] * through2
            d_gs_end = -tl.sum(through1 * k, 1) - tl.sum(through2 * hidden, 1)

        # through the per-token gradients: D1 = act'(Z1) * (D2 W2), D2 = J(Z2)^T (w * e), e = out(Z2, K) - V,
        # Z2 = act(Z1) W2^T, Z1 = K W1^T
        d_pull = slope * d_d1  # [N, BH]
        if GLU:  # D1_gate = silu'(Z_gate) Z_up (D2 W2), D1_up = silu(Z_gate) (D2 W2)
            d_z1 = (_act_grad2(z1, ACT) * z1_up * d_d1 + gate_slope * d_d1_up) * pull
            d_z1_up = gate_slope * pull * d_d1
            d_pull += gate * d_d1_up
        else:
            d_z1 = _act_grad2(z1, ACT) * pull * d_d1
        d_d2 += tl.dot(d_pull, tl.trans(w2), input_precision=PRECISION)
        new_d_w2 += tl.dot(tl.trans(d2), d_pull, input_precision=PRECISION)
        d_d2 = tl.where(v_mask, d_d2, 0.0)
        if NORM == 0:
            d_error = d_d2
            d_z2 = d_d2
        else:
            weighted = error * norm_w[None, :]  # u = w * e: D2 = J(Z2)^T u
            d_weighted = _output_backward(z2, d_d2, tl.full([BV], 1.0, d_w1.dtype), mask_v, DV, NORM, EPS)  # J is symmetric
            d_error = d_weighted * norm_w[None, :]
            d_norm_w += tl.sum(error * d_weighted + d_error * _normalized(z2, mask_v, DV, NORM, EPS), 0)
            d_norm_b += tl.sum(d_error, 0)
            d_z2 = _norm_second(z2, weighted, d_d2, mask_v, DV, NORM, EPS) + _output_backward(z2, d_error, norm_w, mask_v, DV, NORM, EPS)
        d_v = -d_error
        if RESIDUAL:
            d_k += d_error
        d_hidden += tl.dot(d_z2, w2, input_precision=PRECISION)
        new_d_w2 += tl.dot(tl.trans(d_z2), hidden, input_precision=PRECISION)
        d_z1 += slope * d_hidden
        d_k += tl.dot(d_z1, w1, input_precision=PRECISION)
        new_d_w1 += tl.dot(tl.trans(d_z1), k, input_precision=PRECISION)
        if GLU:
            d_z1_up += gate * d_hidden
            d_k += tl.dot(d_z1_up, w1_up, input_precision=PRECISION)
            new_d_w1_up += tl.dot(tl.trans(d_z1_up), k, input_precision=PRECISION)

        # the scan coefficients back to the gates, in log space: A_t = exp(la_t), P[t, tau] = exp(la_t - la_tau)
        if EVERY:  # only the end row depends on the gates
            d_lr = d_g_end
            if MOMENTUM:
                d_lr += d_gs_end
                tl.store(d_beta_ptr + tokens, tl.where(last, d_c_end + d_b_end, 0.0), mask=valid)
            if HAS_KEEP:
                tl.store(d_keep_ptr + tokens, tl.where(last, d_a_end, 0.0), mask=valid)
        else:
            d_coeff += tl.where(last[:, None], d_g_end[None, :], 0.0)
            d_a += tl.where(last, d_a_end, 0.0)
            if MOMENTUM:
                d_lr = tl.sum(d_coeff * p_both, 0)
                d_coeff_mom = tl.where(last[:, None], d_gs_end[None, :], 0.0)
                d_lr += tl.sum(d_coeff_mom * p_beta, 0)
                d_both = d_coeff * lr[None, :]
                d_c += tl.where(last, d_c_end, 0.0)
                d_p_keep = tl.dot(d_both, tl.trans(p_beta), input_precision=PRECISION) + d_c[:, None] * b_cum[None, :]
                d_p_beta = tl.dot(tl.trans(p_keep), d_both, input_precision=PRECISION) + d_coeff_mom * lr[None, :]
                d_b_cum = tl.sum(p_keep * d_c[:, None], 0) + tl.where(last, d_b_end, 0.0)
                d_beta = _log_gate_grad(d_p_beta, p_beta, d_b_cum, b_cum, rows, PRECISION) / tl.maximum(beta, FLOOR)
                tl.store(d_beta_ptr + tokens, d_beta, mask=valid)
            else:
                d_lr = tl.sum(d_coeff * p_keep, 0)
                d_p_keep = d_coeff * lr[None, :]
            if HAS_KEEP:
                d_keep = _log_gate_grad(d_p_keep, p_keep, d_a, a_cum, rows, PRECISION) / tl.maximum(keep, FLOOR)
                tl.store(d_keep_ptr + tokens, d_keep, mask=valid)

        tl.store(d_q_ptr + tokens[:, None] * DK + cols_k[None, :], d_q, mask=k_mask)
        tl.store(d_k_ptr + tokens[:, None] * DK + cols_k[None, :], d_k, mask=k_mask)
        tl.store(d_v_ptr + tokens[:, None] * DV + cols_v[None, :], d_v, mask=v_mask)
        tl.store(d_lr_ptr + tokens, d_lr, mask=valid)
        if i == 0:  # the anchor returned with a partial last mini-batch is this group's start state
            new_d_w1 += tl.load(d_p1_ptr + w1_offsets, mask=w1_mask, other=0.0)
            new_d_w2 += tl.load(d_p2_ptr + bh * DV * DH + w2_local, mask=w2_mask, other=0.0)
            if GLU:
                new_d_w1_up += tl.load(d_p1_ptr + DH * DK + w1_offsets, mask=w1_mask, other=0.0)
        d_w1 = new_d_w1
        d_w2 = new_d_w2
        if GLU:
            d_w1_up = new_d_w1_up
        if MOMENTUM:
            d_s1 = new_d_s1
            d_s2 = new_d_s2
            if GLU:
                d_s1_up = new_d_s1_up

    tl.store(d_w1_ptr + w1_offsets, d_w1, mask=w1_mask)
    tl.store(d_w2_ptr + bh * DV * DH + w2_local, d_w2, mask=w2_mask)
    if GLU:
        tl.store(d_w1_ptr + DH * DK + w1_offsets, d_w1_up, mask=w1_mask)
    if MOMENTUM:
        tl.store(d_s1_ptr + w1_offsets, d_s1, mask=w1_mask)
        tl.store(d_s2_ptr + bh * DV * DH + w2_local, d_s2, mask=w2_mask)
        if GLU:
            tl.store(d_s1_ptr + DH * DK + w1_offsets, d_s1_up, mask=w1_mask)
    if HAS_NORM_W:
        tl.store(d_norm_w_ptr + bh * DV + cols_v, d_norm_w, mask=mask_v)
    if HAS_NORM_B:
        tl.store(d_norm_b_ptr + bh * DV + cols_v, d_norm_b, mask=mask_v)


@triton.jit
def _mlp_read_backward_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, keep_ptr, beta_ptr, w1_starts, w2_starts, s1_starts, s2_starts, norm_w_ptr, norm_b_ptr,
    d_o_ptr, d_w1_end, d_w2_end, d_q_ptr, d_w1_ptr, d_w2_ptr, d_norm_w_ptr, d_norm_b_ptr,
    T, H, GROUP,
    DK: tl.constexpr, DH: tl.constexpr, DV: tl.constexpr, W1_ROWS: tl.constexpr,
    N: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, BV: tl.constexpr,
    ACT: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
    HAS_KEEP: tl.constexpr, MOMENTUM: tl.constexpr, EVERY: tl.constexpr, PRECISION: tl.constexpr, EPS: tl.constexpr,
    FLOOR: tl.constexpr,
):  # fmt: skip
    """grad = stop: writes are off the graph and the reads see M_0 + sg(M_t - M_0), so only q (through each read,
    at its state), M_0 (each layer's read z = W x adds x^T to dL/dW_0) and the read norm get gradients. Each group
    recomputes its reads from its stored start state; nothing is carried between groups."""
    bh = tl.program_id(0)
    head = bh % H
    rows = tl.arange(0, N)
    cols_k = tl.arange(0, BK)
    cols_h = tl.arange(0, BH)
    cols_v = tl.arange(0, BV)
    mask_k = cols_k < DK
    mask_h = cols_h < DH
    mask_v = cols_v < DV
    w1_local = cols_h[:, None] * DK + cols_k[None, :]  # [BH, BK]
    w1_mask = mask_h[:, None] & mask_k[None, :]
    w2_local = cols_v[:, None] * DH + cols_h[None, :]  # [BV, BH]
    w2_mask = mask_v[:, None] & mask_h[None, :]
    causal = rows[:, None] >= rows[None, :]

    w1_offsets = bh * W1_ROWS * DK + w1_local  # swiglu's W1 stacks the gate rows, then the up rows (W1_ROWS = 2 DH)
    d_w1 = tl.load(d_w1_end + w1_offsets, mask=w1_mask, other=0.0)  # [BH, BK] the end state is M_0 + sg(...)
    d_w2 = tl.load(d_w2_end + bh * DV * DH + w2_local, mask=w2_mask, other=0.0)  # [BV, BH]
    d_w1_up = tl.zeros([BH, BK], dtype=d_w1.dtype)
    if GLU:
        d_w1_up = tl.load(d_w1_end + DH * DK + w1_offsets, mask=w1_mask, other=0.0)
    norm_w = tl.full([BV], 1.0, d_w1.dtype)
    norm_b = tl.zeros([BV], dtype=d_w1.dtype)
    if HAS_NORM_W:
        norm_w = tl.load(norm_w_ptr + head * DV + cols_v, mask=mask_v, other=0.0)
    if HAS_NORM_B:
        norm_b = tl.load(norm_b_ptr + head * DV + cols_v, mask=mask_v, other=0.0)
    d_norm_w = tl.zeros([BV], dtype=d_w1.dtype)
    d_norm_b = tl.zeros([BV], dtype=d_w1.dtype)

    n_groups = tl.cdiv(T, GROUP)
    for group in range(n_groups):
        start = group * GROUP
        count = tl.minimum(GROUP, T - start)
        valid = rows < count
        tokens = bh * T + start + rows
        k_mask = valid[:, None] & mask_k[None, :]
        v_mask = valid[:, None] & mask_v[None, :]
        q = tl.load(q_ptr + tokens[:, None] * DK + cols_k[None, :], mask=k_mask, other=0.0)  # [N, BK]
        d_o = tl.load(d_o_ptr + tokens[:, None] * DV + cols_v[None, :], mask=v_mask, other=0.0)  # [N, BV]
        slot = bh * n_groups + group
        w1_slot = slot * W1_ROWS * DK + w1_local
        w1 = tl.load(w1_starts + w1_slot, mask=w1_mask, other=0.0)  # [BH, BK]
        w2 = tl.load(w2_starts + slot * DV * DH + w2_local, mask=w2_mask, other=0.0)  # [BV, BH]
        if GLU:
            w1_up = tl.load(w1_starts + DH * DK + w1_slot, mask=w1_mask, other=0.0)  # [BH, BK]

        if EVERY:  # every token of a chunk reads the chunk's start state
            r1 = tl.dot(q, tl.trans(w1), input_precision=PRECISION)  # [N, BH]
            x2 = _act(r1, ACT)
            if GLU:
                r1_up = tl.dot(q, tl.trans(w1_up), input_precision=PRECISION)  # [N, BH]
                read_gate = x2
                x2 = read_gate * r1_up
            r2 = tl.dot(x2, tl.trans(w2), input_precision=PRECISION)  # [N, BV]
        else:  # the forward's dual reads again: per-token gradients at the start state, scan coefficients
            k = tl.load(k_ptr + tokens[:, None] * DK + cols_k[None, :], mask=k_mask, other=0.0)
            v = tl.load(v_ptr + tokens[:, None] * DV + cols_v[None, :], mask=v_mask, other=0.0)
            lr = tl.load(lr_ptr + tokens, mask=valid, other=0.0)
            z1 = tl.dot(k, tl.trans(w1), input_precision=PRECISION)
            hidden = _act(z1, ACT)
            if GLU:
                z1_up = tl.dot(k, tl.trans(w1_up), input_precision=PRECISION)
                gate = hidden
                hidden = gate * z1_up
            z2 = tl.dot(hidden, tl.trans(w2), input_precision=PRECISION)
            error = tl.where(v_mask, _output(z2, k, norm_w, norm_b, mask_v, DV, NORM, RESIDUAL, EPS) - v, 0.0)
            d2 = _output_backward(z2, error, norm_w, mask_v, DV, NORM, EPS)  # [N, BV]
            pull = tl.dot(d2, w2, input_precision=PRECISION)  # [N, BH]
            d1 = _act_grad(z1, ACT) * pull  # [N, BH]
            if GLU:
                d1 = d1 * z1_up
                d1_up = gate * pull
            log_keep = tl.zeros([N], dtype=d_w1.dtype)
            if HAS_KEEP:
                log_keep = tl.log(tl.maximum(tl.load(keep_ptr + tokens, mask=valid, other=1.0), FLOOR))
            la = tl.cumsum(log_keep, 0)
            p_keep = tl.where(causal, tl.exp(la[:, None] - la[None, :]), 0.0)
            a_cum = tl.exp(la)
            r1 = a_cum[:, None] * tl.dot(q, tl.trans(w1), input_precision=PRECISION)
            if MOMENTUM:
                s1 = tl.load(s1_starts + w1_slot, mask=w1_mask, other=0.0)
                s2 = tl.load(s2_starts + slot * DV * DH + w2_local, mask=w2_mask, other=0.0)
                lb = tl.cumsum(tl.log(tl.maximum(tl.load(beta_ptr + tokens, mask=valid, other=1.0), FLOOR)), 0)
                p_beta = tl.where(causal, tl.exp(lb[:, None] - lb[None, :]), 0.0)
                c = tl.sum(p_keep * tl.exp(lb)[None, :], 1)
                coeff = tl.dot(p_keep, p_beta, input_precision=PRECISION) * lr[None, :]
                r1 += c[:, None] * tl.dot(q, tl.trans(s1), input_precision=PRECISION)
            else:
                coeff = p_keep * lr[None, :]
            gqk = coeff * tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [N, N] G * Q K^T
            r1 -= tl.dot(gqk, d1, input_precision=PRECISION)
            x2 = _act(r1, ACT)
            if GLU:
                r1_up = a_cum[:, None] * tl.dot(q, tl.trans(w1_up), input_precision=PRECISION) - tl.dot(gqk, d1_up, input_precision=PRECISION)
                if MOMENTUM:
                    s1_up = tl.load(s1_starts + DH * DK + w1_slot, mask=w1_mask, other=0.0)
                    r1_up += c[:, None] * tl.dot(q, tl.trans(s1_up), input_precision=PRECISION)
                read_gate = x2
                x2 = read_gate * r1_up
            r2 = a_cum[:, None] * tl.dot(x2, tl.trans(w2), input_precision=PRECISION)
            if MOMENTUM:
                r2 += c[:, None] * tl.dot(x2, tl.trans(s2), input_precision=PRECISION)
            r2 -= tl.dot(coeff * tl.dot(x2, tl.trans(hidden), input_precision=PRECISION), d2, input_precision=PRECISION)

        d_r2 = d_o
        if NORM != 0:
            d_norm_w += tl.sum(d_o * _normalized(r2, mask_v, DV, NORM, EPS), 0)
            d_norm_b += tl.sum(d_o, 0)
            d_r2 = _output_backward(r2, d_o, norm_w, mask_v, DV, NORM, EPS)
        d_q = d_o if RESIDUAL else tl.zeros([N, BK], dtype=d_w1.dtype)
        if EVERY:
            d_x2 = tl.dot(d_r2, w2, input_precision=PRECISION)  # [N, BH]
        else:
            d_x2 = a_cum[:, None] * tl.dot(d_r2, w2, input_precision=PRECISION)
            d_x2 -= tl.dot(coeff * tl.dot(d_r2, tl.trans(d2), input_precision=PRECISION), hidden, input_precision=PRECISION)
            if MOMENTUM:
                d_x2 += c[:, None] * tl.dot(d_r2, s2, input_precision=PRECISION)
        d_r1 = _act_grad(r1, ACT) * d_x2  # [N, BH]
        if GLU:
            d_r1 = d_r1 * r1_up
            d_r1_up = read_gate * d_x2  # [N, BH]
        if EVERY:
            d_q += tl.dot(d_r1, w1, input_precision=PRECISION)
            if GLU:
                d_q += tl.dot(d_r1_up, w1_up, input_precision=PRECISION)
        else:
            psi1 = tl.dot(d_r1, tl.trans(d1), input_precision=PRECISION)  # [N, N]
            d_q += a_cum[:, None] * tl.dot(d_r1, w1, input_precision=PRECISION)
            if GLU:
                psi1 += tl.dot(d_r1_up, tl.trans(d1_up), input_precision=PRECISION)
                d_q += a_cum[:, None] * tl.dot(d_r1_up, w1_up, input_precision=PRECISION)
            d_q -= tl.dot(coeff * psi1, k, input_precision=PRECISION)
            if MOMENTUM:
                d_q += c[:, None] * tl.dot(d_r1, s1, input_precision=PRECISION)
                if GLU:
                    d_q += c[:, None] * tl.dot(d_r1_up, s1_up, input_precision=PRECISION)
        tl.store(d_q_ptr + tokens[:, None] * DK + cols_k[None, :], d_q, mask=k_mask)
        d_w1 += tl.dot(tl.trans(d_r1), q, input_precision=PRECISION)  # [BH, BK]
        d_w2 += tl.dot(tl.trans(d_r2), x2, input_precision=PRECISION)  # [BV, BH]
        if GLU:
            d_w1_up += tl.dot(tl.trans(d_r1_up), q, input_precision=PRECISION)  # [BH, BK]

    tl.store(d_w1_ptr + w1_offsets, d_w1, mask=w1_mask)
    tl.store(d_w2_ptr + bh * DV * DH + w2_local, d_w2, mask=w2_mask)
    if GLU:
        tl.store(d_w1_ptr + DH * DK + w1_offsets, d_w1_up, mask=w1_mask)
    if HAS_NORM_W:
        tl.store(d_norm_w_ptr + bh * DV + cols_v, d_norm_w, mask=mask_v)
    if HAS_NORM_B:
        tl.store(d_norm_b_ptr + bh * DV + cols_v, d_norm_b, mask=mask_v)


def _block(width: int) -> int:
    return max(16, triton.next_power_of_2(width))  # tl.dot needs at least 16 along every dimension


def _hidden(w1_rows: int, act: str) -> int:
    return w1_rows // 2 if act == "swiglu" else w1_rows  # swiglu's W1 stacks W_gate and W_up


def _precision(x: Tensor, allow_tf32: bool) -> str:
    return "tf32" if allow_tf32 and x.dtype == torch.float32 and not INTERPRETED else "ieee"


@torch.library.custom_op("nlc::network_mlp_forward", mutates_args=())
def mlp_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    keep: Optional[Tensor],  # noqa: UP045 (custom_op infers its schema from these annotations)
    beta: Optional[Tensor],  # noqa: UP045
    w1: Tensor,
    w2: Tensor,
    s1: Optional[Tensor],  # noqa: UP045
    s2: Optional[Tensor],  # noqa: UP045
    norm_weight: Optional[Tensor],  # noqa: UP045
    norm_bias: Optional[Tensor],  # noqa: UP045
    group: int,
    every: bool,
    act: str,
    norm: str,
    residual: bool,
    stop: bool,
    allow_tf32: bool,
    save_starts: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One call of a 2-layer MLP memory from a group boundary of the stream. q, k `[B, H, T, d_k]`, v
    `[B, H, T, d_v]`, lr / keep (the retention factor a_t) / beta `[B, H, T]`, w1 `[B, H, hidden, d_k]` (swiglu:
    `[B, H, 2 * hidden, d_k]`, W_gate stacked over W_up), w2 `[B, H, d_v, hidden]`, s1 / s2 their momentum
    (None for gd), norm_weight / norm_bias `[H, d_v]`.
    every: groups are chunks (T a multiple of group) instead of mini-batches. stop: grad = stop (the
    backward's business only). Returns o `[B, H, T, d_v]`, the end weights, the end momentum (empty for
    gd), the weights at the start of the last group (the anchor when the call ends inside a mini-batch)
    and, with save_starts, the weights and momentum entering every group `[B, H, n_groups, ...]` (else empty)."""
    batch, heads, length, d_k = q.shape
    d_v, d_h = v.shape[-1], _hidden(w1.shape[-2], act)
    momentum = s1 is not None
    starts = _starts(w1, w2, length, group, save_starts, momentum)
    q, k, v, lr, w1, w2 = (t.contiguous() for t in (q, k, v, lr, w1, w2))
    keep, beta, s1, s2, norm_weight, norm_bias = (None if t is None else t.contiguous() for t in (keep, beta, s1, s2, norm_weight, norm_bias))
    o = v.new_empty(batch, heads, length, d_v)
    w1_end, w2_end, p1, p2 = torch.empty_like(w1), torch.empty_like(w2), torch.empty_like(w1), torch.empty_like(w2)
    s1_end, s2_end = (torch.empty_like(w1), torch.empty_like(w2)) if momentum else (w1.new_empty(0), w2.new_empty(0))
    _mlp_kernel[(batch * heads,)](
        q, k, v, lr, lr if keep is None else keep, lr if beta is None else beta,
        w1, w2, w1 if s1 is None else s1, w2 if s2 is None else s2,
        lr if norm_weight is None else norm_weight, lr if norm_bias is None else norm_bias,
        o, w1_end, w2_end, s1_end, s2_end, p1, p2, *starts,
        length, heads, group,
        d_k, d_h, d_v, w1.shape[-2], _block(group), _block(d_k), _block(d_h), _block(d_v),
        ACTS[act], act == "swiglu", NORMS[norm], residual, norm_weight is not None, norm_bias is not None,
        keep is not None, momentum, every, save_starts, _precision(q, allow_tf32), NORM_EPS, LOG_FLOOR,
        num_warps=1 if INTERPRETED else 8,
    )  # fmt: skip
    return o, w1_end, w2_end, s1_end, s2_end, p1, p2, *starts


def _starts(w1: Tensor, w2: Tensor, length: int, group: int, save: bool, momentum: bool) -> list[Tensor]:
    """Buffers for the weights (and momentum) entering every group, `[B, H, n_groups, out, in]`; empty ones unless saved."""
    n_groups = -(-length // group)
    shapes = [(*w.shape[:2], n_groups, *w.shape[2:]) if save else (0,) for w in (w1, w2)]
    weights = [w1.new_empty(shape) for shape in shapes]
    return weights + ([w1.new_empty(shape) for shape in shapes] if momentum else [w1.new_empty(0), w1.new_empty(0)])


@mlp_forward.register_fake
def _(q, k, v, lr, keep, beta, w1, w2, s1, s2, norm_weight, norm_bias, group, every, act, norm, residual, stop, allow_tf32, save_starts):
    o = v.new_empty(*q.shape[:3], v.shape[-1])
    momentum = (torch.empty_like(w1), torch.empty_like(w2)) if s1 is not None else (w1.new_empty(0), w2.new_empty(0))
    starts = _starts(w1, w2, q.shape[2], group, save_starts, s1 is not None)
    return o, torch.empty_like(w1), torch.empty_like(w2), *momentum, torch.empty_like(w1), torch.empty_like(w2), *starts


@torch.library.custom_op("nlc::network_mlp_backward", mutates_args=())
def mlp_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    keep: Optional[Tensor],  # noqa: UP045
    beta: Optional[Tensor],  # noqa: UP045
    w1_starts: Tensor,
    w2_starts: Tensor,
    s1_starts: Optional[Tensor],  # noqa: UP045
    s2_starts: Optional[Tensor],  # noqa: UP045
    norm_weight: Optional[Tensor],  # noqa: UP045
    norm_bias: Optional[Tensor],  # noqa: UP045
    d_o: Tensor,
    d_w1: Tensor,
    d_w2: Tensor,
    d_s1: Optional[Tensor],  # noqa: UP045
    d_s2: Optional[Tensor],  # noqa: UP045
    d_p1: Tensor,
    d_p2: Tensor,
    group: int,
    every: bool,
    act: str,
    norm: str,
    residual: bool,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v, lr, keep, beta, the initial w1, w2, s1, s2 and the norm's weight and bias (empty for an
    absent input) from those of o, the end weights and momentum and the last group's start weights (grad = full)."""
    batch, heads, length, width_k = q.shape
    width_v, width_h = v.shape[-1], _hidden(w1_starts.shape[-2], act)
    momentum = s1_starts is not None
    q, k, v, lr, d_o, d_w1, d_w2, d_p1, d_p2 = (t.contiguous() for t in (q, k, v, lr, d_o, d_w1, d_w2, d_p1, d_p2))
    keep, beta, d_s1, d_s2 = (None if t is None else t.contiguous() for t in (keep, beta, d_s1, d_s2))
    d_q, d_k, d_v, d_lr = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(lr)
    d_keep = lr.new_empty(0) if keep is None else torch.empty_like(keep)
    d_beta = lr.new_empty(0) if beta is None else torch.empty_like(beta)
    d_w1_start, d_w2_start = torch.empty_like(d_w1), torch.empty_like(d_w2)
    d_s1_start, d_s2_start = (torch.empty_like(d_w1), torch.empty_like(d_w2)) if momentum else (lr.new_empty(0), lr.new_empty(0))
    # per (batch, head), summed over the batch below
    d_norm_w, d_norm_b = (lr.new_empty(0) if p is None else lr.new_empty(batch, heads, width_v) for p in (norm_weight, norm_bias))
    _mlp_backward_kernel[(batch * heads,)](
        q, k, v, lr, lr if keep is None else keep, lr if beta is None else beta,
        w1_starts, w2_starts, w1_starts if s1_starts is None else s1_starts, w2_starts if s2_starts is None else s2_starts,
        lr if norm_weight is None else norm_weight.contiguous(), lr if norm_bias is None else norm_bias.contiguous(),
        d_o, d_w1, d_w2, d_w1 if d_s1 is None else d_s1, d_w2 if d_s2 is None else d_s2, d_p1, d_p2,
        d_q, d_k, d_v, d_lr, d_keep, d_beta, d_w1_start, d_w2_start, d_s1_start, d_s2_start, d_norm_w, d_norm_b,
        length, heads, group,
        width_k, width_h, width_v, w1_starts.shape[-2], _block(group), _block(width_k), _block(width_h), _block(width_v),
        ACTS[act], act == "swiglu", NORMS[norm], residual, norm_weight is not None, norm_bias is not None,
        keep is not None, momentum, every, _precision(q, allow_tf32), NORM_EPS, LOG_FLOOR,
        num_warps=1 if INTERPRETED else 8,
    )  # fmt: skip
    d_norm_w, d_norm_b = (g if g.numel() == 0 else g.sum(0) for g in (d_norm_w, d_norm_b))
    return d_q, d_k, d_v, d_lr, d_keep, d_beta, d_w1_start, d_w2_start, d_s1_start, d_s2_start, d_norm_w, d_norm_b


@mlp_backward.register_fake
def _(q, k, v, lr, keep, beta, w1_starts, w2_starts, s1_starts, s2_starts, norm_weight, norm_bias, d_o, d_w1, d_w2, d_s1, d_s2, d_p1, d_p2, group, every, act, norm, residual, allow_tf32):  # fmt: skip
    def like(t):
        return lr.new_empty(0) if t is None else torch.empty_like(t)

    momentum = s1_starts is not None
    gates = (like(lr), like(keep), like(beta))
    states = (like(d_w1), like(d_w2), like(d_s1 if momentum else None), like(d_s2 if momentum else None))
    return like(q), like(k), like(v), *gates, *states, like(norm_weight), like(norm_bias)


@torch.library.custom_op("nlc::network_mlp_read_backward", mutates_args=())
def mlp_read_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    keep: Optional[Tensor],  # noqa: UP045
    beta: Optional[Tensor],  # noqa: UP045
    w1_starts: Tensor,
    w2_starts: Tensor,
    s1_starts: Optional[Tensor],  # noqa: UP045
    s2_starts: Optional[Tensor],  # noqa: UP045
    norm_weight: Optional[Tensor],  # noqa: UP045
    norm_bias: Optional[Tensor],  # noqa: UP045
    d_o: Tensor,
    d_w1: Tensor,
    d_w2: Tensor,
    group: int,
    every: bool,
    act: str,
    norm: str,
    residual: bool,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """grad = stop: the gradients of q, the initial w1, w2 and the norm's weight and bias (empty when absent) from
    those of o and the end weights."""
    batch, heads, length, width_k = q.shape
    width_v, width_h = v.shape[-1], _hidden(w1_starts.shape[-2], act)
    q, k, v, lr, d_o, d_w1, d_w2 = (t.contiguous() for t in (q, k, v, lr, d_o, d_w1, d_w2))
    keep, beta = (None if t is None else t.contiguous() for t in (keep, beta))
    d_q, d_w1_start, d_w2_start = torch.empty_like(q), torch.empty_like(d_w1), torch.empty_like(d_w2)
    d_norm_w, d_norm_b = (lr.new_empty(0) if p is None else lr.new_empty(batch, heads, width_v) for p in (norm_weight, norm_bias))
    _mlp_read_backward_kernel[(batch * heads,)](
        q, k, v, lr, lr if keep is None else keep, lr if beta is None else beta,
        w1_starts, w2_starts, w1_starts if s1_starts is None else s1_starts, w2_starts if s2_starts is None else s2_starts,
        lr if norm_weight is None else norm_weight.contiguous(), lr if norm_bias is None else norm_bias.contiguous(),
        d_o, d_w1, d_w2, d_q, d_w1_start, d_w2_start, d_norm_w, d_norm_b,
        length, heads, group,
        width_k, width_h, width_v, w1_starts.shape[-2], _block(group), _block(width_k), _block(width_h), _block(width_v),
        ACTS[act], act == "swiglu", NORMS[norm], residual, norm_weight is not None, norm_bias is not None,
        keep is not None, s1_starts is not None, every, _precision(q, allow_tf32), NORM_EPS, LOG_FLOOR,
        num_warps=1 if INTERPRETED else 8,
    )  # fmt: skip
    d_norm_w, d_norm_b = (g if g.numel() == 0 else g.sum(0) for g in (d_norm_w, d_norm_b))
    return d_q, d_w1_start, d_w2_start, d_norm_w, d_norm_b


@mlp_read_backward.register_fake
def _(q, k, v, lr, keep, beta, w1_starts, w2_starts, s1_starts, s2_starts, norm_weight, norm_bias, d_o, d_w1, d_w2, group, every, act, norm, residual, allow_tf32):  # fmt: skip
    def like(t):
        return lr.new_empty(0) if t is None else torch.empty_like(t)

    return like(q), like(d_w1), like(d_w2), like(norm_weight), like(norm_bias)


def _setup_context(ctx, inputs, output):
    *tensors, group, every, act, norm, residual, stop, allow_tf32, save_starts = inputs
    ctx.save_for_backward(*tensors, *output[7:])
    ctx.saved_starts = save_starts
    ctx.options = (group, every, act, norm, residual, stop)
    ctx.allow_tf32 = allow_tf32


def _backward(ctx, *grads):
    if not ctx.saved_starts:
        raise RuntimeError("nlc::network_mlp_forward ran with save_starts = False: its backward needs the state entering every group")
    inputs = ctx.saved_tensors[:12]  # None where the input was None
    q, k, v, lr, keep, beta, w1, w2, s1, _, norm_weight, norm_bias = inputs
    w1_starts, w2_starts, s1_starts, s2_starts = ctx.saved_tensors[12:]
    momentum = s1 is not None
    s1_starts, s2_starts = (s1_starts, s2_starts) if momentum else (None, None)
    d_o = v.new_zeros(*q.shape[:3], v.shape[-1]) if grads[0] is None else grads[0]
    d_w1, d_w2, d_s1, d_s2, d_p1, d_p2 = (torch.zeros_like(w) if g is None else g for g, w in zip(grads[1:7], (w1, w2) * 3))
    group, every, act, norm, residual, stop = ctx.options
    if stop:  # only q, the initial weights and the read norm are on the graph
        d_q, d_w1, d_w2, d_norm_w, d_norm_b = mlp_read_backward(
            q, k, v, lr, keep, beta, w1_starts, w2_starts, s1_starts, s2_starts, norm_weight, norm_bias,
            d_o, d_w1, d_w2, group, every, act, norm, residual, ctx.allow_tf32,
        )  # fmt: skip
        found = (d_q, None, None, None, None, None, d_w1, d_w2, None, None, d_norm_w, d_norm_b)
    else:
        found = mlp_backward(
            q, k, v, lr, keep, beta, w1_starts, w2_starts, s1_starts, s2_starts, norm_weight, norm_bias,
            d_o, d_w1, d_w2, d_s1 if momentum else None, d_s2 if momentum else None, d_p1, d_p2, group, every, act, norm, residual, ctx.allow_tf32,
        )  # fmt: skip
    return (*(None if t is None else g for g, t in zip(found, inputs)), None, None, None, None, None, None, None, None)


torch.library.register_autograd("nlc::network_mlp_forward", _backward, setup_context=_setup_context)


def supports(rule: Rule, gates: Gates, q: Tensor) -> bool:
    """2-layer MLP memories (gelu, silu, relu, swiglu; residual; optional norm) with l2, gd or momentum, any
    per-head retention, written in mini-batches or chunks, on CUDA tensors other than float64 whose W1 (both
    halves for swiglu) fits the register tile (never chosen on CPU, not even when interpreted)."""
    s = rule.structure
    if not q.is_cuda or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if s.kind != "mlp" or s.depth != 2 or s.act not in ACTS:
        return False
    if rule.objective != "l2" or rule.window != 1 or rule.targets != "values" or rule.update not in ("gd", "momentum"):
        return False
    if (rule.every > 1 and rule.every % rule.batch) or (rule.every == 1 and rule.batch == 1):
        return False
    halves = 2 if s.act == "swiglu" else 1
    if halves * _block(hidden_width(s, q.shape[-1])) * _block(q.shape[-1]) > MAX_WEIGHT_TILE:
        return False
    used = [gates.lr, gates.beta if rule.update == "momentum" else None, {"decay": gates.alpha, "weight_decay": gates.lam}.get(rule.retention)]
    return gates.lr is not None and all(g is None or g.dim() == 3 for g in used)


def apply(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Gates,
    rule: Rule,
    state: MemoryState,
    sparams: StructureParams | None = None,
) -> tuple[Tensor, MemoryState]:
    """Reads `[B, H, T, d_v]` and the state after the last token, as `chunk.apply` computes them.

    The kernel runs from a group boundary of the stream: a call that starts inside a mini-batch or chunk
    finishes it through `chunk.apply` first (that part carries an anchor or a pending sum), and so does a
    call that ends inside a chunk (every); a partial last mini-batch is the kernel's own.
    """
    in_dtype = q.dtype
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Inputs already in 16 bits lose nothing to tf32 operands; float32 ones follow torch's matmul setting.
    allow_tf32 = in_dtype in (torch.bfloat16, torch.float16) or torch.backends.cuda.matmul.allow_tf32
    weight_dtype, gate_dtype = state.weights[0].dtype, gates.lr.dtype

    def cast(t):
        return None if t is None else t.to(dtype)

    q, k, v = cast(q), cast(k), cast(v)
    gates = Gates(**{name: cast(g) for name, g in vars(gates).items()})
    state = state.replace(
        weights=tuple(cast(w) for w in state.weights),
        momentum=None if state.momentum is None else tuple(cast(m) for m in state.momentum),
        anchor=None if state.anchor is None else tuple(cast(a) for a in state.anchor),
        pending=None if state.pending is None else tuple(cast(p) for p in state.pending),
        last={name: cast(g) for name, g in state.last.items()},
    )
    if sparams is not None:
        sparams = StructureParams(cast(sparams.norm_weight), cast(sparams.norm_bias))

    every = rule.every > 1
    group = rule.every if every else rule.batch
    length = q.shape[2]
    lead = min(length, -state.pos % group)
    body = length - lead
    if every:
        body -= body % group
    kernel = functools.partial(_fused, allow_tf32=allow_tf32)
    outs = []
    for start, end, run in ((0, lead, chunk.apply), (lead, lead + body, kernel), (lead + body, length, chunk.apply)):
        if end == start:
            continue
        part = Gates(**{name: None if g is None else g[:, :, start:end] for name, g in vars(gates).items()})
        o, state = run(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], part, rule, state, sparams)
        outs.append(o)
    if not outs:
        outs.append(q.new_zeros(*q.shape[:3], state.weights[-1].shape[-2]))
    state = state.replace(
        weights=tuple(w.to(weight_dtype) for w in state.weights),
        momentum=None if state.momentum is None else tuple(m.to(weight_dtype) for m in state.momentum),
        anchor=None if state.anchor is None else tuple(a.to(weight_dtype) for a in state.anchor),
        pending=None if state.pending is None else tuple(p.to(weight_dtype) for p in state.pending),
        last={name: g.to(gate_dtype) for name, g in state.last.items()},
    )
    return torch.cat(outs, dim=2).to(in_dtype), state


def _fused(q, k, v, gates: Gates, rule: Rule, state: MemoryState, sparams: StructureParams | None, allow_tf32: bool):
    """The kernel over whole groups (and, for mini-batches, a partial last one) from a group boundary."""
    every = rule.every > 1
    group = rule.every if every else rule.batch
    keep = gates.alpha if rule.retention == "decay" else (1 - gates.lam if rule.retention == "weight_decay" else None)
    momentum = rule.update == "momentum"
    s1, s2 = (state.momentum or tuple(torch.zeros_like(w) for w in state.weights)) if momentum else (None, None)
    norm_weight, norm_bias = norm_params(rule.structure, sparams)
    s = rule.structure
    inputs = (q, k, v, gates.lr, keep, gates.beta if momentum else None, *state.weights, s1, s2, norm_weight, norm_bias)
    # the backward kernels recompute each group from the state entering it: kept only when a backward may come
    save_starts = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    o, w1, w2, s1, s2, p1, p2, *_ = mlp_forward(
        *inputs, group, every, s.act, s.norm, s.residual, rule.grad == "stop", allow_tf32, save_starts,
    )  # fmt: skip
    length = q.shape[2]
    inside = not every and (state.pos + length) % group != 0
    new_state = MemoryState(
        weights=(w1, w2),
        pos=state.pos + length,
        momentum=(s1, s2) if momentum else None,
        anchor=(p1, p2) if inside else None,
    )
    return o, new_state
