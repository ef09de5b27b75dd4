"""The oracle: LANGUAGE.md §4 computed literally, one token at a time.

At each token the stated objective is built at the stated gradient point and its gradient taken with
`torch.autograd.grad(..., create_graph=True)`, so the reads are differentiable with respect to q, k, v,
every gate, the initial state and the structure parameters. Slow and obviously right: every fast path
is tested against it. The maths, and the choices made where §4 is silent, are in README.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nlc.ops.memory.rule import Gates, MemoryState, Rule, StructureParams, detach_state, zeros_like_weights
from nlc.ops.memory.structure import apply_structure, newton_schulz

LP_EPS = 1e-6  # lp(p) uses |x| ~ sqrt(x^2 + LP_EPS), smooth at 0
HEAD_ONLY_GATES = ("delta",)  # huber's threshold acts on value coordinates, not keys: one per head


def gates_used(rule: Rule) -> tuple[str, ...]:
    """The `Gates` fields a rule reads (all others must be None or are ignored)."""
    names = ["lr"]
    if rule.update in ("momentum", "muon"):
        names.append("beta")
    if rule.retention == "decay":
        names.append("alpha")
    if rule.retention == "weight_decay":
        names.append("lam")
    if rule.objective == "huber":
        names.append("delta")
    return tuple(names)


def check_rule(rule: Rule, gates: Gates, q: Tensor, k: Tensor, v: Tensor, d_out: int) -> None:
    """Raise ValueError for a combination the ops do not define."""
    if rule.objective == "task":
        raise ValueError(
            "objective 'task' is not an in-context objective: a CMS level with a task objective is written by the layer from the outer loss, not by nlc.ops"
        )
    if rule.window < 1 or rule.batch < 1 or rule.every < 1:
        raise ValueError(f"window, batch and every must be at least 1, got {rule.window}, {rule.batch}, {rule.every}")
    if rule.every > 1 and rule.every % rule.batch != 0:
        raise ValueError(f"every = {rule.every} already takes every gradient at the chunk start; batch = {rule.batch} must be 1 or divide it")
    if rule.targets == "self" and k.shape[-1] != d_out:
        raise ValueError(f"targets = self feeds values to the memory: needs d_k == d_out, got {k.shape[-1]}, {d_out}")
    if rule.targets == "values" and v.shape[-1] != d_out:
        raise ValueError(f"the memory outputs width {d_out} but the values have width {v.shape[-1]}")
    B, H, T, d_k = k.shape
    if q.shape != k.shape or tuple(v.shape[:3]) != (B, H, T):
        raise ValueError(f"q, k must be [B, H, T, d_k] and v [B, H, T, d_v], got {q.shape}, {k.shape}, {v.shape}")
    for name in gates_used(rule):
        gate = getattr(gates, name)
        if gate is None:
            raise ValueError(f"rule {describe(rule)} needs the gate {name!r}, got None")
        if tuple(gate.shape[:3]) != (B, H, T) or gate.dim() not in (3, 4):
            raise ValueError(f"gate {name!r} must be [B, H, T] or [B, H, T, d_k], got {tuple(gate.shape)}")
        if gate.dim() == 4:
            if rule.structure.kind != "matrix" or name in HEAD_ONLY_GATES:
                raise ValueError(f"gate {name!r} cannot be per channel here: per-channel gates are for matrix memories")
            if gate.shape[-1] != d_k:
                raise ValueError(f"per-channel gate {name!r} must have width d_k = {d_k}, got {gate.shape[-1]}")


def describe(rule: Rule) -> str:
    """A short name of the combination, for warnings and errors."""
    s = rule.structure
    parts = [s.kind if s.kind != "mlp" else f"mlp(depth={s.depth},act={s.act})"]
    if s.residual:
        parts.append("residual")
    if s.norm != "none":
        parts.append(f"norm={s.norm}")
    parts += [rule.objective if rule.objective != "lp" else f"lp({rule.p})", rule.retention, rule.update]
    for name in ("window", "batch", "every"):
        if getattr(rule, name) != 1:
            parts.append(f"{name}={getattr(rule, name)}")
    if rule.targets != "values":
        parts.append("targets=self")
    if rule.grad != "full":
        parts.append("grad=stop")
    return "/".join(parts)


def named_tensors(x, name: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor inside x (tensors, tuples, dicts, Gates, StructureParams, MemoryState), named by its path,
    in a fixed order."""
    if isinstance(x, Tensor):
        return [(name, x)]
    found = []
    if isinstance(x, (tuple, list)):
        for i, item in enumerate(x):
            found += named_tensors(item, f"{name}[{i}]")
    elif isinstance(x, dict):
        for key in sorted(x):
            found += named_tensors(x[key], f"{name}.{key}" if name else str(key))
    elif isinstance(x, (Gates, StructureParams, MemoryState)):
        for key, item in vars(x).items():
            found += named_tensors(item, f"{name}.{key}" if name else key)
    return found


