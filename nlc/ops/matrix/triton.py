"""Triton kernels for the chunked matrix memories: the same recurrence and chunk form as `chunk.py`.

    S_t = a_t S_{t-1} - e_t k_t (k_t^T S_{t-1}^*) + w_t k_t v_t^T,      o_t = S_t^T q_t      (S = M^T, [d_k, d_v])

covers the delta rule, the gated delta rule, linear attention with or without decay, weight decay and dgd,
with per-head gates, on CUDA tensors. Momentum (two coupled states) has its own pair of kernels: on linear
attention (no solve), and on the l2 objective at window 1 (Titans with a matrix memory, `scaled_chunk.py`'s
chunk form: the errors read the state the momentum feeds, one UT solve per chunk). Together: the rules
`chunk.supports` accepts with per-head gates, and l2 with momentum. The maths is in README.md ("Chunk form",
"Windows and momentum with l2" and "Triton kernels").

Forward, one program per (batch, head, block of d_v columns; the columns of S evolve independently):
a loop over chunks keeps S in registers; inside a chunk the UT transform T = (I + A)^{-1} is computed by
forward substitution on the C x C unit-lower-triangular system, everything else with `tl.dot`. The state
entering every chunk is stored ([B, H, N, d_k, d_v]), so the backward needs no forward re-run.
Backward, one program per (batch, head, column block): the reverse loop over chunks recomputes each chunk's
T, W, U from its stored state and carries dL/dS; gradients that sum over d_v are summed over column blocks
afterwards. Both are `torch.library.custom_op`s with a registered fake and autograd formula, so
`torch.compile` traces through them as single graph nodes.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from nlc.ops.matrix import chunk
from nlc.ops.memory.naive import gates_used, initial_state
from nlc.ops.memory.rule import Gates, MemoryState, Rule, StructureParams

NAME = "matrix.triton"
# Launch shape. Compiled for sm_90, chunk 64 needs 208 KiB (d = 64) to 336 KiB (d = 128) of shared memory in the
# backward, over the 227 KiB a block may use on an H100; chunk 32 needs at most 164 KiB (tests/ops/test_matrix_triton.py).
CHUNK = 32
BLOCK_V = 64  # columns of the state per program: they evolve independently, so d_v is split across programs
NUM_WARPS = 8  # fewer registers per thread for the [C, d_k] and [d_k, BLOCK_V] tiles
NUM_STAGES = 1  # the loop's loads are small; pipelining them would only take shared memory
MAX_KEY_WIDTH = 128  # a program holds all of d_k: wider keys would not fit in shared memory
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _unit_lower_inverse(lower, C: tl.constexpr):
    """(I + lower)^{-1} for a strictly lower-triangular [C, C] block, by forward substitution:
    row i of the inverse is e_i - sum_{j<i} lower_ij row_j (rows j < i are already final)."""
    rows = tl.arange(0, C)
    inverse = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0).to(lower.dtype)
    for i in range(1, C):
        lower_row = tl.sum(tl.where(rows[:, None] == i, lower, 0.0), 0)  # [C] row i of lower
        new_row = tl.where(rows == i, 1.0, 0.0) - tl.sum(lower_row[:, None] * inverse, 0)  # [C]
        inverse = tl.where(rows[:, None] == i, new_row[None, :], inverse)
    return inverse


@triton.jit
def _chunk_terms(q, k, v, write, erase, g, g_at, g_last, s, C: tl.constexpr, HAS_ERASE: tl.constexpr, HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr):
    """The per-chunk quantities of the chunk form, given the state s entering it. Without decay the decays are 1;
    without erase, inverse / w_keys / kk are placeholders and u_base = u = diag(write) V."""
    rows = tl.arange(0, C)
    causal = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [C, C]
    if HAS_DECAY:
        gamma = tl.where(causal, tl.exp(g[:, None] - g[None, :]), 0.0)  # exp(g_i - g_j), i >= j
        gamma_erase = tl.where(strict, tl.exp(g_at[:, None] - g[None, :]), 0.0)
        decay_in = tl.exp(g)  # [C] from the chunk start
        decay_out = tl.exp(g_last - g)  # [C] to the chunk end
        rate = erase * tl.exp(g_at)  # erase rate times the retention up to the erase point
    else:
        gamma = tl.where(causal, 1.0, 0.0)
        gamma_erase = tl.where(strict, 1.0, 0.0)
        decay_in = tl.full([C], 1.0, q.dtype)
        decay_out = decay_in
        rate = erase
    attn = qk * gamma  # [C, C]
    written = v * write[:, None]  # [C, BV]
    if HAS_ERASE:
        kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)  # [C, C]
        inverse = _unit_lower_inverse(kk * gamma_erase * erase[:, None], C)  # T = (I + diag(e) (Gamma_erase * K K^T))^{-1}
        w_keys = tl.dot(inverse, k * rate[:, None], input_precision=PRECISION)  # [C, BK]  W = T diag(rate) K
        u_base = tl.dot(inverse, written, input_precision=PRECISION)  # [C, BV]  U0 = T diag(w) V
        u = u_base - tl.dot(w_keys, s, input_precision=PRECISION)  # [C, BV] pseudo-values
    else:
        kk = qk
        inverse = gamma
        w_keys = k
        u_base = written
        u = written
    return qk, kk, gamma, gamma_erase, decay_in, decay_out, rate, attn, inverse, w_keys, u_base, u


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, write_ptr, erase_ptr, g_ptr, g_erase_ptr, s0_ptr,
    o_ptr, states_ptr, final_ptr,
    T, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_ERASE: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_ERASE_POINT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)  # offsets below can pass 2^31 at long sequences
    col_block = tl.program_id(1).to(tl.int64)
    n_chunks = T // C
    rows = tl.arange(0, C)
    cols_k = tl.arange(0, BK)
    cols_v = col_block * BV + tl.arange(0, BV)
    mask_k = cols_k < DK
    mask_v = cols_v < DV
    state_offsets = cols_k[:, None] * DV + cols_v[None, :]  # [BK, BV]
    state_mask = mask_k[:, None] & mask_v[None, :]

    s = tl.load(s0_ptr + bh * DK * DV + state_offsets, mask=state_mask, other=0.0)  # [BK, BV]
    for n in range(n_chunks):
        tl.store(states_ptr + (bh * n_chunks + n) * DK * DV + state_offsets, s, mask=state_mask)
        tokens = bh * T + n * C + rows  # [C]
        q = tl.load(q_ptr + tokens[:, None] * DK + cols_k[None, :], mask=mask_k[None, :], other=0.0)  # [C, BK]
        k = tl.load(k_ptr + tokens[:, None] * DK + cols_k[None, :], mask=mask_k[None, :], other=0.0)  # [C, BK]
        v = tl.load(v_ptr + tokens[:, None] * DV + cols_v[None, :], mask=mask_v[None, :], other=0.0)  # [C, BV]
        write = tl.load(write_ptr + tokens)  # [C]
        erase = tl.load(erase_ptr + tokens)  # [C] (a placeholder without erase)
        g = tl.load(g_ptr + tokens)  # [C] chunk-local cumulative log retention (a placeholder without decay)
        g_at = tl.load(g_erase_ptr + tokens) if HAS_ERASE_POINT else g
        g_last = tl.load(g_ptr + bh * T + n * C + C - 1)
        _, _, _, _, decay_in, decay_out, _, attn, _, _, _, u = _chunk_terms(q, k, v, write, erase, g, g_at, g_last, s, C, HAS_ERASE, HAS_DECAY, PRECISION)
        # o = diag(decay_in) Q S_n + (Q K^T * Gamma) U;  S_{n+1} = decay_last S_n + (diag(decay_out) K)^T U
        o = tl.dot(q * decay_in[:, None], s, input_precision=PRECISION) + tl.dot(attn, u, input_precision=PRECISION)
        tl.store(o_ptr + tokens[:, None] * DV + cols_v[None, :], o, mask=mask_v[None, :])
        drive = tl.dot(tl.trans(k * decay_out[:, None]), u, input_precision=PRECISION)  # [BK, BV]
        s = tl.exp(g_last) * s + drive if HAS_DECAY else s + drive
    tl.store(final_ptr + bh * DK * DV + state_offsets, s, mask=state_mask)


@triton.jit
def _backward_kernel(
    q_ptr, k_ptr, v_ptr, write_ptr, erase_ptr, g_ptr, g_erase_ptr, states_ptr, d_o_ptr, d_final_ptr,
    d_q_ptr, d_k_ptr, d_v_ptr, d_write_ptr, d_erase_ptr, d_g_ptr, d_g_erase_ptr, d_s0_ptr,
    T, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_ERASE: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_ERASE_POINT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)  # offsets below can pass 2^31 at long sequences
    col_block = tl.program_id(1).to(tl.int64)
    n_chunks = T // C
    rows = tl.arange(0, C)
    cols_k = tl.arange(0, BK)
    cols_v = col_block * BV + tl.arange(0, BV)
    # Gradients that sum over d_v are written per column block ([NV, B, H, T, ...]) and summed by the caller.
    partial = col_block * tl.num_programs(0) * T
    mask_k = cols_k < DK
    mask_v = cols_v < DV
    state_offsets = cols_k[:, None] * DV + cols_v[None, :]  # [BK, BV]
    state_mask = mask_k[:, None] & mask_v[None, :]
    last = rows == C - 1

    d_s = tl.load(d_final_ptr + bh * DK * DV + state_offsets, mask=state_mask, other=0.0)  # [BK, BV] dL/dS leaving the chunk
    for i in range(n_chunks):
        n = n_chunks - 1 - i
        tokens = bh * T + n * C + rows  # [C]
        k_offsets = tokens[:, None] * DK + cols_k[None, :]  # [C, BK]
        v_offsets = tokens[:, None] * DV + cols_v[None, :]  # [C, BV]
        q = tl.load(q_ptr + k_offsets, mask=mask_k[None, :], other=0.0)
        k = tl.load(k_ptr + k_offsets, mask=mask_k[None, :], other=0.0)
        v = tl.load(v_ptr + v_offsets, mask=mask_v[None, :], other=0.0)
        d_o = tl.load(d_o_ptr + v_offsets, mask=mask_v[None, :], other=0.0)  # [C, BV]
        write = tl.load(write_ptr + tokens)
        erase = tl.load(erase_ptr + tokens)
        g = tl.load(g_ptr + tokens)
        g_at = tl.load(g_erase_ptr + tokens) if HAS_ERASE_POINT else g
        g_last = tl.load(g_ptr + bh * T + n * C + C - 1)
        s = tl.load(states_ptr + (bh * n_chunks + n) * DK * DV + state_offsets, mask=state_mask, other=0.0)  # [BK, BV]
        qk, kk, gamma, gamma_erase, decay_in, decay_out, rate, attn, inverse, w_keys, u_base, u = _chunk_terms(
            q, k, v, write, erase, g, g_at, g_last, s, C, HAS_ERASE, HAS_DECAY, PRECISION
        )
        d_next = d_s
        keys_out = k * decay_out[:, None]  # [C, BK]
        q_in = q * decay_in[:, None]  # [C, BK]

        # Through the chunk: dL/dU and dL/dS entering it (S_n feeds the reads, the next state and U = U0 - W S_n).
        d_u = tl.dot(tl.trans(attn), d_o, input_precision=PRECISION) + tl.dot(keys_out, d_next, input_precision=PRECISION)  # [C, BV]
        d_s = tl.dot(tl.trans(q_in), d_o, input_precision=PRECISION)  # [BK, BV]
        d_s += tl.exp(g_last) * d_next if HAS_DECAY else d_next
        if HAS_ERASE:
            d_s -= tl.dot(tl.trans(w_keys), d_u, input_precision=PRECISION)

        # Reads and state update
        d_attn = tl.dot(d_o, tl.trans(u), input_precision=PRECISION) * gamma  # [C, C]
        d_q = tl.dot(d_o, tl.trans(s), input_precision=PRECISION) * decay_in[:, None] + tl.dot(d_attn, k, input_precision=PRECISION)  # [C, BK]
        d_keys_out = tl.dot(u, tl.trans(d_next), input_precision=PRECISION)  # [C, BK]
        d_k = tl.dot(tl.trans(d_attn), q, input_precision=PRECISION) + d_keys_out * decay_out[:, None]
        d_g = tl.zeros([C], dtype=q.dtype)
        if HAS_DECAY:
            d_log_gamma = d_attn * qk  # d loss / d (g_i - g_j)
            d_g = tl.sum(d_log_gamma, 1) - tl.sum(d_log_gamma, 0)
            d_g += tl.sum(tl.dot(q, s, input_precision=PRECISION) * d_o, 1) * decay_in
            d_decay_out = tl.sum(k * d_keys_out, 1) * decay_out  # d loss / d (g_C - g_i)
            d_g -= d_decay_out
            d_g += tl.where(last, tl.sum(d_decay_out, 0) + tl.sum(tl.sum(s * d_next, 1), 0) * tl.exp(g_last), 0.0)

        if HAS_ERASE:
            # U = U0 - W S_n, W = T diag(rate) K, U0 = T diag(w) V, T = (I + A)^{-1}: d(rhs) = T^T d(solution)
            d_w_keys = -tl.dot(d_u, tl.trans(s), input_precision=PRECISION)  # [C, BK]
            d_rhs_k = tl.dot(tl.trans(inverse), d_w_keys, input_precision=PRECISION)  # [C, BK]
            d_rhs_v = tl.dot(tl.trans(inverse), d_u, input_precision=PRECISION)  # [C, BV]
            d_lower = tl.dot(d_rhs_k, tl.trans(w_keys), input_precision=PRECISION) + tl.dot(d_rhs_v, tl.trans(u_base), input_precision=PRECISION)
            d_lower = -d_lower * gamma_erase  # [C, C], A_ij = e_i Gamma_erase_ij (k_i . k_j)
            d_k += d_rhs_k * rate[:, None]
            d_rate = tl.sum(k * d_rhs_k, 1)  # [C]
            d_v = d_rhs_v * write[:, None]
            d_write = tl.sum(v * d_rhs_v, 1)
            d_kk = d_lower * erase[:, None]
            d_k += tl.dot(d_kk, k, input_precision=PRECISION) + tl.dot(tl.trans(d_kk), k, input_precision=PRECISION)
            d_erase = tl.sum(d_lower * kk, 1)
            if HAS_DECAY:
                d_erase += d_rate * tl.exp(g_at)
                d_log_gamma_erase = d_kk * kk  # d loss / d (g_at_i - g_j)
                d_from_erase = d_rate * rate + tl.sum(d_log_gamma_erase, 1)
                d_g -= tl.sum(d_log_gamma_erase, 0)
                if HAS_ERASE_POINT:
                    tl.store(d_g_erase_ptr + partial + tokens, d_from_erase)
                else:
                    d_g += d_from_erase
            else:
                d_erase += d_rate
            tl.store(d_erase_ptr + partial + tokens, d_erase)
        else:
            d_v = d_u * write[:, None]
            d_write = tl.sum(v * d_u, 1)

        tl.store(d_q_ptr + partial * DK + k_offsets, d_q, mask=mask_k[None, :])
        tl.store(d_k_ptr + partial * DK + k_offsets, d_k, mask=mask_k[None, :])
        tl.store(d_v_ptr + v_offsets, d_v, mask=mask_v[None, :])
        tl.store(d_write_ptr + partial + tokens, d_write)
        if HAS_DECAY:
            tl.store(d_g_ptr + partial + tokens, d_g)
    tl.store(d_s0_ptr + bh * DK * DV + state_offsets, d_s, mask=state_mask)


@triton.jit
def _momentum_terms(g, b, end, C: tl.constexpr, PRECISION: tl.constexpr):
    """Linear attention with momentum inside a chunk: X_t = gamma_t X_0 + zeta_t Z_0 + sum_{j<=t} coef_tj k_j w_j^T.
    Gamma_a, Gamma_beta [C, C] are the retention and momentum decays from token j to token t; coef = Gamma_a Gamma_beta
    sums them over the token s in [j, t] where the write enters X; zeta = Gamma_a exp(b) [C] weighs Z_0.
    `end` is the chunk's last real token: the state leaving the chunk is the one after it."""
    rows = tl.arange(0, C)
    causal = rows[:, None] >= rows[None, :]
    gamma_a = tl.where(causal, tl.exp(g[:, None] - g[None, :]), 0.0)  # [C, C]
    gamma_b = tl.where(causal, tl.exp(b[:, None] - b[None, :]), 0.0)  # [C, C]
    coef = tl.dot(gamma_a, gamma_b, input_precision=PRECISION)  # [C, C]
    zeta = tl.sum(gamma_a * tl.exp(b)[None, :], 1)  # [C]
    at_end = rows == end
    g_end = tl.sum(tl.where(at_end, g, 0.0), 0)
    b_end = tl.sum(tl.where(at_end, b, 0.0), 0)
    zeta_end = tl.sum(tl.where(at_end, zeta, 0.0), 0)
    coef_end = tl.sum(tl.where(at_end[:, None], coef, 0.0), 0)  # [C] row `end` of coef
    keep_b = tl.where(rows <= end, tl.exp(b_end - b), 0.0)  # [C] momentum decay from token j to the end
    return gamma_a, gamma_b, coef, zeta, at_end, g_end, b_end, zeta_end, coef_end, keep_b


