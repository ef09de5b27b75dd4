"""The chunked matrix path against the oracle, in float64: outputs, final state, and the gradients of every input."""

import pytest
import torch

from nlc.ops.matrix import chunk
from nlc.ops.memory.naive import memory_naive as oracle
from nlc.ops.memory.rule import Gates, MemoryState, Rule, Structure

RULES = {
    "delta": Rule(),
    "gated_delta": Rule(retention="decay"),
    "delta_weight_decay": Rule(retention="weight_decay"),
    "linear_attention": Rule(objective="dot"),
    "linear_attention_decay": Rule(objective="dot", retention="decay"),
    "linear_attention_weight_decay": Rule(objective="dot", retention="weight_decay"),
    "dgd": Rule(update="dgd"),
    "dgd_weight_decay": Rule(update="dgd", retention="weight_decay"),
    "dgd_decay": Rule(update="dgd", retention="decay"),
    "dgd_dot": Rule(objective="dot", update="dgd"),
    "dgd_dot_decay": Rule(objective="dot", update="dgd", retention="decay"),
    "linear_attention_momentum": Rule(objective="dot", update="momentum"),
    "linear_attention_momentum_decay": Rule(objective="dot", update="momentum", retention="decay"),
    "linear_attention_momentum_weight_decay": Rule(objective="dot", update="momentum", retention="weight_decay"),
    "linear_attention_channel_lr": Rule(objective="dot"),
    "linear_attention_channel_lr_momentum_decay": Rule(objective="dot", update="momentum", retention="decay"),
    "gla": Rule(objective="dot", retention="decay"),
    "gla_weight_decay_channel_lr": Rule(objective="dot", retention="weight_decay"),
    "gla_stop": Rule(objective="dot", retention="decay", grad="stop"),
    "delta_stop": Rule(grad="stop"),
    "gated_delta_stop": Rule(retention="decay", grad="stop"),
}


CHANNEL_LR = {"linear_attention_channel_lr", "linear_attention_channel_lr_momentum_decay", "gla_weight_decay_channel_lr"}
CHANNEL_KEEP = {"gla", "gla_weight_decay_channel_lr", "gla_stop"}


def make_inputs(rule, length, batch=1, heads=2, d_k=5, d_v=3, dtype=torch.float64, seed=0, channel_lr=False, channel_keep=False):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def unit(*shape):  # gate values strictly inside (0, 1)
        return torch.rand(*shape, generator=gen, dtype=dtype) * 0.8 + 0.1

    q = rand(batch, heads, length, d_k)
    k = torch.nn.functional.normalize(rand(batch, heads, length, d_k), dim=-1)
    v = rand(batch, heads, length, d_v)
    lr_shape = (batch, heads, length, d_k) if channel_lr else (batch, heads, length)
    gates = Gates(lr=unit(*lr_shape) * (0.5 if rule.update == "dgd" else 1.0))
    keep_shape = (batch, heads, length, d_k) if channel_keep else (batch, heads, length)
    if rule.retention == "decay":
        gates.alpha = unit(*keep_shape)
    if rule.retention == "weight_decay":
        gates.lam = unit(*keep_shape) * 0.5
    if rule.update == "momentum":
        gates.beta = unit(batch, heads, length)
    m0 = rand(batch, heads, d_v, d_k)
    return q, k, v, gates, m0


def initial(rule, m0):
    """The state a stream starts from. With momentum, a nonzero initial momentum computed from m0, so that
    the gradient through the initial momentum is part of m0's gradient and compared with the oracle's."""
    if rule.update != "momentum":
        return MemoryState(weights=(m0,))
    return MemoryState(weights=(m0,), momentum=(0.5 * m0.flip(-1),))


def leaves(q, k, v, gates, m0):
    gate_names = [n for n in ("lr", "beta", "alpha", "lam") if getattr(gates, n) is not None]
    tensors = [q, k, v, *(getattr(gates, n) for n in gate_names), m0]
    return [t.detach().clone().requires_grad_() for t in tensors], gate_names


