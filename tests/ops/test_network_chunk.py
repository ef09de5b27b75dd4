"""The dual-form network path against the oracle, in float64: outputs, final state, and the gradients of
q, k, v, every gate (huber's threshold included), the initial weights and the structure parameters."""

import pytest
import torch

from nlc.ops.memory.naive import flush_naive, initial_state, memory_naive
from nlc.ops.memory.rule import Gates, Rule, Structure, StructureParams
from nlc.ops.memory.structure import weight_shapes
from nlc.ops.network import chunk

MLP = Structure("mlp", depth=2, expand=2, act="gelu")
STRUCTURES = {
    "matrix": Structure("matrix"),
    "linear_residual_layer": Structure("linear", residual=True, norm="layer"),
    "mlp_rms": Structure("mlp", depth=2, expand=2, act="silu", norm="rms"),
    "mlp_swiglu_residual_layer": Structure("mlp", depth=2, expand=1.5, act="swiglu", residual=True, norm="layer"),
    "mlp3_relu": Structure("mlp", depth=3, expand=1, act="relu"),
}
MONETA = Structure("mlp", depth=2, expand=2, act="gelu", residual=True, norm="layer")
GATE_NAMES = ("lr", "beta", "alpha", "lam", "delta")


def make_case(rule, length, batch=2, heads=2, d=4, dtype=torch.float64, seed=0):
    """The tensors of one case by name, all requiring grad: q, k, v, the gates, weights w0.., norm parameters."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    def unit(low, high):  # a gate strictly inside (low, high)
        u = torch.rand(batch, heads, length, generator=gen, dtype=dtype)
        return (low + (high - low) * u).requires_grad_()

    leaves = {
        "q": rand(batch, heads, length, d),
        "k": rand(batch, heads, length, d, scale=0.5),
        "v": rand(batch, heads, length, d),
        "lr": unit(0.05, 0.5) * min(1.0, 4 / max(rule.batch, rule.every)),  # mini-batch steps sum B gradients
    }
    if rule.update in ("momentum", "muon"):
        leaves["beta"] = unit(0.3, 0.95)
    if rule.retention == "decay":
        leaves["alpha"] = unit(0.7, 1.0)
    if rule.retention == "weight_decay":
        leaves["lam"] = unit(0.0, 0.2)
    if rule.objective == "huber":
        leaves["delta"] = unit(0.1, 0.8)  # residuals are O(1): both branches are taken
    shapes = weight_shapes(rule.structure, d, d)
    for i, shape in enumerate(shapes):
        leaves[f"w{i}"] = rand(batch, heads, *shape, scale=shape[1] ** -0.5)
    if rule.structure.kind != "matrix" and rule.structure.norm != "none":
        leaves["norm_weight"] = rand(heads, d, scale=0.3)
        if rule.structure.norm == "layer":
            leaves["norm_bias"] = rand(heads, d, scale=0.3)
    return leaves


def arguments(rule, leaves):
    gates = Gates(**{name: leaves.get(name) for name in GATE_NAMES})
    weights = tuple(leaves[name] for name in sorted(leaves) if name.startswith("w"))
    sparams = None
    if "norm_weight" in leaves:
        sparams = StructureParams(norm_weight=leaves["norm_weight"], norm_bias=leaves.get("norm_bias"))
    return gates, initial_state(rule, weights), sparams


def run(op, rule, leaves, splits=None):
    """Run `op` over the whole sequence, or over consecutive pieces of the given lengths."""
    gates, state, sparams = arguments(rule, leaves)
    length = leaves["q"].shape[2]
    splits = splits or [length]
    outs, start = [], 0
    for size in splits:
        piece = slice(start, start + size)
        part = Gates(**{n: None if g is None else g[:, :, piece] for n, g in vars(gates).items()})
        o, state = op(*(leaves[x][:, :, piece] for x in "qkv"), part, rule, state, sparams)
        outs.append(o)
        start += size
    return torch.cat(outs, dim=2), state


def state_tensors(state):
    parts = [state.weights, state.momentum or (), state.anchor or (), state.pending or ()]
    carried = [state.last[n] for n in sorted(state.last)] + [state.recent[n] for n in sorted(state.recent)]
    return [t for part in parts for t in part] + carried


def assert_close(actual, expected, rel):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err < rel, f"relative error {err:.3g} >= {rel}"


def assert_same_state(actual, expected, rel):
    assert actual.pos == expected.pos
    assert (actual.anchor is None) == (expected.anchor is None)
    assert (actual.pending is None) == (expected.pending is None)
    assert sorted(actual.last) == sorted(expected.last)
    assert sorted(actual.recent) == sorted(expected.recent)
    for a, e in zip(state_tensors(actual), state_tensors(expected), strict=True):
        assert_close(a, e, rel)


def gradients(scalar, tensors):
    """Gradients, zero for a tensor the scalar does not depend on (a gate of a chunk never written)."""
    grads = torch.autograd.grad(scalar, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


def check_against_oracle(rule, length, rel=1e-9, seed=0, splits=None, leaves=None):
    leaves = make_case(rule, length, seed=seed) if leaves is None else leaves
    assert chunk.supports(rule, arguments(rule, leaves)[0], leaves["q"])
    o_ref, s_ref = run(memory_naive, rule, leaves)
    o, s = run(chunk.apply, rule, leaves, splits)
    assert_close(o, o_ref, rel)
    assert_same_state(s, s_ref, rel)

    # one scalar that reaches every leaf through the reads and through the final state
    gen = torch.Generator().manual_seed(seed + 1)
    probes = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in [o_ref, *state_tensors(s_ref)]]

    def loss(o, s):
        return sum((p * t).sum() for p, t in zip(probes, [o, *state_tensors(s)]))

    names = sorted(leaves)
    grads_ref = gradients(loss(o_ref, s_ref), [leaves[n] for n in names])
    grads = gradients(loss(o, s), [leaves[n] for n in names])
    for name, g, g_ref in zip(names, grads, grads_ref):
        if name in (("q", "w0") if rule.grad == "stop" else ("q", "k", "v", "lr", "delta", "w0")):
            assert g_ref.abs().max() > 0, f"the oracle's gradient of {name} is zero: the case tests nothing"
        try:
            assert_close(g, g_ref, rel)  # an exactly zero oracle gradient (beta of a first token) must stay ~0
        except AssertionError as e:
            raise AssertionError(f"gradient of {name}: {e}") from None


@pytest.mark.parametrize("update", ["gd", "momentum", "dgd"])
@pytest.mark.parametrize("retention", ["none", "weight_decay", "decay"])
def test_minibatch_mlp_rules(update, retention):
    check_against_oracle(Rule(structure=MLP, update=update, retention=retention, batch=4), length=11)


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_minibatch_structures(name):
    rule = Rule(structure=STRUCTURES[name], update="momentum", retention="weight_decay", batch=3)
    check_against_oracle(rule, length=10)


@pytest.mark.parametrize("name", ["matrix", "mlp_swiglu_residual_layer"])
def test_minibatch_dot(name):
    rule = Rule(structure=STRUCTURES[name], objective="dot", retention="decay", batch=4)
    check_against_oracle(rule, length=9)


@pytest.mark.parametrize("length, batch", [(1, 4), (7, 3), (63, 8), (100, 16)])
def test_minibatch_lengths(length, batch):
    rule = Rule(structure=MLP, update="momentum", retention="weight_decay", batch=batch)
    check_against_oracle(rule, length=length)


@pytest.mark.parametrize("update", ["gd", "momentum", "dgd", "muon"])
@pytest.mark.parametrize("retention", ["none", "weight_decay", "decay"])
def test_every_mlp_rules(update, retention):
    check_against_oracle(Rule(structure=MLP, update=update, retention=retention, every=4), length=11)


@pytest.mark.parametrize("name", ["matrix", "mlp_swiglu_residual_layer"])
@pytest.mark.parametrize("field", ["batch", "every"])
def test_dgd_structures(name, field):
    rule = Rule(structure=STRUCTURES[name], update="dgd", retention="decay", **{field: 3})
    check_against_oracle(rule, length=10, splits=[4, 6])


@pytest.mark.parametrize("name", ["matrix", "mlp_swiglu_residual_layer"])
@pytest.mark.parametrize("field", ["batch", "every"])
def test_muon(name, field):
    rule = Rule(structure=STRUCTURES[name], update="muon", retention="weight_decay", ns_steps=3, **{field: 3})
    check_against_oracle(rule, length=10, splits=[4, 6])


def test_muon_minibatch_stop_gradient_decay():
    rule = Rule(structure=MLP, update="muon", retention="decay", batch=4, grad="stop")
    check_against_oracle(rule, length=9, splits=[2, 7])


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_every_structures(name):
    rule = Rule(structure=STRUCTURES[name], update="momentum", retention="decay", every=3, batch=3)
    check_against_oracle(rule, length=10)


@pytest.mark.parametrize("length, every", [(1, 4), (7, 3), (63, 8), (100, 16)])
def test_every_lengths(length, every):
    rule = Rule(structure=MLP, update="momentum", retention="weight_decay", every=every, objective="dot")
    check_against_oracle(rule, length=length)


@pytest.mark.parametrize("field", ["batch", "every"])
@pytest.mark.parametrize("objective", ["l2", "dot"])
def test_self_generated_targets(field, objective):
    """targets = self: the memory's own output on v at the gradient point, constant for the inner gradient."""
    rule = Rule(structure=STRUCTURES["mlp_rms"], objective=objective, targets="self", update="momentum", **{field: 3})
    check_against_oracle(rule, length=10, splits=[4, 6])