@triton.jit
def _l2_errors(k, v, write, g, b, g_point, gamma_b, x, z, C: tl.constexpr, PRECISION: tl.constexpr):
    """l2 with momentum: the chunk's errors E = V - p K S_{t-1} from (I + A) E = V - diag(p gamma_prev) K X_0 -
    diag(p zeta_prev) K Z_0, A_tj = p_t coef_{t-1,j} w_j (k_t . k_j) (j < t). g_point = log p_t + g_{t-1}, so
    gamma_p_ts = exp(g_point_t - g_s) (s < t) is p_t times the retention from token s to the gradient point of t."""
    rows = tl.arange(0, C)
    strict = rows[:, None] > rows[None, :]
    gamma_p = tl.where(strict, tl.exp(g_point[:, None] - g[None, :]), 0.0)  # [C, C]
    before = tl.dot(gamma_p, gamma_b, input_precision=PRECISION)  # [C, C] p_t coef_{t-1,j}, strictly lower
    from_x = tl.exp(g_point)  # [C] p_t gamma_{t-1}
    from_z = tl.sum(gamma_p * tl.exp(b)[None, :], 1)  # [C] p_t zeta_{t-1}
    kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)  # [C, C]
    inverse = _unit_lower_inverse(before * kk * write[None, :], C)  # T = (I + A)^{-1}
    k_x = tl.dot(k, x, input_precision=PRECISION)  # [C, BV]
    k_z = tl.dot(k, z, input_precision=PRECISION)  # [C, BV]
    errors = tl.dot(inverse, v - from_x[:, None] * k_x - from_z[:, None] * k_z, input_precision=PRECISION)  # [C, BV]
    return gamma_p, before, from_x, from_z, kk, inverse, k_x, k_z, errors