def run(fn, rule, tensors, gate_names, seed=1):
    q, k, v, *gate_values, m0 = tensors
    gates = Gates(**dict(zip(gate_names, gate_values)))
    o, state = fn(q, k, v, gates, rule, initial(rule, m0))
    gen = torch.Generator().manual_seed(seed)
    m = state.weights[0]
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum()
    loss = loss + (m * torch.randn(m.shape, generator=gen, dtype=torch.float64).to(m.dtype)).sum()
    grads = torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True)
    return o, state, grads


def assert_close_all(rule, length, **kw):
    q, k, v, gates, m0 = make_inputs(rule, length, **kw)
    assert chunk.supports(rule, gates, q)
    tensors, gate_names = leaves(q, k, v, gates, m0)
    o_ref, state_ref, grads_ref = run(oracle, rule, tensors, gate_names)
    o, state, grads = run(chunk.apply, rule, tensors, gate_names)
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state.weights[0], state_ref.weights[0], rtol=1e-9, atol=1e-9)
    if rule.update == "momentum":
        torch.testing.assert_close(state.momentum[0], state_ref.momentum[0], rtol=1e-9, atol=1e-9)
    assert state.pos == length
    names = ["q", "k", "v", *gate_names, "initial state"]
    for name, got, want in zip(names, grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("length", [1, 7, 63, 100, 130])
def test_matches_oracle(name, length):
    assert_close_all(RULES[name], length, channel_lr=name in CHANNEL_LR, channel_keep=name in CHANNEL_KEEP)


@pytest.mark.parametrize("name", ["delta", "gated_delta", "linear_attention_decay"])
def test_matches_oracle_wider_and_batched(name):
    assert_close_all(RULES[name], 70, batch=2, heads=1, d_k=16, d_v=8, seed=3)


@pytest.mark.parametrize(
    "name",
    ["delta", "gated_delta", "dgd_weight_decay", "linear_attention_decay", "linear_attention_momentum_decay", "gla_weight_decay_channel_lr"],
)
def test_streaming_equals_one_call(name):
    rule = RULES[name]
    q, k, v, gates, m0 = make_inputs(rule, 150, channel_lr=name in CHANNEL_LR, channel_keep=name in CHANNEL_KEEP)
    whole, whole_state = chunk.apply(q, k, v, gates, rule, initial(rule, m0))
    state = initial(rule, m0)
    pieces = []
    for lo, hi in [(0, 5), (5, 69), (69, 70), (70, 150)]:
        part = Gates(**{n: None if g is None else g[:, :, lo:hi] for n, g in vars(gates).items()})
        o, state = chunk.apply(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], part, rule, state)
        pieces.append(o)
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.weights[0], whole_state.weights[0], rtol=1e-10, atol=1e-10)
    if rule.update == "momentum":
        torch.testing.assert_close(state.momentum[0], whole_state.momentum[0], rtol=1e-10, atol=1e-10)
    assert state.pos == whole_state.pos == 150