@pytest.mark.parametrize("field", ["batch", "every"])
@pytest.mark.parametrize("name", ["matrix", "mlp_swiglu_residual_layer"])
def test_stop_gradient_writes(field, name):
    """grad = stop: writes off the graph, reads differentiable with respect to q, M_0 and the norm."""
    rule = Rule(structure=STRUCTURES[name], update="momentum", retention="weight_decay", grad="stop", **{field: 3})
    check_against_oracle(rule, length=10, splits=[4, 6])


@pytest.mark.parametrize("field", ["batch", "every"])
def test_streaming_equals_one_call(field):
    """Calls that end inside mini-batches / chunks (and one that lies wholly inside one) give the
    oracle's single call, state included."""
    rule = Rule(structure=MLP, update="momentum", retention="weight_decay", **{field: 5})
    check_against_oracle(rule, length=23, splits=[3, 1, 8, 6, 5])


@pytest.mark.parametrize("field", ["batch", "every"])
def test_streaming_hands_over_to_the_oracle(field):
    """A state the fast path leaves inside a mini-batch / chunk continues in the oracle, and the reverse."""
    rule = Rule(structure=MLP, update="momentum", retention="decay", **{field: 4})
    leaves = make_case(rule, 14)
    gates, state, sparams = arguments(rule, leaves)
    o_ref, s_ref = memory_naive(leaves["q"], leaves["k"], leaves["v"], gates, rule, state, sparams)

    def piece(start, end):
        g = Gates(**{n: None if x is None else x[:, :, start:end] for n, x in vars(gates).items()})
        return leaves["q"][:, :, start:end], leaves["k"][:, :, start:end], leaves["v"][:, :, start:end], g

    for first, second in [(chunk.apply, memory_naive), (memory_naive, chunk.apply)]:
        o1, s = first(*piece(0, 6), rule, state, sparams)
        o2, s = second(*piece(6, 14), rule, s, sparams)
        assert_close(torch.cat([o1, o2], dim=2), o_ref, 1e-9)
        assert_same_state(s, s_ref, 1e-9)


