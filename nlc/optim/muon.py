"""Muon and M3: momenta whose output goes through Newton-Schulz (paper Eqs. 42, 52 and Algorithm 1).

Both orthogonalise the updates of matrices only. Parameters of other shapes, and matrices that
are conventionally left to AdamW (embeddings, output heads), take an AdamW step inside the
same optimiser: mark them with a parameter group `{"params": [...], "matrix": False}`, or build
the groups from names with `matrix_param_groups`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import torch
from torch import Tensor

from nlc.optim.base import PerParameter, orthogonalised

DEFAULT_ADAMW_PATTERNS = ("*embed*", "*emb.*", "*head*", "*lm_head*")


def matrix_param_groups(named_parameters: Iterable[tuple[str, Tensor]], adamw_patterns: Iterable[str] = DEFAULT_ADAMW_PATTERNS) -> list[dict]:
    """Split parameters into the Newton-Schulz group and the AdamW group.

    A parameter goes to AdamW when it has fewer than two dimensions or its name matches one of
    `adamw_patterns` (fnmatch globs over `model.named_parameters()` names).
    """
    patterns = list(adamw_patterns)
    matrices, others = [], []
    for name, p in named_parameters:
        if p.ndim >= 2 and not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            matrices.append(p)
        else:
            others.append(p)
    groups = [{"params": matrices, "matrix": True}, {"params": others, "matrix": False}]
    return [group for group in groups if group["params"]]


def _uses_matrix_step(group: dict, p: Tensor) -> bool:
    return p.ndim >= 2 and group["matrix"] is not False


def _adamw_step(p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments)."""
    lr, (beta1, beta2), eps = group["adamw_lr"], group["adamw_betas"], group["adamw_eps"]
    if "adamw_step" not in state:
        state["adamw_step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["adamw_step"] += 1
    t = state["adamw_step"]
    p.mul_(1 - lr * group["adamw_weight_decay"])
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))


def _adamw_defaults(adamw_lr: float, adamw_betas: tuple[float, float], adamw_eps: float, adamw_weight_decay: float):
    if adamw_lr < 0:
        raise ValueError(f"adamw_lr must be >= 0, got {adamw_lr}")
    if not all(0.0 <= b < 1.0 for b in adamw_betas):
        raise ValueError(f"adamw_betas must be in [0, 1), got {adamw_betas}")
    return {"adamw_lr": adamw_lr, "adamw_betas": tuple(adamw_betas), "adamw_eps": adamw_eps, "adamw_weight_decay": adamw_weight_decay}


