"""16,384 tokens through a Titans-style and a Hope-style memory in float32 stay finite."""

import pytest
import torch

from nlc.runtime import Adaptive, GateSpec, MemoryConfig, MemoryLayer, Pipeline, Source, Structure, Transform

LINEAR = Source("linear")
CONV_SILU = (Transform("conv", 4), Transform("silu"))


def adaptive(residual: bool) -> Adaptive:
    return Adaptive(structure=Structure("mlp", depth=2, expand=1.0, residual=residual), targets="self")


TITANS = MemoryConfig(
    dim=8,
    heads=2,
    structure=Structure("mlp", depth=2, expand=2.0),
    keys=Pipeline(LINEAR, (*CONV_SILU, Transform("l2norm"))),
    values=Pipeline(LINEAR, CONV_SILU),
    queries=Pipeline(LINEAR, (*CONV_SILU, Transform("l2norm"))),
    retention="weight_decay",
    update="momentum",
    batch=16,
    output=("norm", "gate"),
)
# Hope's adaptive keys and values with self-generated targets, lr and weight decay from adaptive gates;
# gd and plain values for the outer memory so that every memory runs on a chunked path
HOPE = MemoryConfig(
    dim=8,
    heads=2,
    structure=Structure("mlp", depth=2, expand=1.0, residual=True),
    keys=Pipeline(Source("memory", adaptive=adaptive(True)), (Transform("conv", 4), Transform("l2norm"))),
    values=Pipeline(Source("memory", adaptive=adaptive(True)), (Transform("conv", 4),)),
    queries=Pipeline(LINEAR, (Transform("l2norm"),)),
    retention="weight_decay",
    retention_gate=GateSpec("memory", adaptive=adaptive(False)),
    lr=GateSpec("memory", adaptive=adaptive(False)),
    batch=16,
    init="learned",
)


@pytest.mark.filterwarnings("ignore:no fast path supports")
@pytest.mark.parametrize("cfg", [TITANS, HOPE], ids=["titans", "hope"])
def test_long_stream_stays_finite(cfg):
    torch.manual_seed(0)
    layer = MemoryLayer(cfg)
    x = torch.randn(1, 16384, cfg.dim)
    with torch.no_grad():
        y, state = layer(x)
    assert torch.isfinite(y).all() and y.abs().max() < 1e3
    states = [state.memory, *state.inner.values()]
    assert all(torch.isfinite(w).all() for s in states for w in (*s.weights, *(s.momentum or ())))
