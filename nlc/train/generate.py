"""Sampling with the in-context state carried: the prompt is read once, then each new token is fed
alone with the state, never re-running the prefix. Memory layers hold a fixed-size state per
stream; attention layers hold a KV cache that grows by one token per step.

Generation runs without gradients, so a `cms` with `objective = task` (which writes only after a
backward) keeps the weights it had; memories and `cms` levels with `objective = l2` keep learning
from every token, the generated ones included.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """One token per row of logits `[B, V]` -> `[B]`. Temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1] the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: Tensor,
    tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """`tokens` new tokens `[B, tokens]` after prompt `[B, P]` (P >= 1)."""
    logits, state = model(prompt)  # [B, P, V]
    out = []
    for i in range(tokens):
        token = sample_next(logits[:, -1], temperature, top_k, generator)  # [B]
        out.append(token)
        if i + 1 < tokens:
            logits, state = model(token[:, None], state)  # [B, 1, V]
    return torch.stack(out, dim=1) if out else prompt.new_zeros(prompt.shape[0], 0)
