"""`mlp`: a position-wise feed-forward layer that never learns in context (LANGUAGE.md §3.5)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from nlc.runtime.config import MlpConfig


def mlp_hidden(cfg: MlpConfig) -> int:
    """swiglu has three matrices instead of two: 2/3 of the hidden width keeps the parameter count."""
    if cfg.act == "swiglu":
        return round(2 / 3 * cfg.expand * cfg.dim)
    return round(cfg.expand * cfg.dim)


class MlpLayer(nn.Module):
    def __init__(self, cfg: MlpConfig):
        super().__init__()
        self.cfg = cfg
        hidden = mlp_hidden(cfg)
        self.up = nn.Linear(cfg.dim, 2 * hidden if cfg.act == "swiglu" else hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.dim, bias=False)

    def initial_state(self, batch_size: int, device=None, dtype=None) -> None:
        return None

    def flush(self, state: None) -> None:
        return state

    def forward(self, x: Tensor, state: None = None) -> tuple[Tensor, None]:
        h = self.up(x)  # [B, T, hidden] (swiglu: [B, T, 2 * hidden])
        if self.cfg.act == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}[self.cfg.act](h)
        return self.down(h), state