def initial_state(rule: Rule, weights: tuple[Tensor, ...]) -> MemoryState:
    """The state at the start of a stream: the given weights, zero momentum when the update keeps one."""
    weights = tuple(weights)
    momentum = zeros_like_weights(weights) if rule.update in ("momentum", "muon") else None
    return MemoryState(weights=weights, momentum=momentum)


def scale(x: Tensor, gate: Tensor) -> Tensor:
    """A weight `[B, H, out, in]` times a gate per head `[B, H]` or per key channel `[B, H, in]` (columns)."""
    if gate.dim() == 2:
        return x * gate[:, :, None, None]
    return x * gate[:, :, None, :]


def objective(rule: Rule, y: Tensor, target: Tensor, delta: Tensor | None) -> Tensor:
    """The objective summed over batch, heads and the window's tokens. y, target: `[B, H, N, d_out]`."""
    if rule.objective == "dot":
        return -(y * target).sum()
    r = y - target
    if rule.objective == "l2":
        return 0.5 * r.square().sum()
    if rule.objective == "lp":
        return (r.square() + LP_EPS).pow(rule.p / 2).sum() / rule.p
    if rule.objective == "huber":
        d = delta[..., None]  # [B, H, N] -> [B, H, N, 1]
        a = r.abs()
        return torch.where(a <= d, 0.5 * r.square(), d * (a - 0.5 * d)).sum()
    raise ValueError(f"unknown objective {rule.objective!r}")


def token_gradient(
    rule: Rule,
    point: tuple[Tensor, ...],
    keys: Tensor,
    values: Tensor,
    delta: Tensor | None,
    sparams: StructureParams | None,
    create_graph: bool,
) -> tuple[Tensor, ...]:
    """g = grad_M of the objective over the window's tokens `[B, H, N, d]`, evaluated at M = point.

    Taken in two steps, dl/dy then the vector-Jacobian product through M(keys), so that self-generated
    targets are constants of the inner gradient yet stay in the outer graph.
    """
    with torch.enable_grad():
        point = tuple(p if p.requires_grad else p.detach().requires_grad_() for p in point)
        y = apply_structure(rule.structure, point, keys, sparams)  # [B, H, N, d_out]
        target = values if rule.targets == "values" else apply_structure(rule.structure, point, values, sparams)
        loss = objective(rule, y, target, delta)
        (dl_dy,) = torch.autograd.grad(loss, y, create_graph=create_graph, retain_graph=True)
        return torch.autograd.grad(y, point, grad_outputs=dl_dy, create_graph=create_graph)


def dgd_term(rule: Rule, point: tuple[Tensor, ...], k_t: Tensor, sparams: StructureParams | None) -> tuple[Tensor, ...]:
    """W h h^T for each weight W of the gradient point; h is k_t for a matrix memory, else the weight's
    own (l2-normalised) layer input on k_t. k_t: `[B, H, 1, d_k]`."""
    _, inputs = apply_structure(rule.structure, point, k_t, sparams, return_inputs=True)
    if rule.structure.kind != "matrix":
        inputs = [F.normalize(h, dim=-1) for h in inputs]
    # (W h) h^T: [B, H, out, 1] @ [B, H, 1, in] -> [B, H, out, in]
    return tuple((h @ w.transpose(-1, -2)).transpose(-1, -2) @ h for w, h in zip(point, inputs))


