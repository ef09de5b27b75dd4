"""Matrix memories token by token, with the inner gradient in closed form.

For a matrix memory `y = P k` the gradient of every in-context objective is `g = f'(P K - V) Kᵀ`, summed
over the window's tokens, with `f'` elementwise (README.md, "Recurrent path"). This path runs the oracle's
token loop (`nlc/ops/memory/naive.py`) with that formula in place of the double autograd, batched over
batch and heads, and lets ordinary autograd differentiate through the loop. It covers every matrix rule
with `batch = every = 1`: any objective, window, targets, retention and update (muon and dgd included),
per-head or per-channel gates, `grad = stop`. Exact, and slower than `chunk.py` where that one applies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nlc.ops.memory.naive import HEAD_ONLY_GATES, LP_EPS, check_rule, gates_used, initial_state
from nlc.ops.memory.rule import Gates, MemoryState, Rule, StructureParams, detach_state
from nlc.ops.memory.structure import newton_schulz

NAME = "matrix.recurrent"


def supports(rule: Rule, gates: Gates, q: Tensor) -> bool:
    """Matrix memories with batch = every = 1, float32 or float64, gates per head or (but delta) per channel."""
    if rule.structure.kind != "matrix" or rule.batch != 1 or rule.every != 1:
        return False
    if rule.objective not in ("dot", "l2", "lp", "huber") or q.dtype not in (torch.float32, torch.float64):
        return False
    for name in gates_used(rule):
        gate = getattr(gates, name)
        if gate is None or gate.dim() not in (3, 4) or (gate.dim() == 4 and name in HEAD_ONLY_GATES):
            return False
    return True


def descent(rule: Rule, point: Tensor, keys: Tensor, target: Tensor, delta: Tensor | None) -> Tensor:
    """-dl/dy at y = P K, elementwise in the error e = target - y: the same function as the oracle's autograd.
    point `[BH, d_v, d_k]`, keys `[BH, d_k, N]`, target `[BH, d_v, N]`, delta `[BH, 1, N]`."""
    if rule.objective == "dot":
        return target
    error = torch.baddbmm(target, point, keys, alpha=-1)  # target - P K: [BH, d_v, N]
    if rule.objective == "l2":
        return error
    if rule.objective == "lp":
        return error * (error.square() + LP_EPS).pow(rule.p / 2 - 1)
    if rule.objective == "huber":
        return torch.where(error.abs() <= delta, error, delta * error.sign())
    raise ValueError(f"unknown objective {rule.objective!r}")


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
    B, H, _, d_k = k.shape
    if state is None:
        state = initial_state(rule, (k.new_zeros(B, H, v.shape[-1], d_k),))
    m0 = state.weights[0]
    check_rule(rule, gates, q, k, v, d_out=m0.shape[-2])
    if rule.grad == "stop":
        # writes off the graph (every input to them is cut); reads see M_0 + sg(M_t - M_0)
        gates = Gates(**{name: None if g is None else g.detach() for name, g in vars(gates).items()})
        k, v, cut = k.detach(), v.detach(), detach_state(state)
        return scan_tokens(q, k, v, gates, rule, cut, reattach=m0)
    return scan_tokens(q, k, v, gates, rule, state, reattach=None)


def with_past(x: Tensor, recent: Tensor | None, reach: int, fill: float = 0.0) -> Tensor:
    """`x` `[BH, T, d]` preceded by its last `reach` entries before the call: the carried `recent` ones
    `[BH, n, d]`, and `fill` for those before the stream start, `[BH, reach + T, d]`."""
    parts = [x] if recent is None else [recent, x]
    missing = reach - (0 if recent is None else recent.shape[1])
    if missing > 0:
        parts.insert(0, x.new_full((x.shape[0], missing, x.shape[2]), fill))
    return torch.cat(parts, dim=1)


def windows(x: Tensor, recent: Tensor | None, keep: int, fill: float) -> Tensor:
    """Each token's window of the last `keep + 1` entries of `x` `[BH, T, d]` (see `with_past`), as
    `[BH, T, d, keep + 1]` (a view). With a zero key, an entry before the stream start adds nothing to the gradient."""
    return with_past(x, recent, keep, fill).unfold(1, keep + 1, 1)  # [BH, T, d, window]


def carried_window(rule: Rule, recent: dict[str, Tensor], k: Tensor, v: Tensor, gates: Gates) -> dict[str, Tensor]:
    """The last `window - 1` keys and values (and huber thresholds) of the stream so far, `[B, H, n, d]`:
    what the next call's first windows reach back to."""
    keep = rule.window - 1
    if keep == 0:
        return {}
    latest = {"k": k, "v": v}
    if rule.objective == "huber":
        latest["delta"] = gates.delta
    return {n: (torch.cat([recent[n], x], dim=2) if n in recent else x)[:, :, -keep:] for n, x in latest.items()}


def per_token(gate: Tensor) -> Tensor:
    """A gate `[B, H, T]` or `[B, H, T, d_k]` as `[BH, T, 1, 1]` or `[BH, T, 1, d_k]`: it broadcasts over a
    weight `[BH, d_v, d_k]` one per head, or per key channel (columns)."""
    shaped = gate[..., None, None] if gate.dim() == 3 else gate[..., None, :]
    return shaped.flatten(0, 1)


