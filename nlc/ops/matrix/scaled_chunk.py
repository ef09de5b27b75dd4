"""Chunked matrix memories whose state is only scaled between writes: windows and l2 with momentum.

With `window = c` each step writes the gradient of the last c tokens' errors at one point, a rank-c update
that the delta-rule recurrence of `chunk.py` (rank one per step) does not cover; with `l2` and momentum the
gradient reads the state that the momentum feeds. Both are linear recurrences whose homogeneous part is a
per-head scalar per token (retention a_t, momentum beta_t), so every state in a chunk is the chunk-start
state and momentum times scalars plus a scalar-weighted sum of the chunk's writes (README.md, "Windows and
momentum with l2"). On the transposed state S = M^T ([d_k, d_v]), per token t with window keys K_t [c, d_k]:

    E_t = V_t - p_t K_t S_{t-1}              the window's errors at the gradient point p_t S_{t-1}
    gd:        S_t = a_t S_{t-1} + eta_t K_t^T E_t
    momentum:  Z_t = beta_t Z_{t-1} + eta_t K_t^T E_t,  S_t = a_t S_{t-1} + Z_t

A chunk of C tokens becomes C*c "virtual" rows, one per (token, window slot); the errors solve one
unit-lower-triangular system per chunk, computed for all chunks at once; a short loop over chunks carries
S and Z; plain autograd differentiates it. Covers `dot` and `l2`, `gd` and `momentum`, every retention and
window, with per-head gates, `targets = values`, `grad = full`, batch 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nlc.ops.matrix.chunk import decay_matrix
from nlc.ops.matrix.recurrent import carried_window, with_past
from nlc.ops.memory.naive import check_rule, gates_used, initial_state
from nlc.ops.memory.rule import Gates, MemoryState, Rule, StructureParams

NAME = "matrix.scaled_chunk"
CHUNK = 64  # tokens per chunk without a window
WINDOW_ROWS = 32  # virtual rows per chunk with one (the solve grows with their cube): WINDOW_ROWS // window tokens


def supports(rule: Rule, gates: Gates, q: Tensor) -> bool:
    """Matrix memories at batch = every = 1 with dot or l2 on the values, gd or momentum, grad = full, float32
    or float64, every gate per head."""
    if rule.structure.kind != "matrix" or (rule.batch, rule.every) != (1, 1):
        return False
    if rule.objective not in ("dot", "l2") or rule.targets != "values" or rule.grad != "full":
        return False
    if rule.update not in ("gd", "momentum") or q.dtype not in (torch.float32, torch.float64):
        return False
    return all(getattr(gates, name) is not None and getattr(gates, name).dim() == 3 for name in gates_used(rule))


def apply(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Gates,
    rule: Rule,
    state: MemoryState | None,
    sparams: StructureParams | None = None,
) -> tuple[Tensor, MemoryState]:
    """Reads `o [B, H, T, d_v]` and the state after the last token, as `memory_naive`. q, k `[B, H, T, d_k]`,
    v `[B, H, T, d_v]`; `state = None` starts from zeros."""
    B, H, T, d_k = k.shape
    if state is None:
        state = initial_state(rule, (k.new_zeros(B, H, v.shape[-1], d_k),))
    m0 = state.weights[0]
    d_v = m0.shape[-2]
    check_rule(rule, gates, q, k, v, d_out=d_v)
    z0 = None
    if rule.update == "momentum":
        z0 = torch.zeros_like(m0) if state.momentum is None else state.momentum[0]
    if T == 0:
        return q.new_zeros(B, H, 0, d_v), state.replace(momentum=None if z0 is None else (z0,))

    def flat(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.flatten(0, 1)

    # Keys and values with the window - 1 before the first token (carried, or zeros before the stream start)
    reach = rule.window - 1
    k_all = with_past(flat(k), flat(state.recent.get("k")), reach)  # [BH, reach + T, d_k]
    v_all = with_past(flat(v), flat(state.recent.get("v")), reach)  # [BH, reach + T, d_v]

    # Per-token scalars in log space; a gate of exactly 0 is clamped to the smallest normal number.
    tiny = torch.finfo(q.dtype).tiny
    log_point = log_keep = torch.zeros_like(flat(gates.lr))  # [BH, T]
    if rule.retention == "decay":
        log_point = log_keep = flat(gates.alpha).clamp_min(tiny).log()  # the gradient is taken at a_t S_{t-1}
    elif rule.retention == "weight_decay":
        log_keep = (1 - flat(gates.lam)).clamp_min(tiny).log()
    log_beta = flat(gates.beta).clamp_min(tiny).log() if z0 is not None else None
    per_token = {"q": flat(q), "lr": flat(gates.lr), "log_point": log_point, "log_keep": log_keep, "log_beta": log_beta}

    s = m0.flatten(0, 1).transpose(-1, -2)  # [BH, d_k, d_v]
    z = None if z0 is None else z0.flatten(0, 1).transpose(-1, -2)
    size = CHUNK if rule.window == 1 else max(1, WINDOW_ROWS // rule.window)
    whole = T - T % size
    outs = []
    # the whole chunks in one group, the remainder as one shorter chunk: no padding, which momentum would not ignore
    for start, stop, chunk in ((0, whole, size), (whole, T, T - whole)):
        if stop > start:
            part = {n: None if x is None else x[:, start:stop] for n, x in per_token.items()}
            part["k_all"], part["v_all"] = k_all[:, start : stop + reach], v_all[:, start : stop + reach]
            o, s, z = _chunks(part, chunk, rule.window, rule.objective == "l2", s, z)
            outs.append(o)

    o = torch.cat(outs, dim=1).reshape(B, H, T, d_v)
    new_state = state.replace(
        weights=(s.transpose(-1, -2).unflatten(0, (B, H)),),
        momentum=None if z is None else (z.transpose(-1, -2).unflatten(0, (B, H)),),
        pos=state.pos + T,
        recent=carried_window(rule, state.recent, k, v, gates),
    )
    return o, new_state


def _chunks(tokens: dict, size: int, window: int, l2: bool, s: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Reads [BH, L, d_v] for L tokens cut into chunks of `size`, and the final S and Z [BH, d_k, d_v].
    tokens: q [BH, L, d_k]; lr and log_* [BH, L] (log_beta None without momentum); k_all, v_all
    [BH, window - 1 + L, d] (the keys and values from window - 1 tokens before the first one).

    A chunk's window keys are the rows of its extended keys K_x [C + c - 1, d_k] picked by `slot`: virtual row
    (t, i) is key t + i of K_x. Products of keys are formed once per pair of tokens and picked, and writes are
    summed per key before they meet K_x, so a window costs little more than its C + c - 1 distinct keys."""
    c = window
    BH, L, _ = tokens["q"].shape
    n_chunks, extended = L // size, size + c - 1
    slot = (torch.arange(size)[:, None] + torch.arange(c)).flatten().to(s.device)  # [Cc]

    def chunked(x: Tensor) -> Tensor:
        return x.reshape(BH, n_chunks, size, *x.shape[2:])

    def spread(m: Tensor) -> Tensor:
        """[..., C] over tokens -> [..., C * c] over virtual rows (each token's window slots)."""
        return m.repeat_interleave(c, dim=-1)

    q = chunked(tokens["q"])  # [BH, N, C, d_k]
    keys = tokens["k_all"].unfold(1, extended, size).transpose(-1, -2)  # [BH, N, C + c - 1, d_k]
    values = tokens["v_all"].unfold(1, extended, size).transpose(-1, -2)[:, :, slot]  # [BH, N, Cc, d_v]
    point = chunked(tokens["log_point"]).exp()  # [BH, N, C]
    lr = chunked(tokens["lr"])  # [BH, N, C]

    # Within a chunk: S_t = a_t S_0 + zeta_t Z_0 + sum_{j<=t} D[t, j] lr_j K_j^T E_j
    g = chunked(tokens["log_keep"]).cumsum(-1)  # [BH, N, C]
    coef = decay_matrix(g, g, 0)  # [BH, N, C, C]  retention products from token j to token t
    zeta = None
    if z is not None:
        b = chunked(tokens["log_beta"]).cumsum(-1)  # [BH, N, C]
        zeta = (coef @ b.exp()[..., None])[..., 0]  # [BH, N, C]  weight of Z_0 in S_t
        coef = coef @ decay_matrix(b, b, 0)  # sum over s in [j, t] of a-products (t..s) times beta-products (s..j)
        z_keep = b[..., -1].exp()  # [BH, N]
        z_write = spread((b[..., -1:] - b).exp() * lr)  # [BH, N, Cc]  weight of each row's write in Z_C
    keep = g.exp()  # [BH, N, C]  weight of S_0 in S_t
    coef = coef * lr[..., None, :]  # the write rate of token j folded into its column
    s_write = spread(coef[..., -1, :])  # [BH, N, Cc]  weight of each row's write in S_C

    if l2:
        # E = V - p K S_{t-1}: (I + A) E = V - p (a_{t-1} K S_0 + zeta_{t-1} K Z_0), A strictly lower by token
        gram = (keys @ keys.transpose(-1, -2))[..., slot, :][..., slot]  # [BH, N, Cc, Cc]
        before = F.pad(coef[..., :-1, :], (0, 0, 1, 0))  # [BH, N, C, C]  D[t - 1, j] lr_j, zero in row 0
        mix = gram * spread(point[..., None] * before).repeat_interleave(c, dim=-2)
        identity = torch.eye(size * c, dtype=mix.dtype, device=mix.device)
        solve = torch.linalg.solve_triangular(mix, identity.expand_as(mix), upper=False, unitriangular=True)
        from_s = spread(point * F.pad(keep[..., :-1], (1, 0), value=1.0))  # [BH, N, Cc]  p_t a_{t-1}
        if z is not None:
            from_z = spread(point * F.pad(zeta[..., :-1], (1, 0)))  # [BH, N, Cc]  p_t zeta_{t-1}

    def summed_per_key(weight: Tensor, errors: Tensor) -> Tensor:
        """sum over the virtual rows of each key of weight * error: [BH, Cc] x [BH, Cc, d_v] -> [BH, C + c - 1, d_v]"""
        return errors.new_zeros(BH, extended, errors.shape[-1]).index_add(1, slot, errors * weight[..., None])

    # unbound once: indexing chunk n of a tensor in the loop would cost a full-size gradient per chunk
    chunk_keys, chunk_values, keep_last, s_writes = keys.unbind(1), values.unbind(1), keep[:, :, -1].unbind(1), s_write.unbind(1)
    if l2:
        solves, from_ss = solve.unbind(1), from_s.unbind(1)
    if z is not None:
        zeta_last, z_keeps, z_writes = zeta[:, :, -1].unbind(1), z_keep.unbind(1), z_write.unbind(1)
        if l2:
            from_zs = from_z.unbind(1)
    starts_s, starts_z, errors = [], [], []
    for n in range(n_chunks):
        starts_s.append(s)
        key_t = chunk_keys[n].transpose(-1, -2)  # [BH, d_k, C + c - 1]
        error = chunk_values[n]  # [BH, Cc, d_v]; dot: E = V whatever the state
        if l2:
            read = from_ss[n][..., None] * (chunk_keys[n] @ s)[:, slot]
            if z is not None:
                read = read + from_zs[n][..., None] * (chunk_keys[n] @ z)[:, slot]
            error = solves[n] @ (error - read)
        errors.append(error)
        s_next = keep_last[n][:, None, None] * s + key_t @ summed_per_key(s_writes[n], error)
        if z is not None:
            starts_z.append(z)
            s_next = s_next + zeta_last[n][:, None, None] * z
            z = z_keeps[n][:, None, None] * z + key_t @ summed_per_key(z_writes[n], error)
        s = s_next

    errors = torch.stack(errors, dim=1)  # [BH, N, Cc, d_v]
    local = (q @ keys.transpose(-1, -2))[..., slot] * spread(coef)  # [BH, N, C, Cc]
    o = (q * keep[..., None]) @ torch.stack(starts_s, dim=1) + local @ errors  # [BH, N, C, d_v]
    if z is not None:
        o = o + (q * zeta[..., None]) @ torch.stack(starts_z, dim=1)
    return o.flatten(1, 2), s, z