@triton.jit
def _momentum_forward_kernel(
    q_ptr, k_ptr, v_ptr, write_ptr, g_ptr, b_ptr, g_point_ptr, x0_ptr, z0_ptr,
    o_ptr, states_ptr, final_ptr,
    T, LENGTH, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    L2: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    col_block = tl.program_id(1).to(tl.int64)
    n_chunks = T // C
    rows = tl.arange(0, C)
    cols_k = tl.arange(0, BK)
    cols_v = col_block * BV + tl.arange(0, BV)
    mask_k = cols_k < DK
    mask_v = cols_v < DV
    state_offsets = cols_k[:, None] * DV + cols_v[None, :]  # [BK, BV]
    state_mask = mask_k[:, None] & mask_v[None, :]

    x = tl.load(x0_ptr + bh * DK * DV + state_offsets, mask=state_mask, other=0.0)  # [BK, BV] the memory X = M^T
    z = tl.load(z0_ptr + bh * DK * DV + state_offsets, mask=state_mask, other=0.0)  # [BK, BV] the momentum Z = S^T
    for n in range(n_chunks):
        entering = states_ptr + (bh * n_chunks + n) * 2 * DK * DV  # states [B, H, N, 2, d_k, d_v]: X_n, Z_n
        tl.store(entering + state_offsets, x, mask=state_mask)
        tl.store(entering + DK * DV + state_offsets, z, mask=state_mask)
        tokens = bh * T + n * C + rows  # [C]
        q = tl.load(q_ptr + tokens[:, None] * DK + cols_k[None, :], mask=mask_k[None, :], other=0.0)  # [C, BK]
        k = tl.load(k_ptr + tokens[:, None] * DK + cols_k[None, :], mask=mask_k[None, :], other=0.0)  # [C, BK]
        v = tl.load(v_ptr + tokens[:, None] * DV + cols_v[None, :], mask=mask_v[None, :], other=0.0)  # [C, BV]
        write = tl.load(write_ptr + tokens)  # [C]
        g = tl.load(g_ptr + tokens)  # [C] chunk-local cumulative log retention
        b = tl.load(b_ptr + tokens)  # [C] chunk-local cumulative log momentum decay
        end = tl.minimum(LENGTH - n * C, C) - 1
        _, gamma_b, coef, zeta, _, g_end, b_end, zeta_end, coef_end, keep_b = _momentum_terms(g, b, end, C, PRECISION)
        if L2:
            g_point = tl.load(g_point_ptr + tokens)  # [C]
            errors = _l2_errors(k, v, write, g, b, g_point, gamma_b, x, z, C, PRECISION)[-1]
            written = errors * write[:, None]  # [C, BV]
        else:
            written = v * write[:, None]  # [C, BV]
        attn = tl.dot(q, tl.trans(k), input_precision=PRECISION) * coef  # [C, C]
        o = tl.dot(q * tl.exp(g)[:, None], x, input_precision=PRECISION) + tl.dot(q * zeta[:, None], z, input_precision=PRECISION)
        o += tl.dot(attn, written, input_precision=PRECISION)  # [C, BV]
        tl.store(o_ptr + tokens[:, None] * DV + cols_v[None, :], o, mask=mask_v[None, :])
        x_next = tl.exp(g_end) * x + zeta_end * z + tl.dot(tl.trans(k * coef_end[:, None]), written, input_precision=PRECISION)
        z = tl.exp(b_end) * z + tl.dot(tl.trans(k * keep_b[:, None]), written, input_precision=PRECISION)
        x = x_next
    tl.store(final_ptr + bh * 2 * DK * DV + state_offsets, x, mask=state_mask)
    tl.store(final_ptr + bh * 2 * DK * DV + DK * DV + state_offsets, z, mask=state_mask)


@triton.jit
def _momentum_backward_kernel(
    q_ptr, k_ptr, v_ptr, write_ptr, g_ptr, b_ptr, g_point_ptr, states_ptr, d_o_ptr, d_final_ptr,
    d_q_ptr, d_k_ptr, d_v_ptr, d_write_ptr, d_g_ptr, d_b_ptr, d_g_point_ptr, d_s0_ptr,
    T, LENGTH, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    L2: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    col_block = tl.program_id(1).to(tl.int64)
    n_chunks = T // C
    rows = tl.arange(0, C)
    cols_k = tl.arange(0, BK)
    cols_v = col_block * BV + tl.arange(0, BV)
    mask_k = cols_k < DK
    mask_v = cols_v < DV
    state_offsets = cols_k[:, None] * DV + cols_v[None, :]  # [BK, BV]
    state_mask = mask_k[:, None] & mask_v[None, :]
    partial = col_block * tl.num_programs(0) * T  # gradients summing over d_v: one slice per column block
    strict = rows[:, None] > rows[None, :]

    d_x = tl.load(d_final_ptr + bh * 2 * DK * DV + state_offsets, mask=state_mask, other=0.0)  # [BK, BV]
    d_z = tl.load(d_final_ptr + bh * 2 * DK * DV + DK * DV + state_offsets, mask=state_mask, other=0.0)
    for i in range(n_chunks):
        n = n_chunks - 1 - i
        tokens = bh * T + n * C + rows  # [C]
        k_offsets = tokens[:, None] * DK + cols_k[None, :]  # [C, BK]
        v_offsets = tokens[:, None] * DV + cols_v[None, :]  # [C, BV]
        q = tl.load(q_ptr + k_offsets, mask=mask_k[None, :], other=0.0)
        k = tl.load(k_ptr + k_offsets, mask=mask_k[None, :], other=0.0)
        v = tl.load(v_ptr + v_offsets, mask=mask_v[None, :], other=0.0)
        d_o = tl.load(d_o_ptr + v_offsets, mask=mask_v[None, :], other=0.0)  # [C, BV]
        write = tl.load(write_ptr + tokens)
        g = tl.load(g_ptr + tokens)
        b = tl.load(b_ptr + tokens)
        entering = states_ptr + (bh * n_chunks + n) * 2 * DK * DV
        x = tl.load(entering + state_offsets, mask=state_mask, other=0.0)  # [BK, BV]
        z = tl.load(entering + DK * DV + state_offsets, mask=state_mask, other=0.0)
        end = tl.minimum(LENGTH - n * C, C) - 1
        gamma_a, gamma_b, coef, zeta, at_end, g_end, b_end, zeta_end, coef_end, keep_b = _momentum_terms(g, b, end, C, PRECISION)
        decay_in = tl.exp(g)  # [C]
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [C, C]
        if L2:
            g_point = tl.load(g_point_ptr + tokens)
            gamma_p, before, from_x, from_z, kk, inverse, k_x, k_z, errors = _l2_errors(k, v, write, g, b, g_point, gamma_b, x, z, C, PRECISION)
            written = errors * write[:, None]  # [C, BV]
        else:
            written = v * write[:, None]  # [C, BV]
        d_next_x = d_x
        d_next_z = d_z

        # States entering the chunk: X_n feeds the reads and X_{n+1}; Z_n feeds the reads, X_{n+1} and Z_{n+1}.
        d_x = tl.exp(g_end) * d_next_x + tl.dot(tl.trans(q * decay_in[:, None]), d_o, input_precision=PRECISION)
        d_z = zeta_end * d_next_x + tl.exp(b_end) * d_next_z + tl.dot(tl.trans(q * zeta[:, None]), d_o, input_precision=PRECISION)

        # Writes w_j enter the reads through coef, X_{n+1} through coef[end] and Z_{n+1} through keep_b.
        d_written = tl.dot(tl.trans(qk * coef), d_o, input_precision=PRECISION)
        d_written += tl.dot(k * coef_end[:, None], d_next_x, input_precision=PRECISION)
        d_written += tl.dot(k * keep_b[:, None], d_next_z, input_precision=PRECISION)  # [C, BV]
        d_attn = tl.dot(d_o, tl.trans(written), input_precision=PRECISION)  # [C, C] d loss / d (q_i . k_j coef_ij)
        d_o_x = tl.dot(d_o, tl.trans(x), input_precision=PRECISION)  # [C, BK]
        d_o_z = tl.dot(d_o, tl.trans(z), input_precision=PRECISION)  # [C, BK]
        written_x = tl.dot(written, tl.trans(d_next_x), input_precision=PRECISION)  # [C, BK]
        written_z = tl.dot(written, tl.trans(d_next_z), input_precision=PRECISION)  # [C, BK]
        d_q = d_o_x * decay_in[:, None] + d_o_z * zeta[:, None] + tl.dot(d_attn * coef, k, input_precision=PRECISION)
        d_k = tl.dot(tl.trans(d_attn * coef), q, input_precision=PRECISION) + written_x * coef_end[:, None] + written_z * keep_b[:, None]

        if L2:
            # w = diag(write) E, E = T R, R = V - diag(from_x) K X_n - diag(from_z) K Z_n, T = (I + A)^{-1}
            d_write = tl.sum(errors * d_written, 1)
            d_rhs = tl.dot(tl.trans(inverse), d_written * write[:, None], input_precision=PRECISION)  # [C, BV] = dV
            d_lower = tl.where(strict, -tl.dot(d_rhs, tl.trans(errors), input_precision=PRECISION), 0.0)  # [C, C] dA
            d_from_z = -tl.sum(d_rhs * k_z, 1)  # [C]
            d_g_point = -tl.sum(d_rhs * k_x, 1) * from_x
            d_k -= tl.dot(d_rhs * from_x[:, None], tl.trans(x), input_precision=PRECISION)
            d_k -= tl.dot(d_rhs * from_z[:, None], tl.trans(z), input_precision=PRECISION)
            d_x -= tl.dot(tl.trans(k * from_x[:, None]), d_rhs, input_precision=PRECISION)
            d_z -= tl.dot(tl.trans(k * from_z[:, None]), d_rhs, input_precision=PRECISION)
            # A = before * (K K^T) * write_j, before = Gamma_p Gamma_beta, from_z = Gamma_p exp(b)
            d_kk = d_lower * before * write[None, :]
            d_k += tl.dot(d_kk, k, input_precision=PRECISION) + tl.dot(tl.trans(d_kk), k, input_precision=PRECISION)
            d_write += tl.sum(d_lower * before * kk, 0)
            d_before = d_lower * kk * write[None, :]
            d_gamma_p = tl.dot(d_before, tl.trans(gamma_b), input_precision=PRECISION) + d_from_z[:, None] * tl.exp(b)[None, :]
            d_log_p = d_gamma_p * gamma_p  # d loss / d (g_point_t - g_s)
            d_g_point += tl.sum(d_log_p, 1)
            d_g_from_point = -tl.sum(d_log_p, 0)
            d_log_b_point = tl.dot(tl.trans(gamma_p), d_before, input_precision=PRECISION) * gamma_b  # d loss / d (b_s - b_j)
            d_b_from_point = tl.sum(d_log_b_point, 1) - tl.sum(d_log_b_point, 0)
            d_b_from_point += tl.sum(gamma_p * d_from_z[:, None], 0) * tl.exp(b)  # from_z = Gamma_p exp(b)
            tl.store(d_v_ptr + v_offsets, d_rhs, mask=mask_v[None, :])
            tl.store(d_g_point_ptr + partial + tokens, d_g_point)
        else:
            d_write = tl.sum(v * d_written, 1)
            tl.store(d_v_ptr + v_offsets, d_written * write[:, None], mask=mask_v[None, :])

        # Gates: through gamma_t, zeta_t, coef, keep_b and the end-of-chunk factors, then coef = Gamma_a Gamma_beta.
        d_coef = d_attn * qk + tl.where(at_end[:, None], tl.sum(k * written_x, 1)[None, :], 0.0)  # [C, C]
        d_zeta = tl.sum(d_o_z * q, 1) + tl.where(at_end, tl.sum(tl.sum(z * d_next_x, 1), 0), 0.0)  # [C]
        d_g = tl.sum(d_o_x * q, 1) * decay_in + tl.where(at_end, tl.exp(g_end) * tl.sum(tl.sum(x * d_next_x, 1), 0), 0.0)
        d_keep_b = tl.sum(k * written_z, 1) * keep_b  # d loss / d (b_end - b_j)
        d_b = tl.where(at_end, tl.sum(d_keep_b, 0) + tl.exp(b_end) * tl.sum(tl.sum(z * d_next_z, 1), 0), 0.0) - d_keep_b
        d_b += tl.sum(gamma_a * d_zeta[:, None], 0) * tl.exp(b)  # zeta = Gamma_a exp(b)
        d_gamma_a = tl.dot(d_coef, tl.trans(gamma_b), input_precision=PRECISION) + d_zeta[:, None] * tl.exp(b)[None, :]
        d_gamma_b = tl.dot(tl.trans(gamma_a), d_coef, input_precision=PRECISION)
        d_log_a = d_gamma_a * gamma_a  # d loss / d (g_i - g_j)
        d_log_b = d_gamma_b * gamma_b  # d loss / d (b_i - b_j)
        d_g += tl.sum(d_log_a, 1) - tl.sum(d_log_a, 0)
        d_b += tl.sum(d_log_b, 1) - tl.sum(d_log_b, 0)
        if L2:
            d_g += d_g_from_point
            d_b += d_b_from_point

        tl.store(d_q_ptr + partial * DK + k_offsets, d_q, mask=mask_k[None, :])
        tl.store(d_k_ptr + partial * DK + k_offsets, d_k, mask=mask_k[None, :])
        tl.store(d_write_ptr + partial + tokens, d_write)
        tl.store(d_g_ptr + partial + tokens, d_g)
        tl.store(d_b_ptr + partial + tokens, d_b)
    tl.store(d_s0_ptr + bh * 2 * DK * DV + state_offsets, d_x, mask=state_mask)
    tl.store(d_s0_ptr + bh * 2 * DK * DV + DK * DV + state_offsets, d_z, mask=state_mask)


def _blocks(d_k: int, d_v: int) -> tuple[int, int, int]:
    """Register tiles: all of d_k, d_v in blocks of at most BLOCK_V columns (tl.dot needs >= 16); and their count."""
    block_k = max(16, triton.next_power_of_2(d_k))
    block_v = min(max(16, triton.next_power_of_2(d_v)), BLOCK_V)
    return block_k, block_v, triton.cdiv(d_v, block_v)


def _precision(x: Tensor, allow_tf32: bool) -> str:
    return "tf32" if allow_tf32 and x.dtype == torch.float32 and not INTERPRETED else "ieee"


@torch.library.custom_op("nlc::matrix_chunk_forward", mutates_args=())
def chunk_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    write: Tensor,
    erase: Tensor | None,
    g: Tensor | None,
    g_erase: Tensor | None,
    s0: Tensor,
    chunk_size: int,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k [B, H, T, d_k], v [B, H, T, d_v], write / erase / g / g_erase [B, H, T] with T a multiple of chunk_size;
    g is the chunk-local inclusive cumulative log retention, g_erase the same at the erase point (None: = g).
    Returns o [B, H, T, d_v], the final state [B, H, d_k, d_v] and the state entering each chunk [B, H, N, d_k, d_v].
    allow_tf32: float32 matmuls may round their operands to tf32 (on a GPU; the interpreter is always exact)."""
    batch, heads, length, d_k = q.shape
    d_v = v.shape[-1]
    n_chunks = length // chunk_size
    o = torch.empty_like(v)
    final = torch.empty_like(s0)
    states = s0.new_empty(batch, heads, n_chunks, d_k, d_v)
    block_k, block_v, n_blocks = _blocks(d_k, d_v)
    _forward_kernel[(batch * heads, n_blocks)](
        q, k, v, write, write if erase is None else erase, write if g is None else g, write if g_erase is None else g_erase, s0,
        o, states, final,
        length, d_k, d_v, chunk_size, block_k, block_v,
        erase is not None, g is not None, g_erase is not None, _precision(q, allow_tf32),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return o, final, states


@chunk_forward.register_fake
def _(q, k, v, write, erase, g, g_erase, s0, chunk_size, allow_tf32):
    batch, heads, length, d_k = q.shape
    states = s0.new_empty(batch, heads, length // chunk_size, d_k, v.shape[-1])
    return torch.empty_like(v), torch.empty_like(s0), states


@torch.library.custom_op("nlc::matrix_chunk_backward", mutates_args=())
def chunk_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    write: Tensor,
    erase: Tensor | None,
    g: Tensor | None,
    g_erase: Tensor | None,
    states: Tensor,
    d_o: Tensor,
    d_final: Tensor,
    chunk_size: int,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v, write, erase, g, g_erase and s0 (those of absent inputs are zeros)."""
    batch, heads, length, d_k = q.shape
    d_v = v.shape[-1]
    block_k, block_v, n_blocks = _blocks(d_k, d_v)
    d_q, d_k_ = (q.new_empty(n_blocks, *q.shape) for _ in range(2))  # partial sums over column blocks
    d_write = write.new_empty(n_blocks, *write.shape)
    d_erase, d_g, d_g_erase = (write.new_zeros(n_blocks, *write.shape) for _ in range(3))
    d_v_, d_s0 = torch.empty_like(v), torch.empty_like(d_final)
    _backward_kernel[(batch * heads, n_blocks)](
        q, k, v, write, write if erase is None else erase, write if g is None else g, write if g_erase is None else g_erase,
        states, d_o, d_final,
        d_q, d_k_, d_v_, d_write, d_erase, d_g, d_g_erase, d_s0,
        length, d_k, d_v, chunk_size, block_k, block_v,
        erase is not None, g is not None, g_erase is not None, _precision(q, allow_tf32),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    d_q, d_k_, d_write, d_erase, d_g, d_g_erase = (t.sum(0) for t in (d_q, d_k_, d_write, d_erase, d_g, d_g_erase))
    return d_q, d_k_, d_v_, d_write, d_erase, d_g, d_g_erase, d_s0


@chunk_backward.register_fake
def _(q, k, v, write, erase, g, g_erase, states, d_o, d_final, chunk_size, allow_tf32):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *(torch.empty_like(write) for _ in range(4)), torch.empty_like(d_final))


def _setup_context(ctx, inputs, output):
    q, k, v, write, erase, g, g_erase, _, chunk_size, allow_tf32 = inputs
    ctx.save_for_backward(q, k, v, write, erase, g, g_erase, output[2])
    ctx.chunk_size, ctx.allow_tf32 = chunk_size, allow_tf32


def _backward(ctx, d_o, d_final, _d_states):
    q, k, v, write, erase, g, g_erase, states = ctx.saved_tensors
    d_o = torch.zeros_like(v) if d_o is None else d_o.contiguous()
    d_final = torch.zeros_like(states[:, :, 0]) if d_final is None else d_final.contiguous()
    d_q, d_k, d_v, d_write, d_erase, d_g, d_g_erase, d_s0 = chunk_backward(
        q, k, v, write, erase, g, g_erase, states, d_o, d_final, ctx.chunk_size, ctx.allow_tf32
    )
    d_erase, d_g, d_g_erase = (None if x is None else grad for grad, x in ((d_erase, erase), (d_g, g), (d_g_erase, g_erase)))
    return d_q, d_k, d_v, d_write, d_erase, d_g, d_g_erase, d_s0, None, None


torch.library.register_autograd("nlc::matrix_chunk_forward", _backward, setup_context=_setup_context)


@torch.library.custom_op("nlc::matrix_momentum_forward", mutates_args=())
def momentum_forward(
    q: Tensor, k: Tensor, v: Tensor, write: Tensor, g: Tensor, b: Tensor, g_point: Tensor | None, s0: Tensor,
    chunk_size: int, length: int, allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Momentum on linear attention (g_point None) or on the l2 objective. q, k [B, H, T, d_k], v [B, H, T, d_v],
    write / g / b / g_point [B, H, T] with T a multiple of chunk_size (g, b: chunk-local inclusive cumulative log
    retention and log momentum decay; g_point = log p_t + g_{t-1}, the log scale of the chunk's entering state at the
    gradient point p_t S_{t-1}); s0 [B, H, 2, d_k, d_v] holds X_0 = M_0^T and Z_0 = S_0^T. `length` real tokens: the
    final state is the one after the last of them.
    Returns o [B, H, T, d_v], the final (X, Z) [B, H, 2, d_k, d_v] and (X, Z) entering each chunk [B, H, N, 2, d_k, d_v]."""
    batch, heads, padded_length, d_k = q.shape
    d_v = v.shape[-1]
    o, final = torch.empty_like(v), torch.empty_like(s0)
    states = s0.new_empty(batch, heads, padded_length // chunk_size, 2, d_k, d_v)
    block_k, block_v, n_blocks = _blocks(d_k, d_v)
    _momentum_forward_kernel[(batch * heads, n_blocks)](
        q, k, v, write, g, b, g if g_point is None else g_point, s0[:, :, 0].contiguous(), s0[:, :, 1].contiguous(),
        o, states, final,
        padded_length, length, d_k, d_v, chunk_size, block_k, block_v, g_point is not None, _precision(q, allow_tf32),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return o, final, states


@momentum_forward.register_fake
def _(q, k, v, write, g, b, g_point, s0, chunk_size, length, allow_tf32):
    batch, heads, padded_length, d_k = q.shape
    states = s0.new_empty(batch, heads, padded_length // chunk_size, 2, d_k, v.shape[-1])
    return torch.empty_like(v), torch.empty_like(s0), states


@torch.library.custom_op("nlc::matrix_momentum_backward", mutates_args=())
def momentum_backward(
    q: Tensor, k: Tensor, v: Tensor, write: Tensor, g: Tensor, b: Tensor, g_point: Tensor | None, states: Tensor,
    d_o: Tensor, d_final: Tensor, chunk_size: int, length: int, allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of q, k, v, write, g, b, g_point (zeros without it) and s0."""
    batch, heads, padded_length, d_k = q.shape
    d_v = v.shape[-1]
    block_k, block_v, n_blocks = _blocks(d_k, d_v)
    d_q, d_k_ = (q.new_empty(n_blocks, *q.shape) for _ in range(2))  # partial sums over column blocks
    d_write, d_g, d_b = (write.new_empty(n_blocks, *write.shape) for _ in range(3))
    d_g_point = write.new_zeros(n_blocks, *write.shape)
    d_v_, d_s0 = torch.empty_like(v), torch.empty_like(d_final)
    _momentum_backward_kernel[(batch * heads, n_blocks)](
        q, k, v, write, g, b, g if g_point is None else g_point, states, d_o, d_final,
        d_q, d_k_, d_v_, d_write, d_g, d_b, d_g_point, d_s0,
        padded_length, length, d_k, d_v, chunk_size, block_k, block_v, g_point is not None, _precision(q, allow_tf32),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    d_q, d_k_, d_write, d_g, d_b, d_g_point = (t.sum(0) for t in (d_q, d_k_, d_write, d_g, d_b, d_g_point))
    return d_q, d_k_, d_v_, d_write, d_g, d_b, d_g_point, d_s0


@momentum_backward.register_fake
def _(q, k, v, write, g, b, g_point, states, d_o, d_final, chunk_size, length, allow_tf32):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *(torch.empty_like(write) for _ in range(4)), torch.empty_like(d_final))


def _momentum_setup_context(ctx, inputs, output):
    q, k, v, write, g, b, g_point, _, chunk_size, length, allow_tf32 = inputs
    ctx.save_for_backward(q, k, v, write, g, b, g_point, output[2])
    ctx.chunk_size, ctx.length, ctx.allow_tf32 = chunk_size, length, allow_tf32


def _momentum_backward(ctx, d_o, d_final, _d_states):
    q, k, v, write, g, b, g_point, states = ctx.saved_tensors
    d_o = torch.zeros_like(v) if d_o is None else d_o.contiguous()
    d_final = torch.zeros_like(states[:, :, 0]) if d_final is None else d_final.contiguous()
    *grads, d_g_point, d_s0 = momentum_backward(q, k, v, write, g, b, g_point, states, d_o, d_final, ctx.chunk_size, ctx.length, ctx.allow_tf32)
    return (*grads, None if g_point is None else d_g_point, d_s0, None, None, None)


torch.library.register_autograd("nlc::matrix_momentum_forward", _momentum_backward, setup_context=_momentum_setup_context)


def supports(rule: Rule, gates: Gates, q: Tensor) -> bool:
    """The chunk path's rules with per-head gates, and l2 with momentum at window 1 (scaled_chunk.py's), on CUDA
    tensors other than float64 (never chosen on CPU, not even when interpreted), with keys up to MAX_KEY_WIDTH wide."""
    if not q.is_cuda or q.dtype == torch.float64 or q.shape[-1] > MAX_KEY_WIDTH:
        return False
    # one value per head and token for every gate (chunk.py also takes some per-channel ones)
    if any(getattr(gates, name) is None or getattr(gates, name).shape != q.shape[:3] for name in gates_used(rule)):
        return False
    if rule.objective == "l2" and rule.update == "momentum":
        # Titans' memory with a matrix: chunk.py leaves it to scaled_chunk.py (the gradient reads the state)
        return (
            rule.structure.kind == "matrix"
            and (rule.batch, rule.every, rule.window) == (1, 1, 1)
            and (rule.targets, rule.grad) == ("values", "full")
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        )
    return chunk.supports(rule, gates, q)


def apply(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Gates,
    rule: Rule,
    state: MemoryState | None,
    sparams: StructureParams | None = None,
    chunk_size: int = CHUNK,
) -> tuple[Tensor, MemoryState]:
    """q, k: [B, H, T, d_k]; v: [B, H, T, d_v]; state.weights = (M [B, H, d_v, d_k],), None for zeros.
    Returns o [B, H, T, d_v] and the state after the last token, as `chunk.apply`; chunk_size is a power of two >= 16."""
    if state is None:
        state = initial_state(rule, (k.new_zeros(*k.shape[:2], v.shape[-1], k.shape[-1]),))
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 (tl.dot tiles), got {chunk_size}")
    in_dtype = q.dtype
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Inputs already in 16 bits lose nothing to tf32 operands; float32 ones follow torch's matmul setting.
    allow_tf32 = in_dtype in (torch.bfloat16, torch.float16) or torch.backends.cuda.matmul.allow_tf32
    m0 = state.weights[0]
    q, k, v, lr, m = (t.to(dtype) for t in (q, k, v, gates.lr, m0))

    # Per-token retention in log space; a gate of exactly 0 is clamped to the smallest normal number.
    tiny = torch.finfo(dtype).tiny
    if rule.retention == "decay":
        log_keep = gates.alpha.to(dtype).clamp_min(tiny).log()
    elif rule.retention == "weight_decay":
        log_keep = (1 - gates.lam.to(dtype)).clamp_min(tiny).log()
    else:
        log_keep = None

    if rule.update == "momentum":
        z0 = torch.zeros_like(m) if state.momentum is None else state.momentum[0].to(dtype)
        log_beta = gates.beta.to(dtype).clamp_min(tiny).log()
        log_keep = torch.zeros_like(lr) if log_keep is None else log_keep
        o, m_last, z_last = _chunked_momentum(q, k, v, lr, log_keep, log_beta, rule, m, z0, chunk_size, allow_tf32)
        new_state = state.replace(weights=(m_last.to(m0.dtype),), momentum=(z_last.to(m0.dtype),), pos=state.pos + q.shape[2])
        return o.to(in_dtype), new_state
    if rule.grad == "stop":
        # Writes off the graph; reads see M_0 + sg(M_t - M_0), so they stay differentiable in q and M_0.
        detached_keep = None if log_keep is None else log_keep.detach()
        o, m_last = _chunked(q, k.detach(), v.detach(), lr.detach(), detached_keep, rule, m.detach(), chunk_size, allow_tf32)
        o = o + torch.einsum("bhvk,bhtk->bhtv", m - m.detach(), q)  # adds 0, routes dL/do to M_0
        m_last = m + (m_last - m.detach())
    else:
        o, m_last = _chunked(q, k, v, lr, log_keep, rule, m, chunk_size, allow_tf32)
    new_state = state.replace(weights=(m_last.to(m0.dtype),), pos=state.pos + q.shape[2])
    return o.to(in_dtype), new_state


def _padded(t: Tensor, pad: int) -> Tensor:
    """[B, H, T, ...] -> [B, H, T + pad, ...], contiguous; padding tokens carry zeros: no write, no erase, full retention."""
    return F.pad(t, (0, 0) * (t.dim() - 3) + (0, pad)).contiguous()


def _local_cumsum(t: Tensor, chunk_size: int) -> Tensor:
    """Inclusive cumulative sum of [B, H, T] within each chunk (chunk-local, so differences stay well conditioned)."""
    return t.unflatten(-1, (-1, chunk_size)).cumsum(-1).flatten(-2)


def _chunked(q, k, v, lr, log_keep, rule: Rule, m0: Tensor, chunk_size: int, allow_tf32: bool) -> tuple[Tensor, Tensor]:
    """Reads [B, H, T, d_v] and the final M [B, H, d_v, d_k] for per-head lr and log retention [B, H, T] (or None)."""
    batch, heads, length, _ = q.shape
    if length == 0:
        return v.new_zeros(batch, heads, 0, m0.shape[-2]), m0

    # Erase rate: l2 gd erases with lr; dgd adds its own -lr P k k^T term on top of the gradient's.
    if rule.objective == "l2":
        erase = 2 * lr if rule.update == "dgd" else lr
    else:
        erase = lr if rule.update == "dgd" else None

    pad = -length % chunk_size

    def padded(t: Tensor) -> Tensor:
        return _padded(t, pad)

    g = g_erase = None
    if log_keep is not None:
        log_keep = padded(log_keep)  # [B, H, T']
        g = _local_cumsum(log_keep, chunk_size)
        # decay takes the gradient at the decayed state (inclusive cumsum); weight decay at S_{t-1} (exclusive)
        g_erase = None if rule.retention == "decay" or erase is None else g - log_keep
    s0 = m0.transpose(-1, -2).contiguous()  # [B, H, d_k, d_v]
    o, s, _ = chunk_forward(padded(q), padded(k), padded(v), padded(lr), None if erase is None else padded(erase), g, g_erase, s0, chunk_size, allow_tf32)
    return o[:, :, :length], s.transpose(-1, -2)


def _chunked_momentum(q, k, v, lr, log_keep, log_beta, rule: Rule, m0, z0, chunk_size: int, allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Momentum on linear attention (`chunk._chunked_momentum`'s recurrence) or on the l2 objective
    (`scaled_chunk.py` at window 1): reads [B, H, T, d_v], the final M and the final momentum S ([B, H, d_v, d_k] each)."""
    batch, heads, length, _ = q.shape
    if length == 0:
        return v.new_zeros(batch, heads, 0, m0.shape[-2]), m0, z0
    pad = -length % chunk_size

    def padded(t: Tensor) -> Tensor:
        return _padded(t, pad)

    # padding keeps adding the momentum into X: the kernels take the final state after the last real token
    log_keep = padded(log_keep)
    g, b = _local_cumsum(log_keep, chunk_size), _local_cumsum(padded(log_beta), chunk_size)
    g_point = None
    if rule.objective == "l2":
        # l2 takes the gradient at p_t S_{t-1}: p_t = alpha_t with decay (log p_t + g_{t-1} = g_t), else 1
        g_point = g if rule.retention == "decay" else g - log_keep
    s0 = torch.stack((m0, z0), dim=2).transpose(-1, -2).contiguous()  # [B, H, 2, d_k, d_v]
    o, s, _ = momentum_forward(padded(q), padded(k), padded(v), padded(lr), g, b, g_point, s0, chunk_size, length, allow_tf32)
    x, z = s.transpose(-1, -2).unbind(2)  # [B, H, d_v, d_k] each
    return o[:, :, :length], x, z
