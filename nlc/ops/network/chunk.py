"""Mini-batch (`batch = B`) and chunk-write (`every = C`) memories through matmuls: the dual form.

Every weight matrix of a memory receives, from token t, a gradient that is an outer product
`delta_t h_t^T` (delta: the loss gradient at the layer's pre-activation, h: the layer's input), taken
at a gradient point shared by the whole mini-batch. Inside a mini-batch the states are therefore

    W_t = A_t W_s + c_t S_s - sum_{tau <= t} G[t, tau] delta_tau h_tau^T

with scalar coefficients from the retention and momentum scans, so any read `W_t x_t` is a causal
masked matmul against the stored `(delta, h)` pairs: no per-token weight is ever materialised, at
any depth. The objective (l2, dot, lp, huber) only changes the loss gradient at the output, an
elementwise function of the residual; a window of c tokens (Omega rule) sums the pairs of the last c
tokens, a banded mask on the same matmuls. The maths is in README.md beside this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nlc.ops.memory.naive import LP_EPS, initial_state
from nlc.ops.memory.rule import Gates, MemoryState, Rule, StructureParams, detach_state
from nlc.ops.memory.structure import activation, newton_schulz, output_norm
from nlc.ops.network import every, minibatch
from nlc.ops.network.twolayer import norm_forward, norm_jacobian_t

NAME = "network.chunk"


def supports(rule: Rule, gates: Gates, q: Tensor) -> bool:
    """True when `apply` computes exactly what the oracle does for this rule."""
    if q.dtype not in (torch.float32, torch.float64):
        return False
    if rule.objective not in ("l2", "dot", "lp", "huber"):
        return False
    if rule.update not in ("gd", "momentum", "dgd", "muon"):
        return False
    if rule.every > 1:
        if rule.every % rule.batch:
            return False  # the oracle rejects it
    elif rule.batch <= 1:
        return False  # a token-by-token rule: the recurrent paths serve it
    if rule.objective == "huber" and gates.delta is None:
        return False
    used = [gates.lr, _retention_gate(rule, gates), gates.beta if rule.update in ("momentum", "muon") else None, gates.delta]
    return gates.lr is not None and all(g is None or g.dim() == 3 for g in used)


def apply(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Gates,
    rule: Rule,
    state: MemoryState | None,
    sparams: StructureParams | None = None,
) -> tuple[Tensor, MemoryState]:
    """Reads `[B, H, T, d_out]` and the state after the last token, as `memory_naive` computes them.

    With `grad = stop` every write is computed off the graph and the reads see `M_0 + sg(M_t - M_0)`, as
    in the oracle: differentiable with respect to q, the initial weights M_0 and the structure parameters.
    """
    if state is None:  # a matrix memory starts from zeros, as in the oracle
        state = initial_state(rule, (k.new_zeros(*k.shape[:2], v.shape[-1], k.shape[-1]),))
    if q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], state.weights[-1].shape[-2]), state
    used = {
        "lr": gates.lr,
        "beta": gates.beta if rule.update in ("momentum", "muon") else None,
        "alpha": gates.alpha if rule.retention == "decay" else None,
        "lam": gates.lam if rule.retention == "weight_decay" else None,
        "delta": gates.delta if rule.objective == "huber" else None,
    }
    net = _Net(rule, sparams, sparams)
    if rule.grad == "stop":
        used = {name: None if g is None else g.detach() for name, g in used.items()}
        k, v = k.detach(), v.detach()
        write_sparams = None
        if sparams is not None:
            write_sparams = StructureParams(*(None if p is None else p.detach() for p in (sparams.norm_weight, sparams.norm_bias)))
        net = _Net(rule, write_sparams, sparams, origin=state.weights)
        state = detach_state(state)
    size = rule.every if rule.every > 1 else rule.batch
    sizes = [n for _, count, n in _runs(state.pos, q.shape[2], size) for _ in range(count)]
    written = _Written(rule, state, k, v, used.pop("delta"), sizes)
    seq = _Sequence(q=q, **used)
    if rule.every > 1:
        return _every(net, seq, written, rule, state)
    return _minibatches(net, seq, written, rule, state)


class _Sequence:
    """The per-token inputs of one call's reads and scans: q `[B, H, T, d]`, per-head gates `[B, H, T]`
    (None when the rule does not use them)."""

    FIELDS = ("q", "lr", "beta", "alpha", "lam")

    def __init__(self, **tensors):
        for name in self.FIELDS:
            setattr(self, name, tensors[name])

    def slice(self, start: int, end: int) -> _Sequence:
        def cut(x):
            return None if x is None else x[:, :, start:end]

        return _Sequence(**{name: cut(getattr(self, name)) for name in self.FIELDS})

    def split(self, count: int, n: int) -> _Sequence:
        """The time axis as `count` mini-batches of n tokens: `[B, H, count, n, ...]`."""

        def unflatten(x):
            return None if x is None else x.unflatten(2, (count, n))

        return _Sequence(**{name: unflatten(getattr(self, name)) for name in self.FIELDS})

    def keep(self) -> Tensor | None:
        """The factor a_t on the previous state: alpha_t, 1 - lambda_t, or None (no retention). With the
        gradient point at the mini-batch start, decay and weight decay differ only in how a_t is given."""
        if self.alpha is not None:
            return self.alpha
        return None if self.lam is None else 1 - self.lam


class _Written:
    """The tokens the writes take gradients on: this call's keys, values and huber thresholds, split once into
    the call's groups (mini-batches or chunks, `sizes` tokens each), and the last window - 1 tokens of earlier
    calls (`state.recent`), which this call's windows still sum over. One split, not a slice per group: the
    backward of a slice materialises a zero gradient of the whole call per group."""

    def __init__(self, rule: Rule, state: MemoryState, k: Tensor, v: Tensor, threshold: Tensor | None, sizes: list[int]):
        self.window = rule.window
        new = {"k": k, "v": v} if threshold is None else {"k": k, "v": v, "delta": threshold}
        self.earlier = state.recent if rule.window > 1 else {}  # [B, H, <= window - 1, ...]
        self.new = new
        self.groups = {name: x.split(sizes, dim=2) for name, x in new.items()}  # [B, H, size, ...] each

    def pairs(self, net: _Net, point, group: int) -> tuple[list[Tensor], list[Tensor]]:
        """The `(delta, h)` pairs at `point` of the call's group `group` and of the window - 1 tokens before
        it, `[B, H, window - 1 + n, ...]` per layer (dgd's n pairs after them). Tokens before the stream
        start do not exist: zero pairs stand in for them, so every group has the same band."""
        n = self.groups["k"][group].shape[2]
        part = {name: self._with_prior(name, group) for name in self.groups}
        deltas, inputs = net.gradients(point, part["k"], part["v"], part.get("delta"), n)
        missing = self.window - 1 - (part["k"].shape[2] - n)
        if missing:
            deltas = [F.pad(d, (0, 0, missing, 0)) for d in deltas]  # [B, H, window - 1 + n (+ n for dgd), out]
            inputs = [F.pad(h, (0, 0, missing, 0)) for h in inputs]
        return deltas, inputs

    def _with_prior(self, name: str, group: int) -> Tensor:
        """Group `group`'s tokens after the (up to) window - 1 tokens that precede it in the stream."""
        prior, have = [], 0
        earlier = [self.earlier[name]] if name in self.earlier else []
        for piece in reversed(earlier + list(self.groups[name][:group])):
            if have >= self.window - 1:
                break
            prior.append(piece)
            have += piece.shape[2]
        if not prior:
            return self.groups[name][group]
        before = torch.cat(prior[::-1], dim=2)
        return torch.cat([before[:, :, max(0, have - self.window + 1) :], self.groups[name][group]], dim=2)

    def recent(self) -> dict[str, Tensor]:
        """What the next call's windows still need: the last window - 1 tokens, as the oracle carries them."""
        keep = self.window - 1
        if not keep:
            return {}
        recent = {}
        for name, x in self.new.items():
            if name in self.earlier:
                x = torch.cat([self.earlier[name], x], dim=2)
            recent[name] = x[:, :, -keep:]
        return recent


def _retention_gate(rule: Rule, gates: Gates) -> Tensor | None:
    return {"decay": gates.alpha, "weight_decay": gates.lam}.get(rule.retention)


class _Net:
    """The memory's function (structure.apply_structure) split at its pre-activations, with its exact
    backward written out so that per-token gradients come from one batched pass."""

    def __init__(self, rule: Rule, sparams: StructureParams | None, read_sparams: StructureParams | None, origin=None):
        self.rule = rule
        self.structure = rule.structure
        self.sparams = sparams  # of the writes (detached with grad = stop)
        self.read_sparams = read_sparams
        self.origin = origin  # grad = stop: the initial weights M_0 that the reads stay attached to

    def attach(self, weights) -> list[Tensor]:
        """M_0 + (M - sg(M_0)): the value of M, the gradient of M_0 (identity without grad = stop)."""
        if self.origin is None:
            return list(weights)
        # muon's per-token states [B, H, n, out, in] are attached to M_0 [B, H, 1, out, in]
        origin = [w0.unsqueeze(2) if w.dim() > w0.dim() else w0 for w0, w in zip(self.origin, weights)]
        return [w0 + (w - w0.detach()) for w0, w in zip(origin, weights)]

    def attach_read(self, i: int, x: Tensor, z: Tensor) -> Tensor:
        """z = W x of layer i with gradient x^T to M_0's layer i (grad = stop), its value unchanged."""
        if self.origin is None:
            return z
        through_origin = x.detach() @ self.origin[i].mT  # [B, H, n, out]
        return z + (through_origin - through_origin.detach())

    def hidden(self, z: Tensor) -> Tensor:
        return activation(self.structure, z)

    def hidden_backward(self, z: Tensor, grad_h: Tensor) -> Tensor:
        act = self.structure.act
        if act == "swiglu":
            gate, up = z.chunk(2, dim=-1)
            sig = torch.sigmoid(gate)
            silu_grad = sig * (1 + gate * (1 - sig))
            return torch.cat([grad_h * up * silu_grad, grad_h * gate * sig], dim=-1)
        # gelu and relu: aten's fused backward kernels, which are differentiable themselves
        if act == "gelu":
            return torch.ops.aten.gelu_backward(grad_h, z)
        if act == "relu":
            return torch.ops.aten.threshold_backward(grad_h, z, 0)
        sig = torch.sigmoid(z)
        return grad_h * sig * (1 + z * (1 - sig))

    def output(self, z: Tensor, x: Tensor, read: bool = False) -> Tensor:
        """The memory's output from its last pre-activation `z` for input `x` (a read, or a write's forward)."""
        if self.structure.kind == "matrix":
            return z
        y = output_norm(self.structure, z, self.read_sparams if read else self.sparams)
        return y + x if self.structure.residual else y

    def output_backward(self, z: Tensor, grad_y: Tensor) -> Tensor:
        """d loss / d z from d loss / d output (a residual adds nothing to the weights' gradient)."""
        norm = "none" if self.structure.kind == "matrix" else self.structure.norm
        if norm == "none":
            return grad_y
        if self.sparams is not None and self.sparams.norm_weight is not None:
            grad_y = grad_y * self.sparams.norm_weight[None, :, None, :]  # [H, d_out] -> [1, H, 1, d_out]
        # the layer norm through aten's fused backward: its derivative (what the outer backward needs) is exact,
        # its second derivative is not, so a backward of this op's backward is unsupported for layer norms
        return norm_jacobian_t(norm, grad_y, norm_forward(norm, z))

    def forward(self, weights, x: Tensor) -> Tensor:
        """The last pre-activation of the memory with fixed weights `[..., out, in]` on x `[..., n, in]`."""
        for i, w in enumerate(weights):
            x = x @ w.mT  # [..., n, out]
            if i < len(weights) - 1:
                x = self.hidden(x)
        return x

    def gradients(self, weights, x: Tensor, target: Tensor, threshold: Tensor | None, new: int) -> tuple[list[Tensor], list[Tensor]]:
        """Per-token gradients at `weights` for inputs x `[B, H, m, d_in]` (huber thresholds `[B, H, m]`):
        token t's gradient of layer l is `deltas[l][..., t, :] outer inputs[l][..., t, :]`. dgd's pairs
        are added for the last `new` tokens only (the earlier ones are window tokens of a previous group)."""
        if self.rule.targets == "self":
            # the memory's own output on v at the gradient point: a constant of this (hand-written)
            # gradient, yet part of the outer graph, as in the oracle
            target = self.output(self.forward(weights, target), target)
        inputs, pre = [], []
        h = x
        for i, w in enumerate(weights):
            inputs.append(h)
            z = h @ w.mT  # [B, H, n, out_l]
            pre.append(z)
            if i < len(weights) - 1:
                h = self.hidden(z)
        grad_y = self.loss_gradient(self.output(pre[-1], x), target, threshold)
        delta = self.output_backward(pre[-1], grad_y)
        deltas = [delta]
        for i in range(len(weights) - 1, 0, -1):
            delta = self.hidden_backward(pre[i - 1], delta @ weights[i])  # [B, H, n, out_{i-1}]
            deltas.append(delta)
        deltas = deltas[::-1]
        if self.rule.update == "dgd":
            # dgd adds W_P h h^T per token and layer (h: the layer input, l2-normalised for a network):
            # one more outer product per new token, stored after the m gradient pairs
            for i, w in enumerate(weights):
                h = inputs[i][..., -new:, :]
                h = h if self.structure.kind == "matrix" else F.normalize(h, dim=-1)
                deltas[i] = torch.cat([deltas[i], h @ w.mT], dim=-2)  # [B, H, m + new, out]
                inputs[i] = torch.cat([inputs[i], h], dim=-2)  # [B, H, m + new, in]
        return deltas, inputs

    def loss_gradient(self, y: Tensor, target: Tensor, threshold: Tensor | None) -> Tensor:
        """d l / d y per token, as the oracle's autograd takes it (to every order): elementwise in r = y - v."""
        objective = self.rule.objective
        if objective == "dot":  # l = -<y, v>
            return -target
        r = y - target
        if objective == "l2":
            return r
        if objective == "lp":  # l = (1/p) sum (r^2 + eps)^(p/2)
            return r * (r.square() + LP_EPS).pow(self.rule.p / 2 - 1)
        # huber: r inside the threshold, else threshold * sign(r); the threshold is one per token and head
        d = threshold[..., None]  # [B, H, m] -> [B, H, m, 1]
        return torch.where(r.abs() <= d, r, d * r.sign())


def _decay_matrix(a: Tensor) -> Tensor:
    """P[t, tau] = prod_{tau < s <= t} a_s for tau <= t, else 0: `[..., n, n]` from a `[..., n]`."""
    n = a.shape[-1]
    strictly_below = torch.ones(n, n, dtype=torch.bool, device=a.device).tril(-1)
    factors = torch.where(strictly_below, a.unsqueeze(-1), torch.ones_like(a).unsqueeze(-1))  # [..., s, tau]
    return factors.cumprod(dim=-2).tril()


def _scan_coefficients(keep: Tensor | None, beta: Tensor | None, lr: Tensor):
    """The scalar side of one mini-batch of n tokens with per-token gradients g:

        W_t = A_t W_s + c_t S_s - sum_tau G[t, tau] g_tau
        S_t = Bc_t S_s - sum_tau Gs[t, tau] g_tau          (momentum only)

    Returns A, c, Bc `[B, H, n]` and G, Gs `[B, H, n, n]` (c, Bc, Gs are None without momentum).
    """
    ones = torch.ones_like(lr)
    keep = ones if keep is None else keep
    p_keep = _decay_matrix(keep)  # [B, H, n, n]
    a_cum = keep.cumprod(-1)
    eta = lr.unsqueeze(-2)  # scales column tau
    if beta is None:
        return a_cum, None, p_keep * eta, None, None
    p_beta = _decay_matrix(beta)
    b_cum = beta.cumprod(-1)  # [B, H, n]
    c = (p_keep @ b_cum.unsqueeze(-1)).squeeze(-1)  # sum_r P_keep[t, r] Bc_r
    return a_cum, c, (p_keep @ p_beta) * eta, b_cum, p_beta * eta


def _per_pair(rule: Rule, coeff: Tensor) -> Tensor:
    """A coefficient over a group's n tokens (last axis) as one over its pairs (see `_Written.pairs`): token
    tau's gradient sums the pairs of its window, so pair j gets `sum_tau coeff[tau] Band[tau, j]`; dgd's
    own pair per token gets `coeff` again."""
    summed = coeff if rule.window == 1 else coeff @ _band(coeff.shape[-1], rule.window, coeff)
    return torch.cat([summed, coeff], dim=-1) if rule.update == "dgd" else summed


def _band(n: int, window: int, like: Tensor) -> Tensor:
    """Band[tau, j] = 1 when pair j (the window - 1 tokens before a group of n, then its tokens) lies in
    token tau's window, else 0: `[n, window - 1 + n]`."""
    lag = torch.arange(n, device=like.device)[:, None] + window - 1 - torch.arange(n + window - 1, device=like.device)
    return ((lag >= 0) & (lag < window)).to(like.dtype)  # lag: tau's position minus pair j's


def _fresh_momentum(rule: Rule, state: MemoryState):
    if rule.update not in ("momentum", "muon"):
        return None
    return list(state.momentum) if state.momentum is not None else [torch.zeros_like(w) for w in state.weights]


def _segments(pos: int, length: int, size: int):
    """`(start, end)` of the pieces of a call that lie in one mini-batch / chunk of the stream."""
    start = 0
    while start < length:
        end = min(length, start + size - (pos + start) % size)
        yield start, end
        start = end


def _runs(pos: int, length: int, size: int):
    """`(start, count, n)`: the call cut into runs of `count` consecutive mini-batches of `n` tokens each;
    a partial mini-batch at either end of the call is a run of its own."""
    runs = []
    for start, end in _segments(pos, length, size):
        if end - start == size and runs and runs[-1][2] == size:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, size)
        else:
            runs.append((start, 1, end - start))
    return runs


