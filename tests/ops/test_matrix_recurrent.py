"""The recurrent matrix path against the oracle, in float64: reads, every state field, and the gradients of
q, k, v, every gate and the initial state (weights, momentum, carried window)."""

import pytest
import torch

from nlc.ops.matrix import chunk, recurrent
from nlc.ops.memory import dispatch
from nlc.ops.memory.naive import memory_naive as oracle
from nlc.ops.memory.rule import Gates, Rule, Structure
from tests.ops.helpers import (
    assert_close_with_grads,
    assert_dispatch_takes_a_fast_path,
    assert_empty_call_keeps_the_state,
    assert_finite_with_extreme_gates,
    handover,
    random_inputs,
    run_in_pieces,
)

OBJECTIVES = ("dot", "l2", "lp", "huber")
UPDATES = ("gd", "momentum", "dgd", "muon")
RETENTIONS = ("none", "decay", "weight_decay")

NAMED = {
    "atlas": Rule(window=4, retention="decay", update="muon", ns_steps=5),
    "omeganet": Rule(window=4, retention="decay"),
    "titans_linear": Rule(retention="weight_decay", update="momentum"),
    "huber_window_self": Rule(objective="huber", window=3, targets="self", update="momentum", retention="decay"),
    "lp_dgd": Rule(objective="lp", p=1.5, update="dgd", retention="weight_decay", window=2),
    "dot_muon_self": Rule(objective="dot", update="muon", targets="self", ns_steps=2),
    "atlas_stop": Rule(window=4, retention="decay", update="muon", ns_steps=2, grad="stop"),
}


def rule_of(objective, update, retention, window, targets, grad):
    return Rule(objective=objective, p=3.0, update=update, retention=retention, window=window, targets=targets, grad=grad, ns_steps=2)


@pytest.mark.parametrize("grad", ["full", "stop"])
@pytest.mark.parametrize("targets", ["values", "self"])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("retention", RETENTIONS)
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_combination_matches_the_oracle(objective, update, retention, window, targets, grad):
    rule = rule_of(objective, update, retention, window, targets, grad)
    inputs = random_inputs(rule, B=2, H=2, T=7, dk=3, dv=3, seed=window)
    assert recurrent.supports(rule, inputs["gates"], inputs["q"])
    assert_close_with_grads(oracle, recurrent.apply, inputs)


@pytest.mark.parametrize("retention", RETENTIONS)
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_per_channel_gates_match_the_oracle(objective, update, retention):
    """Every gate but huber's delta per key channel, with a window, keys wider than values."""
    rule = rule_of(objective, update, retention, window=2, targets="values", grad="full")
    inputs = random_inputs(rule, B=1, H=2, T=6, dk=5, dv=3, per_channel=True, seed=3)
    assert all(getattr(inputs["gates"], n).dim() == 4 for n in ("lr", "beta", "alpha", "lam") if getattr(inputs["gates"], n) is not None)
    assert recurrent.supports(rule, inputs["gates"], inputs["q"])
    assert_close_with_grads(oracle, recurrent.apply, inputs)


@pytest.mark.parametrize("length", [1, 33])
@pytest.mark.parametrize("name", sorted(NAMED))
def test_lengths(name, length):
    rule = NAMED[name]
    inputs = random_inputs(rule, B=1, H=2, T=length, dk=4, dv=4, seed=length)
    assert_close_with_grads(oracle, recurrent.apply, inputs)


@pytest.mark.parametrize("name", sorted(NAMED))
def test_streaming_in_pieces_equals_one_call(name):
    """Cuts after 1, 2 and 5 tokens: inside a window of 3 or 4, so the carried keys, values (and
    thresholds) are read by the next piece; gradients flow back through them."""
    rule = NAMED[name]
    inputs = random_inputs(rule, B=1, H=2, T=9, dk=4, dv=4, seed=5)
    assert_close_with_grads(oracle, lambda **i: run_in_pieces(recurrent.apply, i, cuts=(1, 2, 5)), inputs)


