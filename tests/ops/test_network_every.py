"""every.py's hand-written backward for runs of whole chunks (`every = C`, 2-layer MLP memories), in float64
against the oracle and against chunk.py's autograd loop (every.ENABLED = False): reads, final weights and
momentum, and the gradients of q, k, v, every gate, the initial weights and momentum and the norm parameters."""

import itertools

import pytest
import torch

from nlc.ops.memory.naive import memory_naive
from nlc.ops.memory.rule import Gates, Rule, Structure
from nlc.ops.network import chunk, every
from tests.ops.helpers import (
    assert_close_with_grads,
    assert_float32_close_to_float64,
    assert_partial_losses_agree,
    random_inputs,
    record_calls,
    run_in_pieces,
    switched_off,
)

C = 4


def rule_for(act="gelu", norm="layer", update="momentum", retention="weight_decay", residual=True, **changes):
    structure = Structure("mlp", depth=2, expand=2.0, act=act, residual=residual, norm=norm)
    return Rule(structure=structure, update=update, retention=retention, **{"every": C, **changes})


autograd_loop = switched_off(every, chunk.apply)  # the autograd loop the Function replaces


def count_runs(monkeypatch) -> list[int]:
    return record_calls(monkeypatch, every, "run_chunks")


GRID = list(itertools.product(["gelu", "silu", "relu"], ["none", "layer", "rms"], ["gd", "momentum"], ["none", "weight_decay", "decay"]))


@pytest.mark.parametrize("act, norm, update, retention", GRID)
def test_grid_against_oracle_and_autograd(act, norm, update, retention, monkeypatch, poison_empty):
    """Three whole chunks in one run; the residual alternates over the grid, and so does the width (4 or 6)."""
    residual = GRID.index((act, norm, update, retention)) % 2 == 0
    rule = rule_for(act, norm, update, retention, residual)
    inputs = random_inputs(rule, B=2, H=2, T=3 * C, dk=4 if residual else 6, dv=4 if residual else 6)
    calls = count_runs(monkeypatch)
    assert_close_with_grads(memory_naive, chunk.apply, inputs)
    assert_close_with_grads(autograd_loop, chunk.apply, inputs)
    assert calls == [3 * C, 3 * C]