def _minibatches(net: _Net, seq: _Sequence, written: _Written, rule: Rule, state: MemoryState):
    """batch = B: the gradients, reads and end states one mini-batch after the other (each needs the previous
    one's end state); each mini-batch's reads come from its start state and its pairs."""
    size, pos, length = rule.batch, state.pos, seq.q.shape[2]
    weights, momentum = list(state.weights), _fresh_momentum(rule, state)
    if pos % size and state.anchor is None:
        raise ValueError(f"the stream is inside a mini-batch (pos {pos}) but the state carries no anchor")
    point = list(state.anchor) if pos % size else weights
    outs, group = [], 0
    gates = Gates(lr=seq.lr, beta=seq.beta, alpha=seq.alpha, lam=seq.lam)
    handwritten = minibatch.supports(rule, gates, seq.q, net.sparams)
    for start, count, n in _runs(pos, length, size):
        run = seq.slice(start, start + count * n).split(count, n)  # [B, H, count, n, ...]
        if rule.update == "muon":
            for i in range(count):
                if (pos + start + i * n) % size == 0:
                    point = weights
                pairs = written.pairs(net, point, group)
                group += 1
                o, weights, momentum = _muon_minibatch(net, run, i, weights, momentum, pairs)
                outs.append(o)
            continue
        a_cum, c, g, b_cum, g_mom = _scan_coefficients(run.keep(), run.beta, run.lr)
        if handwritten and n == size:  # whole mini-batches from a boundary (no anchor): minibatch.py's backward
            k, v = (written.new[name][:, :, start : start + count * n] for name in ("k", "v"))
            q = run.q.flatten(2, 3)
            z, weights, momentum = minibatch.run_minibatches(q, k, v, (a_cum, c, g, b_cum, g_mom), rule, weights, momentum, net.sparams)
            outs.append(net.output(z, q, read=True))
            group += count
            continue
        g = _per_pair(rule, g)  # [B, H, count, n, pairs]
        g_mom = None if g_mom is None else _per_pair(rule, g_mom)
        # each mini-batch's last row, unbound once (indexing per mini-batch would make each backward a
        # zero tensor of the whole run)
        a_end, g_end = a_cum[:, :, :, -1].unbind(2), g[:, :, :, -1].unbind(2)  # count x [B, H] / [B, H, pairs]
        if momentum is not None:
            c_end, b_end, g_mom_end = c[:, :, :, -1].unbind(2), b_cum[:, :, :, -1].unbind(2), g_mom[:, :, :, -1].unbind(2)
        queries, a_rows, g_rows = run.q.unbind(2), a_cum.unbind(2), g.unbind(2)  # count x [B, H, n, ...]
        c_rows = c.unbind(2) if momentum is not None else None
        zs = []
        for i in range(count):
            if (pos + start + i * n) % size == 0:  # a mini-batch starts: its gradient point is the state now
                point = weights
            d_i, h_i = written.pairs(net, point, group)
            group += 1
            # reads inside the mini-batch, while its start state and pairs are fresh in cache
            zs.append(_dual_read(net, queries[i], weights, momentum, h_i, d_i, a_rows[i], None if c_rows is None else c_rows[i], g_rows[i]))
            if momentum is None:
                weights = _end_weights(weights, None, d_i, h_i, a_end[i], None, g_end[i])
            else:
                weights, momentum = (
                    _end_weights(weights, momentum, d_i, h_i, a_end[i], c_end[i], g_end[i]),
                    _end_momentum(momentum, d_i, h_i, b_end[i], g_mom_end[i]),
                )
        z = torch.stack(zs, dim=2)  # [B, H, count, n, out]
        outs.append(net.output(z.flatten(2, 3), run.q.flatten(2, 3), read=True))
    new_state = MemoryState(
        weights=tuple(net.attach(weights)),
        pos=pos + length,
        momentum=tuple(momentum) if momentum is not None else None,
        anchor=tuple(point) if (pos + length) % size else None,
        recent=written.recent(),
    )
    return torch.cat(outs, dim=2), new_state


