"""A run of whole chunks of a 2-layer MLP memory with `every = C`, with its backward written out.

Per chunk of n tokens, with W1 `[h, d_in]`, W2 `[d_out, h]` the state before the chunk:

    reads:      Zq1 = Q W1^T,  Zq2 = act(Zq1) W2^T                     (the read's last pre-activation)
    gradients:  Z1 = K W1^T,  H = act(Z1),  Z2 = H W2^T,  e = norm(Z2) (+ K) - V       (l2: e = dl/dy)
                D2 = J(Z2)^T (w ⊙ e),  P = D2 W2,  D1 = act'(Z1) ⊙ P    (J: the norm's Jacobian, w its scale)
    step:       G1 = D1^T (η ⊙ K),  G2 = D2^T (η ⊙ H)
    write:      gd: W ← a W - G;   momentum: S ← β S - G, W ← a W + S     (a, β: the chunk's last token's)

The forward keeps each chunk's start state and its activations (Z, H, act'(Z1), P, D1, D2). The backward
walks the chunks in reverse, carrying W̄, S̄ (the loss gradient of the state leaving the chunk), and
differentiates the per-token gradients to second order: act'' for D1, the derivative of the norm's
backward for D2. The equations are in README.md beside this file. The backward is written for first
derivatives only (`once_differentiable`): no double backward through this path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nlc.ops.memory.rule import Gates, Rule, StructureParams
from nlc.ops.memory.structure import NORM_EPS

ENABLED = True  # False sends every run through chunk.py's autograd loop (the tests compare the two)
ACTS = ("gelu", "silu", "relu")
NORMS = ("none", "layer", "rms")


def supports(rule: Rule, gates: Gates, q: Tensor, sparams: StructureParams | None) -> bool:
    """True for rules `ChunkRun` computes: every > 1 and a rule `in_scope`. False whenever ENABLED is False."""
    return ENABLED and rule.every > 1 and in_scope(rule, gates, q, sparams)


def in_scope(rule: Rule, gates: Gates, q: Tensor, sparams: StructureParams | None) -> bool:
    """The memories whose per-token gradients `_key_gradients` and `_error_backward` write out: mlp(depth = 2, act
    gelu | silu | relu, any residual, norm none | layer | rms); l2 on values, window = 1; gd or momentum; retention
    none, weight_decay or decay with per-head gates `[B, H, T]`; grad = full; float32 or float64."""
    structure = rule.structure
    if q.dtype not in (torch.float32, torch.float64):
        return False
    if structure.kind != "mlp" or structure.depth != 2 or structure.act not in ACTS or structure.norm not in NORMS:
        return False
    if (rule.objective, rule.targets, rule.window, rule.grad) != ("l2", "values", 1, "full"):
        return False
    if rule.update not in ("gd", "momentum") or rule.retention not in ("none", "weight_decay", "decay"):
        return False
    used = [gates.lr, {"decay": gates.alpha, "weight_decay": gates.lam}.get(rule.retention), gates.beta if rule.update == "momentum" else None]
    if sparams is not None and any(p is not None and p.dim() != 2 for p in (sparams.norm_weight, sparams.norm_bias)):
        return False
    return gates.lr is not None and all(g is None or g.dim() == 3 for g in used)


def run_chunks(q, k, v, lr, keep, beta, rule: Rule, weights, momentum, sparams: StructureParams | None):
    """`count` whole chunks from a chunk boundary with nothing pending: q, k `[B, H, count * C, d_in]`,
    v `[B, H, count * C, d_out]`, gates `[B, H, count * C]` (keep: the retention factor a, or None; beta None
    for gd). Returns the reads' last pre-activation `[B, H, count * C, d_out]`, the weights and the momentum
    (None for gd) after the run."""
    structure = rule.structure
    norm_weight = norm_bias = None
    if structure.norm != "none" and sparams is not None:
        norm_weight, norm_bias = sparams.norm_weight, sparams.norm_bias if structure.norm == "layer" else None
    s1, s2 = (None, None) if momentum is None else momentum
    out = ChunkRun.apply(q, k, v, lr, keep, beta, norm_weight, norm_bias, *weights, s1, s2, structure.act, structure.norm, structure.residual, rule.every)
    return out[0], list(out[1:3]), None if momentum is None else list(out[3:5])


def _act(name: str, z: Tensor) -> Tensor:
    if name == "gelu":
        return torch.nn.functional.gelu(z)
    return torch.nn.functional.silu(z) if name == "silu" else torch.relu(z)


def _act_slope(name: str, z: Tensor) -> Tensor:
    """act'(z), through aten's fused backward kernels (a broadcast 1 as the incoming gradient)."""
    one = z.new_ones(()).expand_as(z)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(one, z)
    if name == "silu":
        return torch.ops.aten.silu_backward(one, z)
    return (z > 0).to(z.dtype)


def _act_backward(name: str, grad: Tensor, z: Tensor) -> Tensor:
    """act'(z) ⊙ grad, through aten's fused kernels."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, z)
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    return torch.ops.aten.threshold_backward(grad, z, 0)


