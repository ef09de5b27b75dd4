"""The 2-layer MLP memory of `every.py` and `minibatch.py`: its forward, its per-token l2 gradients and the
derivatives of both written out (act'', the derivative of the norm's backward), and the layout helpers of their
group loops. The equations are in README.md beside this file.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nlc.ops.memory.rule import Gates, Rule, Structure, StructureParams
from nlc.ops.memory.structure import NORM_EPS

ACTS = ("gelu", "silu", "relu")
NORMS = ("none", "layer", "rms")


def in_scope(rule: Rule, gates: Gates, q: Tensor, sparams: StructureParams | None) -> bool:
    """The memories whose per-token gradients `key_gradients` and `error_backward` write out: mlp(depth = 2, act
    gelu | silu | relu, any residual, norm none | layer | rms); l2 on values, window = 1; gd or momentum; retention
    none, weight_decay or decay with per-head gates `[B, H, T]`; grad = full; float32 or float64."""
    structure = rule.structure
    if q.dtype not in (torch.float32, torch.float64):
        return False
    if structure.kind != "mlp" or structure.depth != 2 or structure.act not in ACTS or structure.norm not in NORMS:
        return False
    if (rule.objective, rule.targets, rule.window, rule.grad) != ("l2", "values", 1, "full"):
        return False
    if rule.update not in ("gd", "momentum") or rule.retention not in ("none", "weight_decay", "decay"):
        return False
    used = [gates.lr, {"decay": gates.alpha, "weight_decay": gates.lam}.get(rule.retention), gates.beta if rule.update == "momentum" else None]
    if sparams is not None and any(p is not None and p.dim() != 2 for p in (sparams.norm_weight, sparams.norm_bias)):
        return False
    return gates.lr is not None and all(g is None or g.dim() == 3 for g in used)


def activate(name: str, z: Tensor) -> Tensor:
    if name == "gelu":
        return torch.nn.functional.gelu(z)
    return torch.nn.functional.silu(z) if name == "silu" else torch.relu(z)


def act_slope(name: str, z: Tensor) -> Tensor:
    """act'(z), through aten's fused backward kernels (a broadcast 1 as the incoming gradient)."""
    one = z.new_ones(()).expand_as(z)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(one, z)
    if name == "silu":
        return torch.ops.aten.silu_backward(one, z)
    return (z > 0).to(z.dtype)


def act_backward(name: str, grad: Tensor, z: Tensor) -> Tensor:
    """act'(z) ⊙ grad, through aten's fused kernels."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, z)
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    return torch.ops.aten.threshold_backward(grad, z, 0)


def add_second_order(name: str, out: Tensor, z: Tensor, p: Tensor, grad: Tensor) -> None:
    """out += act''(z) ⊙ p ⊙ grad, in place (nothing for relu, whose act'' is 0 almost everywhere)."""
    if name == "gelu":  # gelu = z Φ(z): gelu'' = φ(z) (2 - z²), φ through exp2 (cheaper than exp on CPU)
        square = z.square()
        second = torch.exp2(square * (-0.5 / math.log(2)))
        second.mul_(square.sub_(2)).mul_(p)  # φ √(2π) (z² - 2) p
        out.addcmul_(second, grad, value=-1 / math.sqrt(2 * math.pi))
    elif name == "silu":  # silu = z σ(z): silu'' = σ (1 - σ) (2 + z (1 - 2σ))
        sig = torch.sigmoid(z)
        second = (1 - 2 * sig).mul_(z).add_(2).mul_(sig).mul_(1 - sig).mul_(p)
        out.addcmul_(second, grad)


def mean_last(x: Tensor) -> Tensor:
    return x.mean(-1, keepdim=True)


