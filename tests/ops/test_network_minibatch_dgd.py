"""minibatch.py's hand-written backward for Hope's network memories: `update = dgd` and `targets = self` (each
alone and together), in float64 against the oracle and against chunk.py's autograd loop (minibatch.ENABLED =
False): reads, final weights and momentum, and the gradients of q, k, v, every gate, the initial weights and
momentum and the norm parameters. dgd is its own update (no momentum); self-generated targets go with gd,
momentum or dgd."""

import itertools

import pytest

from nlc.ops.memory.naive import memory_naive
from nlc.ops.network import chunk
from tests.ops.helpers import assert_close_with_grads, assert_float32_close_to_float64, assert_partial_losses_agree, random_inputs, run_in_pieces
from tests.ops.test_network_minibatch import N, autograd_loop, count_runs, rule_for

RULES = [("dgd", "values"), ("gd", "self"), ("momentum", "self"), ("dgd", "self")]
GRID = list(itertools.product(RULES, ["gelu", "silu", "relu"], ["none", "layer", "rms"]))


@pytest.mark.parametrize("update, targets", RULES)
@pytest.mark.parametrize("act, norm", [(act, norm) for act, norm in itertools.product(["gelu", "silu", "relu"], ["none", "layer", "rms"])])
def test_grid_against_oracle_and_autograd(update, targets, act, norm, monkeypatch, poison_empty):
    """Three whole mini-batches in one run. Retention cycles over the grid (each act and each norm meets all three),
    the residual alternates, and so do the widths: 5 -> 5 -> 5 with a residual, 6 -> 9 -> 4 without (6 -> 9 -> 6
    for self targets, which feed the values to the memory)."""
    index = GRID.index(((update, targets), act, norm))
    retention = ["none", "weight_decay", "decay"][(index + index // 3) % 3]
    residual = index % 2 == 0
    rule = rule_for(act, norm, update, retention, residual, expand=1.0 if residual else 1.5, targets=targets)
    dv = 5 if residual else 6 if targets == "self" else 4
    inputs = random_inputs(rule, B=2, H=2, T=3 * N, dk=5 if residual else 6, dv=dv, seed=index)
    calls = count_runs(monkeypatch)
    assert_close_with_grads(memory_naive, chunk.apply, inputs)
    assert_close_with_grads(autograd_loop, chunk.apply, inputs)
    assert calls == [3 * N, 3 * N]


@pytest.mark.parametrize("targets", ["values", "self"])
def test_hope_memories(targets, monkeypatch):
    """The structure and rule of Hope's memories (specs/hope.nl): mlp(depth: 2, expand: 1, residual: true) with
    gelu and no norm, dgd with weight decay, values (its inner memories) or self-generated (its outer one)."""
    rule = rule_for("gelu", "none", "dgd", "weight_decay", residual=True, expand=1.0, targets=targets)
    inputs = random_inputs(rule, B=2, H=2, T=4 * N, dk=8, dv=8, seed=6)
    calls = count_runs(monkeypatch)
    assert_close_with_grads(memory_naive, chunk.apply, inputs)
    assert_close_with_grads(autograd_loop, chunk.apply, inputs)
    assert calls == [4 * N, 4 * N]


@pytest.mark.parametrize("cuts", [[3, 9], [4, 8], [1, 2, 3, 5, 10, 18]])
@pytest.mark.parametrize("update, targets", [("dgd", "values"), ("dgd", "self")])
def test_streaming_equals_one_call(cuts, update, targets, monkeypatch):
    """A stream cut inside and across mini-batches (partial ones through the autograd loop with the anchor,
    whole ones through the Function, from a carried state) equals one call, and the oracle."""
    rule = rule_for(update=update, retention="weight_decay", targets=targets)
    inputs = random_inputs(rule, B=2, H=2, T=5 * N, dk=4, dv=4, seed=1)
    calls = count_runs(monkeypatch)
    assert_close_with_grads(chunk.apply, lambda **x: run_in_pieces(chunk.apply, x, cuts), inputs)
    assert_close_with_grads(memory_naive, lambda **x: run_in_pieces(chunk.apply, x, cuts), inputs)
    bounds = [0, *cuts, 5 * N]
    pieces_with_whole_minibatches = sum(-(-a // N) * N + N <= b for a, b in itertools.pairwise(bounds))
    assert calls[0] == 5 * N and len(calls) == 1 + 2 * pieces_with_whole_minibatches > 1  # one call, then the pieces twice


@pytest.mark.parametrize("used", ["reads", "state"])
@pytest.mark.parametrize("update, targets", [("dgd", "self"), ("momentum", "self")])
def test_part_of_the_outputs(used, update, targets):
    """Only the reads reach the loss, or only the final state (the reads' backward is skipped)."""
    rule = rule_for(act="silu", norm="layer", update=update, retention="decay", targets=targets)
    inputs = random_inputs(rule, B=2, H=2, T=3 * N, dk=4, dv=4, seed=2)
    assert_partial_losses_agree(autograd_loop, chunk.apply, inputs, used)


def test_gates_at_zero():
    """Retention and learning rate exactly 0 inside and at the end of mini-batches: no division anywhere."""
    rule = rule_for(act="gelu", norm="layer", update="dgd", retention="decay", targets="self")
    inputs = random_inputs(rule, B=2, H=2, T=3 * N, dk=4, dv=4, seed=3)
    for name, tokens in (("alpha", (1, N - 1)), ("lr", (2, 3 * N - 1))):
        gate = getattr(inputs["gates"], name).detach().clone()
        gate[:, :, list(tokens)] = 0
        setattr(inputs["gates"], name, gate.requires_grad_())
    assert_close_with_grads(memory_naive, chunk.apply, inputs)
    assert_close_with_grads(autograd_loop, chunk.apply, inputs)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_zero_key_at_the_normalisation_floor(act):
    """Keys of zeros and keys of norm 1e-13: dgd's normalised layer inputs (the key and its hidden layer) sit at
    or under F.normalize's floor of 1e-12, whose backward differs from the smooth one."""
    rule = rule_for(act=act, norm="rms", update="dgd", retention="none", targets="self")
    inputs = random_inputs(rule, B=2, H=2, T=2 * N, dk=4, dv=4, seed=5)
    k = inputs["k"].detach().clone()
    k[:, :, [1, N + 2]] = 0
    k[:, :, [2, N]] *= 1e-13
    inputs["k"] = k.requires_grad_()
    assert_close_with_grads(memory_naive, chunk.apply, inputs)
    assert_close_with_grads(autograd_loop, chunk.apply, inputs)


@pytest.mark.parametrize("update, targets", [("dgd", "values"), ("dgd", "self")])
def test_float32_close_to_float64(update, targets):
    rule = rule_for("gelu", "none", update, "weight_decay", expand=1.0, targets=targets)
    inputs = random_inputs(rule, B=2, H=2, T=4 * N, dk=8, dv=8, seed=4)
    assert_float32_close_to_float64(chunk.apply, inputs)
