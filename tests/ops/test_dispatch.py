"""Dispatch over the whole rule space: for random rules (every structure, objective, retention, update, window,
batch, every, targets and grad), gates per head or per key channel, and random cuts of the stream, the path
`memory_update` chooses computes the oracle's reads, every state field and the gradients of every input, one
call or in pieces; a combination no fast path takes runs the oracle after a warning that names it."""

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlc.ops.memory import dispatch
from nlc.ops.memory.naive import memory_naive as oracle
from nlc.ops.memory.rule import Rule, Structure
from tests.ops.helpers import assert_close_with_grads, random_inputs, rules, run_in_pieces

SPACE = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def drawn_inputs(rule, per_channel: bool, length: int, seed: int) -> dict:
    """Inputs with every gate per key channel (matrix memories only; huber's threshold stays per head)."""
    return random_inputs(rule, B=1, H=2, T=length, dk=3, dv=3, seed=seed, per_channel=per_channel and rule.structure.kind == "matrix")


@SPACE
@given(rule=rules(), per_channel=st.booleans(), length=st.sampled_from([1, 2, 7, 13]), cuts=st.lists(st.integers(1, 12), max_size=2), seed=st.integers(0, 100))
def test_the_chosen_path_computes_the_oracle(rule, per_channel, length, cuts, seed):
    inputs = drawn_inputs(rule, per_channel, length, seed)
    if dispatch.find_path(rule, inputs["gates"], inputs["q"]) is None:
        with mock.patch.object(dispatch, "_warned", set()), pytest.warns(UserWarning, match="no fast path supports"):
            o, _ = dispatch.memory_update(**inputs)
        torch.testing.assert_close(o, oracle(**inputs)[0], rtol=0, atol=0)
        return
    assert_close_with_grads(oracle, dispatch.memory_update, inputs)
    assert_close_with_grads(oracle, lambda **i: run_in_pieces(dispatch.memory_update, i, cuts), inputs)


def test_the_space_drawn_reaches_every_cpu_path():
    """The strategy above is not confined to one path: a sample of its rules lands on each CPU fast path."""
    reached = set()

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(rule=rules(), per_channel=st.booleans())
    def record(rule, per_channel):
        inputs = drawn_inputs(rule, per_channel, length=2, seed=0)
        path = dispatch.find_path(rule, inputs["gates"], inputs["q"])
        reached.add(None if path is None else path.NAME)

    record()
    cpu_paths = {path.NAME for path in dispatch.fast_paths() if path.__name__ not in dispatch.GPU_ONLY}
    assert cpu_paths <= reached, cpu_paths - reached


@pytest.mark.parametrize(
    ("rule", "per_channel", "advice"),
    [
        (Rule(structure=Structure(kind="mlp")), False, "with batch = 16 tokens (mini-batches, as in TTT) it would run on network.chunk"),
        (Rule(batch=2), True, "with gates per head instead of per channel it would run on network.chunk"),
    ],
    ids=["network_memory_token_by_token", "matrix_minibatch_per_channel_gates"],
)
def test_the_fallback_warning_names_a_change_that_has_a_fast_path(rule, per_channel, advice):
    inputs = drawn_inputs(rule, per_channel, length=3, seed=0)
    with mock.patch.object(dispatch, "_warned", set()), pytest.warns(UserWarning) as caught:
        dispatch.memory_update(**inputs)
    assert str(caught[0].message).endswith(advice)


def test_the_fallback_warning_gives_no_advice_where_no_change_is_near():
    """In bfloat16 (which only the matrix chunk path takes) a mini-batch would not help a network memory."""
    rule = Rule(structure=Structure(kind="mlp"))
    inputs = drawn_inputs(rule, per_channel=False, length=3, seed=0)
    assert dispatch.nearest_fast(rule, inputs["gates"], inputs["q"]) != ""
    assert dispatch.nearest_fast(rule, inputs["gates"], inputs["q"].bfloat16()) == ""