def norm_forward(norm: str, z: Tensor) -> tuple:
    """The parameter-free norm over the last axis: `(ŷ, ι, z, mean)` with ŷ normalised and
    ι = (mean(z_c²) + ε)^(-1/2) `[..., n, 1]` (z_c: z centred for layer, z for rms; mean None for rms)."""
    if norm == "layer":
        normed, mean, inv = torch.native_layer_norm(z, z.shape[-1:], None, None, NORM_EPS)
        return normed, inv, z, mean
    inv = torch.rsqrt(mean_last(z.square()) + NORM_EPS)
    return z * inv, inv, z, None


def norm_jacobian_t(norm: str, x: Tensor, normed_state: tuple) -> Tensor:
    """J^T x for the norm's Jacobian J (symmetric): ι (C x - ŷ mean(x ŷ)), C centring for layer (aten's
    fused layer-norm backward)."""
    normed, inv, z, mean = normed_state
    if norm == "layer":
        return torch.ops.aten.native_layer_norm_backward(x, z, z.shape[-1:], mean, inv, None, None, [True, False, False])[0]
    return (x - normed * mean_last(x * normed)) * inv


def norm_params(structure: Structure, sparams: StructureParams | None) -> tuple:
    """The output norm's per-head scale and shift `[H, d_out]` that apply (layer: both, rms: the scale), else None."""
    if structure.norm == "none" or sparams is None:
        return None, None
    return sparams.norm_weight, sparams.norm_bias if structure.norm == "layer" else None


def norm_affine(norm: str, norm_weight: Tensor | None, norm_bias: Tensor | None, B: int, H: int) -> tuple:
    """The norm's per-head scale w and shift b `[H, d_out]` as `[B * H, 1, d_out]` (None where absent)."""
    if norm == "none":
        return None, None
    return tuple(None if p is None else p.expand(B, *p.shape).reshape(B * p.shape[0], 1, p.shape[1]) for p in (norm_weight, norm_bias))


def memory_output(act: str, norm: str, residual: bool, x: Tensor, w1: Tensor, w2: Tensor, scale, shift) -> tuple:
    """M(x) = w ⊙ ŷ(act(X W1^T) W2^T) + b (+ X) for x `[BH, n, d_in]`: (M(x), Z1, H, the norm's state)."""
    z1 = torch.bmm(x, w1.mT)  # [BH, n, hidden]
    h = activate(act, z1)
    z2 = torch.bmm(h, w2.mT)  # [BH, n, d_out]
    normed_state = None
    if norm == "none":
        y = z2
    else:
        normed_state = norm_forward(norm, z2)
        normed = normed_state[0]
        y = normed if scale is None else normed * scale
        y = y if shift is None else y + shift
    return (y + x if residual else y), z1, h, normed_state


def key_gradients(act: str, norm: str, residual: bool, keys: Tensor, values: Tensor, w1: Tensor, w2: Tensor, scale, shift) -> tuple:
    """The per-token gradients of l2 at (W1, W2) for a group's keys `[BH, n, d_in]` and values `[BH, n, d_out]`:

        Z1 = K W1^T,  H = act(Z1),  Z2 = H W2^T,  e = w ⊙ ŷ(Z2) + b (+ K) - V,  D2 = J^T (w ⊙ e),  P = D2 W2,  D1 = act'(Z1) ⊙ P

    Token t's gradient of W1 is `D1_t K_t^T`, of W2 `D2_t H_t^T`. Returns (Z1, H, act'(Z1), the norm's state, e, D2, P, D1)."""
    y, z1, h, normed_state = memory_output(act, norm, residual, keys, w1, w2, scale, shift)
    slope = act_slope(act, z1)  # used three times: kept rather than recomputed
    err = y - values  # dl/dy of l2
    d2 = err if norm == "none" else norm_jacobian_t(norm, err if scale is None else err * scale, normed_state)  # [BH, n, d_out]
    p = torch.bmm(d2, w2)  # [BH, n, hidden]
    return z1, h, slope, normed_state, err, d2, p, slope * p