@pytest.mark.parametrize("order", ["oracle_then_recurrent", "recurrent_then_oracle"])
@pytest.mark.parametrize("name", ["atlas", "huber_window_self", "titans_linear", "atlas_stop"])
def test_handover_between_the_oracle_and_this_path(name, order):
    rule = NAMED[name]
    inputs = random_inputs(rule, B=1, H=2, T=8, dk=4, dv=4, seed=7)
    paths = (oracle, recurrent.apply) if order == "oracle_then_recurrent" else (recurrent.apply, oracle)
    assert_close_with_grads(oracle, handover(*paths, cut=3), inputs)


@pytest.mark.parametrize("name", ["atlas", "huber_window_self", "lp_dgd"])
def test_a_carried_window_gets_its_gradient(name):
    """A state that already holds the last tokens' keys, values and thresholds as leaves of their own."""
    rule = NAMED[name]
    inputs = random_inputs(rule, B=1, H=2, T=5, dk=4, dv=4, seed=11)
    gen = torch.Generator().manual_seed(12)
    held = rule.window - 2  # fewer than window - 1: the first token's window also reaches the stream start
    recent = {"k": torch.randn(1, 2, held, 4, generator=gen, dtype=torch.float64), "v": torch.randn(1, 2, held, 4, generator=gen, dtype=torch.float64)}
    if rule.objective == "huber":
        recent["delta"] = torch.rand(1, 2, held, generator=gen, dtype=torch.float64) * 0.7 + 0.1
    inputs["state"] = inputs["state"].replace(pos=held, recent={n: x.requires_grad_() for n, x in recent.items()})
    assert_close_with_grads(oracle, recurrent.apply, inputs)


@pytest.mark.parametrize("name", ["atlas", "titans_linear"])
def test_starting_from_no_state(name):
    inputs = random_inputs(NAMED[name], B=1, H=2, T=5, dk=4, dv=4, seed=13)
    inputs["state"] = None
    assert_close_with_grads(oracle, recurrent.apply, inputs)


def test_an_empty_call_returns_the_state_unchanged():
    assert_empty_call_keeps_the_state(recurrent.apply, random_inputs(NAMED["atlas"], B=1, H=2, T=0, dk=4, dv=4))


def test_supports_what_the_chunked_paths_leave_and_nothing_beyond_batch_and_every_one():
    gates = Gates(lr=torch.zeros(1, 1, 1), beta=torch.zeros(1, 1, 1), alpha=torch.zeros(1, 1, 1))
    q = torch.zeros(1, 1, 1, 1)
    atlas = NAMED["atlas"]
    assert recurrent.supports(atlas, gates, q)
    assert not chunk.supports(atlas, gates, q)
    assert dispatch.chosen_path(atlas) == recurrent.NAME
    assert dispatch.chosen_path(NAMED["huber_window_self"]) == recurrent.NAME
    assert dispatch.chosen_path(Rule()) == chunk.NAME  # the delta rule stays on the chunked path
    assert not recurrent.supports(Rule(batch=2), gates, q)
    assert not recurrent.supports(Rule(every=2), gates, q)
    assert not recurrent.supports(Rule(structure=Structure(kind="linear")), gates, q)
    assert not recurrent.supports(Rule(), gates, q.to(torch.bfloat16))
    assert not recurrent.supports(Rule(objective="huber"), Gates(lr=gates.lr, delta=torch.zeros(1, 1, 1, 1)), q)


def test_dispatch_runs_this_path_without_the_fallback_warning():
    assert_dispatch_takes_a_fast_path(random_inputs(NAMED["atlas"], B=1, H=2, T=5, dk=4, dv=4))


@pytest.mark.parametrize("name", sorted(NAMED))
def test_no_nan_in_float32_with_extreme_gates(name, poison_empty):
    """Extreme gates, zero values and a zero start (lp's and huber's residuals exactly 0)."""
    inputs = random_inputs(NAMED[name], B=1, H=2, T=40, dk=4, dv=4, dtype=torch.float32, zero_state=True)
    assert_finite_with_extreme_gates(recurrent.apply, inputs)