OBJECTIVES = {"lp3": {"objective": "lp", "p": 3.0}, "lp1.5": {"objective": "lp", "p": 1.5}, "huber": {"objective": "huber"}}


@pytest.mark.parametrize("objective", ["lp3", "huber"])
@pytest.mark.parametrize("field", ["batch", "every"])
def test_lp_and_huber(objective, field):
    """Moneta / Yaad's layer: residual layer-normed MLP, weight decay, gd; the stream cut inside groups."""
    rule = Rule(structure=MONETA, retention="weight_decay", **OBJECTIVES[objective], **{field: 4})
    check_against_oracle(rule, length=11, splits=[2, 7, 2])


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_lp_and_huber_structures(name):
    objective = "huber" if name in ("matrix", "mlp_rms", "mlp3_relu") else "lp1.5"
    rule = Rule(structure=STRUCTURES[name], update="momentum", retention="decay", batch=3, **OBJECTIVES[objective])
    check_against_oracle(rule, length=8)


@pytest.mark.parametrize("update", ["dgd", "muon"])
def test_huber_other_updates(update):
    rule = Rule(structure=MLP, objective="huber", update=update, retention="decay", ns_steps=3, batch=3)
    check_against_oracle(rule, length=8, splits=[4, 4])


def test_huber_threshold_at_the_residual():
    """Residuals exactly at the threshold take the quadratic branch in both, as `abs(r) <= delta` says."""
    rule = Rule(structure=Structure("matrix"), objective="huber", batch=2)
    leaves = make_case(rule, 5)
    with torch.no_grad():  # zero state: the first mini-batch's residuals are -v; put one on each threshold
        leaves["w0"].zero_()
        leaves["v"][:, :, 0, 0] = -leaves["delta"][:, :, 0]
        leaves["v"][:, :, 1, 1] = leaves["delta"][:, :, 1]
    check_against_oracle(rule, length=5, leaves=leaves)