def error_backward(norm: str, grad_d2: Tensor, err: Tensor, d2: Tensor, normed_state, scale, grad_scale, grad_shift) -> tuple:
    """The backward of D2 = J(Z2)^T (w ⊙ e), e = w ⊙ ŷ + b (+ K) - V: (ē, Z̄2) from D̄2, adding w̄ and b̄
    (`[BH, d_out]`, None when not wanted) into grad_scale and grad_shift."""
    if norm == "none":
        return grad_d2, grad_d2
    normed, inv = normed_state[:2]
    weighted = err if scale is None else err * scale  # u
    if norm == "layer":
        delta, weighted = grad_d2 - mean_last(grad_d2), weighted - mean_last(weighted)
    else:
        delta = grad_d2
    u_y, delta_y, delta_u = mean_last(weighted * normed), mean_last(delta * normed), mean_last(delta * weighted)
    grad_u = (delta - normed * delta_y) * inv  # J δ
    grad_err = grad_u if scale is None else grad_u * scale
    # d<δ, J(z)^T u>/dz = ι² ((3 m_uŷ m_δŷ - m_δu) ŷ - m_uŷ δ - m_δŷ u)   (layer: δ, u centred)
    #                   = ι² (m_uŷ m_δŷ - m_δu) ŷ - ι (m_uŷ J δ + m_δŷ J^T u),   J^T u = D2
    through_jacobian = normed * ((u_y * delta_y - delta_u) * inv.square()) - (u_y * inv) * grad_u - (delta_y * inv) * d2
    grad_z2 = through_jacobian + norm_jacobian_t(norm, grad_err if scale is None else grad_err * scale, normed_state)
    if grad_scale is not None:
        grad_scale += (err * grad_u + normed * grad_err).sum(1)
    if grad_shift is not None:
        grad_shift += grad_err.sum(1)
    return grad_err, grad_z2


def key_gradients_backward(
    act: str, norm: str, residual: bool, keys: Tensor, w1: Tensor, w2: Tensor, key: tuple, grads: tuple, scale, norm_grads: tuple, grad_w: list
) -> Tensor:
    """The backward of `key_gradients` to second order, from the gradients reaching D1, D2, H and K
    (`grads` = (D̄1, D̄2, H̄, K̄); D̄2, H̄ and K̄ are owned: updated in place, K̄ the result). Adds the weights'
    terms into grad_w and the norm's (`norm_grads` = (grad_scale, grad_shift)); returns ē, the error's gradient."""
    z1, h, slope, normed_state, err, d2, p = key[:7]
    grad_d1, grad_d2, grad_h, grad_k = grads
    grad_p = slope * grad_d1  # D1 = act'(Z1) ⊙ P, P = D2 W2
    grad_d2.baddbmm_(grad_p, w2.mT)
    grad_err, grad_z2 = error_backward(norm, grad_d2, err, d2, normed_state, scale, *norm_grads)
    grad_z1 = grad_h.baddbmm_(grad_z2, w2).mul_(slope)  # the keys' forward Z2 = act(K W1^T) W2^T
    add_second_order(act, grad_z1, z1, p, grad_d1)
    grad_w[1].baddbmm_(d2.mT, grad_p).baddbmm_(grad_z2.mT, h)
    grad_w[0].baddbmm_(grad_z1.mT, keys)
    grad_k.baddbmm_(grad_z1, w1)
    if residual:
        grad_k += grad_err
    return grad_err


def dot_rows(a: Tensor, b: Tensor) -> Tensor:
    """<a_i, b_i> over all but the first axis, `[BH]`."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1))


def group_major(x: Tensor, count: int, n: int) -> Tensor:
    """[B, H, T, ...] -> [count, B * H, n, ...] (a view)."""
    return x.reshape(-1, count, n, *x.shape[3:]).transpose(0, 1)


def group_ends(g: Tensor | None, count: int, n: int) -> Tensor | None:
    """A gate's value at each chunk's last token, [B, H, T] -> [count, B * H, 1, 1]."""
    return None if g is None else g.reshape(-1, count, n)[:, :, -1].T[..., None, None]