def _add_second_order(name: str, out: Tensor, z: Tensor, p: Tensor, grad: Tensor) -> None:
    """out += act''(z) ⊙ p ⊙ grad, in place (nothing for relu, whose act'' is 0 almost everywhere)."""
    if name == "gelu":  # gelu = z Φ(z): gelu'' = φ(z) (2 - z²), φ through exp2 (cheaper than exp on CPU)
        square = z.square()
        second = torch.exp2(square * (-0.5 / math.log(2)))
        second.mul_(square.sub_(2)).mul_(p)  # φ √(2π) (z² - 2) p
        out.addcmul_(second, grad, value=-1 / math.sqrt(2 * math.pi))
    elif name == "silu":  # silu = z σ(z): silu'' = σ (1 - σ) (2 + z (1 - 2σ))
        sig = torch.sigmoid(z)
        second = (1 - 2 * sig).mul_(z).add_(2).mul_(sig).mul_(1 - sig).mul_(p)
        out.addcmul_(second, grad)


def _mean(x: Tensor) -> Tensor:
    return x.mean(-1, keepdim=True)


def _norm_forward(norm: str, z: Tensor) -> tuple:
    """The parameter-free norm over the last axis: `(ŷ, ι, z, mean)` with ŷ normalised and
    ι = (mean(z_c²) + ε)^(-1/2) `[..., n, 1]` (z_c: z centred for layer, z for rms; mean None for rms)."""
    if norm == "layer":
        normed, mean, inv = torch.native_layer_norm(z, z.shape[-1:], None, None, NORM_EPS)
        return normed, inv, z, mean
    inv = torch.rsqrt(_mean(z.square()) + NORM_EPS)
    return z * inv, inv, z, None


def _norm_jacobian_t(norm: str, x: Tensor, normed_state: tuple) -> Tensor:
    """J^T x for the norm's Jacobian J (symmetric): ι (C x - ŷ mean(x ŷ)), C centring for layer (aten's
    fused layer-norm backward)."""
    normed, inv, z, mean = normed_state
    if norm == "layer":
        return torch.ops.aten.native_layer_norm_backward(x, z, z.shape[-1:], mean, inv, None, None, [True, False, False])[0]
    return (x - normed * _mean(x * normed)) * inv


def _norm_affine(norm: str, norm_weight: Tensor | None, norm_bias: Tensor | None, B: int, H: int) -> tuple:
    """The norm's per-head scale w and shift b `[H, d_out]` as `[B * H, 1, d_out]` (None where absent)."""
    if norm == "none":
        return None, None
    return tuple(None if p is None else p.expand(B, *p.shape).reshape(B * p.shape[0], 1, p.shape[1]) for p in (norm_weight, norm_bias))


def _memory_output(act: str, norm: str, residual: bool, x: Tensor, w1: Tensor, w2: Tensor, scale, shift) -> tuple:
    """M(x) = w ⊙ ŷ(act(X W1^T) W2^T) + b (+ X) for x `[BH, n, d_in]`: (M(x), Z1, H, the norm's state)."""
    z1 = torch.bmm(x, w1.mT)  # [BH, n, hidden]
    h = _act(act, z1)
    z2 = torch.bmm(h, w2.mT)  # [BH, n, d_out]
    normed_state = None
    if norm == "none":
        y = z2
    else:
        normed_state = _norm_forward(norm, z2)
        normed = normed_state[0]
        y = normed if scale is None else normed * scale
        y = y if shift is None else y + shift
    return (y + x if residual else y), z1, h, normed_state


