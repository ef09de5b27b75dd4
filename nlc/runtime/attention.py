"""`attention`: causal softmax attention, the non-parametric memory (LANGUAGE.md §3.4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlc.runtime.config import AttentionConfig


@dataclass
class AttentionState:
    """The KV cache (keys after RoPE) and the stream position. A windowed layer keeps the last
    `window - 1` tokens, all a future query can see; a global layer keeps every token.

    k, v: `[B, H, S, d]`
    pos:  tokens seen so far (the RoPE position of the next token)
    """

    k: Tensor
    v: Tensor
    pos: int = 0


def rope(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotary embedding (rotate-half convention): x `[B, H, T, d]`, positions `[T]`."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float64) * 2 / d)  # [d/2]
    angles = positions.to(torch.float64)[:, None] * inv_freq[None]  # [T, d/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # [T, d]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class AttentionLayer(nn.Module):
    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"heads ({cfg.heads}) must divide dim ({cfg.dim})")
        if cfg.rope and (cfg.dim // cfg.heads) % 2:
            raise ValueError("rope needs an even head width")
        if cfg.window is not None and cfg.window < 1:
            raise ValueError("window must be at least 1")
        self.cfg = cfg
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def initial_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> AttentionState:
        empty = torch.zeros(batch_size, self.heads, 0, self.head_dim, device=device, dtype=dtype)
        return AttentionState(k=empty, v=empty.clone())

    def flush(self, state: AttentionState) -> AttentionState:
        return state  # nothing is ever pending

    def forward(self, x: Tensor, state: AttentionState | None = None) -> tuple[Tensor, AttentionState]:
        B, T, D = x.shape
        if state is None:
            state = self.initial_state(B, x.device, x.dtype)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, T, d] each
        if self.cfg.rope:
            positions = torch.arange(state.pos, state.pos + T, device=x.device)
            q, k = rope(q, positions, self.cfg.rope_base), rope(k, positions, self.cfg.rope_base)
        k = torch.cat([state.k.to(k.dtype), k], dim=2)  # [B, H, S + T, d]
        v = torch.cat([state.v.to(v.dtype), v], dim=2)
        S = k.shape[2] - T
        # query i (stream position pos + i) sees key j (position pos - S + j) when 0 <= (S + i) - j < window
        offset = (torch.arange(T, device=x.device)[:, None] + S) - torch.arange(S + T, device=x.device)[None]  # [T, S+T]
        allowed = offset >= 0
        if self.cfg.window is not None:
            allowed = allowed & (offset < self.cfg.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # [B, H, T, d]
        y = self.out(y.transpose(1, 2).reshape(B, T, D))
        keep = k.shape[2] if self.cfg.window is None else min(k.shape[2], self.cfg.window - 1)
        return y, AttentionState(k=k[:, :, k.shape[2] - keep :], v=v[:, :, v.shape[2] - keep :], pos=state.pos + T)