def write(rule: Rule, weights, momentum, step, gates: dict[str, Tensor]):
    """One step of the update and retention. `step` is eta * g (gd, momentum, dgd) or the raw g (muon,
    whose lr scales the orthogonalised momentum). Returns (weights, momentum)."""
    if rule.update in ("gd", "dgd"):
        change = tuple(-s for s in step)
    elif rule.update == "momentum":
        momentum = tuple(scale(m, gates["beta"]) - s for m, s in zip(momentum, step))
        change = momentum
    elif rule.update == "muon":
        momentum = tuple(scale(m, gates["beta"]) + s for m, s in zip(momentum, step))
        change = tuple(-scale(newton_schulz(m, rule.ns_steps), gates["lr"]) for m in momentum)
    else:
        raise ValueError(f"unknown update {rule.update!r}")

    if rule.retention == "none":
        kept = weights
    elif rule.retention == "weight_decay":
        kept = tuple(scale(w, 1 - gates["lam"]) for w in weights)
    elif rule.retention == "decay":
        kept = tuple(scale(w, gates["alpha"]) for w in weights)
    else:
        raise ValueError(f"unknown retention {rule.retention!r}")
    return tuple(w + u for w, u in zip(kept, change)), momentum


def memory_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Gates,
    rule: Rule,
    state: MemoryState | None,
    sparams: StructureParams | None = None,
) -> tuple[Tensor, MemoryState]:
    """Reads `o [B, H, T, d_out]` and the state after the last token. q, k `[B, H, T, d_k]`, v `[B, H, T, d_v]`.

    `state = None` starts a matrix memory from zeros.
    """
    if state is None:
        if rule.structure.kind != "matrix":
            raise ValueError("a network memory needs an initial state (its weights)")
        B, H, _, d_k = k.shape
        state = initial_state(rule, (k.new_zeros(B, H, v.shape[-1], d_k),))
    check_rule(rule, gates, q, k, v, d_out=state.weights[-1].shape[-2])
    if rule.grad == "full":
        create_graph = torch.is_grad_enabled() and any(t.requires_grad for _, t in named_tensors((q, k, v, gates, state, sparams)))
        return scan_tokens(q, k, v, gates, rule, state, sparams, sparams, reattach=None, create_graph=create_graph)
    # grad = stop: every write is computed off the graph; the read state is M_0 + sg(M_t - M_0), so reads
    # stay differentiable with respect to q, the initial weights M_0 and the structure parameters.
    cut_gates = Gates(**{name: None if g is None else g.detach() for name, g in vars(gates).items()})
    cut_sparams = None if sparams is None else StructureParams(*(None if p is None else p.detach() for p in (sparams.norm_weight, sparams.norm_bias)))
    return scan_tokens(q, k.detach(), v.detach(), cut_gates, rule, detach_state(state), cut_sparams, sparams, state.weights, False)