@pytest.mark.parametrize(
    "field, size, window, splits",
    [
        ("batch", 4, 2, [3, 2, 6]),  # a window reaching into the previous mini-batch, calls cut inside both
        ("batch", 2, 5, [1, 3, 7]),  # a window longer than a mini-batch, and than the first calls
        ("batch", 3, 3, [11]),
        ("every", 4, 3, [2, 1, 5, 3]),
        ("every", 2, 4, [5, 6]),
    ],
)
def test_window(field, size, window, splits):
    """Omega rule: each token's objective sums the last `window` tokens at its gradient point; the tokens
    before a call come from `state.recent`, none exist before the stream start."""
    rule = Rule(structure=MLP, update="momentum", retention="weight_decay", window=window, **{field: size})
    check_against_oracle(rule, length=11, splits=splits)


@pytest.mark.parametrize("update", ["gd", "dgd", "muon"])
@pytest.mark.parametrize("field", ["batch", "every"])
def test_window_updates(update, field):
    rule = Rule(structure=STRUCTURES["mlp_swiglu_residual_layer"], update=update, retention="decay", window=3, ns_steps=3, **{field: 3})
    check_against_oracle(rule, length=10, splits=[4, 1, 5])


@pytest.mark.parametrize("objective", ["lp1.5", "huber"])
@pytest.mark.parametrize("field", ["batch", "every"])
def test_window_lp_and_huber(objective, field):
    """The thresholds of the window's tokens travel with their keys and values in `state.recent`."""
    rule = Rule(structure=MONETA, retention="weight_decay", window=3, **OBJECTIVES[objective], **{field: 4})
    check_against_oracle(rule, length=13, splits=[5, 2, 6])


@pytest.mark.parametrize("name", ["matrix", "mlp_rms"])
def test_window_huber_self_targets_and_stop_gradient(name):
    for grad in ("full", "stop"):
        rule = Rule(structure=STRUCTURES[name], objective="huber", targets="self", window=2, grad=grad, update="momentum", batch=3)
        check_against_oracle(rule, length=9, splits=[4, 5])


def one_after_the_other(*ops):
    """An op that is ops[0] on its first call, ops[1] on its second, ..."""
    calls = iter(ops)
    return lambda *args: next(calls)(*args)