class Muon(PerParameter):
    """Muon: Newton-Schulz-orthogonalised momentum for matrices, AdamW for the rest (Eq. 42).

        b_t = beta * b_{t-1} + g_t
        u_t = g_t + beta * b_t  (nesterov)   or   b_t
        W_t = (1 - lr * wd) W_{t-1} - lr * sqrt(max(1, rows / cols)) * NewtonSchulz_steps(u_t)

    NewtonSchulz is the quintic iteration with coefficients (3.4445, -4.7750, 2.0315) on u
    scaled to unit Frobenius norm; it maps u to roughly U V^T of its SVD, so the scale of b is
    irrelevant and b is kept as a sum rather than a (1 - beta)-weighted mean. A tensor with more
    than two dimensions is treated as the matrix [shape[0], -1]. Groups with `matrix=False`,
    and parameters with fewer than two dimensions, take an AdamW step with the `adamw_*` settings.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        beta: float = 0.95,
        steps: int = 5,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        defaults = {"lr": lr, "beta": beta, "steps": steps, "nesterov": nesterov, "weight_decay": weight_decay, "matrix": None}
        defaults.update(_adamw_defaults(adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay))
        super().__init__(params, defaults)

    def update(self, p: Tensor, group: dict, state: dict) -> None:
        if not _uses_matrix_step(group, p):
            _adamw_step(p, p.grad, state, group)
            return
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p)
        b = state["momentum"]
        b.mul_(group["beta"]).add_(p.grad)
        update = p.grad.add(b, alpha=group["beta"]) if group["nesterov"] else b
        rows, cols = p.shape[0], p[0].numel()
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(orthogonalised(update, group["steps"]), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)


class M3(PerParameter):
    """Multi-scale Momentum Muon (Algorithm 1 of the Nested Learning paper, §7.2).

    For every matrix, a fast momentum M1 (every step), a slow momentum M2 (every `slow_every`
    steps, from the sum of the gradients of the chunk just finished) and an Adam-style second
    moment V; both momenta pass through Newton-Schulz and the sum is divided element-wise by
    sqrt(V), as in the algorithm, so the step's scale is set by lr / |g| rather than by lr alone
    as in Muon (lr has no default). At step t = 1, 2, ... with f = slow_every:

        if t > 1 and (t - 1) % f == 0:                      (a chunk of f gradients has ended)
            M2 = beta_slow * M2 + (1 - beta_slow) * sum(g_{t-f} .. g_{t-1});  O2 = NS(M2)
        M1 = beta_fast * M1 + (1 - beta_fast) * g_t;  O1 = NS(M1)
        V  = beta2 * V + (1 - beta2) * g_t^2;  V_hat = V / (1 - beta2^t)
        W  = (1 - lr * wd) W - lr * (O1 + alpha * O2) / (sqrt(V_hat) + eps)

    O2 is zero until the first chunk ends. Choices against the printed algorithm: its moments
    are plain sums (M1 += beta1 g); we use exponential moving averages so that old gradients
    are forgotten (Newton-Schulz normalises the scale away, only the mixture matters), and V is
    bias-corrected as in Adam. Its chunk sum runs over i = (k-1)f .. kf, f + 1 terms that overlap
    the next chunk's; we sum each gradient once. Like Muon, a tensor with more than two dimensions
    is the matrix [shape[0], -1]; other parameters and `matrix=False` groups take an AdamW step.
    """

    def __init__(
        self,
        params,
        lr: float,
        slow_every: int = 8,
        beta_fast: float = 0.9,
        beta_slow: float = 0.5,
        beta2: float = 0.999,
        alpha: float = 1.0,
        steps: int = 5,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if slow_every < 1:
            raise ValueError(f"slow_every must be >= 1, got {slow_every}")
        for name, beta in (("beta_fast", beta_fast), ("beta_slow", beta_slow), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {beta}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        defaults = {
            "lr": lr,
            "slow_every": slow_every,
            "beta_fast": beta_fast,
            "beta_slow": beta_slow,
            "beta2": beta2,
            "alpha": alpha,
            "steps": steps,
            "eps": eps,
            "weight_decay": weight_decay,
            "matrix": None,
        }
        defaults.update(_adamw_defaults(adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay))
        super().__init__(params, defaults)

    def update(self, p: Tensor, group: dict, state: dict) -> None:
        if not _uses_matrix_step(group, p):
            _adamw_step(p, p.grad, state, group)
            return
        g = p.grad
        if "fast" not in state:
            state["step"] = 0
            for key in ("fast", "slow", "slow_out", "chunk", "second_moment"):
                state[key] = torch.zeros_like(p)
        state["step"] += 1
        t, f = state["step"], group["slow_every"]
        if t > 1 and (t - 1) % f == 0:
            state["slow"].mul_(group["beta_slow"]).add_(state["chunk"], alpha=1 - group["beta_slow"])
            state["slow_out"] = orthogonalised(state["slow"], group["steps"])
            state["chunk"].zero_()
        state["chunk"].add_(g)
        state["fast"].lerp_(g, 1 - group["beta_fast"])
        v = state["second_moment"]
        v.mul_(group["beta2"]).addcmul_(g, g, value=1 - group["beta2"])
        v_hat = v / (1 - group["beta2"] ** t)
        update = orthogonalised(state["fast"], group["steps"]) + group["alpha"] * state["slow_out"]
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(update, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])