def scan_tokens(q, k, v, gates, rule, state, write_sparams, read_sparams, reattach, create_graph):
    """The token loop. Writes use `write_sparams`, reads `read_sparams`; with `reattach` (the call's initial
    weights M_0, for grad = stop) the weights read and returned are M_0 + sg(M_t - M_0)."""
    B, H, T, _ = q.shape
    names = gates_used(rule)
    weights, momentum, anchor = state.weights, state.momentum, state.anchor
    pending, last, recent = state.pending, dict(state.last), dict(state.recent)
    if rule.update in ("momentum", "muon") and momentum is None:
        momentum = zeros_like_weights(weights)
    if rule.every == 1 and rule.batch > 1 and state.pos % rule.batch != 0 and anchor is None:
        raise ValueError(f"the stream is inside a mini-batch (pos {state.pos}) but the state carries no anchor")
    # muon's lr scales the orthogonalised step, so a chunk write needs it along with beta, alpha, lam
    kept_gates = ("beta", "alpha", "lam", "lr") if rule.update == "muon" else ("beta", "alpha", "lam")
    keep = rule.window - 1  # tokens of this window still in the next tokens' windows

    def attach(ws):
        return ws if reattach is None else tuple(b + (w - b.detach()) for b, w in zip(reattach, ws))

    def read(ws, t):
        return apply_structure(rule.structure, attach(ws), q[:, :, t : t + 1], read_sparams)  # [B, H, 1, d_out]

    outs = []
    pos = state.pos
    for t in range(T):
        gates_t = {name: getattr(gates, name)[:, :, t] for name in names}  # [B, H] or [B, H, d_k]
        window = {"k": k[:, :, t : t + 1], "v": v[:, :, t : t + 1]}
        if rule.objective == "huber":
            window["delta"] = gates.delta[:, :, t : t + 1]
        window = {n: torch.cat([recent[n], x], dim=2) if n in recent else x for n, x in window.items()}

        if rule.every > 1:
            point = weights  # the state before the chunk: nothing is written inside a chunk
        elif rule.batch > 1:
            if pos % rule.batch == 0:
                anchor = weights
            point = anchor
        elif rule.retention == "decay":
            point = tuple(scale(w, gates_t["alpha"]) for w in weights)
        else:
            point = weights

        g = token_gradient(rule, point, window["k"], window["v"], window.get("delta"), write_sparams, create_graph)
        if rule.update == "dgd":
            g = tuple(a + b for a, b in zip(g, dgd_term(rule, point, k[:, :, t : t + 1], write_sparams)))
        step = g if rule.update == "muon" else tuple(scale(x, gates_t["lr"]) for x in g)

        if rule.every > 1:
            pending = step if pending is None else tuple(p + s for p, s in zip(pending, step))
            last = {n: x for n, x in gates_t.items() if n in kept_gates}
            outs.append(read(weights, t))
            if (pos + 1) % rule.every == 0:
                weights, momentum = write(rule, weights, momentum, pending, last)
                pending, last = None, {}
        else:
            weights, momentum = write(rule, weights, momentum, step, gates_t)
            outs.append(read(weights, t))
        pos += 1
        recent = {n: x[:, :, -keep:] for n, x in window.items()} if keep > 0 else {}

    if T == 0:
        outs.append(q.new_zeros(B, H, 0, state.weights[-1].shape[-2]))
    in_batch = rule.every == 1 and rule.batch > 1 and pos % rule.batch != 0
    new_state = MemoryState(
        weights=attach(weights),
        pos=pos,
        momentum=momentum if rule.update in ("momentum", "muon") else None,
        anchor=anchor if in_batch else None,
        pending=pending,
        last=last if pending is not None else {},
        recent=recent,
    )
    return torch.cat(outs, dim=2), new_state


def flush_naive(rule: Rule, state: MemoryState) -> MemoryState:
    """Write a pending partial chunk at once (the end of a document). A state with nothing pending is
    returned as is. The rest of that chunk, if the stream goes on, accumulates afresh and is written at
    the chunk's regular end."""
    if state.pending is None:
        return state
    momentum = state.momentum
    if rule.update in ("momentum", "muon") and momentum is None:
        momentum = zeros_like_weights(state.weights)
    if rule.grad == "full":
        weights, momentum = write(rule, state.weights, momentum, state.pending, state.last)
    else:
        cut = detach_state(state.replace(momentum=momentum))
        written, momentum = write(rule, cut.weights, cut.momentum, cut.pending, cut.last)
        weights = tuple(w + (n - w.detach()) for w, n in zip(state.weights, written))
    return state.replace(weights=weights, momentum=momentum, pending=None, last={})