def scan_tokens(q, k, v, gates, rule, state, reattach):
    """The token loop of `naive.scan_tokens` for batch = every = 1, batched over BH = batch x heads, on the
    window layout `[BH, d, window]`: with the error e = target - P K, g = -e Kᵀ. Each write is one fused
    matmul-add: the lr is folded into the keys it multiplies (columns, so per channel too)."""
    B, H, T, _ = q.shape
    d_v = state.weights[0].shape[-2]
    keep = rule.window - 1
    weights = state.weights[0].flatten(0, 1)  # [BH, d_v, d_k]
    momentum = None
    if rule.update in ("momentum", "muon"):
        momentum = torch.zeros_like(weights) if state.momentum is None else state.momentum[0].flatten(0, 1)
    if T == 0:
        # nothing written: the weights come back as given (reattached to M_0 for grad = stop, as the oracle does)
        new_weights = state.weights[0] if reattach is None else reattach + (state.weights[0] - reattach.detach())
        momentum = None if momentum is None else (momentum.unflatten(0, (B, H)),)
        return q.new_zeros(B, H, 0, d_v), state.replace(weights=(new_weights,), momentum=momentum)

    def flat(x):
        return None if x is None else x.flatten(0, 1)

    recent = state.recent
    key_windows = windows(flat(k), flat(recent.get("k")), keep, 0.0)  # [BH, T, d_k, window]
    value_windows = windows(flat(v), flat(recent.get("v")), keep, 0.0)  # [BH, T, d_v, window]
    lr = per_token(gates.lr)
    if rule.update == "muon":
        write_keys = key_windows.transpose(-1, -2)  # lr scales the orthogonalised momentum instead
        neg_lr = (-lr).unbind(1)
    else:
        write_keys = (key_windows * lr.transpose(-1, -2)).transpose(-1, -2)  # (lr ⊙ K)ᵀ: [BH, T, window, d_k]
    if rule.update == "dgd":
        own_keys = flat(k)[..., None].unbind(1)  # T x [BH, d_k, 1]
        erase_rows = (-(flat(k)[:, :, None, :] * lr)).unbind(1)  # -(lr ⊙ k)ᵀ: T x [BH, 1, d_k]
    if rule.objective == "huber":
        delta = flat(gates.delta)[..., None]  # [BH, T, 1]: one threshold per token, for every value coordinate
        carried = recent.get("delta")
        delta_windows = windows(delta, None if carried is None else flat(carried)[..., None], keep, 1.0).unbind(1)
    alpha = per_token(gates.alpha).unbind(1) if rule.retention == "decay" else None
    keep_rate = per_token(1 - gates.lam).unbind(1) if rule.retention == "weight_decay" else None
    beta = per_token(gates.beta).unbind(1) if momentum is not None else None
    key_windows, value_windows, write_keys = key_windows.unbind(1), value_windows.unbind(1), write_keys.unbind(1)
    queries = flat(q)[..., None].unbind(1)  # T x [BH, d_k, 1]

    outs = []
    for t in range(T):
        point = weights * alpha[t] if alpha is not None else weights
        target = value_windows[t] if rule.targets == "values" else point @ value_windows[t]  # [BH, d_v, window]
        error = descent(rule, point, key_windows[t], target, delta_windows[t] if rule.objective == "huber" else None)
        if alpha is not None:
            kept = point
        elif keep_rate is not None:
            kept = weights * keep_rate[t]
        else:
            kept = weights
        if rule.update in ("gd", "dgd"):
            weights = torch.baddbmm(kept, error, write_keys[t])  # M - lr g
            if rule.update == "dgd":
                weights = torch.baddbmm(weights, point @ own_keys[t], erase_rows[t])  # - lr P k kᵀ, token t's own key
        elif rule.update == "momentum":
            momentum = torch.baddbmm(momentum * beta[t], error, write_keys[t])  # beta S - lr g
            weights = kept + momentum
        else:
            momentum = torch.baddbmm(momentum * beta[t], error, write_keys[t], alpha=-1)  # beta S + g
            weights = torch.addcmul(kept, newton_schulz(momentum, rule.ns_steps), neg_lr[t])
        outs.append(weights @ queries[t])  # [BH, d_v, 1]

    o = torch.stack(outs, dim=1).reshape(B, H, T, d_v)
    weights = weights.unflatten(0, (B, H))
    if reattach is not None:
        # grad = stop: the reads are of M_0 + sg(M_t - M_0); this path read M_t, so M_0's gradient
        # q_t dO_tᵀ is added by a term of value zero
        read_m0 = q.detach() @ reattach.transpose(-1, -2)  # [B, H, T, d_v]
        o = o + (read_m0 - read_m0.detach())
        weights = reattach + (weights - reattach.detach())
    new_state = MemoryState(
        weights=(weights,),
        pos=state.pos + T,
        momentum=None if momentum is None else (momentum.unflatten(0, (B, H)),),
        pending=state.pending,
        last=dict(state.last) if state.pending is not None else {},
        recent=carried_window(rule, recent, k, v, gates),
    )
    return o, new_state