@pytest.mark.parametrize("cuts", [[3, 9], [4, 8], [6, 13], [1, 2, 3, 5, 10, 18]])
@pytest.mark.parametrize("update", ["gd", "momentum"])
def test_streaming_equals_one_call(cuts, update, monkeypatch):
    """A stream cut inside and across chunks (partial chunks through the autograd loop, whole ones through
    the Function, from a carried state) equals one call, and the oracle."""
    rule = rule_for(update=update, retention="decay")
    inputs = random_inputs(rule, B=2, H=2, T=5 * C, dk=4, dv=4, seed=1)
    calls = count_runs(monkeypatch)
    assert_close_with_grads(chunk.apply, lambda **x: run_in_pieces(chunk.apply, x, cuts), inputs)
    assert_close_with_grads(memory_naive, lambda **x: run_in_pieces(chunk.apply, x, cuts), inputs)
    bounds = [0, *cuts, 5 * C]
    pieces_with_whole_chunks = sum(-(-a // C) * C + C <= b for a, b in itertools.pairwise(bounds))
    assert calls[0] == 5 * C and len(calls) == 1 + 2 * pieces_with_whole_chunks > 1  # one call, then the pieces twice


@pytest.mark.parametrize("used", ["reads", "state"])
def test_part_of_the_outputs(used):
    """Only the reads reach the loss (the last write's backward is skipped), or only the final state."""
    rule = rule_for(act="silu", norm="rms", update="momentum", retention="decay", residual=False)
    inputs = random_inputs(rule, B=2, H=2, T=3 * C, dk=4, dv=4, seed=2)
    assert_partial_losses_agree(autograd_loop, chunk.apply, inputs, used)


def test_gates_at_zero():
    """Retention, momentum and learning rate exactly 0 at some chunk ends: no division anywhere."""
    rule = rule_for(act="gelu", norm="layer", update="momentum", retention="decay")
    inputs = random_inputs(rule, B=2, H=2, T=3 * C, dk=4, dv=4, seed=3)
    for name, token in (("alpha", C - 1), ("beta", 2 * C - 1), ("lr", 3 * C - 1)):
        gate = getattr(inputs["gates"], name).detach().clone()
        gate[:, :, token] = 0
        setattr(inputs["gates"], name, gate.requires_grad_())
    assert_close_with_grads(memory_naive, chunk.apply, inputs)


@pytest.mark.parametrize("act, norm, update", [("gelu", "layer", "momentum"), ("silu", "rms", "gd"), ("relu", "none", "momentum")])
def test_float32_close_to_float64(act, norm, update):
    rule = rule_for(act, norm, update, "weight_decay")
    inputs = random_inputs(rule, B=2, H=2, T=4 * C, dk=8, dv=8, seed=4)
    assert_float32_close_to_float64(chunk.apply, inputs)


def test_supports_scope():
    q = torch.zeros(1, 1, 8, 4)
    gates = Gates(lr=torch.ones(1, 1, 8), beta=torch.ones(1, 1, 8), lam=torch.ones(1, 1, 8))
    assert every.supports(rule_for(), gates, q, None)
    assert every.supports(rule_for(), gates, q.double(), None)
    assert every.supports(rule_for(batch=2), gates, q, None)
    unsupported = [
        rule_for(every=1, batch=4),
        rule_for(act="swiglu"),
        Rule(structure=Structure("mlp", depth=3), update="momentum", retention="weight_decay", every=C),
        Rule(structure=Structure("linear"), update="momentum", retention="weight_decay", every=C),
        rule_for(objective="dot"),
        rule_for(targets="self"),
        rule_for(window=2),
        rule_for(update="muon"),
        rule_for(update="dgd"),
        rule_for(grad="stop"),
    ]
    for rule in unsupported:
        assert not every.supports(rule, gates, q, None), rule
    assert not every.supports(rule_for(), gates, q.half(), None)
    wide = Gates(lr=torch.ones(1, 1, 8), beta=torch.ones(1, 1, 8), lam=torch.ones(1, 1, 8, 4))
    assert not every.supports(rule_for(), wide, q, None)


@pytest.mark.parametrize(
    "rule",
    [rule_for(grad="stop"), rule_for(act="swiglu"), rule_for(objective="huber", retention="none"), rule_for(update="muon")],
    ids=["grad_stop", "swiglu", "huber", "muon"],
)
def test_unsupported_rules_keep_the_autograd_loop(rule, monkeypatch):
    inputs = random_inputs(rule, B=1, H=2, T=2 * C, dk=4, dv=4)
    calls = count_runs(monkeypatch)
    chunk.apply(**inputs)
    assert calls == []


def test_switched_off_keeps_the_autograd_loop(monkeypatch):
    inputs = random_inputs(rule_for(), B=1, H=2, T=2 * C, dk=4, dv=4)
    calls = count_runs(monkeypatch)
    autograd_loop(**inputs)
    assert calls == []
    chunk.apply(**inputs)
    assert calls == [2 * C]


def test_forward_without_grad_equals_forward_with_grad():
    inputs = random_inputs(rule_for(), B=2, H=2, T=3 * C, dk=4, dv=4)
    with torch.no_grad():
        o, state = chunk.apply(**inputs)
    o_grad, state_grad = chunk.apply(**inputs)
    assert not o.requires_grad
    torch.testing.assert_close(o, o_grad.detach(), atol=0, rtol=0)
    for w, w_grad in zip((*state.weights, *state.momentum), (*state_grad.weights, *state_grad.momentum)):
        torch.testing.assert_close(w, w_grad.detach(), atol=0, rtol=0)
