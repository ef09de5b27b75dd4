"""MemoryLayer: every catalogue configuration runs forward and backward, trains every parameter it
should, streams, is causal, and runs in float64, float32 and bfloat16."""

import copy
import dataclasses
import itertools

import pytest
import torch

from nlc.runtime import Adaptive, GateSpec, MemoryConfig, MemoryLayer, Pipeline, Source, Structure, Transform
from nlc.runtime.gates import Gate

pytestmark = pytest.mark.filterwarnings("ignore:no fast path supports")

DIM, HEADS = 8, 2  # head width 4


def pipe(source: Source, *steps) -> Pipeline:
    return Pipeline(source, tuple(Transform(*s) if isinstance(s, tuple) else Transform(s) for s in steps))


LINEAR = Source("linear")
RESIDUAL_MLP = Structure("mlp", depth=2, expand=1.0, residual=True)


def adaptive_source() -> Source:
    return Source("memory", adaptive=Adaptive(structure=RESIDUAL_MLP))


def adaptive_gate() -> GateSpec:
    return GateSpec("memory", adaptive=Adaptive(structure=Structure("mlp", depth=2, expand=1.0)))


CONFIGS = {
    "deltanet": MemoryConfig(dim=DIM, heads=HEADS),
    "gated_deltanet": MemoryConfig(dim=DIM, heads=HEADS, retention="decay", output=("norm", "gate")),
    "linear_attention": MemoryConfig(
        dim=DIM,
        heads=HEADS,
        objective="dot",
        lr=GateSpec("constant", 1.0),
        keys=pipe(LINEAR, "elu1"),
        queries=pipe(LINEAR, "elu1"),
        output=("none",),
    ),
    "ttt_linear": MemoryConfig(
        dim=DIM,
        heads=HEADS,
        structure=Structure("linear", residual=True, norm="layer"),
        batch=16,
        init="learned",
    ),
    "titans": MemoryConfig(
        dim=DIM,
        heads=HEADS,
        structure=Structure("mlp", depth=2, expand=2.0),
        keys=pipe(LINEAR, ("conv", 4), "silu", "l2norm"),
        values=pipe(LINEAR, ("conv", 4), "silu"),
        queries=pipe(LINEAR, ("conv", 4), "silu", "l2norm"),
        retention="weight_decay",
        update="momentum",
        batch=16,
        output=("norm", "gate"),
    ),
    "hope": MemoryConfig(
        dim=DIM,
        heads=HEADS,
        structure=RESIDUAL_MLP,
        keys=pipe(adaptive_source(), ("conv", 4), "l2norm"),
        values=pipe(adaptive_source(), ("conv", 4)),
        queries=pipe(LINEAR, "l2norm"),
        targets="self",
        retention="weight_decay",
        retention_gate=adaptive_gate(),
        update="dgd",
        lr=adaptive_gate(),
        batch=4,
        init="learned",
    ),
    "atlas": MemoryConfig(
        dim=DIM,
        heads=HEADS,
        keys=pipe(LINEAR, "l2norm", ("poly", 2)),
        window=4,
        update="muon",
        beta=GateSpec("learned"),
        retention="decay",
        ns_steps=3,
    ),
    # the remaining sources, transforms and gate kinds
    "chunked_huber": MemoryConfig(
        dim=DIM,
        heads=HEADS,
        keys=pipe(Source("lowrank", rank=2), "relu", "rmsnorm"),
        values=pipe(Source("input")),
        queries=pipe(LINEAR, ("scale", 0.5), "l2norm"),
        objective="huber",
        huber_delta=GateSpec("learned"),
        retention="decay",
        retention_gate=GateSpec("gate", per="channel"),
        lr=GateSpec("learned", 0.3),
        every=4,
        output=("none",),
        out="none",
    ),
    "stop_lp_swiglu": MemoryConfig(
        dim=DIM,
        heads=HEADS,
        structure=Structure("mlp", depth=2, expand=2.0, act="swiglu", norm="rms"),
        objective="lp",
        p=3.0,
        update="momentum",
        lr=GateSpec("constant", 0.1),
        beta=GateSpec("learned"),
        batch=2,
        grad="stop",
    ),
}


def make(name: str, dtype=torch.float64, seed: int = 0) -> MemoryLayer:
    torch.manual_seed(seed)
    return MemoryLayer(CONFIGS[name]).to(dtype)


