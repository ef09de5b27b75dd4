"""CmsLayer: the three variants with task and l2 objectives; task writes checked against the literal
gradient of the loss of each chunk; l2 writes checked against the memory oracle."""

import pytest
import torch
import torch.nn.functional as F

from nlc.ops.memory.naive import memory_naive
from nlc.ops.memory.rule import Gates
from nlc.runtime import CmsConfig, CmsLayer, CmsLevelConfig, Structure

pytestmark = pytest.mark.filterwarnings("ignore:no fast path supports")

DIM = 6
SWIGLU = Structure("mlp", depth=2, expand=2.0, act="swiglu")


def levels(*specs):
    return tuple(CmsLevelConfig(name, SWIGLU, every=every, update=update, lr=0.1) for name, every, update in specs)


THREE = levels(("fast", 2, "gd"), ("mid", 4, "momentum"), ("slow", 0, "gd"))


def make(variant="sequential", objective="task", lv=THREE, seed=0):
    torch.manual_seed(seed)
    return CmsLayer(CmsConfig(dim=DIM, levels=lv, variant=variant, objective=objective)).double()


def swiglu_mlp(W, h):
    """The level's function written out: W2 (silu(W_gate h) * (W_up h)), weights [B, out, in], h [B, T, d]."""
    gate, up = (h @ W[0].transpose(-1, -2)).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ W[1].transpose(-1, -2)


VARIANTS = [(v, o) for v in ("sequential", "independent", "nested") for o in ("task", "l2")]


