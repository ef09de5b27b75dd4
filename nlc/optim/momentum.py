"""Momentum and the two momenta the Nested Learning paper derives from it (paper §4, Eqs. 33-50).

Momentum is a value-less associative memory of gradients: its state b is one step of gradient
descent per outer step on the inner objective <b, g> with decay beta (Eq. 33-34). The paper
writes the displacement m = -lr * b: W <- W + m, m <- beta m - lr g. We store b, as torch's SGD
does, so that a learning-rate schedule acts on the step and not on the memory.

Every optimiser here treats a parameter tensor of any shape as one vector: inner products and
norms are over all its elements (Frobenius). Weight decay is coupled, as in SGD: g <- g + wd * W.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nlc.optim.base import PerParameter, decayed_grad


def _check_common(lr: float, beta: float, weight_decay: float) -> None:
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


class Momentum(PerParameter):
    """Momentum as a value-less memory of gradients (paper Eq. 33-34).

        b_t = beta * b_{t-1} + g_t          (one GD step on <b, g> with decay beta)
        W_t = W_{t-1} - lr * b_t

    Step for step the same as `torch.optim.SGD(lr, momentum=beta, dampening=0)`.
    """

    def __init__(self, params, lr: float, beta: float = 0.9, weight_decay: float = 0.0):
        _check_common(lr, beta, weight_decay)
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay})

    def update(self, p: Tensor, group: dict, state: dict) -> None:
        g = decayed_grad(p, group["weight_decay"])
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p)
        b = state["momentum"]
        b.mul_(group["beta"]).add_(g)
        p.add_(b, alpha=-group["lr"])


class DeltaMomentum(PerParameter):
    """Delta momentum: the momentum memory trained with an l2 objective (paper Eq. 48-49).

    The paper's rule m <- m (alpha I - g g^T) - lr P g decays the momentum along the current
    gradient, by an amount that grows with the gradient, before writing the gradient. Taken
    literally (an explicit step) it diverges once ||g||^2 > 1 + alpha. We take the decay as an
    implicit step instead, the Sherman-Morrison form used by delta gradient descent (paper
    Eq. 57): with inner learning rate zeta,

        c_t = zeta ||g_t||^2 / (1 + zeta ||g_t||^2)             in [0, 1)
        k_t = g_t / ||g_t||
        b_t = beta * (b_{t-1} - c_t <b_{t-1}, k_t> k_t) + g_t
        W_t = W_{t-1} - lr * b_t

    i.e. m = -lr b decays by beta (I - zeta g g^T / (1 + zeta ||g||^2)), the minimiser of
    zeta/2 <m, g>^2 + 1/2 ||m - beta m_{t-1}||^2. Components of the momentum orthogonal to g
    decay by beta, the component along g by beta (1 - c_t): where gradients are large (the
    steep walls of a valley) the memory forgets what it held along them, where they are small
    (the valley floor) it keeps accumulating. zeta = 0 is plain momentum.
    """

    def __init__(
        self,
        params,
        lr: float,
        beta: float = 0.9,
        inner_lr: float = 1.0,
        weight_decay: float = 0.0,
    ):
        _check_common(lr, beta, weight_decay)
        if inner_lr < 0:
            raise ValueError(f"inner_lr must be >= 0, got {inner_lr}")
        super().__init__(params, {"lr": lr, "beta": beta, "inner_lr": inner_lr, "weight_decay": weight_decay})

    def update(self, p: Tensor, group: dict, state: dict) -> None:
        zeta = group["inner_lr"]
        g = decayed_grad(p, group["weight_decay"])
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p)
        b = state["momentum"]
        # c <b, k> k = zeta <b, g> g / (1 + zeta ||g||^2), without dividing by ||g||
        b.sub_(g * (zeta * torch.sum(b * g) / (1 + zeta * torch.sum(g * g))))
        b.mul_(group["beta"]).add_(g)
        p.add_(b, alpha=-group["lr"])


class PreconditionedMomentum(PerParameter):
    """Momentum whose value is preconditioned by an Adam-style diagonal (paper Eq. 47).

    The memory learns min_b <b, P g> instead of <b, g>: the value written is the gradient mapped
    by P = 1 / (sqrt(v_hat) + eps), v the bias-corrected running mean of g^2:

        v_t   = beta2 * v_{t-1} + (1 - beta2) * g_t^2,   v_hat = v_t / (1 - beta2^t)
        b_t   = beta * b_{t-1} + g_t / (sqrt(v_hat) + eps)
        W_t   = W_{t-1} - lr * b_t
    """

    def __init__(
        self,
        params,
        lr: float,
        beta: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        _check_common(lr, beta, weight_decay)
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
        super().__init__(params, {"lr": lr, "beta": beta, "beta2": beta2, "eps": eps, "weight_decay": weight_decay})

    def update(self, p: Tensor, group: dict, state: dict) -> None:
        beta2 = group["beta2"]
        g = decayed_grad(p, group["weight_decay"])
        if "momentum" not in state:
            state["step"] = 0
            state["momentum"] = torch.zeros_like(p)
            state["second_moment"] = torch.zeros_like(p)
        state["step"] += 1
        v = state["second_moment"]
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        v_hat = v / (1 - beta2 ** state["step"])
        b = state["momentum"]
        b.mul_(group["beta"]).add_(g / (v_hat.sqrt() + group["eps"]))
        p.add_(b, alpha=-group["lr"])