@pytest.mark.parametrize("field", ["batch", "every"])
def test_window_hands_over_to_the_oracle(field):
    """A huber window state left inside a mini-batch / chunk by one path continues in the other, gradients
    of every input included."""
    rule = Rule(structure=MONETA, objective="huber", retention="weight_decay", window=3, **{field: 4})
    leaves = make_case(rule, 13)
    o_ref, s_ref = run(memory_naive, rule, leaves)
    names = sorted(leaves)
    gen = torch.Generator().manual_seed(1)
    probes = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in [o_ref, *state_tensors(s_ref)]]

    def loss(o, s):
        return sum((p * t).sum() for p, t in zip(probes, [o, *state_tensors(s)]))

    grads_ref = gradients(loss(o_ref, s_ref), [leaves[n] for n in names])
    for ops in [(chunk.apply, memory_naive), (memory_naive, chunk.apply)]:
        o, s = run(one_after_the_other(*ops), rule, leaves, splits=[6, 7])
        assert_close(o, o_ref, 1e-9)
        assert_same_state(s, s_ref, 1e-9)
        for name, g, g_ref in zip(names, gradients(loss(o, s), [leaves[n] for n in names]), grads_ref):
            try:
                assert_close(g, g_ref, 1e-9)
            except AssertionError as e:
                raise AssertionError(f"gradient of {name}: {e}") from None


def test_flushed_chunk_continues_like_the_oracle():
    rule = Rule(structure=MLP, update="momentum", retention="weight_decay", every=4)
    leaves = make_case(rule, 10)
    gates, state, sparams = arguments(rule, leaves)
    q, k, v = (leaves[x] for x in "qkv")
    g1 = Gates(**{n: None if x is None else x[:, :, :6] for n, x in vars(gates).items()})
    g2 = Gates(**{n: None if x is None else x[:, :, 6:] for n, x in vars(gates).items()})
    results = []
    for op in (memory_naive, chunk.apply):
        _, s = op(q[:, :, :6], k[:, :, :6], v[:, :, :6], g1, rule, state, sparams)
        s = flush_naive(rule, s)
        results.append(op(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], g2, rule, s, sparams))
    (o_ref, s_ref), (o, s) = results
    assert_close(o, o_ref, 1e-9)
    assert_same_state(s, s_ref, 1e-9)


@pytest.mark.parametrize("field", ["batch", "every"])
def test_float32_against_float64_oracle(field):
    rule = Rule(structure=MLP, update="momentum", retention="weight_decay", **{field: 8})
    leaves = make_case(rule, 30)
    o_ref, _ = run(memory_naive, rule, leaves)
    low = {n: t.detach().float().requires_grad_() for n, t in leaves.items()}
    o, _ = run(chunk.apply, rule, low)
    assert o.dtype == torch.float32
    assert_close(o.double(), o_ref, 1e-4)
    grads = gradients(o.sum(), list(low.values()))
    grads_ref = gradients(o_ref.sum(), list(leaves.values()))
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g.double(), g_ref, 1e-3)


@pytest.mark.parametrize("objective", ["lp3", "huber"])
def test_float32_moneta_and_yaad_against_float64_oracle(objective):
    rule = Rule(structure=MONETA, retention="weight_decay", batch=16, window=2, **OBJECTIVES[objective])
    leaves = make_case(rule, 40)
    o_ref, _ = run(memory_naive, rule, leaves)
    low = {n: t.detach().float().requires_grad_() for n, t in leaves.items()}
    o, _ = run(chunk.apply, rule, low)
    assert o.dtype == torch.float32
    assert_close(o.double(), o_ref, 1e-4)
    grads = gradients(o.sum(), list(low.values()))
    grads_ref = gradients(o_ref.sum(), list(leaves.values()))
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g.double(), g_ref, 1e-3)