def _muon_minibatch(net: _Net, run: _Sequence, i: int, weights, momentum, pairs):
    """Mini-batch i of a run under muon, from its gradient pairs. Newton-Schulz of each token's momentum has
    no dual form, so the per-token momenta and weights are materialised, `[B, H, n, out, in]`, from the
    same scans:

        S_t = Bc_t S_s + sum_tau P^beta[t, tau] g_tau,   W_t = A_t W_s - sum_tau P^a[t, tau] eta_tau NS(S_tau)
    """
    deltas, inputs = pairs
    lr, beta = run.lr[:, :, i], run.beta[:, :, i]  # [B, H, n]
    keep = run.keep()
    keep = torch.ones_like(lr) if keep is None else keep[:, :, i]
    p_beta, p_keep = _decay_matrix(beta), _decay_matrix(keep)  # [B, H, n, n]
    p_beta_pairs = _per_pair(net.rule, p_beta)  # [B, H, n, pairs]
    b_cum, a_cum = beta.cumprod(-1)[..., None, None], keep.cumprod(-1)[..., None, None]  # [B, H, n, 1, 1]
    per_token_w, per_token_s = [], []
    for w, s, d, h in zip(weights, momentum, deltas, inputs):
        s_all = b_cum * s.unsqueeze(2) + torch.einsum("bhtu,bhuo,bhui->bhtoi", p_beta_pairs, d, h)  # [B, H, n, out, in]
        step = lr[..., None, None] * newton_schulz(s_all, net.rule.ns_steps)
        written = (p_keep @ step.flatten(-2)).unflatten(-1, w.shape[-2:])  # sum_tau P^a[t, tau] eta_tau NS(S_tau)
        per_token_w.append(a_cum * w.unsqueeze(2) - written)
        per_token_s.append(s_all)
    x = run.q[:, :, i]
    for j, w in enumerate(net.attach(per_token_w)):
        x = (w @ x.unsqueeze(-1)).squeeze(-1)  # [B, H, n, out]: each token through its own state
        if j < len(per_token_w) - 1:
            x = net.hidden(x)
    o = net.output(x, run.q[:, :, i], read=True)
    return o, [w[:, :, -1] for w in per_token_w], [s[:, :, -1] for s in per_token_s]


