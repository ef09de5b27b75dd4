"""AttentionLayer against a literal masked softmax, streaming through the KV cache; MlpLayer."""

import math

import pytest
import torch

from nlc.runtime import AttentionConfig, AttentionLayer, MlpConfig, MlpLayer
from nlc.runtime.attention import rope

DIM, HEADS = 8, 2


def literal_attention(layer: AttentionLayer, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v written out, one query at a time, from position 0."""
    B, T, D = x.shape
    H, d = layer.heads, layer.head_dim
    q, k, v = layer.qkv(x).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)  # [B, H, T, d]
    if layer.cfg.rope:
        pos = torch.arange(T)
        q, k = rope(q, pos, layer.cfg.rope_base), rope(k, pos, layer.cfg.rope_base)
    rows = []
    for i in range(T):
        first = 0 if layer.cfg.window is None else max(0, i - layer.cfg.window + 1)
        scores = q[:, :, i : i + 1] @ k[:, :, first : i + 1].transpose(-1, -2) / math.sqrt(d)  # [B, H, 1, n]
        rows.append(torch.softmax(scores, dim=-1) @ v[:, :, first : i + 1])
    y = torch.cat(rows, dim=2).transpose(1, 2).reshape(B, T, D)
    return layer.out(y)


CONFIGS = {
    "global_rope": AttentionConfig(dim=DIM, heads=HEADS),
    "windowed_rope": AttentionConfig(dim=DIM, heads=HEADS, window=3),
    "global_no_rope": AttentionConfig(dim=DIM, heads=HEADS, rope=False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_attention_matches_literal_and_streams(name):
    torch.manual_seed(0)
    layer = AttentionLayer(CONFIGS[name]).double()
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    y, _ = layer(x)
    torch.testing.assert_close(y, literal_attention(layer, x), rtol=1e-10, atol=1e-10)
    ys, st = [], None
    for s, e in [(0, 1), (1, 5), (5, 6), (6, 11)]:
        out, st = layer(x[:, s:e], st)
        ys.append(out)
    torch.testing.assert_close(torch.cat(ys, dim=1), y, rtol=1e-10, atol=1e-10)
    assert st.pos == 11
    if CONFIGS[name].window is not None:
        assert st.k.shape[2] == CONFIGS[name].window - 1  # only what a future query can still see


def test_generation_token_by_token_equals_one_call():
    torch.manual_seed(1)
    layer = AttentionLayer(CONFIGS["windowed_rope"]).double()
    x = torch.randn(1, 9, DIM, dtype=torch.float64)
    y, _ = layer(x)
    state, outs = None, []
    for t in range(9):
        out, state = layer(x[:, t : t + 1], state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", CONFIGS)
def test_attention_causal_gradients_and_dtypes(name):
    torch.manual_seed(2)
    layer = AttentionLayer(CONFIGS[name]).double()
    x = torch.randn(1, 10, DIM, dtype=torch.float64)
    changed = x.clone()
    changed[:, 4:] += 1.0
    torch.testing.assert_close(layer(changed)[0][:, :4], layer(x)[0][:, :4], rtol=0, atol=0)
    layer(x)[0].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    for dtype in (torch.float32, torch.bfloat16):
        y, _ = layer.to(dtype)(x.to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all()


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(3)
    q, k = torch.randn(1, 1, 1, 4, dtype=torch.float64), torch.randn(1, 1, 1, 4, dtype=torch.float64)

    def score(i, j):
        return (rope(q, torch.tensor([i]), 10000.0) * rope(k, torch.tensor([j]), 10000.0)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(7, 4))


@pytest.mark.parametrize("act", ["swiglu", "gelu", "silu", "relu"])
def test_mlp(act):
    torch.manual_seed(4)
    layer = MlpLayer(MlpConfig(dim=DIM, act=act, expand=3.0)).double()
    hidden = round(2 / 3 * 3.0 * DIM) if act == "swiglu" else round(3.0 * DIM)
    assert layer.down.in_features == hidden
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    y, state = layer(x)
    assert state is None and y.shape == x.shape
    torch.testing.assert_close(layer(x[:, 2:3])[0], y[:, 2:3])  # position-wise
    h = layer.up(x)
    if act == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        expected = layer.down(torch.nn.functional.silu(gate) * up)
    else:
        expected = layer.down(getattr(torch.nn.functional, act)(h))
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert torch.isfinite(layer.to(torch.bfloat16)(x.to(torch.bfloat16))[0]).all()


def test_runtime_imports_no_front_end():
    import subprocess
    import sys

    code = (
        "import sys, nlc.runtime; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('rich', 'lark', 'pydantic', 'jinja2') "
        "or m.startswith(('nlc.syntax', 'nlc.spec', 'nlc.codegen'))]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