@pytest.mark.parametrize("name", ["gated_delta", "dgd_weight_decay", "linear_attention"])
def test_no_uninitialised_memory_reaches_results(name, monkeypatch):
    monkeypatch.setattr(chunk, "POISON_FRESH_BUFFERS", True)
    rule = RULES[name]
    q, k, v, gates, m0 = make_inputs(rule, 100)
    tensors, gate_names = leaves(q, k, v, gates, m0)
    o, state, grads = run(chunk.apply, rule, tensors, gate_names)
    for t in (o, state.weights[0], *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", ["delta", "gated_delta", "linear_attention_decay"])
def test_float32_close_to_float64(name):
    rule = RULES[name]
    inputs64 = make_inputs(rule, 200, heads=2, d_k=32, d_v=32)
    tensors64, gate_names = leaves(*inputs64)
    tensors32 = [t.detach().float().requires_grad_() for t in tensors64]
    o64, _, grads64 = run(chunk.apply, rule, tensors64, gate_names)
    o32, _, grads32 = run(chunk.apply, rule, tensors32, gate_names)
    assert o32.dtype == torch.float32
    for got, want in zip((o32, *grads32), (o64, *grads64)):
        rel_rmse = ((got.double() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
        assert rel_rmse < 1e-5


def test_bfloat16_inputs_give_bfloat16_outputs_and_gradients():
    rule = RULES["gated_delta"]
    q, k, v, gates, m0 = make_inputs(rule, 40, dtype=torch.float32)
    o32, _ = chunk.apply(q, k, v, gates, rule, MemoryState(weights=(m0,)))
    leaves16 = [t.bfloat16().requires_grad_() for t in (q, k, v, gates.lr, gates.alpha)]
    q16, k16, v16, lr16, alpha16 = leaves16
    o16, _ = chunk.apply(q16, k16, v16, Gates(lr=lr16, alpha=alpha16), rule, MemoryState(weights=(m0,)))
    assert o16.dtype == torch.bfloat16
    rel_rmse = ((o16.float() - o32).pow(2).mean().sqrt() / o32.pow(2).mean().sqrt()).item()
    assert rel_rmse < 3e-2
    o16.float().square().sum().backward()
    for t in leaves16:
        assert t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad).all()


@pytest.mark.parametrize(
    "rule",
    [
        Rule(update="momentum"),
        Rule(objective="dot", update="momentum", grad="stop"),
        Rule(update="muon"),
        Rule(batch=4),
        Rule(every=2),
        Rule(window=2),
        Rule(objective="huber"),
        Rule(targets="self"),
        Rule(structure=Structure(kind="mlp")),
    ],
)
def test_declines_what_it_does_not_compute(rule):
    q = torch.zeros(1, 1, 4, 3)
    gates = Gates(lr=torch.zeros(1, 1, 4), beta=torch.zeros(1, 1, 4), alpha=torch.zeros(1, 1, 4))
    assert not chunk.supports(rule, gates, q)


def test_declines_missing_or_per_channel_gates():
    q = torch.zeros(1, 1, 4, 3)
    per_head, per_channel = torch.zeros(1, 1, 4), torch.zeros(1, 1, 4, 3)
    assert not chunk.supports(Rule(retention="decay"), Gates(lr=per_head), q)
    assert not chunk.supports(Rule(), Gates(lr=per_channel), q)
    assert not chunk.supports(Rule(objective="dot", update="dgd"), Gates(lr=per_channel), q)
    assert not chunk.supports(Rule(retention="decay"), Gates(lr=per_head, alpha=per_channel), q)
    assert not chunk.supports(Rule(objective="dot", update="dgd", retention="decay"), Gates(lr=per_head, alpha=per_channel), q)
    momentum_gates = Gates(lr=per_head, beta=per_head, alpha=per_channel)
    assert not chunk.supports(Rule(objective="dot", update="momentum", retention="decay"), momentum_gates, q)
    assert chunk.supports(Rule(objective="dot", retention="decay"), Gates(lr=per_head, alpha=per_channel), q)
    assert chunk.supports(Rule(objective="dot", retention="decay"), Gates(lr=per_channel, alpha=per_head), q)


def test_dispatch_picks_the_chunked_path_and_starts_from_zeros():
    from nlc.ops.memory.dispatch import chosen_path, memory_update

    rule = RULES["gated_delta"]
    assert chosen_path(rule) == chunk.NAME
    q, k, v, gates, _ = make_inputs(rule, 20)
    o, state = memory_update(q, k, v, gates, rule, None, impl="chunk")
    o_ref, state_ref = oracle(q, k, v, gates, rule, None)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.weights[0], state_ref.weights[0], rtol=1e-10, atol=1e-10)
