"""DeltaNet and Gated DeltaNet memories against fla's pure-PyTorch references (`fla/ops/delta_rule/naive.py`,
`fla/ops/gated_delta_rule/naive.py`), at the op level (`memory_update`) and at the level of the memory layer
that specs/deltanet.nl and specs/gated_deltanet.nl compile to.

Mapping (docs/references.md): fla's state S `[d_k, d_v]` is nlc's M `[d_v, d_k]` transposed; fla's `beta`
is nlc's lr gate; fla's gated `g` is log(alpha); fla scales queries by 1/sqrt(d_k), nlc does not, so the
references are given q * sqrt(d_k) (or scale = 1); the gated references take `[B, T, H, D]`.
"""

from __future__ import annotations

import pytest
import torch

from nlc.ops.memory.rule import Gates, MemoryState, Rule
from tests.ops.helpers import assert_close_with_grads, random_inputs
from tests.reference.conftest import FLA_FLOAT32_RMSE, assert_layer_matches, assert_rmse, compiled_memory_layer, load_fla_naive, nlc_memory, perturb_parameters

DELTANET = Rule()
GATED_DELTANET = Rule(retention="decay")


def check_delta_rule(rule: Rule, state: MemoryState | None, gates: Gates, q) -> None:
    """The references compute exactly this rule: l2 delta rule per head, optional per-head decay."""
    assert rule.structure.kind == "matrix" and rule.objective == "l2" and rule.update == "gd"
    assert rule.batch == rule.every == rule.window == 1 and rule.targets == "values"
    assert gates.lr.dim() == 3 and (gates.alpha is None or gates.alpha.dim() == 3)
    assert state is None or state.pos == 0, "the references start a stream"


def initial_weights(state: MemoryState | None):
    return None if state is None else state.weights[0]


def fla_delta_rule(chunk_size: int | None = None):
    """fla's delta rule in nlc's op signature: the token recurrence (float32 inside, any initial state) or,
    with `chunk_size`, the chunkwise WY form (computes in the input dtype, starts from a zero state)."""
    naive = load_fla_naive("delta_rule")

    def memory(q, k, v, gates, rule, state, sparams=None):
        check_delta_rule(rule, state, gates, q)
        assert rule.retention == "none"
        q_fla = q * q.shape[-1] ** 0.5  # fla reads (q / sqrt(d_k)) S
        m0 = initial_weights(state)
        if chunk_size is None:
            s0 = None if m0 is None else m0.transpose(-1, -2)  # [B, H, d_k, d_v]
            o, s = naive.delta_rule_recurrence(q_fla, k, v, gates.lr, initial_state=s0)
        else:
            assert m0 is None or not m0.any(), "fla's chunkwise reference starts from a zero state"
            o, s = naive.delta_rule_chunkwise(q_fla, k, v, gates.lr, chunk_size=chunk_size)
        return o.to(q.dtype), MemoryState(weights=(s.transpose(-1, -2).to(q.dtype),), pos=q.shape[2])

    return memory


def fla_gated_delta_rule(chunk_size: int | None = None):
    """fla's gated delta rule in nlc's op signature (float32 inside): the token recurrence or, with
    `chunk_size`, the chunked form (which pads T to a multiple of the chunk)."""
    naive = load_fla_naive("gated_delta_rule")

    def memory(q, k, v, gates, rule, state, sparams=None):
        check_delta_rule(rule, state, gates, q)
        assert rule.retention == "decay"
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, T, H, D]
        beta, g = gates.lr.transpose(1, 2), gates.alpha.log().transpose(1, 2)  # [B, T, H]
        m0 = initial_weights(state)
        s0 = None if m0 is None else m0.transpose(-1, -2)  # [B, H, d_k, d_v]
        if chunk_size is None:
            o, s = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=1.0, initial_state=s0, output_final_state=True)
        else:
            o, s = naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, scale=1.0, initial_state=s0, output_final_state=True)
        o = o.transpose(1, 2).to(q.dtype)  # [B, H, T, d_v]
        return o, MemoryState(weights=(s.transpose(-1, -2).to(q.dtype),), pos=q.shape[1])

    return memory


def without_initial_state_grad(inputs: dict) -> dict:
    """Zero initial state, not a leaf: fla's chunkwise delta rule has no initial-state argument."""
    zeros = inputs["state"].weights[0].detach()
    return dict(inputs, state=MemoryState(weights=(zeros,)))


def outputs_and_grads(fn, inputs: dict) -> dict[str, torch.Tensor]:
    """Reads, final state and the gradients of a fixed projection of both w.r.t. q, k, v, every gate and
    the initial state, by name."""
    o, state = fn(**inputs)
    gates = {f"grad {n}": g for n, g in vars(inputs["gates"]).items() if g is not None}
    leaves = {"grad q": inputs["q"], "grad k": inputs["k"], "grad v": inputs["v"], **gates, "grad M0": inputs["state"].weights[0]}
    gen = torch.Generator().manual_seed(3)
    (m,) = state.weights
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + (m * torch.randn(m.shape, generator=gen, dtype=m.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"reads": o, "final state": m, **dict(zip(leaves, grads))}


def assert_close_rmse(fn_nlc, fn_ref, inputs: dict, tol: float) -> None:
    actual, expected = outputs_and_grads(fn_nlc, inputs), outputs_and_grads(fn_ref, inputs)
    for name, a in actual.items():
        assert_rmse(a, expected[name], tol, name)


@pytest.mark.parametrize("impl", ["naive", "auto"])
@pytest.mark.parametrize("chunk_size", [4, 8])
def test_delta_rule_matches_fla_chunkwise_in_float64(impl, chunk_size):
    inputs = without_initial_state_grad(random_inputs(DELTANET, B=2, H=2, T=16, dk=8, dv=6, seed=chunk_size, zero_state=True))
    assert_close_with_grads(fla_delta_rule(chunk_size), nlc_memory(impl), inputs, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("impl", ["naive", "auto"])
def test_delta_rule_matches_fla_recurrence_from_any_state(impl):
    inputs = random_inputs(DELTANET, B=2, H=2, T=13, dk=8, dv=6, seed=1)
    assert_close_rmse(nlc_memory(impl), fla_delta_rule(), inputs, FLA_FLOAT32_RMSE)


@pytest.mark.parametrize("impl", ["naive", "auto"])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_gated_delta_rule_matches_fla(impl, chunk_size):
    inputs = random_inputs(GATED_DELTANET, B=2, H=2, T=13, dk=8, dv=6, seed=2)  # 13: the chunked form pads
    assert_close_rmse(nlc_memory(impl), fla_gated_delta_rule(chunk_size), inputs, FLA_FLOAT32_RMSE)


def test_deltanet_layer_matches_fla_in_float64(monkeypatch):
    layer = compiled_memory_layer("deltanet.nl")
    perturb_parameters(layer)
    x = torch.randn(2, 16, layer.cfg.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert_layer_matches(layer, x, fla_delta_rule(chunk_size=8), monkeypatch, tol=None)


def test_gated_deltanet_layer_matches_fla(monkeypatch):
    layer = compiled_memory_layer("gated_deltanet.nl")
    perturb_parameters(layer)
    x = torch.randn(2, 12, layer.cfg.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert_layer_matches(layer, x, fla_gated_delta_rule(), monkeypatch, tol=FLA_FLOAT32_RMSE)
