"""Deep Momentum Gradient Descent (DMGD, paper Eq. 50, optional Eq. 52 output)."""

from __future__ import annotations

import torch
from torch import Tensor

from nlc.optim.base import PerParameter, decayed_grad, orthogonalised


def _memory_forward(weights: list[Tensor], x: Tensor) -> Tensor:
    """f(x) = W_L tanh(... tanh(W_1 x)) applied to every row of x: [n, 1] -> [n, 1]."""
    h = x
    for w in weights[:-1]:
        h = torch.tanh(h @ w.T)  # [n, hidden]
    return h @ weights[-1].T


def _init_memory(hidden: int, depth: int, seed: int, like: Tensor) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(hidden, 1)] + [(hidden, hidden)] * (depth - 2)
    weights = [torch.randn(shape, generator=generator, dtype=torch.float64) / shape[1] ** 0.5 for shape in shapes]
    # a zero last layer: the first step's update is written entirely by the inner step
    weights.append(torch.zeros(1, hidden, dtype=torch.float64))
    return [w.to(device=like.device, dtype=like.dtype) for w in weights]


class DeepMomentum(PerParameter):
    """DMGD: the momentum is an MLP memory f_theta updated by its own gradient step (Eq. 50).

    One memory per parameter tensor, shared across its elements and acting on each gradient
    element: f_theta: R -> R, f(x) = W_L tanh(... tanh(W_1 x)), `depth` weight matrices of width
    `hidden`, no biases. Per outer step, with u the gradient scaled to unit RMS:

        u       = g_t / (rms(g_t) + eps)
        L2(th)  = mean_e  u_e * f_th(u_e)                  (inner objective)
        theta  <- beta * theta - inner_lr * grad_theta L2(theta)
        W_t     = W_{t-1} + lr * f_theta(u)                (after the inner step)

    The inner objective is momentum's own objective <m, g> (Eq. 34) with the constant memory m
    replaced by f(u): minimising <f(u), u> trains f to output a descent direction, and the decay
    beta is its l2 retention. With f a per-element constant (f(u_e) = m_e) the same rule is
    classical momentum on the scaled gradient (m <- beta m - inner_lr u / n); a shared f instead
    compresses the gradient history into a learned response curve. Scaling u to unit RMS makes the memory's inputs, and so lr, independent of
    the gradient's scale (as in Adam and Muon). tanh keeps the inner dynamics bounded: the last
    layer's gradient is mean(u * h) with |h| <= 1 and rms(u) = 1, so each of its entries stays
    within inner_lr / (1 - beta) and |f| within hidden * inner_lr / (1 - beta). The last layer
    starts at zero, the others are drawn from a generator seeded with `seed`.

    With `newton_schulz=True`, a parameter with two or more dimensions (reshaped to
    [shape[0], -1]) steps by NewtonSchulz(f(u)) instead (Eq. 52).
    """

    def __init__(
        self,
        params,
        lr: float,
        beta: float = 0.9,
        hidden: int = 16,
        depth: int = 2,
        inner_lr: float = 0.1,
        newton_schulz: bool = False,
        ns_steps: int = 5,
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        if lr < 0 or inner_lr < 0:
            raise ValueError(f"lr and inner_lr must be >= 0, got {lr} and {inner_lr}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if depth < 2 or hidden < 1:
            raise ValueError(f"the memory needs depth >= 2 and hidden >= 1, got depth={depth}, hidden={hidden}")
        defaults = {
            "lr": lr,
            "beta": beta,
            "hidden": hidden,
            "depth": depth,
            "inner_lr": inner_lr,
            "newton_schulz": newton_schulz,
            "ns_steps": ns_steps,
            "eps": eps,
            "weight_decay": weight_decay,
            "seed": seed,
        }
        super().__init__(params, defaults)

    def update(self, p: Tensor, group: dict, state: dict) -> None:
        g = decayed_grad(p, group["weight_decay"])
        if "memory" not in state:
            state["memory"] = _init_memory(group["hidden"], group["depth"], group["seed"], p)
        u = g.reshape(-1, 1)  # [n, 1]
        u = u / (u.square().mean().sqrt() + group["eps"])
        weights = [w.detach().requires_grad_() for w in state["memory"]]
        with torch.enable_grad():
            inner_loss = (u * _memory_forward(weights, u)).mean()
            grads = torch.autograd.grad(inner_loss, weights)
        for w, dw in zip(state["memory"], grads):
            w.mul_(group["beta"]).sub_(dw, alpha=group["inner_lr"])
        update = _memory_forward(state["memory"], u).reshape(p.shape)
        if group["newton_schulz"] and p.ndim >= 2:
            update = orthogonalised(update, group["ns_steps"])
        p.add_(update, alpha=group["lr"])
