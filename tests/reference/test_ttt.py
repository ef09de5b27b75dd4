"""TTT-Linear memories against TTT's dual form (Sun et al. 2024, "Learning to (Learn at Test Time)", §2.7 and
its reference code), written here independently of nlc: per mini-batch of b tokens, every gradient is taken
at the mini-batch's start weights W_0, and the reads and the end-of-batch weights are matmuls only,

    G = dl/dz at z = K W_0^T                 (per token: the output error pulled back through the inner norm)
    Z = Q W_0^T - tril(Q K^T) diag(eta) G    (token t reads W_t = W_0 - sum_{s <= t} eta_s G_s k_s^T)
    W_b = W_0 - (diag(eta) G)^T K

for the linear inner model f(x) = W x (G = K W_0^T - V) and TTT's f(x) = x + LN(W x) (G is the layer-norm
backward of gamma * (f(k) - v), in closed form). The objective is 1/2 ||f(k) - v||^2 (nlc's l2); TTT's own
code writes ||.||^2 and folds the factor 2 into its learning rate.
"""

from __future__ import annotations

import pytest
import torch

from nlc.ops.memory.rule import MemoryState, Rule, Structure
from nlc.ops.memory.structure import NORM_EPS
from tests.ops.helpers import assert_close_with_grads, random_inputs
from tests.reference.conftest import assert_layer_matches, compiled_memory_layer, nlc_memory, perturb_parameters

TTT_BATCH = 16
TTT_LINEAR = Rule(structure=Structure("linear", residual=True, norm="layer"), batch=TTT_BATCH)
PLAIN_LINEAR = Rule(structure=Structure("linear"), batch=TTT_BATCH)


def layer_norm_parts(z):
    """Normalised z and 1 / std over the last dim (biased variance, as nn.LayerNorm)."""
    mean = z.mean(-1, keepdim=True)
    inv_std = torch.rsqrt((z - mean).square().mean(-1, keepdim=True) + NORM_EPS)
    return (z - mean) * inv_std, inv_std


def ttt_dual_form(q, k, v, gates, rule, state, sparams=None):
    """TTT's mini-batch dual form in nlc's op signature. q, k `[B, H, T, d_k]`, v `[B, H, T, d_v]`, lr
    `[B, H, T]`, W_0 `[B, H, d_v, d_k]`; gamma, beta (the inner layer norm's scale and shift) `[H, d_v]`."""
    s = rule.structure
    assert s.kind == "linear" and s.norm in ("none", "layer") and s.residual == (s.norm == "layer")
    assert rule.objective == "l2" and rule.update == "gd" and rule.retention == "none" and rule.every == 1
    assert state.pos == 0, "the dual form starts a stream"
    layer_norm = s.norm == "layer"
    if layer_norm:
        gamma, beta = sparams.norm_weight[None, :, None, :], sparams.norm_bias[None, :, None, :]  # [1, H, 1, d_v]

    (w,) = state.weights
    b, T = rule.batch, q.shape[2]
    outs = []
    for start in range(0, T, b):
        w0 = w  # the mini-batch's gradient point
        Q, K, V = (x[:, :, start : start + b] for x in (q, k, v))  # [B, H, n, d]
        eta = gates.lr[:, :, start : start + b, None]  # [B, H, n, 1]
        z_k = K @ w0.transpose(-1, -2)  # [B, H, n, d_v]
        if layer_norm:
            x_hat, inv_std = layer_norm_parts(z_k)
            error = gamma * x_hat + beta + K - V  # f(k) - v
            g_hat = gamma * error  # dl/dx_hat
            G = inv_std * (g_hat - g_hat.mean(-1, keepdim=True) - x_hat * (g_hat * x_hat).mean(-1, keepdim=True))
        else:
            G = z_k - V
        z_q = Q @ w0.transpose(-1, -2) - torch.tril(Q @ K.transpose(-1, -2)) @ (eta * G)  # [B, H, n, d_v]
        if layer_norm:
            z_q = Q + gamma * layer_norm_parts(z_q)[0] + beta
        outs.append(z_q)
        w = w0 - (eta * G).transpose(-1, -2) @ K  # [B, H, d_v, d_k]
    in_batch = T % b != 0
    return torch.cat(outs, dim=2), MemoryState(weights=(w,), pos=T, anchor=(w0,) if in_batch else None)


@pytest.mark.parametrize("impl", ["naive", "auto"])
@pytest.mark.parametrize("rule", [TTT_LINEAR, PLAIN_LINEAR], ids=["residual-layernorm", "plain"])
@pytest.mark.parametrize("T", [32, 37])  # 37: the stream ends inside a mini-batch
def test_linear_memory_matches_ttt_dual_form(impl, rule, T):
    inputs = random_inputs(rule, B=2, H=2, T=T, dk=6, dv=6, seed=T)
    assert_close_with_grads(ttt_dual_form, nlc_memory(impl), inputs, atol=1e-10, rtol=1e-8)


def test_ttt_linear_layer_matches_ttt_dual_form(monkeypatch):
    layer = compiled_memory_layer("ttt_linear.nl")
    assert layer.rule == TTT_LINEAR
    perturb_parameters(layer)
    x = torch.randn(2, 40, layer.cfg.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert_layer_matches(layer, x, ttt_dual_form, monkeypatch, tol=None)
