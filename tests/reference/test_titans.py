"""A Titans memory (specs/titans.nl's rule with `every = C`) against titans-pytorch's `NeuralMemory` where the
two definitions coincide (docs/references.md lists every difference):

- NeuralMemory with `batch_size = chunk_size = C`: each chunk's gradient is taken at the weights from the end
  of the previous chunk, one momentum step and one weight-decay step per chunk, which is nlc's `every = C`.
  (Without `batch_size`, every chunk of the stream takes its gradient at the initial weights: not an nlc rule.)
- Memory model `MemoryMLP(depth 2)` without TTT's residual + layer norm (`mem_model_norm_add_residual =
  False`): its norm scale would be memory state there, an outer parameter in nlc. Weights `[in, out]`
  (x @ W) are nlc's `[out, in]` transposed.
- Loss `mean_d (M(k) - v)^2` weighted by the adaptive lr: nlc's lr gate is titans' lr * 2 / d.
- Per-chunk momentum and decay gates (titans computes them from the chunk's mean input): nlc's gates hold
  the chunk's value at every token of the chunk (nlc writes with the chunk's last token's).
- Reads: titans' token t reads the weights after every chunk that ends at or before t (its retrieval is
  shifted by one token), nlc's token t those after the chunks ending before t. So titans' read of q_t is
  nlc's read at position t + 1: nlc is run on the queries shifted right by one token.

The projections, pre-norms, retrieve gate and head combination of NeuralMemory are replaced by identities
and its gate projections by the test's values, so that both compute from the same q, k, v, gates and initial
weights; outputs, final weights, final momentum and the gradients of all of them are compared in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nlc.ops.memory.dispatch import memory_update
from nlc.ops.memory.rule import Gates, MemoryState, Rule, Structure

titans_pytorch = pytest.importorskip("titans_pytorch", reason="titans-pytorch is not installed: the Titans reference check needs it")

B, H, D, C, EXPAND = 2, 2, 4, 4, 2.0
N_CHUNKS = 3
T = N_CHUNKS * C


def titans_rule() -> Rule:
    """specs/titans.nl's memory rule, written every C tokens instead of in mini-batches of 64."""
    return Rule(
        structure=Structure("mlp", depth=2, expand=EXPAND, act="gelu"),
        objective="l2",
        retention="weight_decay",
        update="momentum",
        every=C,
    )


class ChunkValues(nn.Module):
    """Stands in for one of NeuralMemory's gate projections: ignores its input and returns the next chunk's
    given value (NeuralMemory calls each projection once per stored chunk, in order)."""

    def __init__(self, values: list[torch.Tensor]):
        super().__init__()
        self.values = list(values)

    def forward(self, x):
        return self.values.pop(0)


def neural_memory() -> nn.Module:
    """NeuralMemory reduced to its memory: identity projections, no norms, no retrieve gate."""
    from titans_pytorch.memory_models import MemoryMLP

    torch.manual_seed(0)
    mem = titans_pytorch.NeuralMemory(
        dim=H * D,
        heads=H,
        dim_head=D,
        chunk_size=C,
        batch_size=C,
        model=MemoryMLP(D, depth=2, expansion_factor=EXPAND),
        mem_model_norm_add_residual=False,
        pre_rmsnorm=False,
        qkv_receives_diff_views=True,  # seq = (query view, key view, value view)
        adaptive_step_transform=lambda lr: lr,
        momentum=True,
    ).double()
    mem.to_queries, mem.to_keys, mem.to_values, mem.combine_heads = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
    mem.retrieve_gate = None
    return mem


def leaves():
    gen = torch.Generator().manual_seed(7)

    def leaf(*shape, low=None, high=None):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        if low is not None:
            x = low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)
        return x.requires_grad_()

    return {
        "q": leaf(B, H, T, D),
        "k": leaf(B, H, T, D),
        "v": leaf(B, H, T, D),
        "lr": leaf(B, H, T, low=0.05, high=0.5),  # titans' adaptive lr, per token
        "momentum_logit": leaf(B, H, N_CHUNKS),  # per chunk, before the sigmoid
        "decay_logit": leaf(B, H, N_CHUNKS, low=-3.0, high=-1.0),
    }


