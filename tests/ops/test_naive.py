"""The oracle against closed forms derived by hand (outputs, final state and the gradients of every input),
and its own properties: streaming, causality, flush, grad = stop, dispatch."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlc.ops.memory import dispatch
from nlc.ops.memory.naive import flush_naive, initial_state, memory_naive
from nlc.ops.memory.rule import Gates, MemoryState, Rule, Structure
from nlc.ops.memory.structure import NORM_EPS, NS_COEFFS, apply_structure, newton_schulz, weight_shapes
from tests.ops.helpers import (
    assert_close_with_grads,
    random_inputs,
    relative_rmse,
    rules,
    run_in_pieces,
    slice_gates,
)


def outer(a, b):
    return a[..., :, None] * b[..., None, :]  # [B, H, m], [B, H, n] -> [B, H, m, n]


def mv(M, x):
    return (M @ x[..., None])[..., 0]  # [B, H, m, n] @ [B, H, n] -> [B, H, m]


def per_head(gate):
    return gate[..., None, None]  # [B, H] -> [B, H, 1, 1]


def reads_and_weights(**inputs):
    o, state = memory_naive(**inputs)
    return o, state.weights


def check_against(reference, rule, **input_options):
    """memory_naive and a hand-written `reference(q, k, v, gates, M)` -> (reads, final weights) agree on
    values and on the gradients of every input."""
    inputs = random_inputs(rule, **input_options)

    def hand(q, k, v, gates, rule, state, sparams):
        return reference(q, k, v, gates, state.weights[0])

    assert_close_with_grads(reads_and_weights, hand, inputs)


def matrix_scan(q, M, step):
    """M_t = step(t, M_{t-1}), y_t = M_t q_t."""
    reads = []
    for t in range(q.shape[2]):
        M = step(t, M)
        reads.append(mv(M, q[:, :, t]))
    return torch.stack(reads, dim=2), (M,)


def test_l2_gd_is_the_delta_rule():
    def delta_rule(q, k, v, gates, M):
        def step(t, M):
            k_t, v_t, lr = k[:, :, t], v[:, :, t], gates.lr[:, :, t]
            return M + per_head(lr) * outer(v_t - mv(M, k_t), k_t)

        return matrix_scan(q, M, step)

    check_against(delta_rule, Rule())


def test_dot_gd_is_linear_attention():
    def linear_attention(q, k, v, gates, M):
        return matrix_scan(q, M, lambda t, M: M + per_head(gates.lr[:, :, t]) * outer(v[:, :, t], k[:, :, t]))

    check_against(linear_attention, Rule(objective="dot"))


def test_decay_is_gated_deltanet():
    def gated_delta(q, k, v, gates, M):
        def step(t, M):
            k_t, v_t, a, b = k[:, :, t], v[:, :, t], gates.alpha[:, :, t], gates.lr[:, :, t]
            eye = torch.eye(k.shape[-1], dtype=k.dtype)
            # S_t = S_{t-1} alpha (I - beta k k^T) + beta v k^T
            return per_head(a) * M @ (eye - per_head(b) * outer(k_t, k_t)) + per_head(b) * outer(v_t, k_t)

        return matrix_scan(q, M, step)

    check_against(gated_delta, Rule(retention="decay"))


def test_dot_decay_is_retnet_and_equals_weight_decay_of_one_minus_alpha():
    def retnet(q, k, v, gates, M):
        def step(t, M):
            return per_head(gates.alpha[:, :, t]) * M + per_head(gates.lr[:, :, t]) * outer(v[:, :, t], k[:, :, t])

        return matrix_scan(q, M, step)

    check_against(retnet, Rule(objective="dot", retention="decay"))

    inputs = random_inputs(Rule(objective="dot", retention="decay"))
    as_weight_decay = dict(
        inputs,
        rule=Rule(objective="dot", retention="weight_decay"),
        gates=Gates(lr=inputs["gates"].lr, lam=1 - inputs["gates"].alpha),
    )
    o_decay, s_decay = memory_naive(**inputs)
    o_wd, s_wd = memory_naive(**as_weight_decay)
    torch.testing.assert_close(o_wd, o_decay)
    torch.testing.assert_close(s_wd.weights, s_decay.weights)


def test_per_channel_decay_is_gla():
    def gla(q, k, v, gates, M):
        def step(t, M):
            decayed = M * gates.alpha[:, :, t, None, :]  # M diag(alpha): one decay per key channel
            return decayed + per_head(gates.lr[:, :, t]) * outer(v[:, :, t], k[:, :, t])

        return matrix_scan(q, M, step)

    check_against(gla, Rule(objective="dot", retention="decay"), per_channel=("alpha",))


def test_per_channel_lr_scales_key_columns():
    def delta_channel_lr(q, k, v, gates, M):
        def step(t, M):
            k_t, v_t = k[:, :, t], v[:, :, t]
            return M + outer(v_t - mv(M, k_t), gates.lr[:, :, t] * k_t)

        return matrix_scan(q, M, step)

    check_against(delta_channel_lr, Rule(), per_channel=("lr",))


def test_per_channel_decay_with_l2_takes_the_gradient_at_the_decayed_state():
    def gated_delta_channels(q, k, v, gates, M):
        def step(t, M):
            k_t, v_t, lr = k[:, :, t], v[:, :, t], gates.lr[:, :, t]
            point = M * gates.alpha[:, :, t, None, :]
            return point - per_head(lr) * outer(mv(point, k_t) - v_t, k_t)

        return matrix_scan(q, M, step)

    check_against(gated_delta_channels, Rule(retention="decay"), per_channel=("alpha",))


def test_momentum_with_weight_decay_is_linear_titans():
    rule = Rule(update="momentum", retention="weight_decay")
    inputs = random_inputs(rule)

    def titans(q, k, v, gates, rule, state, sparams):
        M, S = state.weights[0], state.momentum[0]
        reads = []
        for t in range(q.shape[2]):
            k_t, v_t = k[:, :, t], v[:, :, t]
            S = per_head(gates.beta[:, :, t]) * S - per_head(gates.lr[:, :, t]) * outer(mv(M, k_t) - v_t, k_t)
            M = per_head(1 - gates.lam[:, :, t]) * M + S
            reads.append(mv(M, q[:, :, t]))
        return torch.stack(reads, dim=2), (M,), (S,)

    def oracle(**kw):
        o, state = memory_naive(**kw)
        return o, state.weights, state.momentum

    assert_close_with_grads(oracle, titans, inputs)


def test_muon_orthogonalises_the_momentum():
    rule = Rule(update="muon", ns_steps=3, retention="decay")
    inputs = random_inputs(rule, dk=3, dv=4)

    def atlas(q, k, v, gates, rule, state, sparams):
        M, S = state.weights[0], state.momentum[0]
        reads = []
        for t in range(q.shape[2]):
            k_t, v_t = k[:, :, t], v[:, :, t]
            point = per_head(gates.alpha[:, :, t]) * M
            S = per_head(gates.beta[:, :, t]) * S + outer(mv(point, k_t) - v_t, k_t)
            M = point - per_head(gates.lr[:, :, t]) * newton_schulz(S, 3)
            reads.append(mv(M, q[:, :, t]))
        return torch.stack(reads, dim=2), (M,), (S,)

    def oracle(**kw):
        o, state = memory_naive(**kw)
        return o, state.weights, state.momentum

    assert_close_with_grads(oracle, atlas, inputs)


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
def test_newton_schulz_applies_the_quintic_to_singular_values(shape):
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    a, b, c = NS_COEFFS
    x = s / s.square().sum(-1, keepdim=True).sqrt()  # Frobenius normalisation
    for _ in range(4):
        x = a * x + b * x**3 + c * x**5
    torch.testing.assert_close(newton_schulz(G, 4), U @ torch.diag_embed(x) @ Vh, atol=1e-6, rtol=1e-6)


def test_dgd_with_weight_decay_is_hopes_update():
    def hope(q, k, v, gates, M):
        def step(t, M):
            k_t, v_t, lr, lam = k[:, :, t], v[:, :, t], gates.lr[:, :, t], gates.lam[:, :, t]
            eye = torch.eye(k.shape[-1], dtype=k.dtype)
            # M_t = M_{t-1} ((1 - lam) I - eta k k^T) - eta (M_{t-1} k - v) k^T
            transition = per_head(1 - lam) * eye - per_head(lr) * outer(k_t, k_t)
            return M @ transition - per_head(lr) * outer(mv(M, k_t) - v_t, k_t)

        return matrix_scan(q, M, step)

    check_against(hope, Rule(update="dgd", retention="weight_decay"))


def test_dgd_on_a_network_uses_the_normalised_layer_input():
    # linear structure without norm: M(x) = W x, a network memory, so its dgd term uses k / |k|
    rule = Rule(structure=Structure(kind="linear"), update="dgd")
    inputs = random_inputs(rule, dk=3, dv=3)
    lengths = torch.linspace(0.5, 2.0, inputs["k"].shape[2], dtype=torch.float64)[:, None]
    inputs["k"] = (inputs["k"].detach() * lengths).requires_grad_()  # keys off the unit sphere

    def dgd_network(q, k, v, gates, W):
        def step(t, W):
            k_t, v_t, lr = k[:, :, t], v[:, :, t], per_head(gates.lr[:, :, t])
            h = k_t / k_t.norm(dim=-1, keepdim=True)
            return W - lr * outer(mv(W, h), h) - lr * outer(mv(W, k_t) - v_t, k_t)

        return matrix_scan(q, W, step)

    def hand(q, k, v, gates, rule, state, sparams):
        return dgd_network(q, k, v, gates, state.weights[0])

    assert_close_with_grads(reads_and_weights, hand, inputs)


def test_window_sums_the_last_c_tokens_at_one_gradient_point():
    c = 3

    def omega(q, k, v, gates, M):
        def step(t, M):
            g = sum(outer(mv(M, k[:, :, i]) - v[:, :, i], k[:, :, i]) for i in range(max(0, t - c + 1), t + 1))
            return M - per_head(gates.lr[:, :, t]) * g

        return matrix_scan(q, M, step)

    check_against(omega, Rule(window=c), T=7)


def test_huber_window_uses_each_tokens_own_threshold():
    def huber_window(q, k, v, gates, M):
        def step(t, M):
            g = 0
            for i in range(max(0, t - 1), t + 1):
                r, d = mv(M, k[:, :, i]) - v[:, :, i], gates.delta[:, :, i, None]
                g = g + outer(torch.maximum(torch.minimum(r, d), -d), k[:, :, i])  # clip(r, -delta, delta) k^T
            return M - per_head(gates.lr[:, :, t]) * g

        return matrix_scan(q, M, step)

    check_against(huber_window, Rule(objective="huber", window=2))


@pytest.mark.parametrize("p", [1.5, 3.0])
def test_lp_gradient_uses_the_smooth_absolute_value(p):
    from nlc.ops.memory.naive import LP_EPS

    def lp(q, k, v, gates, M):
        def step(t, M):
            r = mv(M, k[:, :, t]) - v[:, :, t]
            psi = r * (r.square() + LP_EPS) ** (p / 2 - 1)  # d/dr of (1/p) (r^2 + eps)^(p/2)
            return M - per_head(gates.lr[:, :, t]) * outer(psi, k[:, :, t])

        return matrix_scan(q, M, step)

    check_against(lp, Rule(objective="lp", p=p))


def test_targets_self_regresses_onto_the_memorys_own_output():
    # v_hat = M_{t-1} v_t: a constant of the inner gradient, yet differentiable for the outer level
    def self_targets(q, k, v, gates, M):
        def step(t, M):
            k_t, v_t = k[:, :, t], v[:, :, t]
            return M - per_head(gates.lr[:, :, t]) * outer(mv(M, k_t) - mv(M, v_t), k_t)

        return matrix_scan(q, M, step)

    check_against(self_targets, Rule(targets="self"))


def test_minibatch_gd_is_ttts_dual_form():
    b, T = 3, 8
    rule = Rule(batch=b)
    inputs = random_inputs(rule, T=T)

    def dual_form(q, k, v, gates, rule, state, sparams):
        W, reads = state.weights[0], []
        for start in range(0, T, b):
            Q, K, V = (x[:, :, start : start + b] for x in (q, k, v))  # [B, H, n, d]
            lr = gates.lr[:, :, start : start + b]  # [B, H, n]
            causal = torch.tril(Q @ K.transpose(-1, -2)) * lr[:, :, None, :]  # eta_s (k_s . q_t), s <= t
            residual = K @ W.transpose(-1, -2) - V  # W_0 k_s - v_s: every gradient at the mini-batch start
            reads.append(Q @ W.transpose(-1, -2) - causal @ residual)
            W = W - (residual * lr[..., None]).transpose(-1, -2) @ K
        return torch.cat(reads, dim=2), (W,)

    assert_close_with_grads(reads_and_weights, dual_form, inputs)


def test_minibatch_with_decay_takes_the_gradient_at_the_undecayed_batch_start():
    b = 2

    def decayed_minibatch(q, k, v, gates, M):
        anchor = [M]

        def step(t, M):
            if t % b == 0:
                anchor[0] = M
            k_t, v_t = k[:, :, t], v[:, :, t]
            grad = outer(mv(anchor[0], k_t) - v_t, k_t)
            return per_head(gates.alpha[:, :, t]) * M - per_head(gates.lr[:, :, t]) * grad

        return matrix_scan(q, M, step)

    check_against(decayed_minibatch, Rule(batch=b, retention="decay"), T=5)


def layer_norm_backward(z, grad_n):
    """Hand-written d loss / d z for n = (z - mean) / sqrt(var + eps) given d loss / d n."""
    n = F.layer_norm(z, z.shape[-1:], eps=NORM_EPS)
    sigma = (z.var(-1, unbiased=False, keepdim=True) + NORM_EPS).sqrt()
    return (grad_n - grad_n.mean(-1, keepdim=True) - n * (grad_n * n).mean(-1, keepdim=True)) / sigma


def test_ttt_linear_with_layer_norm_and_residual():
    b, T = 2, 5
    rule = Rule(structure=Structure(kind="linear", residual=True, norm="layer"), batch=b)
    inputs = random_inputs(rule, T=T)

    def ttt_linear(q, k, v, gates, rule, state, sparams):
        gamma, beta = sparams.norm_weight[None, :, :], sparams.norm_bias[None, :, :]  # [1, H, d]

        def f(W, x):
            return gamma * F.layer_norm(mv(W, x), x.shape[-1:], eps=NORM_EPS) + beta + x

        W = state.weights[0]
        reads = []
        for t in range(T):
            if t % b == 0:
                anchor = W
            k_t, v_t = k[:, :, t], v[:, :, t]
            grad_z = layer_norm_backward(mv(anchor, k_t), gamma * (f(anchor, k_t) - v_t))
            W = W - per_head(gates.lr[:, :, t]) * outer(grad_z, k_t)
            reads.append(f(W, q[:, :, t]))
        return torch.stack(reads, dim=2), (W,)

    assert_close_with_grads(reads_and_weights, ttt_linear, inputs)


def test_two_layer_gelu_mlp_backpropagates_by_hand():
    rule = Rule(structure=Structure(kind="mlp", depth=2, expand=1.5, act="gelu"), retention="weight_decay")
    inputs = random_inputs(rule, T=4, dk=4, dv=3)

    def gelu_grad(z):
        return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)

    def deep_memory(q, k, v, gates, rule, state, sparams):
        W1, W2 = state.weights
        reads = []
        for t in range(q.shape[2]):
            k_t, v_t = k[:, :, t], v[:, :, t]
            z = mv(W1, k_t)
            r = mv(W2, F.gelu(z)) - v_t
            g2 = outer(r, F.gelu(z))
            g1 = outer(mv(W2.transpose(-1, -2), r) * gelu_grad(z), k_t)
            keep, lr = per_head(1 - gates.lam[:, :, t]), per_head(gates.lr[:, :, t])
            W1, W2 = keep * W1 - lr * g1, keep * W2 - lr * g2
            reads.append(mv(W2, F.gelu(mv(W1, q[:, :, t]))))
        return torch.stack(reads, dim=2), (W1, W2)

    assert_close_with_grads(reads_and_weights, deep_memory, inputs)


def test_every_writes_once_per_chunk_and_reads_the_previous_chunk():
    C, T = 3, 8  # the last chunk is unfinished: its part stays pending
    rule = Rule(every=C)
    inputs = random_inputs(rule, T=T)

    def chunked(q, k, v, gates, rule, state, sparams):
        M, reads, pending = state.weights[0], [], 0
        for t in range(T):
            k_t, v_t = k[:, :, t], v[:, :, t]
            pending = pending + per_head(gates.lr[:, :, t]) * outer(mv(M, k_t) - v_t, k_t)
            reads.append(mv(M, q[:, :, t]))
            if (t + 1) % C == 0:
                M, pending = M - pending, 0
        return torch.stack(reads, dim=2), (M,), (pending,)

    def oracle(**kw):
        o, state = memory_naive(**kw)
        assert state.pos == T and state.last == {}
        return o, state.weights, state.pending

    assert_close_with_grads(oracle, chunked, inputs)

    _, state = memory_naive(**inputs)
    flushed = flush_naive(rule, state)
    torch.testing.assert_close(flushed.weights[0], state.weights[0] - state.pending[0])
    assert flushed.pending is None and flushed.pos == T


@pytest.mark.parametrize("update", ["momentum", "muon", "dgd"])
def test_every_with_each_update_uses_the_chunks_last_gates(update):
    C, T = 2, 6
    rule = Rule(every=C, update=update, retention="weight_decay", ns_steps=2)
    inputs = random_inputs(rule, T=T)

    def chunked(q, k, v, gates, rule, state, sparams):
        M, S, reads, acc = state.weights[0], (state.momentum or (None,))[0], [], 0
        for t in range(T):
            k_t, v_t, lr = k[:, :, t], v[:, :, t], per_head(gates.lr[:, :, t])
            g = outer(mv(M, k_t) - v_t, k_t)
            if update == "dgd":
                g = g + outer(mv(M, k_t), k_t)  # the chunk-start state's own decay term
            acc = acc + (g if update == "muon" else lr * g)
            reads.append(mv(M, q[:, :, t]))
            if (t + 1) % C == 0:
                keep = per_head(1 - gates.lam[:, :, t])
                beta = None if gates.beta is None else per_head(gates.beta[:, :, t])
                if update == "dgd":
                    M = keep * M - acc
                elif update == "momentum":
                    S = beta * S - acc
                    M = keep * M + S
                else:
                    S = beta * S + acc
                    M = keep * M - lr * newton_schulz(S, 2)
                acc = 0
        return torch.stack(reads, dim=2), (M,), None if S is None else (S,)

    def oracle(**kw):
        o, state = memory_naive(**kw)
        return o, state.weights, state.momentum

    assert_close_with_grads(oracle, chunked, inputs)


def test_grad_stop_detaches_writes_but_not_reads():
    rule = Rule(grad="stop", retention="decay")
    inputs = random_inputs(rule)
    o_full, state_full = memory_naive(**dict(inputs, rule=Rule(retention="decay")))
    o, state = memory_naive(**inputs)
    torch.testing.assert_close(o, o_full)
    torch.testing.assert_close(state.weights, state_full.weights)

    upstream = torch.randn_like(o)
    M0, q = inputs["state"].weights[0], inputs["q"]
    leaves = [q, M0, inputs["k"], inputs["v"], inputs["gates"].lr, inputs["gates"].alpha]
    grads = torch.autograd.grad((o * upstream).sum(), leaves, allow_unused=True)
    # y_t = (M_0 + sg(M_t - M_0)) q_t: dM_t/dM_0 = I, and nothing reaches k, v or the gates
    reads_of = [mv(M0 + (M - M0).detach(), q[:, :, t]) for t, M in enumerate(matrix_states(inputs))]
    expected = torch.autograd.grad((torch.stack(reads_of, 2) * upstream).sum(), [q, M0])
    torch.testing.assert_close(grads[0], expected[0])
    torch.testing.assert_close(grads[1], sum(outer(upstream[:, :, t], q[:, :, t]) for t in range(q.shape[2])))
    assert all(g is None or torch.all(g == 0) for g in grads[2:])


def matrix_states(inputs):
    """The weights after each token, from one-token calls of the oracle."""
    states, state = [], inputs["state"]
    for t in range(inputs["q"].shape[2]):
        piece = {name: inputs[name][:, :, t : t + 1] for name in ("q", "k", "v")}
        _, state = memory_naive(**piece, gates=slice_gates(inputs["gates"], t, t + 1), rule=inputs["rule"], state=state)
        states.append(state.weights[0].detach())
    return states


def test_zero_length_call_keeps_the_state():
    inputs = random_inputs(Rule(every=2), T=0)
    o, state = memory_naive(**inputs)
    assert o.shape == (2, 2, 0, 4)
    assert torch.equal(state.weights[0], inputs["state"].weights[0]) and state.pos == 0


def test_initial_state_has_momentum_only_when_the_update_keeps_one():
    w = (torch.zeros(1, 1, 2, 2),)
    assert initial_state(Rule(), w).momentum is None
    assert torch.equal(initial_state(Rule(update="muon"), w).momentum[0], torch.zeros(1, 1, 2, 2))
    assert initial_state(Rule(), w).pos == 0 and initial_state(Rule(), w).pending is None


def test_poisoned_empty_fills_fresh_buffers_with_nan(poison_empty):
    assert torch.isnan(torch.empty(3)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2, dtype=torch.float64))).all()
    assert torch.isnan(torch.zeros(1).new_empty(4)).all()


def test_relative_rmse():
    x = torch.tensor([3.0, 4.0])
    assert relative_rmse(x, x) == 0
    assert relative_rmse(1.1 * x, x) == pytest.approx(0.1)


def test_weight_shapes():
    assert weight_shapes(Structure(), 4, 3) == [(3, 4)]
    assert weight_shapes(Structure(kind="linear"), 4, 3) == [(3, 4)]
    assert weight_shapes(Structure(kind="mlp", depth=3, expand=1.5), 4, 3) == [(6, 4), (6, 6), (3, 6)]
    assert weight_shapes(Structure(kind="mlp", depth=2, expand=2, act="swiglu"), 4, 4) == [(16, 4), (4, 8)]
    assert weight_shapes(Structure(kind="mlp", depth=1), 4, 3) == [(3, 4)]
    with pytest.raises(ValueError, match="residual"):
        weight_shapes(Structure(kind="mlp", residual=True), 4, 3)


def test_apply_structure_swiglu_and_layer_inputs():
    structure = Structure(kind="mlp", depth=2, expand=1.0, act="swiglu", residual=True)
    gen = torch.Generator().manual_seed(0)
    W1, W2 = (torch.randn(1, 2, *s, generator=gen, dtype=torch.float64) for s in weight_shapes(structure, 3, 3))
    x = torch.randn(1, 2, 5, 3, generator=gen, dtype=torch.float64)
    y, inputs = apply_structure(structure, (W1, W2), x, return_inputs=True)
    gate, up = (x @ W1.transpose(-1, -2)).chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    torch.testing.assert_close(y, hidden @ W2.transpose(-1, -2) + x)
    torch.testing.assert_close(inputs[1], hidden)
    assert inputs[0] is x


def test_invalid_combinations_raise():
    inputs = random_inputs(Rule())
    with pytest.raises(ValueError, match="task"):
        memory_naive(**dict(inputs, rule=Rule(objective="task")))
    with pytest.raises(ValueError, match="batch"):
        memory_naive(**dict(inputs, rule=Rule(every=4, batch=3)))
    mlp = random_inputs(Rule(structure=Structure(kind="mlp")), per_channel=False)
    wide_lr = torch.rand(2, 2, 6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="per channel"):
        memory_naive(**dict(mlp, gates=Gates(lr=wide_lr)))
    with pytest.raises(ValueError, match="needs the gate 'alpha'"):
        memory_naive(**dict(inputs, rule=Rule(retention="decay")))


# Streaming, causality and the gradient plumbing, over random combinations.

small = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(
    "rule",
    [
        Rule(batch=3, update="momentum"),
        Rule(every=3, retention="decay"),
        Rule(window=3, objective="huber", retention="weight_decay"),
        Rule(batch=2, update="dgd", targets="self", grad="stop"),
        Rule(structure=Structure(kind="mlp", expand=1.0, residual=True), every=2, batch=2, update="muon", window=2),
    ],
    ids=["batch", "every", "window", "batch-stop", "mlp-every-window-muon"],
)
def test_splits_inside_minibatches_chunks_and_windows(rule):
    inputs = random_inputs(rule, B=1, T=7, dk=3, dv=3)

    def pieces(**kw):
        return run_in_pieces(memory_naive, kw, [1, 2, 4, 5])

    assert_close_with_grads(memory_naive, pieces, inputs)


SCHEDULES = [  # (batch, every, window, targets, grad), cycled over the combinations below
    (1, 1, 1, "values", "full"),
    (2, 1, 2, "values", "full"),
    (1, 3, 1, "self", "full"),
    (3, 3, 2, "values", "stop"),
    (1, 2, 3, "values", "full"),
]
COMBINATIONS = [
    (kind, objective, retention, update)
    for kind in ("matrix", "mlp")
    for objective in ("dot", "l2", "lp", "huber")
    for retention in ("none", "decay", "weight_decay")
    for update in ("gd", "momentum", "dgd", "muon")
]


@pytest.mark.parametrize("index", range(len(COMBINATIONS)), ids=lambda i: "-".join(COMBINATIONS[i]))
def test_every_structure_objective_retention_and_update_streams(index):
    kind, objective, retention, update = COMBINATIONS[index]
    batch, every, window, targets, grad = SCHEDULES[index % len(SCHEDULES)]
    structure = Structure(kind=kind, depth=2, expand=1.0, act=("gelu", "silu", "swiglu")[index % 3], norm="rms", residual=True)
    rule = Rule(
        structure=Structure() if kind == "matrix" else structure,
        objective=objective,
        window=window,
        targets=targets,
        retention=retention,
        update=update,
        ns_steps=2,
        batch=batch,
        every=every,
        grad=grad,
    )
    inputs = random_inputs(rule, B=1, H=1, T=5, dk=2, dv=2, seed=index)

    def pieces(**kw):
        return run_in_pieces(memory_naive, kw, [2, 3])

    assert_close_with_grads(memory_naive, pieces, inputs)


@small
@given(rule=rules(), cuts=st.lists(st.integers(1, 6), max_size=3), seed=st.integers(0, 100))
def test_one_call_equals_consecutive_calls(rule, cuts, seed):
    inputs = random_inputs(rule, B=1, H=2, T=7, dk=3, dv=3, seed=seed)

    def one_call_then_flush(**kw):
        o, state = memory_naive(**kw)
        return o, state, flush_naive(kw["rule"], state)

    def pieces_then_flush(**kw):
        o, state = run_in_pieces(memory_naive, kw, cuts)
        return o, state, flush_naive(kw["rule"], state)

    assert_close_with_grads(one_call_then_flush, pieces_then_flush, inputs)


@small
@given(rule=rules(), split=st.integers(1, 5), seed=st.integers(0, 100))
def test_reads_never_depend_on_later_tokens(rule, split, seed):
    inputs = random_inputs(rule, B=1, H=1, T=6, dk=3, dv=3, seed=seed)
    o, _ = memory_naive(**inputs)
    later = [inputs["q"], inputs["k"], inputs["v"], *(g for g in vars(inputs["gates"]).values() if g is not None)]
    grads = torch.autograd.grad(o[:, :, :split].sum(), later, allow_unused=True)
    for g in grads:
        assert g is None or torch.all(g[:, :, split:] == 0)

    changed = dict(inputs, v=torch.cat([inputs["v"][:, :, :split], 10 + inputs["v"][:, :, split:]], dim=2))
    o_changed, _ = memory_naive(**changed)
    torch.testing.assert_close(o_changed[:, :, :split], o[:, :, :split])


@pytest.mark.parametrize(
    "rule",
    [
        Rule(
            structure=Structure(kind="mlp", depth=2, expand=1.0, act="silu", norm="rms"),
            objective="huber",
            update="momentum",
            retention="decay",
            window=2,
        ),
        Rule(update="muon", ns_steps=2, every=2, targets="self"),
        Rule(structure=Structure(kind="linear", residual=True, norm="layer"), update="dgd", objective="lp", batch=2),
    ],
    ids=["mlp-huber-momentum-decay-window", "matrix-muon-every-self", "linear-dgd-lp-batch"],
)
def test_outer_gradients_match_finite_differences(rule):
    inputs = random_inputs(rule, B=1, H=1, T=3, dk=2, dv=2, seed=3)
    names = [n for n in ("q", "k", "v") if inputs[n].requires_grad]
    gate_names = [n for n, g in vars(inputs["gates"]).items() if g is not None]
    weights = list(inputs["state"].weights)
    momentum = list(inputs["state"].momentum or ())
    sparams = inputs["sparams"]
    extra = [] if sparams is None else [p for p in (sparams.norm_weight, sparams.norm_bias) if p is not None]
    flat = [inputs[n] for n in names] + [getattr(inputs["gates"], n) for n in gate_names] + weights + momentum + extra

    def fn(*xs):
        it = iter(xs)
        kw = {n: next(it) for n in names}
        gates = Gates(**{n: next(it) for n in gate_names})
        ws = tuple(next(it) for _ in weights)
        ms = tuple(next(it) for _ in momentum) or None
        params = None
        if sparams is not None:
            params = type(sparams)(norm_weight=next(it), norm_bias=next(it) if sparams.norm_bias is not None else None)
        o, state = memory_naive(**kw, gates=gates, rule=rule, state=MemoryState(weights=ws, momentum=ms), sparams=params)
        return o, *state.weights

    assert torch.autograd.gradcheck(fn, flat, eps=1e-6, atol=1e-5)


# Dispatch.


class ToyPath:
    """A fast path for matrix memories that just calls the oracle, to test the dispatch."""

    NAME = "toy"

    @staticmethod
    def supports(rule, gates, q):
        return rule.structure.kind == "matrix"

    @staticmethod
    def apply(q, k, v, gates, rule, state, sparams):
        o, state = memory_naive(q, k, v, gates, rule, state, sparams)
        return o + 0, state


@pytest.fixture
def toy_paths(monkeypatch):
    monkeypatch.setattr(dispatch, "_loaded", [ToyPath])
    monkeypatch.setattr(dispatch, "_warned", set())


def test_dispatch_uses_a_supporting_fast_path_and_warns_once_otherwise(toy_paths):
    matrix = random_inputs(Rule())
    assert dispatch.chosen_path(Rule()) == "toy"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, _ = dispatch.memory_update(**matrix)
    torch.testing.assert_close(o, memory_naive(**matrix)[0])

    mlp_rule = Rule(structure=Structure(kind="mlp", expand=1.0))
    mlp = random_inputs(mlp_rule)
    assert dispatch.chosen_path(mlp_rule) == "naive (fallback)"
    with pytest.warns(UserWarning, match="mlp"):
        dispatch.memory_update(**mlp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same combination warns only once
        dispatch.memory_update(**mlp)
    with pytest.raises(ValueError, match="no fast path"):
        dispatch.memory_update(**mlp, impl="chunk")
    with pytest.raises(ValueError, match="impl"):
        dispatch.memory_update(**mlp, impl="triton")


def test_dispatch_flush_is_the_oracles(toy_paths):
    rule = Rule(every=4)
    inputs = random_inputs(rule, T=6)
    _, state = dispatch.memory_update(**inputs, impl="naive")
    torch.testing.assert_close(dispatch.flush(rule, state).weights, flush_naive(rule, state).weights)


def test_no_triton_import_without_a_gpu():
    """On a CPU-only machine the kernels can serve nothing: dispatch does not pay for importing Triton."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from nlc.ops.memory import dispatch; dispatch.fast_paths(); "
        "assert torch.cuda.is_available() or 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
