"""The runtime's fast forms equal their plain definitions: inner memories of one rule computed as one op
call (stacked on the head axis) against one call per memory, and the causal convolution against conv1d.
float64, outputs and the gradients of every input."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from nlc.runtime import Adaptive, GateSpec, MemoryConfig, MemoryLayer, Pipeline, Source, Structure, Transform
from nlc.runtime.transforms import CausalConv

pytestmark = pytest.mark.filterwarnings("ignore:no fast path supports")

DIM, HEADS = 8, 2


def pipe(source: Source, *steps) -> Pipeline:
    return Pipeline(source, tuple(Transform(*s) if isinstance(s, tuple) else Transform(s) for s in steps))


def adaptive(structure: Structure, **fields) -> Source:
    return Source("memory", adaptive=Adaptive(structure=structure, **fields))


RESIDUAL_MLP = Structure("mlp", depth=2, expand=1.0, residual=True)
GATE_MLP = Structure("mlp", depth=2, expand=1.0)
NORMED_MLP = Structure("mlp", depth=2, expand=1.0, residual=True, norm="layer")

CONFIGS = {
    # Hope: key and value memories form one group, lr and weight-decay memories another
    "hope": MemoryConfig(
        dim=DIM,
        heads=HEADS,
        structure=RESIDUAL_MLP,
        keys=pipe(adaptive(RESIDUAL_MLP), ("conv", 4), "l2norm"),
        values=pipe(adaptive(RESIDUAL_MLP), ("conv", 4)),
        queries=pipe(Source("linear"), "l2norm"),
        targets="self",
        retention="weight_decay",
        retention_gate=GateSpec("memory", adaptive=Adaptive(structure=GATE_MLP)),
        update="dgd",
        lr=GateSpec("memory", adaptive=Adaptive(structure=GATE_MLP)),
        batch=4,
        init="learned",
    ),
    # momentum and pending chunks in the stacked states, norm parameters, own gates; the query memory has
    # its own lr, so it runs in a group of its own
    "chunked_momentum": MemoryConfig(
        dim=DIM,
        heads=HEADS,
        structure=Structure("mlp", depth=2, expand=2.0),
        keys=pipe(adaptive(NORMED_MLP, beta=GateSpec("gate")), "l2norm"),
        values=pipe(adaptive(NORMED_MLP, beta=GateSpec("gate"))),
        queries=pipe(adaptive(NORMED_MLP, beta=GateSpec("gate"), lr=GateSpec("learned", 0.02)), "l2norm"),
        retention="decay",
        update="momentum",
        every=4,
        init="learned",
    ),
}


def run_pieces(layer: MemoryLayer, x, cuts):
    state, ys = None, []
    for s, e in itertools.pairwise(cuts):
        y, state = layer(x[:, s:e], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("name", CONFIGS)
def test_stacked_inner_memories_equal_one_call_per_memory(name):
    torch.manual_seed(0)
    layer = MemoryLayer(CONFIGS[name]).double()
    groups = layer._inner_groups()
    assert len(groups) < len(layer.inner)  # something is stacked
    separate = copy.deepcopy(layer)
    separate._inner_groups = lambda: [(n,) for n in separate.inner]

    x = torch.randn(2, 14, DIM, dtype=torch.float64, requires_grad=True)
    x_separate = x.detach().clone().requires_grad_()
    weight = torch.randn(2, 14, DIM, dtype=torch.float64)
    cuts = [0, 3, 9, 14]  # inside mini-batches and chunks: anchors and pending sums are stacked too
    y, state = run_pieces(layer, x, cuts)
    y_separate, state_separate = run_pieces(separate, x_separate, cuts)
    torch.testing.assert_close(y, y_separate, rtol=1e-12, atol=1e-12)
    for n in layer.inner:
        for a, b in zip(state.inner[n].weights, state_separate.inner[n].weights):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=n)

    (y * weight).sum().backward()
    (y_separate * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_separate.grad, rtol=1e-10, atol=1e-12)
    for (p_name, p), q in zip(layer.named_parameters(), separate.parameters()):
        assert (p.grad is None) == (q.grad is None), p_name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=p_name)


@pytest.mark.parametrize("length", [1, 5, 16])
def test_causal_conv_equals_conv1d(length):
    torch.manual_seed(0)
    channels, width = 6, 4
    conv = CausalConv(channels, width).double()
    x = torch.randn(2, length, channels, dtype=torch.float64, requires_grad=True)
    tail = torch.randn(2, width - 1, channels, dtype=torch.float64, requires_grad=True)
    y, new_tail = conv(x, tail)

    weight = conv.weight.detach().clone().requires_grad_()
    x_ref, tail_ref = x.detach().clone().requires_grad_(), tail.detach().clone().requires_grad_()
    padded = torch.cat([tail_ref, x_ref], dim=1)  # [B, w - 1 + T, C]
    y_ref = F.conv1d(padded.transpose(1, 2), weight, groups=channels).transpose(1, 2)  # [B, T, C]
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_tail, padded[:, -(width - 1) :])

    probe = torch.randn_like(y)
    (y * probe).sum().backward()
    (y_ref * probe).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tail.grad, tail_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.weight.grad, weight.grad, rtol=1e-12, atol=1e-12)