def test_long_titans_stream_stays_finite():
    """16,384 tokens through a Titans-style memory in float32: mlp depth 2, momentum, weight decay, batch 64."""
    rule = Rule(structure=Structure("mlp", depth=2, expand=4, act="gelu"), update="momentum", retention="weight_decay", batch=64)
    gen = torch.Generator().manual_seed(0)
    b, h, t, d = 1, 2, 16_384, 16

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    def gate(bias):  # sigmoid gates as a layer would produce them
        return torch.sigmoid(rand(b, h, t) + bias)

    k = torch.nn.functional.normalize(rand(b, h, t, d), dim=-1)
    q = torch.nn.functional.normalize(rand(b, h, t, d), dim=-1)
    v = rand(b, h, t, d)
    gates = Gates(lr=0.05 * gate(0.0), beta=gate(2.0), lam=gate(-4.0))
    weights = tuple(rand(b, h, *s) * s[1] ** -0.5 for s in weight_shapes(rule.structure, d, d))
    with torch.no_grad():
        o, state = chunk.apply(q, k, v, gates, rule, initial_state(rule, weights), None)
    assert o.shape == (b, h, t, d) and state.pos == t
    assert torch.isfinite(o).all()
    assert all(torch.isfinite(w).all() for w in state.weights + state.momentum)


def test_gates_at_zero():
    """A retention or momentum gate of exactly 0 (the scan coefficients come from products, never divisions)."""
    rule = Rule(structure=MLP, update="momentum", retention="decay", batch=4)
    leaves = make_case(rule, 11)
    with torch.no_grad():
        leaves["alpha"][:, :, 2] = 0.0
        leaves["beta"][:, :, 5] = 0.0
    o_ref, s_ref = run(memory_naive, rule, leaves)
    o, s = run(chunk.apply, rule, leaves)
    assert_close(o, o_ref, 1e-9)
    assert_same_state(s, s_ref, 1e-9)
    names = sorted(leaves)
    grads_ref = gradients(o_ref.sum() + sum(w.sum() for w in s_ref.weights), [leaves[n] for n in names])
    grads = gradients(o.sum() + sum(w.sum() for w in s.weights), [leaves[n] for n in names])
    for g, g_ref in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        assert_close(g, g_ref, 1e-9)


def test_matrix_memory_without_a_state_starts_from_zeros():
    rule = Rule(objective="dot", retention="decay", batch=3)
    leaves = make_case(rule, 8)
    gates = arguments(rule, leaves)[0]
    q, k, v = (leaves[x] for x in "qkv")
    o_ref, s_ref = memory_naive(q, k, v, gates, rule, None)
    o, s = chunk.apply(q, k, v, gates, rule, None)
    assert_close(o, o_ref, 1e-9)
    assert_same_state(s, s_ref, 1e-9)


@pytest.mark.parametrize("field", ["batch", "every"])
def test_empty_call_keeps_the_state(field):
    rule = Rule(structure=MLP, update="momentum", **{field: 4})
    leaves = make_case(rule, 6)
    o, state = run(chunk.apply, rule, leaves, splits=[3, 0, 3])
    o_ref, state_ref = run(memory_naive, rule, leaves, splits=[3, 0, 3])
    assert_close(o, o_ref, 1e-9)
    assert_same_state(state, state_ref, 1e-9)


def test_supports_only_what_it_computes_exactly():
    leaves = make_case(Rule(structure=MLP, update="momentum", retention="decay", batch=4), 5)
    gates, q = arguments(Rule(), leaves)[0], leaves["q"]
    yes = Rule(structure=MLP, update="momentum", retention="decay", batch=4)
    assert chunk.supports(yes, gates, q)
    assert chunk.supports(Rule(structure=MLP, every=8, batch=4), gates, q)
    for rule in [Rule(structure=MLP, batch=4, objective="lp", window=3), Rule(structure=MLP, every=4, window=2)]:
        assert chunk.supports(rule, gates, q)
    huber = Rule(structure=MLP, batch=4, objective="huber")
    assert chunk.supports(huber, Gates(lr=gates.lr, delta=gates.lr), q)
    for no in [
        Rule(structure=MLP),  # one token at a time
        Rule(structure=MLP, window=3),
        huber,  # no threshold given
        Rule(structure=MLP, every=6, batch=4),
    ]:
        assert not chunk.supports(no, gates, q), no
    per_channel = Gates(lr=gates.lr[..., None].expand(*gates.lr.shape, 4))
    assert not chunk.supports(Rule(batch=4), per_channel, q)
    assert not chunk.supports(yes, gates, q.to(torch.bfloat16))