def run_titans(mem, x):
    """Reads `[B, H, T, D]`, final weights and final momentum (nlc's `[B, H, out, in]` layout)."""

    def merged(t):  # [B, H, T, D] -> [B, T, H * D]
        return t.transpose(1, 2).reshape(B, T, H * D)

    def per_chunk(t):  # [B, H, N] -> chunk n's [B * H, ...]
        return [t[:, :, n].reshape(B * H) for n in range(N_CHUNKS)]

    mem.to_adaptive_step = ChunkValues([x["lr"][:, :, n * C : (n + 1) * C].reshape(B * H, C) for n in range(N_CHUNKS)])
    mem.to_momentum = ChunkValues([m[None, :, None, None] for m in per_chunk(x["momentum_logit"])])  # [o, B * H, 1, 1]
    mem.to_decay_factor = ChunkValues([a[:, None, None] for a in per_chunk(x["decay_logit"])])  # [B * H, 1, 1]
    seq = torch.stack([merged(x["q"]), merged(x["k"]), merged(x["v"])])  # [3, B, T, H * D]
    out, state = mem(seq)
    o = out.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
    weights, momentum = state.states

    def nlc_layout(t):  # [B * H, in, out] -> [B, H, out, in]
        return t.reshape(B, H, *t.shape[1:]).transpose(-1, -2)

    return o, [nlc_layout(w) for w in weights.values()], [nlc_layout(m[0]) for m in momentum.values()]


def nlc_weights(mem) -> tuple[torch.Tensor, ...]:
    """NeuralMemory's initial weights `[H, in, out]` as nlc's state, `[B, H, out, in]`."""
    return tuple(p.transpose(-1, -2)[None].expand(B, -1, -1, -1) for p in mem.memory_model_parameters)


def run_nlc(mem, x, impl):
    """The same computation as nlc's memory op, on the queries shifted right by one token (titans' read of
    q_t is nlc's read at t + 1) and one extra token whose write stays pending."""
    pad = torch.zeros(B, H, 1, D, dtype=torch.float64)
    q = torch.cat([pad, x["q"]], dim=2)  # [B, H, T + 1, D]
    k, v = (torch.cat([x[n], pad], dim=2) for n in ("k", "v"))

    def tokens(per_chunk):  # [B, H, N] -> [B, H, T + 1]: each chunk's value at its tokens
        t = per_chunk.repeat_interleave(C, dim=2)
        return torch.cat([t, t[:, :, -1:]], dim=2)

    lr = x["lr"] * 2 / D  # d/dM of mean_d (M(k) - v)^2 is 2 / D times that of 1/2 ||M(k) - v||^2
    gates = Gates(
        lr=torch.cat([lr, lr[:, :, -1:]], dim=2),
        beta=tokens(x["momentum_logit"].sigmoid()),
        lam=tokens(x["decay_logit"].sigmoid()),
    )
    weights = nlc_weights(mem)
    state = MemoryState(weights=weights, momentum=tuple(torch.zeros_like(w) for w in weights))
    o, state = memory_update(q, k, v, gates, titans_rule(), state, impl=impl)
    assert state.pos == T + 1 and state.pending is not None
    return o[:, :, 1:], list(state.weights), list(state.momentum)


@pytest.mark.parametrize("impl", ["naive", "auto"])
def test_titans_memory_matches_neural_memory(impl):
    mem = neural_memory()
    x = leaves()
    inputs = [*x.values(), *mem.memory_model_parameters]
    names = [*x, *(f"initial weight {i}" for i in range(len(mem.memory_model_parameters)))]
    results = []
    for run in (lambda: run_titans(mem, x), lambda: run_nlc(mem, x, impl)):
        o, weights, momentum = run()
        outputs = [o, *weights, *momentum]
        gen = torch.Generator().manual_seed(8)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in outputs)
        results.append((outputs, torch.autograd.grad(loss, inputs)))
    (outputs_ref, grads_ref), (outputs, grads) = results
    output_names = ["reads", "weight 1", "weight 2", "momentum 1", "momentum 2"]
    for name, actual, expected in [*zip(output_names, outputs, outputs_ref), *zip((f"grad of {n}" for n in names), grads, grads_ref)]:
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-8, msg=lambda m, name=name: f"{name}: {m}")


def test_unshifted_reads_differ_only_at_chunk_ends():
    """Without the one-token shift, nlc's `every = C` reads equal titans' everywhere but at the last token of
    each chunk, which titans reads after its own chunk's write and nlc before it."""
    mem = neural_memory()
    x = leaves()
    o_titans = run_titans(mem, x)[0].detach()  # titans takes its inner gradients with torch.func: grad mode stays on
    gates = Gates(
        lr=x["lr"] * 2 / D,
        beta=x["momentum_logit"].sigmoid().repeat_interleave(C, dim=2),
        lam=x["decay_logit"].sigmoid().repeat_interleave(C, dim=2),
    )
    weights = nlc_weights(mem)
    o, _ = memory_update(x["q"], x["k"], x["v"], gates, titans_rule(), MemoryState(weights=weights), impl="naive")
    o = o.detach()
    chunk_end = torch.arange(T) % C == C - 1
    torch.testing.assert_close(o[:, :, ~chunk_end], o_titans[:, :, ~chunk_end], atol=1e-10, rtol=1e-8)
    gap = (o - o_titans)[:, :, chunk_end].abs().amax(dim=(0, 1, 3))  # [N_CHUNKS]
    assert (gap > 1e-3).all(), f"chunk-end reads should differ, max gaps {gap.tolist()}"