def _dual_read(net: _Net, x, weights, momentum, inputs, deltas, a_cum, c, g) -> Tensor:
    """The last pre-activation of `M_t(x_t)` for every token, `[..., n, out]`, where M_t is the state after
    token t's write: per layer, `A_t W_s x + c_t S_s x - sum_{tau <= t} G[t, tau] <h_tau, x> delta_tau`."""
    for i, w in enumerate(weights):
        z = _scaled_read(x, w, a_cum)  # [..., n, out]
        if momentum is not None:
            z = z + _scaled_read(x, momentum[i], c)
        z = z - (g * (x @ inputs[i].mT)) @ deltas[i]  # g is lower triangular: the causal mask
        z = net.attach_read(i, x, z)
        x = net.hidden(z) if i < len(weights) - 1 else z
    return x


def _scaled_read(x: Tensor, w: Tensor, coeff: Tensor) -> Tensor:
    """coeff_t * (W x_t) for x `[..., n, in]`, W `[..., out, in]`, coeff `[..., n]`: scaled on the narrower side."""
    if x.shape[-1] <= w.shape[-2]:
        return (coeff.unsqueeze(-1) * x) @ w.mT
    return coeff.unsqueeze(-1) * (x @ w.mT)


def _end_weights(weights, momentum, deltas, inputs, a_end, c_end, g_end):
    """W_n = A_n W_s + c_n S_s - sum_tau G[n, tau] delta_tau h_tau^T, gates `[B, H]` / `[B, H, n]`."""
    new = []
    for i, w in enumerate(weights):
        w_end = a_end[..., None, None] * w - deltas[i].mT @ (g_end.unsqueeze(-1) * inputs[i])  # [B, H, out, in]
        if momentum is not None:
            w_end = w_end + c_end[..., None, None] * momentum[i]
        new.append(w_end)
    return new


