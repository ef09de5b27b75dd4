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

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nlc.ops.memory.rule import Gates, Rule, StructureParams
from nlc.ops.network.twolayer import (
    act_backward,
    activate,
    dot_rows,
    group_ends,
    group_major,
    in_scope,
    key_gradients,
    key_gradients_backward,
    norm_affine,
    norm_params,
)

ENABLED = True  # False sends every run through chunk.py's autograd loop (the tests compare the two)


def supports(rule: Rule, gates: Gates, q: Tensor, sparams: StructureParams | None) -> bool:
    """True for rules `ChunkRun` computes: every > 1 and a rule `in_scope`. False whenever ENABLED is False."""
    return ENABLED and rule.every > 1 and in_scope(rule, gates, q, sparams)


def run_chunks(q, k, v, lr, keep, beta, rule: Rule, weights, momentum, sparams: StructureParams | None):
    """`count` whole chunks from a chunk boundary with nothing pending: q, k `[B, H, count * C, d_in]`,
    v `[B, H, count * C, d_out]`, gates `[B, H, count * C]` (keep: the retention factor a, or None; beta None
    for gd). Returns the reads' last pre-activation `[B, H, count * C, d_out]`, the weights and the momentum
    (None for gd) after the run."""
    structure = rule.structure
    norm_weight, norm_bias = norm_params(structure, sparams)
    s1, s2 = (None, None) if momentum is None else momentum
    out = ChunkRun.apply(q, k, v, lr, keep, beta, norm_weight, norm_bias, *weights, s1, s2, structure.act, structure.norm, structure.residual, rule.every)
    return out[0], list(out[1:3]), None if momentum is None else list(out[3:5])


class ChunkRun(torch.autograd.Function):
    """See the module docstring. Tensors are held chunk-major, `[count, B * H, n, width]`, so that each
    chunk's operands are contiguous batched matrices."""

    @staticmethod
    def forward(ctx, q, k, v, lr, keep, beta, norm_weight, norm_bias, w1, w2, s1, s2, act, norm, residual, size):
        B, H, T, d_in = q.shape
        d_out, hidden, n = v.shape[-1], w1.shape[-2], size
        count, BH = T // size, B * H
        queries, keys = group_major(q, count, n).contiguous(), group_major(k, count, n).contiguous()  # [count, BH, n, d_in]
        values, rates = group_major(v, count, n), group_major(lr, count, n).unsqueeze(-1)  # [count, BH, n, d_out], [.., 1]
        keeps, betas = group_ends(keep, count, n), group_ends(beta, count, n)
        scale, shift = norm_affine(norm, norm_weight, norm_bias, B, H)
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
            hq = activate(act, z1q)
            torch.bmm(hq, w2_i.mT, out=reads[i])
            z1, h, slope, normed_state, err, d2, p, d1 = key_gradients(act, norm, residual, keys[i], values[i], w1_i, w2_i, scale, shift)
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
        rates = group_major(lr, count, n).unsqueeze(-1)  # [count, BH, n, 1]
        keeps, betas = group_ends(keep, count, n), group_ends(beta, count, n)
        scale = norm_affine(norm, norm_weight, None, B, H)[0]
        grad_z = None if grad_reads is None else group_major(grad_reads, count, n).contiguous()  # [count, BH, n, d_out]

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
                    grad_beta[i] = dot_rows(grad_s[0], moms[0]) + dot_rows(grad_s[1], moms[1])
                grad_step = grad_s if momentum else grad_w
                if keeps is not None:
                    grad_keep[i] = dot_rows(grad_w[0], w1) + dot_rows(grad_w[1], w2)
                neg_rate = -rate  # [BH, n, 1]
                grad_d1 = torch.bmm(neg_rate * k_i, grad_step[0].mT)  # [BH, n, hidden]
                keys_step = torch.bmm(d1, grad_step[0])  # [BH, n, d_in]: from G1 = D1^T (η K)
                hidden_step = torch.bmm(h, grad_step[1].mT)  # [BH, n, d_out]: from G2 = (η D2)^T H
                grad_rate[i] = -((k_i * keys_step).sum(-1) + (d2 * hidden_step).sum(-1))
                grad_h = torch.bmm(neg_rate * d2, grad_step[1])  # [BH, n, hidden]: H's part of G2
                # the uses of W̄', S̄' are done: from here on they are W̄, S̄ of the chunk's start
                if keeps is not None:
                    for gw in grad_w:
                        gw.mul_(keeps[i])
                if momentum:
                    for gs in grad_s:
                        gs.mul_(betas[i])
                grads = (grad_d1, neg_rate * hidden_step, grad_h, neg_rate * keys_step)  # D̄1, D̄2, H̄, K̄ from the write
                key = (z1, h, slope, normed_state, err, d2, p)
                grad_v[i] = -key_gradients_backward(act, norm, residual, k_i, w1, w2, key, grads, scale, (grad_scale, grad_shift), grad_w)
                grad_k[i] = grads[3]
            if grad_z is not None:  # the reads Zq2 = act(Q W1^T) W2^T
                grad_z1q = act_backward(act, torch.bmm(grad_z[i], w2), z1q)  # [BH, n, hidden]
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
