"""Chunked matrix memories: the delta rule family and linear attention, in exact chunkwise form.

Every rule covered here is one recurrence on the transposed state S = M^T ([d_k, d_v]):

    S_t = a_t S_{t-1} - e_t k_t (k_t^T S_{t-1}^*) + w_t k_t v_t^T,      o_t = S_t^T q_t

with a_t the retention, w_t the write rate, e_t the erase rate and S^* the point the erase reads
(a_t S_{t-1} for decay, S_{t-1} otherwise). The chunk form (README.md) turns each chunk of C tokens
into a few batched matmuls and one unit-lower-triangular inverse; a short loop over chunks carries the
state. The backward is written by hand and runs the same chunk loop in reverse with transposed transitions.
Two variants outside that recurrence use plain autograd over a short chunk loop: linear attention with
momentum (two coupled scalar recurrences) and linear attention with per-channel retention (GLA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nlc.ops.memory.naive import initial_state
from nlc.ops.memory.rule import Gates, MemoryState, Rule, StructureParams

NAME = "matrix.chunk"
CHUNK = 64

# Set by tests: fresh buffers are filled with NaN so that any element never written shows up in the result.
POISON_FRESH_BUFFERS = False


def _fresh(shape, like: Tensor) -> Tensor:
    if POISON_FRESH_BUFFERS:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def decay_matrix(row: Tensor, col: Tensor, diagonal: int) -> Tensor:
    """exp(row_i - col_j) on and below the given diagonal, 0 above it. row, col: [..., C] -> [..., C, C]."""
    size = row.shape[-1]
    keep = torch.ones(size, size, dtype=torch.bool, device=row.device).tril(diagonal)
    return (row[..., :, None] - col[..., None, :]).masked_fill(~keep, float("-inf")).exp()


class ChunkedDelta(torch.autograd.Function):
    """Inputs are chunked: q, k [B, H, N, C, d_k]; v [B, H, N, C, d_v]; write, erase, g, g_erase [B, H, N, C];
    s0 [B, H, d_k, d_v]. g is the chunk-local cumulative log retention (inclusive), None for no retention;
    g_erase the same at the erase point, None when it equals g. erase = None: no erase term (linear attention).
    Returns o [B, H, N, C, d_v] and the final state [B, H, d_k, d_v]."""

    @staticmethod
    def forward(ctx, q, k, v, write, erase, g, g_erase, s0):
        size = q.shape[3]
        gamma, gamma_erase, decay_in, decay_out, decay_last = _decays(g, g_erase, size, q)
        qk = q @ k.transpose(-1, -2)  # [B, H, N, C, C]
        attn = qk * gamma
        written = v * write[..., None]  # [B, H, N, C, d_v]
        keys_out = k if decay_out is None else k * decay_out[..., None]  # [B, H, N, C, d_k]

        if erase is not None:
            # T = (I + diag(e) tril_{-1}(Gamma_erase * K K^T))^{-1}; W = T diag(e gamma_erase) K, U0 = T diag(w) V
            kk = k @ k.transpose(-1, -2)  # [B, H, N, C, C]
            lower = (kk * erase[..., None]).mul_(gamma_erase)
            inverse = _unit_lower_inverse(lower)  # [B, H, N, C, C]
            w_keys = inverse @ (k * _erase_scale(erase, g, g_erase)[..., None])  # [B, H, N, C, d_k]
            u_base = inverse @ written  # [B, H, N, C, d_v]
            # S_{n+1} = (decay_last I - K_out^T W) S_n + K_out^T U0
            transition = (keys_out.transpose(-1, -2) @ w_keys).neg_()  # [B, H, N, d_k, d_k]
            if decay_last is not None:
                transition.diagonal(dim1=-2, dim2=-1).add_(decay_last[..., None])
            else:
                transition.diagonal(dim1=-2, dim2=-1).add_(1.0)
        else:
            kk = inverse = w_keys = transition = None
            u_base = written
        drive = keys_out.transpose(-1, -2) @ u_base  # [B, H, N, d_k, d_v]

        scanned = _scan(s0, drive, transition, decay_last)  # [N + 1, B, H, d_k, d_v]
        states, s = scanned[:-1].movedim(0, 2).contiguous(), scanned[-1]  # states entering each chunk, final

        u = u_base if w_keys is None else _add_matmul(u_base, w_keys, states, alpha=-1)  # [B, H, N, C, d_v] pseudo-values
        q_in = q if decay_in is None else q * decay_in[..., None]
        o = _add_matmul(q_in @ states, attn, u)  # [B, H, N, C, d_v]
        ctx.save_for_backward(q, k, v, write, erase, g, g_erase, states, u, inverse, w_keys, transition, qk, kk)
        return o, s

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, write, erase, g, g_erase, states, u, inverse, w_keys, transition, qk, kk = ctx.saved_tensors
        size = q.shape[3]
        d_o = d_o.contiguous()  # a broadcast gradient (of o.sum(), say) has zero strides: bmm would copy it matrix by matrix
        if d_final is None:
            d_final = torch.zeros_like(states[:, :, 0])
        gamma, gamma_erase, decay_in, decay_out, decay_last = _decays(g, g_erase, size, q)
        attn = qk * gamma
        keys_out = k if decay_out is None else k * decay_out[..., None]
        q_in = q if decay_in is None else q * decay_in[..., None]

        # Reverse scan over chunk states: d_next[n] is the gradient of the state leaving chunk n.
        d_u_local = attn.transpose(-1, -2) @ d_o  # [B, H, N, C, d_v]
        d_s_local = q_in.transpose(-1, -2) @ d_o  # [B, H, N, d_k, d_v]
        if w_keys is not None:
            d_s_local = _add_matmul(d_s_local, w_keys.transpose(-1, -2), d_u_local, alpha=-1)
            transition = transition.transpose(-1, -2)
        scanned = _scan(d_final, d_s_local, transition, decay_last, reverse=True)  # [N + 1, B, H, d_k, d_v]
        d_s0, d_next = scanned[0], scanned[1:].movedim(0, 2).contiguous()
        d_u = _add_matmul(d_u_local, keys_out, d_next)  # [B, H, N, C, d_v]

        # Reads: o = diag(decay_in) Q S_n + (Q K^T * Gamma) U
        d_attn = (d_o @ u.transpose(-1, -2)).mul_(gamma)  # [B, H, N, C, C]
        d_q = d_o @ states.transpose(-1, -2)
        if decay_in is not None:
            d_q.mul_(decay_in[..., None])
        d_q = _add_matmul(d_q, d_attn, k)
        d_k = d_attn.transpose(-1, -2) @ q

        # State updates: S_{n+1} = decay_last S_n + (diag(decay_out) K)^T U
        if decay_out is None:
            d_k = _add_matmul(d_k, u, d_next.transpose(-1, -2))
        else:
            d_keys_out = u @ d_next.transpose(-1, -2)  # [B, H, N, C, d_k]
            d_k = d_k + d_keys_out * decay_out[..., None]

        d_g = None
        if g is not None:
            d_log_gamma = d_attn * qk  # d loss / d (g_i - g_j), for Gamma = exp(g_i - g_j)
            d_g = d_log_gamma.sum(-1) - d_log_gamma.sum(-2)
            d_g = d_g + ((q @ states) * d_o).sum(-1) * decay_in
            d_decay_out = (k * d_keys_out).sum(-1) * decay_out  # d loss / d (g_C - g_i)
            d_g = d_g - d_decay_out
            d_g[..., -1] += d_decay_out.sum(-1) + (states * d_next).sum((-1, -2)) * decay_last

        if erase is None:
            return d_q, d_k, d_u * write[..., None], (v * d_u).sum(-1), None, d_g, None, d_s0

        # U = U0 - W S_n with W = T diag(r) K, U0 = T diag(w) V and T = A^{-1}: d(rhs) = T^T d(solution) and
        # dA = -sum T^T d(solution) solution^T. With dW = -dU S_n^T both collapse onto d_rhs_v:
        # d_rhs_k = -d_rhs_v S_n^T and dA = -d_rhs_v (U0 - W S_n)^T = -d_rhs_v U^T
        d_rhs_v = inverse.transpose(-1, -2) @ d_u  # [B, H, N, C, d_v]
        d_rhs_k = (d_rhs_v @ states.transpose(-1, -2)).neg_()  # [B, H, N, C, d_k]
        d_lower = (d_rhs_v @ u.transpose(-1, -2)).mul_(gamma_erase.neg())  # [B, H, N, C, C]

        rate_keys = _erase_scale(erase, g, g_erase)  # [B, H, N, C]
        d_k.addcmul_(d_rhs_k, rate_keys[..., None])
        d_rate_keys = (k * d_rhs_k).sum(-1)
        d_v = d_rhs_v * write[..., None]
        d_write = (v * d_rhs_v).sum(-1)

        # lower_ij = e_i Gamma_erase_ij (k_i . k_j); d_lower already carries the Gamma_erase factor
        d_kk = d_lower * erase[..., None]
        d_k = d_k + (d_kk + d_kk.transpose(-1, -2)) @ k
        d_erase = (d_lower * kk).sum(-1)
        d_g_erase = None
        if g is None:
            d_erase = d_erase + d_rate_keys
        else:
            scale_erase = (g if g_erase is None else g_erase).exp()
            d_erase = d_erase + d_rate_keys * scale_erase
            d_log_gamma_erase = d_kk * kk  # d loss / d (g_erase_i - g_j)
            d_from_erase = d_rate_keys * rate_keys + d_log_gamma_erase.sum(-1)
            d_g = d_g - d_log_gamma_erase.sum(-2)
            if g_erase is None:
                d_g = d_g + d_from_erase
            else:
                d_g_erase = d_from_erase
        return d_q, d_k, d_v, d_write, d_erase, d_g, d_g_erase, d_s0


def _add_matmul(base: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """base + alpha * (a @ b) for [..., m, k] @ [..., k, n] in one BLAS call, without a separate add pass."""
    flat = [t.reshape(-1, *t.shape[-2:]) for t in (base, a, b)]  # views for contiguous or transposed inputs
    return torch.baddbmm(*flat, alpha=alpha).view(base.shape)


def _unit_lower_inverse(lower: Tensor) -> Tensor:
    """(I + lower)^{-1} for strictly lower-triangular `lower` [..., C, C], C a power of two.

    Recursive block inversion, [[A, 0], [L, B]]^{-1} = [[A^-1, 0], [-B^-1 L A^-1, B^-1]], from 1x1 blocks up:
    forward substitution reorganised into log2(C) rounds of batched matmuls, written in place
    (torch.linalg.solve_triangular on many small systems was slow and erratic on CPU; README.md).
    """
    size = lower.shape[-1]
    lead = lower.shape[:-2]
    inverse = torch.zeros_like(lower)
    inverse.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    block = 1
    while block < size:
        pairs = size // (2 * block)
        # [..., 2b, 2b, pairs]: the 2b x 2b diagonal tiles, as views
        tiles_lower = lower.reshape((*lead, pairs, 2 * block, pairs, 2 * block)).diagonal(dim1=-4, dim2=-2)
        tiles_inverse = inverse.view((*lead, pairs, 2 * block, pairs, 2 * block)).diagonal(dim1=-4, dim2=-2)
        first = tiles_inverse[..., :block, :block, :].movedim(-1, -3)  # [..., pairs, b, b]
        second = tiles_inverse[..., block:, block:, :].movedim(-1, -3)
        below = tiles_lower[..., block:, :block, :].movedim(-1, -3)
        tiles_inverse[..., block:, :block, :].copy_(-(second @ (below @ first)).movedim(-3, -1))
        block *= 2
    return inverse


def _scan(start: Tensor, drive: Tensor, transition: Tensor | None, decay: Tensor | None, reverse: bool = False):
    """The chunk-level recurrence x_{n+1} = A_n x_n + b_n, A_n = transition_n, or decay_n I, or I.

    start [B, H, d_k, d_v]; drive b [B, H, N, d_k, d_v]; transition [B, H, N, d_k, d_k]; decay [B, H, N].
    Returns x [N + 1, B, H, d_k, d_v] with x_0 = start; reverse: x_N = start and x_n = A_n x_{n+1} + b_n.
    One fused op per step, written straight into its slot of the result.
    """
    batch, heads, n_chunks = drive.shape[:3]
    drive = drive.movedim(2, 0).reshape(n_chunks, batch * heads, *drive.shape[3:])  # [N, BH, d_k, d_v]
    out = _fresh((n_chunks + 1, *drive.shape[1:]), drive)  # [N + 1, BH, d_k, d_v]
    first = n_chunks if reverse else 0
    out[first] = start.reshape(drive.shape[1:])
    if transition is None and decay is None:
        totals = drive.flip(0).cumsum(0).flip(0) if reverse else drive.cumsum(0)
        torch.add(totals, out[first], out=out[:-1] if reverse else out[1:])
    else:
        if transition is not None:
            transition = transition.movedim(2, 0).reshape(n_chunks, batch * heads, *transition.shape[3:])
        else:
            decay = decay.movedim(2, 0).reshape(n_chunks, batch * heads, 1, 1)  # [N, BH, 1, 1]
        steps = range(n_chunks - 1, -1, -1) if reverse else range(n_chunks)
        for n in steps:
            src, dst = (n + 1, n) if reverse else (n, n + 1)
            if transition is not None:
                torch.baddbmm(drive[n], transition[n], out[src], out=out[dst])
            else:
                torch.addcmul(drive[n], decay[n], out[src], out=out[dst])
    return out.reshape(n_chunks + 1, batch, heads, *drive.shape[2:])


def _decays(g: Tensor | None, g_erase: Tensor | None, size: int, like: Tensor):
    """Gamma [.., C, C] (inclusive), Gamma_erase (strict), and the per-token decays from the chunk start
    (decay_in), to the chunk end (decay_out) and over the chunk (decay_last); the last three None without g."""
    if g is None:
        ones = torch.ones(size, size, dtype=like.dtype, device=like.device)
        return ones.tril(), ones.tril(-1), None, None, None
    gamma = decay_matrix(g, g, 0)
    gamma_erase = gamma.tril(-1) if g_erase is None else decay_matrix(g_erase, g, -1)
    return gamma, gamma_erase, g.exp(), (g[..., -1:] - g).exp(), g[..., -1].exp()


def _erase_scale(erase: Tensor, g: Tensor | None, g_erase: Tensor | None) -> Tensor:
    """The erase rate times the retention from the chunk start to the erase point: scales the rows of W."""
    if g is None:
        return erase
    return erase * (g if g_erase is None else g_erase).exp()


def _per_head(gate: Tensor | None, q: Tensor) -> bool:
    return gate is not None and gate.shape == q.shape[:3]


def supports(rule: Rule, gates: Gates, q: Tensor) -> bool:
    """True exactly for the rules this path computes as the oracle does (see module docstring)."""
    if rule.structure.kind != "matrix" or (rule.batch, rule.every, rule.window) != (1, 1, 1):
        return False
    if rule.targets != "values" or rule.objective not in ("dot", "l2"):
        return False
    if q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return False
    if rule.update not in ("gd", "dgd", "momentum"):
        return False
    channel_lr = rule.objective == "dot" and rule.update != "dgd" and gates.lr is not None and gates.lr.shape == q.shape
    if not (_per_head(gates.lr, q) or channel_lr):
        return False
    if rule.update == "momentum" and (rule.objective != "dot" or rule.grad != "full" or not _per_head(gates.beta, q)):
        return False  # with l2 the gradient depends on M and momentum is no longer a linear scan
    if rule.retention == "none":
        return True
    keep = gates.alpha if rule.retention == "decay" else gates.lam
    # per-channel retention (GLA-style): linear attention with gd only
    channel_keep = rule.objective == "dot" and rule.update == "gd" and keep is not None and keep.shape == q.shape
    return _per_head(keep, q) or channel_keep


def apply(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Gates,
    rule: Rule,
    state: MemoryState | None,
    sparams: StructureParams | None = None,
) -> tuple[Tensor, MemoryState]:
    """q, k: [B, H, T, d_k]; v: [B, H, T, d_v]; state.weights = (M [B, H, d_v, d_k],), None for zeros.
    Returns o [B, H, T, d_v] and the state after the last token."""
    if state is None:
        state = initial_state(rule, (k.new_zeros(*k.shape[:2], v.shape[-1], k.shape[-1]),))
    in_dtype = q.dtype
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    m0 = state.weights[0]
    q, k, v, lr, m = (t.to(dtype) for t in (q, k, v, gates.lr, m0))
    if lr.dim() == 4:
        # per-channel lr (dot only): the write is v (lr * k)^T and keys enter nothing else, so fold lr into them
        k, lr = k * lr, torch.ones_like(lr[..., 0])

    # Per-token retention in log space; a gate of exactly 0 is clamped to the smallest normal number.
    tiny = torch.finfo(dtype).tiny
    if rule.retention == "decay":
        log_keep = gates.alpha.to(dtype).clamp_min(tiny).log()
    elif rule.retention == "weight_decay":
        log_keep = (1 - gates.lam.to(dtype)).clamp_min(tiny).log()
    else:
        log_keep = torch.zeros_like(lr)

    if rule.update == "momentum":
        z0 = torch.zeros_like(m) if state.momentum is None else state.momentum[0].to(dtype)
        log_beta = gates.beta.to(dtype).clamp_min(tiny).log()
        o, m_last, z_last = _chunked_momentum(q, k, v, lr, log_keep, log_beta, m, z0)
        new_state = state.replace(weights=(m_last.to(m0.dtype),), momentum=(z_last.to(m0.dtype),), pos=state.pos + q.shape[2])
        return o.to(in_dtype), new_state
    if rule.grad == "stop":
        # Writes off the graph; reads see M_0 + sg(M_t - M_0), so they stay differentiable in q and M_0.
        o, m_last = _chunked(q, k.detach(), v.detach(), lr.detach(), log_keep.detach(), rule, m.detach())
        o = o + torch.einsum("bhvk,bhtk->bhtv", m - m.detach(), q)  # adds 0, routes dL/do to M_0
        m_last = m + (m_last - m.detach())
    else:
        o, m_last = _chunked(q, k, v, lr, log_keep, rule, m)
    new_state = state.replace(weights=(m_last.to(m0.dtype),), pos=state.pos + q.shape[2])
    return o.to(in_dtype), new_state


def _chunked(q, k, v, lr, log_keep, rule: Rule, m0: Tensor) -> tuple[Tensor, Tensor]:
    """Reads [B, H, T, d_v] and the final M [B, H, d_v, d_k] for per-head lr [B, H, T] and log retention
    [B, H, T] (or [B, H, T, d_k] for linear attention)."""
    batch, heads, length, _ = q.shape
    if length == 0:
        return v.new_zeros(batch, heads, 0, m0.shape[-2]), m0
    if log_keep.dim() == 4:
        return _chunked_channel_decay(q, k, v, lr, log_keep, m0)

    # Erase rate: l2 gd erases with lr; dgd adds its own -lr P k k^T term on top of the gradient's.
    if rule.objective == "l2":
        erase = 2 * lr if rule.update == "dgd" else lr
    else:
        erase = lr if rule.update == "dgd" else None
    # decay takes the gradient at the decayed state (inclusive cumsum); otherwise at S_{t-1} (exclusive)
    erase_at_decayed = rule.retention == "decay"

    chunk, pad, n_chunks = _chunk_layout(length)

    def chunked(t: Tensor) -> Tensor:
        return _to_chunks(t, chunk, pad)

    if rule.retention == "none":
        g = g_erase = None
    else:
        log_keep = chunked(log_keep)  # [B, H, N, C]
        g = log_keep.cumsum(-1)  # [B, H, N, C] chunk-local, so differences stay well conditioned
        g_erase = None if erase_at_decayed else g - log_keep
    s0 = m0.transpose(-1, -2)  # [B, H, d_k, d_v]
    o, s = ChunkedDelta.apply(chunked(q), chunked(k), chunked(v), chunked(lr), None if erase is None else chunked(erase), g, g_erase, s0)
    o = o.reshape(batch, heads, n_chunks * chunk, -1)[:, :, :length]  # [B, H, T, d_v]
    return o, s.transpose(-1, -2)


def _chunk_layout(length: int, max_chunk: int = CHUNK):
    """Chunk size (a power of two, at most max_chunk), padding and number of chunks for a sequence of `length`."""
    chunk = min(max_chunk, 1 << (length - 1).bit_length())
    pad = -length % chunk
    return chunk, pad, (length + pad) // chunk


def _chunked_channel_decay(q, k, v, lr, log_keep, m0, max_chunk: int = 16) -> tuple[Tensor, Tensor]:
    """Linear attention with per-channel retention (GLA): S_t = diag(a_t) S_{t-1} + lr_t k_t v_t^T, a_t [d_k].

    With G the chunk-local cumulative log retention [C, d_k], the intra-chunk weights are
    sum_c q_ic k_jc exp(G_ic - G_jc): every exponent is <= 0, so they are formed exactly from a
    [C, C, d_k] tensor (hence the shorter chunk) instead of rescaling q and k by exp(+-G), which
    overflows under strong decay. Plain autograd: the chunk loop is one elementwise update per chunk.
    """
    batch, heads, length, _ = q.shape
    chunk, pad, n_chunks = _chunk_layout(length, max_chunk)
    q, k, v, lr = (_to_chunks(t, chunk, pad) for t in (q, k, v, lr))
    g = _to_chunks(log_keep, chunk, pad).cumsum(-2)  # [B, H, N, C, d_k]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()[..., None]  # [C, C, 1]
    decay = (g[..., :, None, :] - g[..., None, :, :]).masked_fill(~causal, float("-inf")).exp()  # [B, H, N, C, C, d_k]
    attn = torch.einsum("bhnic,bhnjc,bhnijc->bhnij", q, k, decay)  # [B, H, N, C, C]
    written = v * lr[..., None]  # [B, H, N, C, d_v]
    drive = (k * (g[..., -1:, :] - g).exp()).transpose(-1, -2) @ written  # [B, H, N, d_k, d_v]
    keep = g[..., -1, :].exp()  # [B, H, N, d_k]

    s = m0.transpose(-1, -2)  # [B, H, d_k, d_v]
    states = []
    for n in range(n_chunks):
        states.append(s)
        s = keep[:, :, n, :, None] * s + drive[:, :, n]
    states = torch.stack(states, dim=2)  # [B, H, N, d_k, d_v]

    o = (q * g.exp()) @ states + attn @ written  # [B, H, N, C, d_v]
    return o.reshape(batch, heads, n_chunks * chunk, -1)[:, :, :length], s.transpose(-1, -2)


def _to_chunks(t: Tensor, chunk: int, pad: int) -> Tensor:
    """[B, H, T, ...] -> [B, H, N, C, ...]; padding tokens carry zeros (no write, full retention)."""
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 3) + (0, pad))
    return t.reshape(t.shape[0], t.shape[1], -1, chunk, *t.shape[3:])


def _chunked_momentum(q, k, v, lr, log_keep, log_beta, m0, z0) -> tuple[Tensor, Tensor, Tensor]:
    """Linear attention with momentum: Z_t = beta_t Z_{t-1} + lr_t k_t v_t^T, X_t = a_t X_{t-1} + Z_t (X = M^T,
    Z = S^T the momentum). The gradient of dot does not depend on M, so both are linear in the inputs' writes:
    within a chunk X_t = gamma_t X_0 + zeta_t Z_0 + sum_{j<=t} c_tj lr_j k_j v_j^T with c = Gamma_a @ Gamma_beta
    and zeta = Gamma_a @ exp(b). Plain autograd: the chunk loop is two scalar-times-matrix updates per chunk.
    Returns reads [B, H, T, d_v], the final M and the final momentum S ([B, H, d_v, d_k] each)."""
    batch, heads, length, _ = q.shape
    if length == 0:
        return v.new_zeros(batch, heads, 0, m0.shape[-2]), m0, z0
    chunk, pad, n_chunks = _chunk_layout(length)

    def chunked(t: Tensor) -> Tensor:
        return _to_chunks(t, chunk, pad)

    q, k, v, lr = chunked(q), chunked(k), chunked(v), chunked(lr)
    g, b = chunked(log_keep).cumsum(-1), chunked(log_beta).cumsum(-1)  # [B, H, N, C]
    gamma = decay_matrix(g, g, 0)  # [B, H, N, C, C]  a-products from token j to token t
    coef = gamma @ decay_matrix(b, b, 0)  # [B, H, N, C, C]  sum over s in [j, t] of Gamma_a[t, s] Gamma_beta[s, j]
    zeta = (gamma @ b.exp()[..., None])[..., 0]  # [B, H, N, C]  weight of Z_0 in X_t
    written = v * lr[..., None]  # [B, H, N, C, d_v]
    local = ((q @ k.transpose(-1, -2)) * coef) @ written  # [B, H, N, C, d_v]
    drive_x = (k * coef[..., -1, :, None]).transpose(-1, -2) @ written  # [B, H, N, d_k, d_v]
    drive_z = (k * (b[..., -1:] - b).exp()[..., None]).transpose(-1, -2) @ written
    keep_x, carry_z, keep_z = g[..., -1].exp(), zeta[..., -1], b[..., -1].exp()  # [B, H, N]

    x, z = m0.transpose(-1, -2), z0.transpose(-1, -2)  # [B, H, d_k, d_v]
    xs, zs = [], []
    for n in range(n_chunks):
        xs.append(x)
        zs.append(z)
        x = keep_x[:, :, n, None, None] * x + carry_z[:, :, n, None, None] * z + drive_x[:, :, n]
        z = keep_z[:, :, n, None, None] * z + drive_z[:, :, n]
    xs, zs = torch.stack(xs, dim=2), torch.stack(zs, dim=2)  # [B, H, N, d_k, d_v]
    if pad:
        # Padding keeps X but would still add the momentum into it: take the final state at the last real token.
        last = chunk - pad - 1
        k_n, w_n, x_n, z_n = k[:, :, -1], written[:, :, -1], xs[:, :, -1], zs[:, :, -1]
        g_n, b_n = g[:, :, -1], b[:, :, -1]  # [B, H, C]
        x = g_n[..., last, None, None].exp() * x_n + zeta[:, :, -1, last, None, None] * z_n
        x = x + (k_n * coef[:, :, -1, last, :, None]).transpose(-1, -2) @ w_n
        z = b_n[..., last, None, None].exp() * z_n + (k_n * (b_n[..., last, None] - b_n).exp()[..., None]).transpose(-1, -2) @ w_n

    o = (q * g.exp()[..., None]) @ xs + (q * zeta[..., None]) @ zs + local  # [B, H, N, C, d_v]
    o = o.reshape(batch, heads, n_chunks * chunk, -1)[:, :, :length]
    return o, x.transpose(-1, -2), z.transpose(-1, -2)