def run_pieces(layer, x, cuts):
    state, ys = None, []
    for s, e in itertools.pairwise(cuts):
        y, state = layer(x[:, s:e], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def cut_by_stop(name: str) -> bool:
    """Parameters that only shape the writes: with grad = stop they never reach the outer loss."""
    return any(part in name for part in ("sources.key", "sources.value", "transforms.key", "transforms.value", "gates."))


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_backward_reaches_every_parameter(name):
    layer = make(name)
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    y, _ = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y.square().sum()).backward()
    stop = CONFIGS[name].grad == "stop"
    for pname, p in layer.named_parameters():
        if stop and cut_by_stop(pname):
            assert p.grad is None or p.grad.abs().sum() == 0, pname
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", CONFIGS)
def test_one_call_equals_pieces(name):
    """Cuts inside mini-batches (batch 2, 4, 16), inside chunks (every 4) and shorter than the conv tail."""
    layer = make(name)
    x = torch.randn(2, 19, DIM, dtype=torch.float64)
    y, state = layer(x)
    y_pieces, state_pieces = run_pieces(layer, x, [0, 1, 3, 6, 7, 13, 19])
    torch.testing.assert_close(y_pieces, y, rtol=1e-10, atol=1e-10)
    for a, b in zip(state.memory.weights, state_pieces.memory.weights):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # the continuation after the pieces matches the continuation after one call
    x_next = torch.randn(2, 5, DIM, dtype=torch.float64)
    torch.testing.assert_close(layer(x_next, state_pieces)[0], layer(x_next, state)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", CONFIGS)
def test_causal(name):
    layer = make(name)
    x = torch.randn(1, 14, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[:, 6:] = torch.randn(1, 8, DIM, dtype=torch.float64)
    with torch.no_grad():
        y, y_changed = layer(x)[0], layer(changed)[0]
    torch.testing.assert_close(y_changed[:, :6], y[:, :6], rtol=0, atol=0)
    assert not torch.allclose(y_changed[:, 6:], y[:, 6:])


@pytest.mark.parametrize("name", ["deltanet", "titans", "hope", "atlas", "chunked_huber"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_runs_with_float32_state(name, dtype):
    layer = make(name, dtype)
    x = torch.randn(2, 10, DIM, dtype=dtype)
    y, state = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert all(w.dtype == torch.float32 for w in state.memory.weights)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_flush_writes_the_pending_chunk():
    layer = make("chunked_huber")  # every = 4
    x = torch.randn(1, 6, DIM, dtype=torch.float64)
    with torch.no_grad():
        _, state = layer(x)
        flushed = layer.flush(state)
        _, whole_chunks = layer(x[:, :4])
    assert state.memory.pending is not None and flushed.memory.pending is None
    # tokens 5 and 6 are pending: before the flush the weights are those after the first chunk
    torch.testing.assert_close(state.memory.weights[0], whole_chunks.memory.weights[0])
    assert not torch.allclose(flushed.memory.weights[0], state.memory.weights[0])


def test_adaptive_projections_learn_and_read_at_the_minibatch_start():
    """Hope's inner memories change in context, and with batch = 4 the key source of the first mini-batch
    is the inner memory's initial state applied to x, untouched by the writes inside that mini-batch."""
    layer = make("hope")
    x = torch.randn(1, 8, DIM, dtype=torch.float64)
    x_heads = x.view(1, 8, HEADS, DIM // HEADS).transpose(1, 2)  # [B, H, T, d]
    seen = []
    handle = layer.transforms["key"].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        start = layer.initial_state(1, dtype=torch.float64)
        _, state = layer(x, start)
    handle.remove()
    for name, inner in state.inner.items():
        assert inner.pos == 8
        assert any(not torch.allclose(a, b) for a, b in zip(inner.weights, start.inner[name].weights)), name
    assert [s.shape[1] for s in seen] == [4, 4]  # one segment per mini-batch
    first = layer.inner["key"].read(start.inner["key"], x_heads[:, :, :4]).transpose(1, 2)  # [B, 4, H, d]
    torch.testing.assert_close(seen[0], first, rtol=1e-12, atol=1e-12)
    second_from_start = layer.inner["key"].read(start.inner["key"], x_heads[:, :, 4:]).transpose(1, 2)
    assert not torch.allclose(seen[1], second_from_start)  # the second mini-batch reads the written state


def test_poly_features_width_and_coefficients():
    layer = make("atlas")
    poly = layer.transforms["key"].poly
    assert layer.d_k == 1 + 4 + 16 and layer.transforms["query"].out_width == layer.d_k  # queries share the map
    torch.testing.assert_close(poly.coef.detach(), torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64))
    x = torch.randn(3, 4, dtype=torch.float64)
    phi = poly(x)
    torch.testing.assert_close(phi @ phi.T, 1 + x @ x.T + 0.25 * (x @ x.T) ** 2)


def test_configuration_errors_are_reported():
    with pytest.raises(ValueError, match="divide"):
        MemoryLayer(MemoryConfig(dim=10, heads=3))
    with pytest.raises(ValueError, match="out = none"):
        MemoryLayer(MemoryConfig(dim=8, heads=2, values=pipe(Source("lowrank", rank=2), ("poly", 2)), out="none"))
    with pytest.raises(ValueError, match="cannot be residual"):
        MemoryLayer(MemoryConfig(dim=8, heads=2, lr=GateSpec("memory", adaptive=Adaptive(structure=RESIDUAL_MLP))))


def test_paths_names_the_op_of_every_memory():
    paths = make("hope").paths()
    assert set(paths) == {"memory", "key", "value", "lr", "lam"}
    assert all(isinstance(p, str) and p for p in paths.values())


def test_self_targets_computed_by_the_layer_equal_the_ops_self_targets():
    """The inner key and value memories of Hope inherit targets = self; the layer passes M_P(v_t) as plain
    values. Against the same layer that leaves targets = self to the ops: outputs and every gradient."""
    layer = make("hope")
    assert layer.inner_self_targets["key"] and layer.inner["key"].rule.targets == "values"
    reference = copy.deepcopy(layer)
    for name in ("key", "value"):
        reference.inner_self_targets[name] = False
        reference.inner[name].rule = dataclasses.replace(reference.inner[name].rule, targets="self")
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    weight = torch.randn(2, 10, DIM, dtype=torch.float64)
    y, y_reference = layer(x)[0], reference(x)[0]
    torch.testing.assert_close(y, y_reference, rtol=1e-12, atol=1e-12)
    (y * weight).sum().backward()
    (y_reference * weight).sum().backward()
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_gate_kinds_ranges_and_initial_values():
    x = torch.randn(2, 5, DIM)
    lr = Gate(GateSpec("learned", 1.0), "lr", DIM, HEADS, 4, network=False)  # softplus: 1 is reachable
    torch.testing.assert_close(lr(x, torch.float32), torch.ones(2, HEADS, 5))
    beta = Gate(GateSpec("learned"), "beta", DIM, HEADS, 4, network=True)  # sigmoid, default 0.9
    torch.testing.assert_close(beta(x, torch.float32), torch.full((2, HEADS, 5), 0.9))
    const = Gate(GateSpec("constant", 0.25), "alpha", DIM, HEADS, 4, network=False)
    assert torch.equal(const(x, torch.float32), torch.full((2, HEADS, 5), 0.25))
    channel = Gate(GateSpec("gate", per="channel"), "alpha", DIM, HEADS, 4, network=False)
    values = channel(x, torch.float32)
    assert values.shape == (2, HEADS, 5, 4) and ((values > 0) & (values < 1)).all()
    assert abs(values.mean().item() - 0.99) < 0.01  # starts near its default through the bias
    network_lr = Gate(GateSpec("gate", squash="softplus"), "lr", DIM, HEADS, 4, network=True)
    assert (network_lr(x, torch.float32) > 0).all()
    adaptive_lr = Gate(GateSpec("memory", adaptive=Adaptive(Structure("mlp"))), "lr", DIM, HEADS, 4, network=True)
    torch.testing.assert_close(adaptive_lr(x, torch.float32, pre=torch.zeros(2, HEADS, 5)), torch.full((2, HEADS, 5), 0.05))


def test_paths_sees_per_channel_gates_as_the_forward_does(monkeypatch):
    """A per-channel lr on linear attention is the chunk path's (dot folds it into the keys): `paths` must
    name the path a forward takes, not the one per-head gates would."""
    from nlc.ops.memory import dispatch

    layer = MemoryLayer(MemoryConfig(dim=16, heads=2, objective="dot", lr=GateSpec("gate", per="channel")))
    expected = layer.paths()
    taken, original = [], dispatch.find_path
    monkeypatch.setattr(dispatch, "find_path", lambda *args: taken.append(original(*args).NAME) or original(*args))
    layer(torch.randn(1, 5, 16))
    assert taken == ["matrix.chunk"] and expected == {"memory": "matrix.chunk"}
