"""minibatch.py's hand-written backward for runs of whole mini-batches (`batch = B`, 2-layer MLP memories), in
float64 against the oracle and against chunk.py's autograd loop (minibatch.ENABLED = False): reads, final weights
and momentum, and the gradients of q, k, v, every gate, the initial weights and momentum and the norm parameters."""

import itertools

import pytest
import torch

from nlc.ops.memory.naive import memory_naive
from nlc.ops.memory.rule import Gates, Rule, Structure
from nlc.ops.network import chunk, minibatch
from tests.ops.helpers import (
    assert_close_with_grads,
    assert_float32_close_to_float64,
    assert_partial_losses_agree,
    random_inputs,
    record_calls,
    run_in_pieces,
    switched_off,
)

N = 4  # tokens per mini-batch


def rule_for(act="gelu", norm="layer", update="momentum", retention="weight_decay", residual=True, expand=2.0, **changes):
    structure = Structure("mlp", depth=2, expand=expand, act=act, residual=residual, norm=norm)
    return Rule(structure=structure, update=update, retention=retention, **{"batch": N, **changes})


autograd_loop = switched_off(minibatch, chunk.apply)  # the autograd loop the Function replaces


def count_runs(monkeypatch) -> list[int]:
    return record_calls(monkeypatch, minibatch, "run_minibatches")


GRID = list(itertools.product(["gelu", "silu", "relu"], ["none", "layer", "rms"], ["gd", "momentum"], ["none", "weight_decay", "decay"]))


@pytest.mark.parametrize("act, norm, update, retention", GRID)
def test_grid_against_oracle_and_autograd(act, norm, update, retention, monkeypatch, poison_empty):
    """Three whole mini-batches in one run. The residual alternates over the grid, and so do the widths: 5 -> 5
    -> 5 with a residual, 6 -> 9 -> 4 without."""
    residual = GRID.index((act, norm, update, retention)) % 2 == 0
    rule = rule_for(act, norm, update, retention, residual, expand=1.0 if residual else 1.5)
    inputs = random_inputs(rule, B=2, H=2, T=3 * N, dk=5 if residual else 6, dv=5 if residual else 4)
    calls = count_runs(monkeypatch)
    assert_close_with_grads(memory_naive, chunk.apply, inputs)
    assert_close_with_grads(autograd_loop, chunk.apply, inputs)
    assert calls == [3 * N, 3 * N]


