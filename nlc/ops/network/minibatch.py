"""A run of whole mini-batches of a 2-layer MLP memory with `batch = B`, with its backward written out.

Per mini-batch of n tokens, from the state W1 `[h, d_in]`, W2 `[d_out, h]` (S1, S2) at its start, with the
scan coefficients A, c `[n]`, G `[n, n]`, Bc `[n]`, Gs `[n, n]` of `chunk._scan_coefficients` as inputs (the
gates' cumulative products stay with autograd, outside):

    gradients:  Z1 = K W1^T,  H = act(Z1),  ... D2, D1 at (W1, W2), as every.py     (pairs (D1, K), (D2, H))
                targets = self: the values V replaced by M_P(V), the memory's own output at (W1, W2)
                dgd: n more pairs per layer (Ĥ W^T, Ĥ), Ĥ = K, H l2-normalised, with G repeated for them
    reads:      R1 = A ⊙ (Q W1^T) + c ⊙ (Q S1^T) - (G ⊙ Q K^T) D1,   X2 = act(R1)
                R2 = A ⊙ (X2 W2^T) + c ⊙ (X2 S2^T) - (G ⊙ X2 H^T) D2                (the read's last pre-activation)
    end state:  W' = A_n W + c_n S - D^T (g ⊙ X),   S' = Bc_n S - D^T (gs ⊙ X)      (g, gs: the last rows of G, Gs)

The forward keeps each mini-batch's start state, its key pass (Z1, H, act'(Z1), P, D1, D2, e, the norm's
state) and its reads (R1, X2, Q K^T, X2 H^T). The backward walks the mini-batches in reverse, carrying W̄, S̄
(the loss gradient of the state leaving the mini-batch), through the end state, the two dual reads, dgd's
pairs and their normalisation, and the per-token gradients to second order (`twolayer.py`), with
the self-generated targets' forward among them. The equations are in README.md beside this file. The
backward is written for first derivatives only (`once_differentiable`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nlc.ops.memory.rule import Gates, Rule, StructureParams
from nlc.ops.network.twolayer import (
    act_backward,
    activate,
    dot_rows,
    group_major,
    in_scope,
    key_gradients,
    key_gradients_backward,
    memory_output,
    norm_affine,
    norm_jacobian_t,
    norm_params,
)

ENABLED = True  # False sends every run through chunk.py's autograd loop (the tests compare the two)
L2_EPS = 1e-12  # F.normalize's floor on the norm of dgd's layer inputs


def supports(rule: Rule, gates: Gates, q: Tensor, sparams: StructureParams | None) -> bool:
    """True for rules `MinibatchRun` computes: batch > 1 with every = 1, and a rule `twolayer.in_scope` (mlp of
    depth 2, l2, gd or momentum, per-head gates, grad = full) but for two extensions `every.py` lacks: dgd
    (gd's gates) and targets = self. False whenever ENABLED is False."""
    if not (ENABLED and rule.batch > 1 and rule.every == 1):
        return False
    chunk_rule = replace(rule, targets="values", update="gd" if rule.update == "dgd" else rule.update)
    return in_scope(chunk_rule, gates, q, sparams)


def run_minibatches(q, k, v, coefficients, rule: Rule, weights, momentum, sparams: StructureParams | None):
    """`count` whole mini-batches from a mini-batch boundary (no anchor pending): q, k `[B, H, count * n, d_in]`,
    v `[B, H, count * n, d_out]`, `coefficients` = (A, c, G, Bc, Gs) of `chunk._scan_coefficients` over the run
    split `[B, H, count, n(, n)]` (c, Bc, Gs None for gd). Returns the reads' last pre-activation
    `[B, H, count * n, d_out]`, the weights and the momentum (None for gd) after the run."""
    structure = rule.structure
    norm_weight, norm_bias = norm_params(structure, sparams)
    s1, s2 = (None, None) if momentum is None else momentum
    config = structure.act, structure.norm, structure.residual, rule.batch, rule.update == "dgd", rule.targets == "self"
    out = MinibatchRun.apply(q, k, v, *coefficients, norm_weight, norm_bias, *weights, s1, s2, *config)
    return out[0], list(out[1:3]), None if momentum is None else list(out[3:5])


def _per_minibatch(x: Tensor | None, count: int, n: int) -> Tensor | None:
    """A coefficient [B, H, count, n, ...] -> [count, B * H, n, ...] (a view)."""
    return None if x is None else group_major(x.flatten(2, 3), count, n)


def _memory_output_backward(act: str, norm: str, residual: bool, grad_y: Tensor, x, w1, w2, forward, scale, grads) -> Tensor:
    """The backward of `memory_output` for Ȳ `[BH, n, d_out]`: returns X̄ and adds into `grads` = (W̄1, W̄2, w̄, b̄)
    (w̄, b̄ `[BH, d_out]`, None when not wanted)."""
    grad_w1, grad_w2, grad_scale, grad_shift = grads
    z1, h, normed_state = forward
    grad_z2 = grad_y
    if norm != "none":
        if grad_scale is not None:
            grad_scale += (grad_y * normed_state[0]).sum(1)
        if grad_shift is not None:
            grad_shift += grad_y.sum(1)
        grad_z2 = norm_jacobian_t(norm, grad_y if scale is None else grad_y * scale, normed_state)
    grad_w2.baddbmm_(grad_z2.mT, h)
    grad_z1 = act_backward(act, torch.bmm(grad_z2, w2), z1)  # [BH, n, hidden]
    grad_w1.baddbmm_(grad_z1.mT, x)
    grad_x = torch.bmm(grad_z1, w1)
    return grad_x.add_(grad_y) if residual else grad_x


def _dgd_pair(x: Tensor, w: Tensor) -> tuple:
    """dgd's pair of one layer, (W Ĥ^T, Ĥ) with Ĥ = x / max(|x|, ε) row-wise (F.normalize) for the layer inputs
    x `[BH, n, in]`: (U `[BH, n, out]`, Ĥ, the clamped norms `[BH, n, 1]`)."""
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(L2_EPS)
    hat = x / norms
    return torch.bmm(hat, w.mT), hat, norms


def _dgd_pair_backward(grad_u: Tensor, grad_hat: Tensor, hat: Tensor, norms: Tensor, w: Tensor, grad_w: Tensor) -> Tensor:
    """The backward of `_dgd_pair` for Ū, Ĥ̄: returns x̄ = (Ĥ̄' − Ĥ ⟨Ĥ̄', Ĥ⟩) / |x| with Ĥ̄' = Ĥ̄ + Ū W, and adds
    Ū^T Ĥ into `grad_w` (a clamped norm, ε, passes Ĥ̄' / ε alone, as F.normalize's backward)."""
    grad_w.baddbmm_(grad_u.mT, hat)
    grad_hat = torch.baddbmm(grad_hat, grad_u, w)  # [BH, n, in]
    radial = (grad_hat * hat).sum(-1, keepdim=True).masked_fill_(norms <= L2_EPS, 0)
    return grad_hat.sub_(hat * radial).div_(norms)


def _dual_read(x: Tensor, w: Tensor, s: Tensor | None, inputs: Tensor, deltas: Tensor, a: Tensor, c: Tensor | None, g: Tensor) -> tuple:
    """`A ⊙ (X W^T) + c ⊙ (X S^T) - (G ⊙ X H^T) D` for x `[BH, n, in]` against the pairs (deltas, inputs) and
    coefficients a, c `[BH, n, 1]`, g `[BH, n, pairs]`: `([BH, n, out], X H^T)`."""
    scores = torch.bmm(x, inputs.mT)  # [BH, n, n]: <x_t, h_τ>
    if x.shape[-1] <= w.shape[-2]:  # the coefficients scale the narrower side of each product
        z = torch.bmm(a * x, w.mT)  # [BH, n, out]
        if s is not None:
            z.baddbmm_(c * x, s.mT)
    else:
        z = torch.bmm(x, w.mT).mul_(a)
        if s is not None:
            z.addcmul_(torch.bmm(x, s.mT), c)
    return z.baddbmm_(g * scores, deltas, alpha=-1), scores  # g is lower triangular: the causal mask


def _dual_read_backward(grad_r, x, w, s, inputs, deltas, a, c, g, scores, grads) -> Tensor:
    """The backward of `_dual_read` for R̄ `[BH, n, out]`: returns X̄ and adds into `grads` = (W̄, S̄, H̄, D̄, Ā, c̄, Ḡ)
    (H̄, D̄: of the pairs; Ā, c̄ `[BH, n]`; S̄ and c̄ None without momentum)."""
    grad_w, grad_s, grad_inputs, grad_deltas, grad_a, grad_c, grad_g = grads
    through_w = torch.bmm(grad_r, w)  # [BH, n, in]: W^T R̄_t, so that Ā_t = <R̄_t, W x_t> = <W^T R̄_t, x_t>
    grad_a += (through_w * x).sum(-1)
    grad_x = through_w.mul_(a)
    _add_scaled_outer(grad_w, grad_r, x, a)
    if s is not None:
        through_s = torch.bmm(grad_r, s)
        grad_c += (through_s * x).sum(-1)
        grad_x.addcmul_(through_s, c)
        _add_scaled_outer(grad_s, grad_r, x, c)
    psi = torch.bmm(grad_r, deltas.mT)  # [BH, n, n]: <R̄_t, δ_τ>
    grad_g.addcmul_(psi, scores, value=-1)
    masked = psi.mul_(g)
    grad_x.baddbmm_(masked, inputs, alpha=-1)
    grad_inputs.baddbmm_(masked.mT, x, alpha=-1)
    grad_deltas.baddbmm_((g * scores).mT, grad_r, alpha=-1)
    return grad_x


def _add_scaled_outer(out: Tensor, grad_r: Tensor, x: Tensor, coeff: Tensor) -> None:
    """out += (coeff ⊙ R̄)^T X, coeff `[BH, n, 1]` scaling the narrower of R̄ `[BH, n, out]` and X `[BH, n, in]`."""
    if x.shape[-1] <= grad_r.shape[-1]:
        out.baddbmm_(grad_r.mT, coeff * x)
    else:
        out.baddbmm_((coeff * grad_r).mT, x)


class MinibatchRun(torch.autograd.Function):
    """See the module docstring. Tensors are held mini-batch-major, `[count, B * H, n, width]`, so that each
    mini-batch's operands are contiguous batched matrices."""

    @staticmethod
    def forward(ctx, q, k, v, a_cum, c, g, b_cum, g_mom, norm_weight, norm_bias, w1, w2, s1, s2, act, norm, residual, size, dgd, self_targets):
        B, H, T, _ = q.shape
        d_out, n = v.shape[-1], size
        count, BH = T // n, B * H
        queries, keys = group_major(q, count, n).contiguous(), group_major(k, count, n).contiguous()  # [count, BH, n, d_in]
        values = group_major(v, count, n)  # [count, BH, n, d_out]
        a_cum, c, b_cum = (_per_minibatch(x, count, n) for x in (a_cum, c, b_cum))  # [count, BH, n]
        g, g_mom = _per_minibatch(g, count, n), _per_minibatch(g_mom, count, n)  # [count, BH, n, n]
        scale, shift = norm_affine(norm, norm_weight, norm_bias, B, H)
        momentum = s1 is not None

        weights = [w1.reshape(BH, *w1.shape[2:]), w2.reshape(BH, *w2.shape[2:])]
        moms = [s1.reshape(BH, *s1.shape[2:]), s2.reshape(BH, *s2.shape[2:])] if momentum else [None, None]
        starts, saved = [], []
        keep_for_backward = any(ctx.needs_input_grad)  # nothing is kept without a backward to come
        reads = q.new_empty(count, BH, n, d_out)
        for i in range(count):
            if keep_for_backward:
                starts.append((weights, moms))
            (w1_i, w2_i), (s1_i, s2_i) = weights, moms
            targets, target_state = values[i], None
            if self_targets:  # M_P(V): a constant of the per-token gradients, differentiated in the backward
                targets, *target_state = memory_output(act, norm, residual, values[i], w1_i, w2_i, scale, shift)
            key = key_gradients(act, norm, residual, keys[i], targets, w1_i, w2_i, scale, shift)
            inputs, deltas, g_i, dgd_state = [keys[i], key[1]], [key[7], key[5]], g[i], None  # (K, H), (D1, D2)
            if dgd:  # the pairs (Ĥ W^T, Ĥ) after the gradient pairs, with the same coefficients
                dgd_state = [_dgd_pair(x, w) for x, w in zip(inputs, weights)]
                inputs = [torch.cat([x, hat], 1) for x, (_, hat, _) in zip(inputs, dgd_state)]  # [BH, 2n, in]
                deltas = [torch.cat([d, u], 1) for d, (u, _, _) in zip(deltas, dgd_state)]  # [BH, 2n, out]
                g_i = torch.cat([g_i, g_i], -1)  # [BH, n, 2n]
            a_i = a_cum[i].unsqueeze(-1)  # [BH, n, 1]
            c_i = c[i].unsqueeze(-1) if momentum else None
            r1, scores1 = _dual_read(queries[i], w1_i, s1_i, inputs[0], deltas[0], a_i, c_i, g_i)  # [BH, n, hidden]
            x2 = activate(act, r1)
            r2, scores2 = _dual_read(x2, w2_i, s2_i, inputs[1], deltas[1], a_i, c_i, g_i)  # [BH, n, d_out]
            reads[i] = r2
            # the end state from the coefficients' last rows: -D^T (g ⊙ X) per layer
            pairs = [(d.mT, x) for d, x in zip(deltas, inputs)]
            a_end, g_end = a_cum[i, :, -1, None, None], g_i[:, -1, :, None]  # [BH, 1, 1], [BH, pairs, 1]
            new = [(a_end * w).baddbmm_(left, g_end * right, alpha=-1) for w, (left, right) in zip(weights, pairs)]
            if momentum:
                c_end, b_end, g_mom_end = c[i, :, -1, None, None], b_cum[i, :, -1, None, None], g_mom[i, :, -1, :, None]
                new = [w_new.addcmul_(s, c_end) for w_new, s in zip(new, moms)]
                moms = [(b_end * s).baddbmm_(left, g_mom_end * right, alpha=-1) for s, (left, right) in zip(moms, pairs)]
            weights = new
            if keep_for_backward:
                saved.append((key, r1, x2, scores1, scores2, inputs, deltas, dgd_state, target_state))

        ctx.set_materialize_grads(False)
        ctx.queries, ctx.keys, ctx.starts, ctx.saved = queries, keys, starts, saved
        ctx.values = values if self_targets else None
        ctx.coefficients = a_cum, c, g, b_cum, g_mom
        ctx.save_for_backward(norm_weight, norm_bias)
        ctx.config = B, H, d_out, act, norm, residual, dgd, self_targets
        new = [w.reshape(B, H, *w.shape[1:]) for w in weights]
        if momentum:
            new += [s.reshape(B, H, *s.shape[1:]) for s in moms]
        return (reads.transpose(0, 1).reshape(B, H, T, d_out), *new)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_reads, *grad_state):
        norm_weight, norm_bias = ctx.saved_tensors
        a_cum, c, g, b_cum, g_mom = ctx.coefficients
        B, H, d_out, act, norm, residual, dgd, self_targets = ctx.config
        queries, keys, values = ctx.queries, ctx.keys, ctx.values
        count, BH, n, _ = queries.shape
        T, momentum = count * n, c is not None
        scale = norm_affine(norm, norm_weight, None, B, H)[0]
        grad_z = None if grad_reads is None else group_major(grad_reads, count, n).contiguous()  # [count, BH, n, d_out]

        # W̄, S̄: the loss gradient of the state leaving the current mini-batch (owned: updated in place)
        w_start, s_start = ctx.starts[0]
        grad_w = [torch.zeros_like(w) if gr is None else gr.reshape(w.shape).clone() for w, gr in zip(w_start, grad_state[:2])]
        grad_s = [torch.zeros_like(s) if gr is None else gr.reshape(s.shape).clone() for s, gr in zip(s_start, grad_state[2:4])] if momentum else [None, None]

        new = queries.new_zeros
        grad_q = torch.zeros_like(queries) if grad_z is None else queries.new_empty(queries.shape)
        grad_k, grad_v = keys.new_empty(keys.shape), keys.new_empty(count, BH, n, d_out)
        pairs = 2 * n if dgd else n
        grad_a, grad_g = new(count, BH, n), new(count, BH, n, pairs)  # Ḡ over the pairs, dgd's folded at the end
        grad_c, grad_b, grad_g_mom = (new(count, BH, n), new(count, BH, n), new(count, BH, n, n)) if momentum else (None, None, None)
        grad_scale = new(BH, d_out) if scale is not None else None
        grad_shift = new(BH, d_out) if norm == "layer" and norm_bias is not None else None

        for i in reversed(range(count)):
            (w1, w2), (s1, s2) = ctx.starts[i]
            key, r1, x2, scores1, scores2, inputs, deltas, dgd_state, target_state = ctx.saved[i]
            ctx.starts[i] = ctx.saved[i] = None  # freed as we go: the next mini-batch's buffers reuse the memory
            k_i, a_i, g_i = keys[i], a_cum[i].unsqueeze(-1), g[i]
            g_i = torch.cat([g_i, g_i], -1) if dgd else g_i  # [BH, n, pairs]
            c_i = c[i].unsqueeze(-1) if momentum else None

            # the end state W' = A_n W + c_n S - D^T (g ⊙ X), S' = Bc_n S - D^T (gs ⊙ X), X = K, H per layer
            g_end = g_i[:, -1, :, None]  # [BH, pairs, 1]
            grad_a[i, :, -1] += dot_rows(grad_w[0], w1) + dot_rows(grad_w[1], w2)
            grad_d, grad_x = [], []  # of the pairs: [BH, pairs, out], [BH, pairs, in]
            for layer, (x, d) in enumerate(zip(inputs, deltas)):
                through_x = torch.bmm(x, grad_w[layer].mT)  # [BH, pairs, out]: W̄' x_τ
                grad_g[i, :, -1] -= (through_x * d).sum(-1)
                grad_d.append(through_x.mul_(-g_end))
                grad_x.append(torch.bmm(d, grad_w[layer]).mul_(-g_end))  # [BH, n, in]
            if momentum:
                g_mom_end = g_mom[i, :, -1, :, None]
                grad_c[i, :, -1] += dot_rows(grad_w[0], s1) + dot_rows(grad_w[1], s2)
                grad_b[i, :, -1] += dot_rows(grad_s[0], s1) + dot_rows(grad_s[1], s2)
                for layer, (x, d) in enumerate(zip(inputs, deltas)):  # no dgd with momentum: n pairs
                    through_x = torch.bmm(x, grad_s[layer].mT)
                    grad_g_mom[i, :, -1] -= (through_x * d).sum(-1)
                    grad_d[layer].addcmul_(through_x, g_mom_end, value=-1)
                    grad_x[layer].addcmul_(torch.bmm(d, grad_s[layer]), g_mom_end, value=-1)
                # S̄ = c_n W̄' + Bc_n S̄', before W̄' is scaled in place
                for gs, gw in zip(grad_s, grad_w):
                    gs.mul_(b_cum[i, :, -1, None, None]).addcmul_(gw, c[i, :, -1, None, None])
            for gw in grad_w:
                gw.mul_(a_cum[i, :, -1, None, None])  # W̄ = A_n W̄' (+ the terms below, all at the start state)

            if grad_z is not None:  # the dual reads, layer 2 then layer 1
                grads2 = (grad_w[1], grad_s[1], grad_x[1], grad_d[1], grad_a[i], None if c is None else grad_c[i], grad_g[i])
                grad_x2 = _dual_read_backward(grad_z[i], x2, w2, s2, inputs[1], deltas[1], a_i, c_i, g_i, scores2, grads2)
                grad_r1 = act_backward(act, grad_x2, r1)  # [BH, n, hidden]
                grads1 = (grad_w[0], grad_s[0], grad_x[0], grad_d[0], grad_a[i], None if c is None else grad_c[i], grad_g[i])
                grad_q[i] = _dual_read_backward(grad_r1, queries[i], w1, s1, inputs[0], deltas[0], a_i, c_i, g_i, scores1, grads1)

            # the gradient pairs' part (contiguous: an in-place baddbmm_ into a strided view runs per matrix)
            grad_d1, grad_d2 = (gd[:, :n].contiguous() for gd in grad_d)
            grad_k_i, grad_h = (gx[:, :n].contiguous() for gx in grad_x)
            if dgd:  # dgd's pairs, back to K and H through their normalisation
                grad_k_i += _dgd_pair_backward(grad_d[0][:, n:], grad_x[0][:, n:], *dgd_state[0][1:], w1, grad_w[0])
                grad_h += _dgd_pair_backward(grad_d[1][:, n:], grad_x[1][:, n:], *dgd_state[1][1:], w2, grad_w[1])

            # the per-token gradients, to second order
            grads = (grad_d1, grad_d2, grad_h, grad_k_i)
            grad_err = key_gradients_backward(act, norm, residual, k_i, w1, w2, key, grads, scale, (grad_scale, grad_shift), grad_w)
            if self_targets:  # e = y - M_P(V): -ē back through the memory at its start state
                grads = (grad_w[0], grad_w[1], grad_scale, grad_shift)
                grad_v[i] = _memory_output_backward(act, norm, residual, -grad_err, values[i], w1, w2, target_state, scale, grads)
            else:
                grad_v[i] = -grad_err
            grad_k[i] = grad_k_i

        def unchunk(x):  # [count, B * H, n, ...] -> [B, H, T, ...]
            return x.transpose(0, 1).reshape(B, H, T, *x.shape[3:])

        def per_minibatch(x):  # [count, B * H, n, ...] -> [B, H, count, n, ...]
            return None if x is None else x.transpose(0, 1).reshape(B, H, count, *x.shape[2:])

        grad_norm = [None if gr is None else gr.reshape(B, H, d_out).sum(0) for gr in (grad_scale, grad_shift)]
        grad_weights = [gr.reshape(B, H, *gr.shape[1:]) for gr in grad_w]
        grad_moms = [gr.reshape(B, H, *gr.shape[1:]) for gr in grad_s] if momentum else [None, None]
        if dgd:
            grad_g = grad_g[..., :n] + grad_g[..., n:]  # each token's two pairs share G's column
        ctx.queries = ctx.keys = ctx.values = ctx.starts = ctx.saved = ctx.coefficients = None
        return (
            unchunk(grad_q),
            unchunk(grad_k),
            unchunk(grad_v),
            *(per_minibatch(gr) for gr in (grad_a, grad_c, grad_g, grad_b, grad_g_mom)),
            *grad_norm,
            *grad_weights,
            *grad_moms,
            *(None,) * 6,
        )