@pytest.mark.parametrize("variant,objective", VARIANTS)
def test_forward_backward_stream_causal(variant, objective):
    layer = make(variant, objective)
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    y, state = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all() and state.pos == 11
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        y = layer(x)[0]
        ys, st = [], None
        for s, e in [(0, 1), (1, 4), (4, 9), (9, 11)]:  # inside and across chunks of 2 and 4
            out, st = layer(x[:, s:e], st)
            ys.append(out)
        torch.testing.assert_close(torch.cat(ys, dim=1), y, rtol=1e-10, atol=1e-10)
        changed = x.clone()
        changed[:, 5:] += 1.0
        torch.testing.assert_close(layer(changed)[0][:, :5], y[:, :5], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("objective", ["task", "l2"])
def test_low_precision(dtype, objective):
    layer = make(objective=objective).to(dtype)
    x = torch.randn(2, 6, DIM, dtype=dtype)
    y, state = layer(x)
    y.float().square().sum().backward()
    state = layer.learn(state)
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_task_write_is_the_literal_gradient_of_the_chunk_loss():
    """fast: every 4 with gd; two pieces of 2 tokens, each followed by backward and learn. The first learn
    only accumulates; the second writes W_fast = W0 - lr (dL_1/dW + dL_2/dW), both gradients taken at W0."""
    lv = levels(("fast", 4, "gd"), ("slow", 0, "gd"))
    layer = make("sequential", "task", lv)
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    target = torch.randn(2, 4, DIM, dtype=torch.float64)
    W0 = [w.detach() for w in layer.cores[0].init_weights]  # [1, out, in]
    S0 = [w.detach() for w in layer.cores[1].init_weights]

    def literal_loss(W, piece):
        h = x[:, piece] + swiglu_mlp(W, x[:, piece])
        y = h + swiglu_mlp([s[0] for s in S0], h)
        return (y * target[:, piece]).sum()

    expected_grad = [torch.zeros(2, *w.shape[1:], dtype=torch.float64) for w in W0]
    state = None
    for piece in (slice(0, 2), slice(2, 4)):
        y, state = layer(x[:, piece], state)
        assert all(d.abs().sum() == 0 for d in state.levels[0].delta)  # a forward never writes
        (y * target[:, piece]).sum().backward()
        state = layer.learn(state)
        W = [w[0].expand(2, *w.shape[1:]).clone().requires_grad_() for w in W0]  # [B, out, in]
        for acc, g in zip(expected_grad, torch.autograd.grad(literal_loss(W, piece), W)):
            acc += g
        if piece.start == 0:
            assert all(d.abs().sum() == 0 for d in state.levels[0].delta)
            assert state.levels[0].pending is not None
    for d, g in zip(state.levels[0].delta, expected_grad):
        assert g.abs().sum() > 0
        torch.testing.assert_close(d[:, 0], -0.1 * g, rtol=1e-12, atol=1e-12)
    assert state.levels[0].pending is None
    assert all(d.abs().sum() == 0 for d in state.levels[1].delta)  # every = 0: never learns
    # the next chunk reads W0 + delta
    x_next = torch.randn(2, 3, DIM, dtype=torch.float64)
    with torch.no_grad():
        y_next, _ = layer(x_next, state)
        W_new = [w[0] + d[:, 0] for w, d in zip(W0, state.levels[0].delta)]
        h = x_next + swiglu_mlp(W_new, x_next)
        torch.testing.assert_close(y_next, h + swiglu_mlp([s[0] for s in S0], h), rtol=1e-12, atol=1e-12)


def test_task_call_over_several_chunks_writes_each_with_its_own_tokens_gradient():
    """One call of 10 tokens, fast every 4 with gd: pieces [0, 4), [4, 8), [8, 10), all read W0 (a call never
    writes). After one backward, learn writes chunk 1 then chunk 2, each with the literal gradient of its own
    tokens' loss at W0, and keeps the last piece's gradient pending."""
    lv = levels(("fast", 4, "gd"), ("slow", 0, "gd"))
    layer = make("sequential", "task", lv)
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    target = torch.randn(2, 10, DIM, dtype=torch.float64)
    W0 = [w.detach() for w in layer.cores[0].init_weights]  # [1, out, in]
    S0 = [w.detach()[0] for w in layer.cores[1].init_weights]

    def piece_gradient(piece):
        W = [w[0].expand(2, *w.shape[1:]).clone().requires_grad_() for w in W0]  # [B, out, in]
        h = x[:, piece] + swiglu_mlp(W, x[:, piece])
        return torch.autograd.grad(((h + swiglu_mlp(S0, h)) * target[:, piece]).sum(), W)

    y, state = layer(x)
    (y * target).sum().backward()
    state = layer.learn(state)
    g1, g2, g3 = (piece_gradient(piece) for piece in (slice(0, 4), slice(4, 8), slice(8, 10)))
    for d, a, b in zip(state.levels[0].delta, g1, g2):
        torch.testing.assert_close(d[:, 0], -0.1 * (a + b), rtol=1e-12, atol=1e-12)
    for p, c in zip(state.levels[0].pending, g3):
        assert c.abs().sum() > 0
        torch.testing.assert_close(p[:, 0], c, rtol=1e-12, atol=1e-12)


def test_task_momentum_and_flush():
    lv = levels(
        ("fast", 2, "momentum"),
    )
    layer = make("sequential", "task", lv)
    x = torch.randn(1, 5, DIM, dtype=torch.float64)
    state, grads = None, []
    for piece in (slice(0, 2), slice(2, 4), slice(4, 5)):
        y, state = layer(x[:, piece], state)
        y.sum().backward()
        ((piece_grads, _),) = state.levels[0].reads[-1].gradients(state.levels[0].delta)  # one piece per call here
        grads.append(list(piece_grads))
        state = layer.learn(state) if piece.stop < 5 else layer.flush(state)
    # S_1 = -lr g_1; S_2 = beta S_1 - lr g_2; S_3 (flushed partial chunk) = beta S_2 - lr g_3; delta = S_1 + S_2 + S_3
    S, delta = [0, 0], [0, 0]
    for g in grads:
        S = [0.9 * s - 0.1 * gi for s, gi in zip(S, g)]
        delta = [d + s for d, s in zip(delta, S)]
    for got, want in zip(state.levels[0].delta, delta):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert state.levels[0].pending is None


def test_nested_task_resets_the_fast_level_when_the_slow_chunk_ends():
    lv = levels(("fast", 2, "gd"), ("slow", 4, "gd"))
    layer = make("nested", "task", lv)
    x = torch.randn(1, 4, DIM, dtype=torch.float64)
    state = None
    for piece in (slice(0, 2), slice(2, 4)):
        y, state = layer(x[:, piece], state)
        y.square().sum().backward()
        state = layer.learn(state)
        W_fast = [w + d for w, d in zip(layer._weights0(0, 1, torch.float64), state.levels[0].delta)]
        W_slow = [w + d for w, d in zip(layer._weights0(1, 1, torch.float64), state.levels[1].delta)]
        if piece.stop == 2:
            assert all(d.abs().sum() > 0 for d in state.levels[0].delta)
            assert all(d.abs().sum() == 0 for d in state.levels[1].delta)
        else:
            assert all(d.abs().sum() > 0 for d in state.levels[1].delta)
            for a, b in zip(W_fast, W_slow):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_l2_level_learns_its_next_input_as_the_oracle_says():
    """The first level of a sequential chain sees x: its writes are the oracle's with key = x_{t-1},
    value = x_t (every = 2, gd, lr 0.1, stop-gradient writes)."""
    lv = levels(("fast", 2, "gd"), ("slow", 0, "gd"))
    layer = make("sequential", "l2", lv)
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    with torch.no_grad():
        y, state = layer(x)
        keys = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)[:, None]  # [B, 1, T, d]
        lr = torch.full((2, 1, 7), 0.1, dtype=torch.float64)
        start = layer.initial_state(2, dtype=torch.float64).levels[0].memory
        reads, expected = memory_naive(x[:, None], keys, x[:, None], Gates(lr=lr), layer.rules[0], start)
    for a, b in zip(state.levels[0].memory.weights, expected.weights):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    h = x + reads[:, 0]
    W_slow = [w[0] for w in layer.cores[1].init_weights]
    torch.testing.assert_close(y, h + swiglu_mlp(W_slow, h).detach(), rtol=1e-12, atol=1e-12)
    assert state.levels[0].memory.pending is not None  # token 7 opens a chunk
    flushed = layer.flush(state)
    assert flushed.levels[0].memory.pending is None


def test_nested_l2_resets_at_the_slow_chunk_end():
    lv = levels(("fast", 2, "gd"), ("slow", 4, "gd"))
    layer = make("nested", "l2", lv)
    x = torch.randn(1, 4, DIM, dtype=torch.float64)
    with torch.no_grad():
        _, state = layer(x)
    for a, b in zip(state.levels[0].memory.weights, state.levels[1].memory.weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.allclose(a, w[None]) for a, w in zip(state.levels[1].memory.weights, layer.cores[1].init_weights))


def test_invalid_nested_levels_are_rejected():
    with pytest.raises(ValueError, match="multiple"):
        make("nested", "task", levels(("fast", 4, "gd"), ("slow", 6, "gd")))