def _key_gradients(act: str, norm: str, residual: bool, keys: Tensor, values: Tensor, w1: Tensor, w2: Tensor, scale, shift) -> tuple:
    """The per-token gradients of l2 at (W1, W2) for a group's keys `[BH, n, d_in]` and values `[BH, n, d_out]`:

        Z1 = K W1^T,  H = act(Z1),  Z2 = H W2^T,  e = w ⊙ ŷ(Z2) + b (+ K) - V,  D2 = J^T (w ⊙ e),  P = D2 W2,  D1 = act'(Z1) ⊙ P

    Token t's gradient of W1 is `D1_t K_t^T`, of W2 `D2_t H_t^T`. Returns (Z1, H, act'(Z1), the norm's state, e, D2, P, D1)."""
    y, z1, h, normed_state = _memory_output(act, norm, residual, keys, w1, w2, scale, shift)
    slope = _act_slope(act, z1)  # used three times: kept rather than recomputed
    err = y - values  # dl/dy of l2
    d2 = err if norm == "none" else _norm_jacobian_t(norm, err if scale is None else err * scale, normed_state)  # [BH, n, d_out]
    p = torch.bmm(d2, w2)  # [BH, n, hidden]
    return z1, h, slope, normed_state, err, d2, p, slope * p


def _error_backward(norm: str, grad_d2: Tensor, err: Tensor, d2: Tensor, normed_state, scale, grad_scale, grad_shift) -> tuple:
    """The backward of D2 = J(Z2)^T (w ⊙ e), e = w ⊙ ŷ + b (+ K) - V: (ē, Z̄2) from D̄2, adding w̄ and b̄
    (`[BH, d_out]`, None when not wanted) into grad_scale and grad_shift."""
    if norm == "none":
        return grad_d2, grad_d2
    normed, inv = normed_state[:2]
    weighted = err if scale is None else err * scale  # u
    if norm == "layer":
        delta, weighted = grad_d2 - _mean(grad_d2), weighted - _mean(weighted)
    else:
        delta = grad_d2
    u_y, delta_y, delta_u = _mean(weighted * normed), _mean(delta * normed), _mean(delta * weighted)
    grad_u = (delta - normed * delta_y) * inv  # J δ
    grad_err = grad_u if scale is None else grad_u * scale
    # d<δ, J(z)^T u>/dz = ι² ((3 m_uŷ m_δŷ - m_δu) ŷ - m_uŷ δ - m_δŷ u)   (layer: δ, u centred)
    #                   = ι² (m_uŷ m_δŷ - m_δu) ŷ - ι (m_uŷ J δ + m_δŷ J^T u),   J^T u = D2
    through_jacobian = normed * ((u_y * delta_y - delta_u) * inv.square()) - (u_y * inv) * grad_u - (delta_y * inv) * d2
    grad_z2 = through_jacobian + _norm_jacobian_t(norm, grad_err if scale is None else grad_err * scale, normed_state)
    if grad_scale is not None:
        grad_scale += (err * grad_u + normed * grad_err).sum(1)
    if grad_shift is not None:
        grad_shift += grad_err.sum(1)
    return grad_err, grad_z2


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """<a_i, b_i> over all but the first axis, `[BH]`."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1))


def _chunked(x: Tensor, count: int, n: int) -> Tensor:
    """[B, H, T, ...] -> [count, B * H, n, ...] (a view)."""
    return x.reshape(-1, count, n, *x.shape[3:]).transpose(0, 1)


def _chunk_ends(g: Tensor | None, count: int, n: int) -> Tensor | None:
    """A gate's value at each chunk's last token, [B, H, T] -> [count, B * H, 1, 1]."""
    return None if g is None else g.reshape(-1, count, n)[:, :, -1].T[..., None, None]


class ChunkRun(torch.autograd.Function):
    """See the module docstring. Tensors are held chunk-major, `[count, B * H, n, width]`, so that each
    chunk's operands are contiguous batched matrices."""

    @staticmethod
    def forward(ctx, q, k, v, lr, keep, beta, norm_weight, norm_bias, w1, w2, s1, s2, act, norm, residual, size):
        B, H, T, d_in = q.shape
        d_out, hidden, n = v.shape[-1], w1.shape[-2], size
        count, BH = T // size, B * H
        queries, keys = _chunked(q, count, n).contiguous(), _chunked(k, count, n).contiguous()  # [count, BH, n, d_in]
        values, rates = _chunked(v, count, n), _chunked(lr, count, n).unsqueeze(-1)  # [count, BH, n, d_out], [.., 1]
        keeps, betas = _chunk_ends(keep, count, n), _chunk_ends(beta, count, n)
        scale, shift = _norm_affine(norm, norm_weight, norm_bias, B, H)
        momentum = s1 is not None

        weights = [w1.reshape(BH, hidden, d_in), w2.reshape(BH, d_out, hidden)]
        moms = [s1.reshape(BH, hidden, d_in), s2.reshape(BH, d_out, hidden)] if momentum else None
        starts, saved = [], []
        keep_for_backward = any(ctx.needs_input_grad)  # nothing is kept without a backward to come
        reads = q.new_empty(count, BH, n, d_out)
        for i in range(count):
            if keep_for_backward:
                starts.append((weights, moms))
            w1_i, w2_i = weights
            z1q = torch.bmm(queries[i], w1_i.mT)  # [BH, n, hidden]
            hq = _act(act, z1q)
            torch.bmm(hq, w2_i.mT, out=reads[i])
            z1, h, slope, normed_state, err, d2, p, d1 = _key_gradients(act, norm, residual, keys[i], values[i], w1_i, w2_i, scale, shift)
            rate = rates[i]
            # sum_t η_t g_t = D1^T (η K), (η D2)^T H: the write's step, subtracted
            pairs = [(d1.mT, rate * keys[i]), ((rate * d2).mT, h)]
            a = None if keeps is None else keeps[i]
            if momentum:
                moms = [(betas[i] * s).baddbmm_(left, right, alpha=-1) for s, (left, right) in zip(moms, pairs)]
                weights = [s + w if a is None else torch.addcmul(s, a, w) for s, w in zip(moms, weights)]
            else:
                weights = [(w if a is None else a * w).baddbmm(left, right, alpha=-1) for w, (left, right) in zip(weights, pairs)]
            if keep_for_backward:
                saved.append((z1q, hq, z1, h, slope, normed_state, err, d2, p, d1))

        ctx.set_materialize_grads(False)
        ctx.queries, ctx.keys, ctx.starts, ctx.saved = queries, keys, starts, saved
        ctx.save_for_backward(lr, keep, beta, norm_weight, norm_bias)
        ctx.config = B, H, v.shape[-1], act, norm, residual
        new = [w.reshape(B, H, *w.shape[1:]) for w in weights]
        if momentum:
            new += [s.reshape(B, H, *s.shape[1:]) for s in moms]
        return (reads.transpose(0, 1).reshape(B, H, T, d_out), *new)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_reads, *grad_state):
        lr, keep, beta, norm_weight, norm_bias = ctx.saved_tensors
        B, H, d_out, act, norm, residual = ctx.config
        queries, keys = ctx.queries, ctx.keys
        count, BH, n, _ = queries.shape
        T, momentum = count * n, beta is not None
        rates = _chunked(lr, count, n).unsqueeze(-1)  # [count, BH, n, 1]
        keeps, betas = _chunk_ends(keep, count, n), _chunk_ends(beta, count, n)
        scale = _norm_affine(norm, norm_weight, None, B, H)[0]
        grad_z = None if grad_reads is None else _chunked(grad_reads, count, n).contiguous()  # [count, BH, n, d_out]

        # W̄, S̄: the loss gradient of the state leaving the current chunk (owned: updated in place)
        w_start, s_start = ctx.starts[0]
        # False while nothing after the chunk's write reaches the loss (at most the last chunk)
        live = grad_z is None or any(g is not None for g in grad_state)
        grad_w = [torch.zeros_like(w) if g is None else g.reshape(w.shape).clone() for w, g in zip(w_start, grad_state[:2])]
        grad_s = [torch.zeros_like(s) if g is None else g.reshape(s.shape).clone() for s, g in zip(s_start, grad_state[2:4])] if momentum else None

        # written chunk by chunk; the last chunk's write-side rows stay zero while it is not live
        grad_q = queries.new_empty(queries.shape) if grad_z is not None else torch.zeros_like(queries)
        grad_k, grad_v, grad_rate = keys.new_empty(keys.shape), keys.new_empty(count, BH, n, d_out), keys.new_empty(count, BH, n)
        if not live:
            for g in (grad_k, grad_v, grad_rate):
                g[-1] = 0
        new = queries.new_zeros
        grad_keep = new(count, BH) if keep is not None else None
        grad_beta = new(count, BH) if momentum else None
        grad_scale = new(BH, d_out) if scale is not None else None
        grad_shift = new(BH, d_out) if norm == "layer" and norm_bias is not None else None

        for i in reversed(range(count)):
            (w1, w2), moms = ctx.starts[i]
            z1q, hq, z1, h, slope, normed_state, err, d2, p, d1 = ctx.saved[i]
            ctx.starts[i] = ctx.saved[i] = None  # freed as we go: the next chunk's buffers reuse the memory
            k_i, rate = keys[i], rates[i]
            if live:
                # through the write: the step's gradient is -S̄' (momentum; S' also enters W' = a W + S') or -W̄'
                if momentum:
                    for gs, gw in zip(grad_s, grad_w):
                        gs += gw
                    grad_beta[i] = _dot(grad_s[0], moms[0]) + _dot(grad_s[1], moms[1])
                grad_step = grad_s if momentum else grad_w
                if keeps is not None:
                    grad_keep[i] = _dot(grad_w[0], w1) + _dot(grad_w[1], w2)
                neg_rate = -rate  # [BH, n, 1]
                grad_d1 = torch.bmm(neg_rate * k_i, grad_step[0].mT)  # [BH, n, hidden]
                keys_step = torch.bmm(d1, grad_step[0])  # [BH, n, d_in]: from G1 = D1^T (η K)
                hidden_step = torch.bmm(h, grad_step[1].mT)  # [BH, n, d_out]: from G2 = (η D2)^T H
                grad_rate[i] = -((k_i * keys_step).sum(-1) + (d2 * hidden_step).sum(-1))
                # D1 = act'(Z1) ⊙ P, P = D2 W2
                grad_p = slope * grad_d1
                grad_d2 = torch.baddbmm(neg_rate * hidden_step, grad_p, w2.mT)  # [BH, n, d_out]
                grad_err, grad_z2 = _error_backward(norm, grad_d2, err, d2, normed_state, scale, grad_scale, grad_shift)
                grad_v[i] = -grad_err
                # the keys' forward Z2 = act(K W1^T) W2^T, and H's part of G2
                grad_h = torch.bmm(grad_z2, w2).baddbmm_(neg_rate * d2, grad_step[1])  # [BH, n, hidden]
                grad_z1 = grad_h.mul_(slope)
                _add_second_order(act, grad_z1, z1, p, grad_d1)
                # the uses of W̄', S̄' are done: from here on they are W̄, S̄ of the chunk's start
                if keeps is not None:
                    for gw in grad_w:
                        gw.mul_(keeps[i])
                if momentum:
                    for gs in grad_s:
                        gs.mul_(betas[i])
                grad_w[1].baddbmm_(d2.mT, grad_p).baddbmm_(grad_z2.mT, h)
                grad_w[0].baddbmm_(grad_z1.mT, k_i)
                torch.bmm(grad_z1, w1, out=grad_k[i])
                grad_k[i].addcmul_(neg_rate, keys_step)
                if residual:
                    grad_k[i] += grad_err
            if grad_z is not None:  # the reads Zq2 = act(Q W1^T) W2^T
                grad_z1q = _act_backward(act, torch.bmm(grad_z[i], w2), z1q)  # [BH, n, hidden]
                grad_w[1].baddbmm_(grad_z[i].mT, hq)
                grad_w[0].baddbmm_(grad_z1q.mT, queries[i])
                torch.bmm(grad_z1q, w1, out=grad_q[i])
            live = True

        def unchunk(x):  # [count, B * H, n, ...] -> [B, H, T, ...]
            return x.transpose(0, 1).reshape(B, H, T, *x.shape[3:])

        def at_chunk_ends(g):  # [count, B * H] -> [B, H, T], zero but at each chunk's last token
            if g is None:
                return None
            full = g.new_zeros(BH, count, n)
            full[:, :, -1] = g.T
            return full.reshape(B, H, T)

        grad_norm = [None if g is None else g.reshape(B, H, d_out).sum(0) for g in (grad_scale, grad_shift)]
        grad_weights = [g.reshape(B, H, *g.shape[1:]) for g in grad_w]
        grad_moms = [g.reshape(B, H, *g.shape[1:]) for g in grad_s] if momentum else [None, None]
        ctx.queries = ctx.keys = ctx.starts = ctx.saved = None
        return (
            unchunk(grad_q),
            unchunk(grad_k),
            unchunk(grad_v),
            unchunk(grad_rate),
            at_chunk_ends(grad_keep),
            at_chunk_ends(grad_beta),
            *grad_norm,
            *grad_weights,
            *grad_moms,
            None,
            None,
            None,
            None,
        )