def _end_momentum(momentum, deltas, inputs, b_end, g_end):
    """S_n = Bc_n S_s - sum_tau Gs[n, tau] delta_tau h_tau^T."""
    return [b_end[..., None, None] * s - d.mT @ (g_end.unsqueeze(-1) * h) for s, d, h in zip(momentum, deltas, inputs)]


def _every(net: _Net, seq: _Sequence, written: _Written, rule: Rule, state: MemoryState):
    """every = C: reads see the previous chunk's state; one write per chunk of its summed gradient. The
    chunks go one after the other, each read with the weights it starts from."""
    size, pos, length = rule.every, state.pos, seq.q.shape[2]
    weights, momentum = list(state.weights), _fresh_momentum(rule, state)
    pending = list(state.pending) if pos % size and state.pending is not None else None
    last = dict(state.last)
    outs, group = [], 0
    gates = Gates(lr=seq.lr, beta=seq.beta, alpha=seq.alpha, lam=seq.lam)
    handwritten = every.supports(rule, gates, seq.q, net.sparams)
    for start, count, n in _runs(pos, length, size):
        if handwritten and n == size:  # whole chunks from a boundary (nothing pending): every.py's backward
            part, end = seq.slice(start, start + count * n), start + count * n
            k, v = (written.new[name][:, :, start:end] for name in ("k", "v"))
            z, weights, momentum = every.run_chunks(part.q, k, v, part.lr, part.keep(), part.beta, rule, weights, momentum, net.sparams)
            outs.append(net.output(z, part.q, read=True))
            group += count
            continue
        run = seq.slice(start, start + count * n).split(count, n)  # [B, H, count, n, ...]
        queries, zs = run.q.unbind(2), []  # count x [B, H, n, d]
        for i in range(count):
            # the chunk reads the state before its write, while it is fresh in cache
            zs.append(net.forward(net.attach(weights), queries[i]))  # [B, H, n, out]
            deltas, inputs = written.pairs(net, weights, group)
            group += 1
            lr = run.lr[:, :, i]  # [B, H, n]
            if rule.update == "muon":  # its lr scales the orthogonalised momentum instead: sum_t g_t
                lr = torch.ones_like(lr)
            lr = _per_pair(rule, lr).unsqueeze(-1)  # [B, H, pairs, 1]
            summed = [d.mT @ (lr * x) for d, x in zip(deltas, inputs)]  # sum_t eta_t g_t: [B, H, out, in]
            pending = summed if pending is None else [p + s for p, s in zip(pending, summed)]
            last = {
                name: getattr(run, name)[:, :, i, -1]  # [B, H]
                for name in ("beta", "alpha", "lam") + (("lr",) if rule.update == "muon" else ())
                if getattr(run, name) is not None
            }
            if (pos + start + (i + 1) * n) % size == 0:
                weights, momentum = _write(rule, weights, momentum, pending, last)
                pending = None
        z = torch.stack(zs, dim=2)  # [B, H, count, n, out]
        outs.append(net.output(z.flatten(2, 3), run.q.flatten(2, 3), read=True))
    new_state = MemoryState(
        weights=tuple(net.attach(weights)),
        pos=pos + length,
        momentum=tuple(momentum) if momentum is not None else None,
        pending=tuple(pending) if pending is not None else None,
        last=last if pending is not None else {},
        recent=written.recent(),
    )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2), new_state


def _write(rule: Rule, weights, momentum, total, last):
    """One step of the update rule with the chunk's summed step `total` (sum eta g, or sum g for muon)
    and its last gates (`[B, H]` each)."""
    keep = last["alpha"] if "alpha" in last else (1 - last["lam"] if "lam" in last else None)

    def retain(w):
        return w if keep is None else keep[..., None, None] * w

    if momentum is None:  # gd, dgd
        return [retain(w) - g for w, g in zip(weights, total)], None
    beta = last["beta"][..., None, None]
    if rule.update == "muon":
        momentum = [beta * s + g for s, g in zip(momentum, total)]
        lr = last["lr"][..., None, None]
        return [retain(w) - lr * newton_schulz(s, rule.ns_steps) for w, s in zip(weights, momentum)], momentum
    momentum = [beta * s - g for s, g in zip(momentum, total)]
    return [retain(w) + s for w, s in zip(weights, momentum)], momentum
