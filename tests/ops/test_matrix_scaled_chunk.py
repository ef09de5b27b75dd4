"""The chunked path for windows and l2 with momentum against the oracle, in float64: reads, every state field,
and the gradients of q, k, v, every gate and the initial state (weights, momentum, carried window)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nlc.ops.matrix import chunk, recurrent, scaled_chunk
from nlc.ops.memory import dispatch
from nlc.ops.memory.naive import memory_naive as oracle
from nlc.ops.memory.rule import Gates, Rule, Structure
from tests.ops.helpers import (
    assert_close_with_grads,
    assert_dispatch_takes_a_fast_path,
    assert_empty_call_keeps_the_state,
    assert_finite_with_extreme_gates,
    assert_float32_close_to_float64,
    handover,
    random_inputs,
    rules,
    run_in_pieces,
)

NAMED = {
    "omeganet": Rule(window=4, retention="decay"),
    "titans_linear": Rule(retention="weight_decay", update="momentum"),
    "window_momentum_decay": Rule(window=3, retention="decay", update="momentum"),
    "dot_window_momentum": Rule(objective="dot", window=2, retention="weight_decay", update="momentum"),
}


@pytest.fixture(params=[(64, 32), (4, 6)], ids=["default_chunks", "short_chunks"])
def chunk_sizes(request, monkeypatch):
    """The default chunk sizes, and short ones so that a few tokens already span several chunks and a remainder."""
    monkeypatch.setattr(scaled_chunk, "CHUNK", request.param[0])
    monkeypatch.setattr(scaled_chunk, "WINDOW_ROWS", request.param[1])


@pytest.mark.parametrize("window", [1, 2, 4])
@pytest.mark.parametrize("retention", ["none", "decay", "weight_decay"])
@pytest.mark.parametrize("update", ["gd", "momentum"])
@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_every_combination_matches_the_oracle(objective, update, retention, window, chunk_sizes):
    rule = Rule(objective=objective, update=update, retention=retention, window=window)
    inputs = random_inputs(rule, B=2, H=2, T=11, dk=3, dv=4, seed=window)
    assert scaled_chunk.supports(rule, inputs["gates"], inputs["q"])
    assert_close_with_grads(oracle, scaled_chunk.apply, inputs)


@pytest.mark.parametrize("length", [1, 7, 63, 100])
@pytest.mark.parametrize("name", sorted(NAMED))
def test_lengths(name, length):
    """Odd lengths with the default chunks: one partial chunk, whole chunks and a remainder."""
    inputs = random_inputs(NAMED[name], B=1, H=2, T=length, dk=5, dv=3, seed=length)
    assert_close_with_grads(oracle, scaled_chunk.apply, inputs)


@pytest.mark.parametrize("name", sorted(NAMED))
def test_streaming_in_pieces_equals_one_call(name, chunk_sizes):
    """Cuts inside windows and chunks: the carried keys and values are read by the next piece."""
    inputs = random_inputs(NAMED[name], B=1, H=2, T=13, dk=4, dv=4, seed=5)
    assert_close_with_grads(oracle, lambda **i: run_in_pieces(scaled_chunk.apply, i, cuts=(1, 2, 7)), inputs)


@pytest.mark.parametrize("order", ["recurrent_then_chunked", "chunked_then_recurrent"])
@pytest.mark.parametrize("name", ["omeganet", "window_momentum_decay"])
def test_handover_with_the_recurrent_path(name, order):
    """Both paths read and write the same state: a stream may move between them mid-window."""
    inputs = random_inputs(NAMED[name], B=1, H=2, T=9, dk=4, dv=4, seed=7)
    paths = (recurrent.apply, scaled_chunk.apply) if order == "recurrent_then_chunked" else (scaled_chunk.apply, recurrent.apply)
    assert_close_with_grads(oracle, handover(*paths, cut=3), inputs)


def test_a_carried_window_gets_its_gradient():
    """A state holding fewer keys and values than the window reaches back to, as leaves of their own."""
    rule = NAMED["omeganet"]
    inputs = random_inputs(rule, B=1, H=2, T=5, dk=4, dv=4, seed=11)
    gen = torch.Generator().manual_seed(12)
    recent = {name: torch.randn(1, 2, 2, 4, generator=gen, dtype=torch.float64).requires_grad_() for name in ("k", "v")}
    inputs["state"] = inputs["state"].replace(pos=2, recent=recent)
    assert_close_with_grads(oracle, scaled_chunk.apply, inputs)


@pytest.mark.parametrize("name", ["omeganet", "titans_linear"])
def test_starting_from_no_state(name):
    inputs = random_inputs(NAMED[name], B=1, H=2, T=5, dk=4, dv=4, seed=13)
    inputs["state"] = None
    assert_close_with_grads(oracle, scaled_chunk.apply, inputs)


@pytest.mark.parametrize("name", ["omeganet", "titans_linear"])
def test_an_empty_call_returns_the_state_unchanged(name):
    assert_empty_call_keeps_the_state(scaled_chunk.apply, random_inputs(NAMED[name], B=1, H=2, T=0, dk=4, dv=4))


@settings(max_examples=30, deadline=None)
@given(
    rule=rules(kinds=("matrix",), objectives=("dot", "l2"), updates=("gd", "momentum"), batches=(1,), everies=(1,), targets=("values",), grads=("full",)),
    length=st.integers(1, 20),
    seed=st.integers(0, 100),
)
def test_random_rules_match_the_oracle(rule, length, seed):
    inputs = random_inputs(rule, B=1, H=2, T=length, dk=3, dv=2, seed=seed)
    assert_close_with_grads(oracle, scaled_chunk.apply, inputs)


def test_supports_the_rules_between_the_delta_rule_and_the_recurrent_path():
    gates = Gates(lr=torch.zeros(1, 1, 1), beta=torch.zeros(1, 1, 1), alpha=torch.zeros(1, 1, 1), lam=torch.zeros(1, 1, 1))
    q = torch.zeros(1, 1, 1, 1)
    for name, rule in NAMED.items():
        assert scaled_chunk.supports(rule, gates, q), name
    assert dispatch.chosen_path(NAMED["omeganet"]) == scaled_chunk.NAME
    assert dispatch.chosen_path(NAMED["titans_linear"]) == scaled_chunk.NAME
    assert dispatch.chosen_path(Rule()) == chunk.NAME  # the delta rule keeps its hand-written backward
    assert dispatch.chosen_path(Rule(window=4, update="muon")) == recurrent.NAME
    for rule in (
        Rule(objective="huber"),
        Rule(objective="lp"),
        Rule(update="dgd"),
        Rule(update="muon"),
        Rule(targets="self"),
        Rule(grad="stop"),
        Rule(batch=2),
        Rule(every=2),
        Rule(structure=Structure(kind="linear")),
    ):
        assert not scaled_chunk.supports(rule, Gates(lr=gates.lr, beta=gates.beta, delta=torch.zeros(1, 1, 1)), q), rule
    assert not scaled_chunk.supports(Rule(), gates, q.to(torch.bfloat16))
    assert not scaled_chunk.supports(Rule(window=2), Gates(lr=torch.zeros(1, 1, 1, 1)), q)  # per-channel lr
    assert not scaled_chunk.supports(Rule(window=2, retention="decay"), Gates(lr=gates.lr, alpha=torch.zeros(1, 1, 1, 1)), q)


def test_dispatch_runs_this_path_without_the_fallback_warning():
    assert_dispatch_takes_a_fast_path(random_inputs(NAMED["omeganet"], B=1, H=2, T=5, dk=4, dv=4))


@pytest.mark.parametrize("name", sorted(NAMED))
def test_no_nan_in_float32_with_extreme_gates(name, poison_empty):
    inputs = random_inputs(NAMED[name], B=1, H=2, T=40, dk=4, dv=4, dtype=torch.float32, zero_state=True)
    assert_finite_with_extreme_gates(scaled_chunk.apply, inputs)


def test_float32_stays_close_to_float64():
    """A 300-token OmegaNet-style stream: float32 reads, weights and gradients against float64."""
    inputs = random_inputs(NAMED["omeganet"], B=1, H=2, T=300, dk=8, dv=8, seed=3)
    assert_float32_close_to_float64(scaled_chunk.apply, inputs)
