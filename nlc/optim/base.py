"""The loop every optimiser here shares: each parameter with a gradient is stepped on its own."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from nlc.ops.memory.structure import newton_schulz


class PerParameter(Optimizer):
    """A `torch.optim.Optimizer` whose step updates each parameter that has a gradient independently:
    subclasses write `update(p, group, state)`."""

    def update(self, p: Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group, self.state[p])
        return loss


def orthogonalised(update: Tensor, steps: int) -> Tensor:
    """NewtonSchulz of a tensor seen as the matrix [shape[0], -1] (Muon's step, DMGD's option)."""
    return newton_schulz(update.reshape(update.shape[0], -1), steps).reshape(update.shape)


def decayed_grad(p: Tensor, weight_decay: float) -> Tensor:
    """The gradient with coupled weight decay, as in SGD: g + wd * W."""
    return p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