@pytest.mark.parametrize("cuts", [[3, 9], [4, 8], [6, 13], [1, 2, 3, 5, 10, 18]])
@pytest.mark.parametrize("update", ["gd", "momentum"])
def test_streaming_equals_one_call(cuts, update, monkeypatch):
    """A stream cut inside and across mini-batches (partial ones through the autograd loop with the anchor,
    whole ones through the Function, from a carried state) equals one call, and the oracle."""
    rule = rule_for(update=update, retention="decay")
    inputs = random_inputs(rule, B=2, H=2, T=5 * N, dk=4, dv=4, seed=1)
    calls = count_runs(monkeypatch)
    assert_close_with_grads(chunk.apply, lambda **x: run_in_pieces(chunk.apply, x, cuts), inputs)
    assert_close_with_grads(memory_naive, lambda **x: run_in_pieces(chunk.apply, x, cuts), inputs)
    bounds = [0, *cuts, 5 * N]
    pieces_with_whole_minibatches = sum(-(-a // N) * N + N <= b for a, b in itertools.pairwise(bounds))
    assert calls[0] == 5 * N and len(calls) == 1 + 2 * pieces_with_whole_minibatches > 1  # one call, then the pieces twice


@pytest.mark.parametrize("used", ["reads", "state"])
@pytest.mark.parametrize("update", ["gd", "momentum"])
def test_part_of_the_outputs(used, update):
    """Only the reads reach the loss, or only the final state (the reads' backward is skipped)."""
    rule = rule_for(act="silu", norm="rms", update=update, retention="decay", residual=False)
    inputs = random_inputs(rule, B=2, H=2, T=3 * N, dk=4, dv=4, seed=2)
    assert_partial_losses_agree(autograd_loop, chunk.apply, inputs, used)


def test_gates_at_zero():
    """Retention, momentum and learning rate exactly 0 inside and at the end of mini-batches: no division anywhere."""
    rule = rule_for(act="gelu", norm="layer", update="momentum", retention="decay")
    inputs = random_inputs(rule, B=2, H=2, T=3 * N, dk=4, dv=4, seed=3)
    for name, tokens in (("alpha", (1, N - 1)), ("beta", (N, 2 * N - 1)), ("lr", (2, 3 * N - 1))):
        gate = getattr(inputs["gates"], name).detach().clone()
        gate[:, :, list(tokens)] = 0
        setattr(inputs["gates"], name, gate.requires_grad_())
    assert_close_with_grads(memory_naive, chunk.apply, inputs)
    assert_close_with_grads(autograd_loop, chunk.apply, inputs)


@pytest.mark.parametrize("act, norm, update", [("gelu", "layer", "momentum"), ("silu", "rms", "gd"), ("relu", "none", "momentum")])
def test_float32_close_to_float64(act, norm, update):
    rule = rule_for(act, norm, update, "weight_decay")
    inputs = random_inputs(rule, B=2, H=2, T=4 * N, dk=8, dv=8, seed=4)
    assert_float32_close_to_float64(chunk.apply, inputs)


def test_supports_scope():
    q = torch.zeros(1, 1, 8, 4)
    gates = Gates(lr=torch.ones(1, 1, 8), beta=torch.ones(1, 1, 8), lam=torch.ones(1, 1, 8))
    assert minibatch.supports(rule_for(), gates, q, None)
    assert minibatch.supports(rule_for(), gates, q.double(), None)
    assert minibatch.supports(rule_for(update="gd", retention="none"), Gates(lr=torch.ones(1, 1, 8)), q, None)
    assert minibatch.supports(rule_for(targets="self"), gates, q, None)
    assert minibatch.supports(rule_for(update="dgd"), gates, q, None)  # dgd: the tests in test_network_minibatch_dgd.py
    unsupported = [
        rule_for(batch=1),
        rule_for(every=N),  # chunk writes: every.py
        rule_for(act="swiglu"),
        Rule(structure=Structure("mlp", depth=3), update="momentum", retention="weight_decay", batch=N),
        Rule(structure=Structure("linear"), update="momentum", retention="weight_decay", batch=N),
        rule_for(objective="dot"),
        rule_for(window=2),
        rule_for(update="muon"),
        rule_for(update="dgd", act="swiglu"),
        rule_for(grad="stop"),
    ]
    for rule in unsupported:
        assert not minibatch.supports(rule, gates, q, None), rule
    assert not minibatch.supports(rule_for(), gates, q.half(), None)
    wide = Gates(lr=torch.ones(1, 1, 8), beta=torch.ones(1, 1, 8), lam=torch.ones(1, 1, 8, 4))
    assert not minibatch.supports(rule_for(), wide, q, None)


@pytest.mark.parametrize(
    "rule",
    [rule_for(grad="stop"), rule_for(act="swiglu"), rule_for(objective="huber", retention="none"), rule_for(update="muon"), rule_for(window=2)],
    ids=["grad_stop", "swiglu", "huber", "muon", "window"],
)
def test_unsupported_rules_keep_the_autograd_loop(rule, monkeypatch):
    inputs = random_inputs(rule, B=1, H=2, T=2 * N, dk=4, dv=4)
    calls = count_runs(monkeypatch)
    chunk.apply(**inputs)
    assert calls == []


def test_partial_minibatches_keep_the_autograd_loop(monkeypatch):
    """Only the whole mini-batches of a call go to the Function; a call inside one mini-batch never does."""
    rule = rule_for()
    inputs = random_inputs(rule, B=1, H=2, T=3 * N + 3, dk=4, dv=4)
    calls = count_runs(monkeypatch)
    run_in_pieces(chunk.apply, inputs, [N - 1, 3 * N + 2])  # N - 1 | 2 whole mini-batches and 2 tokens | 1 token
    assert calls == [2 * N]
    run_in_pieces(chunk.apply, inputs, [1, 3, 3 * N])
    assert calls == [2 * N, 2 * N]  # the piece from token 3 to 3 N: 1 token, then 2 whole mini-batches


def test_switched_off_keeps_the_autograd_loop(monkeypatch):
    inputs = random_inputs(rule_for(), B=1, H=2, T=2 * N, dk=4, dv=4)
    calls = count_runs(monkeypatch)
    autograd_loop(**inputs)
    assert calls == []
    chunk.apply(**inputs)
    assert calls == [2 * N]


def test_forward_without_grad_equals_forward_with_grad():
    inputs = random_inputs(rule_for(), B=2, H=2, T=3 * N, dk=4, dv=4)
    with torch.no_grad():
        o, state = chunk.apply(**inputs)
    o_grad, state_grad = chunk.apply(**inputs)
    assert not o.requires_grad
    torch.testing.assert_close(o, o_grad.detach(), atol=0, rtol=0)
    for w, w_grad in zip((*state.weights, *state.momentum), (*state_grad.weights, *state_grad.momentum)):
        torch.testing.assert_close(w, w_grad.detach(), atol=0, rtol=0)
