"""Each optimiser against a literal re-implementation of its equation, in float64."""

import io
import math

import pytest
import torch

from nlc.optim import (
    M3,
    OPTIMIZERS,
    DeepMomentum,
    DeltaMomentum,
    Momentum,
    Muon,
    PreconditionedMomentum,
    make_optimizer,
)

STEPS = 6
X = torch.linspace(-1.0, 1.0, 15, dtype=torch.float64).reshape(5, 3)  # fixed data of the toy loss


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, generator=generator, dtype=torch.float64)
    return [torch.nn.Parameter(weight), torch.nn.Parameter(bias)]


def toy_loss(weight, bias):
    # non-quadratic, so the gradient keeps changing direction along the run
    return torch.tanh(X @ weight + bias).square().sum() + torch.sin(3 * weight).sum() + 0.5 * bias.square().sum()


def gradients(tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    return list(torch.autograd.grad(toy_loss(*tensors), tensors))


def run_optimizer(optimizer_cls, params, steps=STEPS, **kwargs):
    optimizer = optimizer_cls(params, **kwargs)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        toy_loss(*params).backward()
        optimizer.step()
        history.append([p.detach().clone() for p in params])
    return history


def assert_histories_close(actual, expected):
    assert len(actual) == len(expected)
    for step, (got, want) in enumerate(zip(actual, expected)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"step {step + 1}")


def reference_newton_schulz(matrix, steps):
    """The quintic iteration X <- a X + b (X X^T) X + c (X X^T)^2 X, on the wide orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if tall else matrix
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


def test_momentum_equals_torch_sgd_step_for_step():
    ours, theirs = make_params(), make_params()
    optimizer = Momentum(ours, lr=0.05, beta=0.9, weight_decay=0.01)
    sgd = torch.optim.SGD(theirs, lr=0.05, momentum=0.9, dampening=0, weight_decay=0.01)
    for step in range(STEPS):
        if step == 3:  # a schedule changing lr mid-run must act on both alike
            for opt in (optimizer, sgd):
                opt.param_groups[0]["lr"] = 0.02
        for opt, params in ((optimizer, ours), (sgd, theirs)):
            opt.zero_grad()
            toy_loss(*params).backward()
            opt.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), f"step {step + 1}"


def test_momentum_matches_the_paper_form():
    lr, beta = 0.05, 0.8
    tensors = [p.detach().clone() for p in make_params()]
    displacement = [torch.zeros_like(t) for t in tensors]  # m in W <- W + m, m <- beta m - lr g
    expected = []
    for _ in range(STEPS):
        for i, g in enumerate(gradients(tensors)):
            displacement[i] = beta * displacement[i] - lr * g
            tensors[i] = tensors[i] + displacement[i]
        expected.append([t.clone() for t in tensors])
    assert_histories_close(run_optimizer(Momentum, make_params(), lr=lr, beta=beta), expected)


@pytest.mark.parametrize("inner_lr", [0.0, 0.3, 5.0])
def test_delta_momentum_matches_eq_49(inner_lr):
    lr, beta = 0.05, 0.9
    tensors = [p.detach().clone() for p in make_params()]
    displacement = [torch.zeros(t.numel(), dtype=torch.float64) for t in tensors]
    expected = []
    for _ in range(STEPS):
        for i, g in enumerate(gradients(tensors)):
            g = g.reshape(-1)
            # m <- m (beta I - beta G) - lr g, G the implicit-step matrix (I + zeta g g^T)^-1 = I - G
            eye = torch.eye(g.numel(), dtype=torch.float64)
            decay = beta * torch.linalg.inv(eye + inner_lr * torch.outer(g, g))
            displacement[i] = decay @ displacement[i] - lr * g
            tensors[i] = tensors[i] + displacement[i].reshape(tensors[i].shape)
        expected.append([t.clone() for t in tensors])
    got = run_optimizer(DeltaMomentum, make_params(), lr=lr, beta=beta, inner_lr=inner_lr)
    assert_histories_close(got, expected)


def test_delta_momentum_with_zero_inner_lr_is_momentum():
    got = run_optimizer(DeltaMomentum, make_params(), lr=0.05, beta=0.9, inner_lr=0.0)
    want = run_optimizer(Momentum, make_params(), lr=0.05, beta=0.9)
    assert_histories_close(got, want)


def test_preconditioned_momentum_matches_eq_47():
    lr, beta, beta2, eps = 0.01, 0.9, 0.99, 1e-8
    tensors = [p.detach().clone() for p in make_params()]
    displacement = [torch.zeros_like(t) for t in tensors]
    second = [torch.zeros_like(t) for t in tensors]
    expected = []
    for t in range(1, STEPS + 1):
        for i, g in enumerate(gradients(tensors)):
            second[i] = beta2 * second[i] + (1 - beta2) * g * g
            preconditioner = 1 / (torch.sqrt(second[i] / (1 - beta2**t)) + eps)  # the value P_i, diagonal
            displacement[i] = beta * displacement[i] - lr * preconditioner * g
            tensors[i] = tensors[i] + displacement[i]
        expected.append([x.clone() for x in tensors])
    got = run_optimizer(PreconditionedMomentum, make_params(), lr=lr, beta=beta, beta2=beta2, eps=eps)
    assert_histories_close(got, expected)


@pytest.mark.parametrize("use_newton_schulz", [False, True])
def test_deep_momentum_matches_eq_50_with_hand_written_gradients(use_newton_schulz):
    lr, beta, inner_lr, hidden, seed = 0.01, 0.9, 0.3, 5, 7
    tensors = [p.detach().clone() for p in make_params()]
    memories = []
    for _ in tensors:
        generator = torch.Generator().manual_seed(seed)
        memories.append([torch.randn(hidden, 1, generator=generator, dtype=torch.float64), torch.zeros(1, hidden, dtype=torch.float64)])
    expected = []
    for _ in range(STEPS):
        for i, g in enumerate(gradients(tensors)):
            w1, w2 = memories[i]
            u = g.reshape(-1, 1) / g.square().mean().sqrt()  # [n, 1]
            n = u.shape[0]
            h = torch.tanh(u @ w1.T)  # [n, hidden]
            # inner loss mean(u * h w2^T), differentiated by hand
            d_w2 = (u * h).sum(0, keepdim=True) / n  # [1, hidden]
            d_pre = (u / n) * w2 * (1 - h * h)  # [n, hidden]
            d_w1 = d_pre.T @ u  # [hidden, 1]
            w1, w2 = beta * w1 - inner_lr * d_w1, beta * w2 - inner_lr * d_w2
            memories[i] = [w1, w2]
            update = (torch.tanh(u @ w1.T) @ w2.T).reshape(tensors[i].shape)
            if use_newton_schulz and update.ndim == 2:
                update = reference_newton_schulz(update, 5)
            tensors[i] = tensors[i] + lr * update
        expected.append([t.clone() for t in tensors])
    got = run_optimizer(
        DeepMomentum,
        make_params(),
        lr=lr,
        beta=beta,
        hidden=hidden,
        depth=2,
        inner_lr=inner_lr,
        newton_schulz=use_newton_schulz,
        seed=seed,
    )
    assert_histories_close(got, expected)


def test_deep_momentum_deeper_memory_descends():
    params = make_params()
    start = toy_loss(*params).item()
    run_optimizer(DeepMomentum, params, steps=30, lr=0.005, depth=3, hidden=8)
    assert toy_loss(*params).item() < start


def test_newton_schulz_approximately_orthogonalises():
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    u, _s, vh = torch.linalg.svd(matrix, full_matrices=False)
    result = reference_newton_schulz(matrix, 5)
    singular_values = torch.linalg.svdvals(result)
    # the quintic coefficients trade exactness for speed: singular values land near 1, not on it
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25
    # and the singular vectors are those of U V^T
    torch.testing.assert_close(u.T @ result @ vh.T, torch.diag(torch.diagonal(u.T @ result @ vh.T)), atol=1e-8, rtol=0)


def test_muon_matches_literal_rule_and_adamw_for_vectors():
    lr, beta, adamw_lr, betas = 0.02, 0.95, 0.003, (0.9, 0.95)
    tensors = [p.detach().clone() for p in make_params()]
    momentum = torch.zeros_like(tensors[0])
    first, second = torch.zeros_like(tensors[1]), torch.zeros_like(tensors[1])
    expected = []
    for t in range(1, STEPS + 1):
        g_weight, g_bias = gradients(tensors)
        momentum = beta * momentum + g_weight
        nesterov = g_weight + beta * momentum
        tensors[0] = tensors[0] - lr * math.sqrt(max(1, 3 / 4)) * reference_newton_schulz(nesterov, 5)
        first = betas[0] * first + (1 - betas[0]) * g_bias
        second = betas[1] * second + (1 - betas[1]) * g_bias**2
        m_hat, v_hat = first / (1 - betas[0] ** t), second / (1 - betas[1] ** t)
        tensors[1] = tensors[1] - adamw_lr * m_hat / (v_hat.sqrt() + 1e-8)
        expected.append([x.clone() for x in tensors])
    got = run_optimizer(Muon, make_params(), lr=lr, beta=beta, adamw_lr=adamw_lr, adamw_betas=betas)
    assert_histories_close(got, expected)


def test_muon_treats_higher_rank_tensors_as_matrices():
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(2, 3, 2, generator=generator, dtype=torch.float64)
    grads = [torch.randn(2, 3, 2, generator=generator, dtype=torch.float64) for _ in range(3)]
    kernel = torch.nn.Parameter(start.clone())
    optimizer = Muon([kernel], lr=0.1, beta=0.5, nesterov=False)
    expected, momentum = start.clone(), torch.zeros_like(start)
    for g in grads:
        kernel.grad = g.clone()
        optimizer.step()
        momentum = 0.5 * momentum + g
        expected = expected - 0.1 * reference_newton_schulz(momentum.reshape(2, 6), 5).reshape(2, 3, 2)
        torch.testing.assert_close(kernel.detach(), expected, rtol=1e-10, atol=1e-12)


def test_muon_marked_matrices_follow_torch_adamw():
    ours, theirs = make_params(), make_params()
    muon = Muon([{"params": ours, "matrix": False}], adamw_lr=0.01, adamw_weight_decay=0.1)
    adamw = torch.optim.AdamW(theirs, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(STEPS):
        for opt, params in ((muon, ours), (adamw, theirs)):
            opt.zero_grad()
            toy_loss(*params).backward()
            opt.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"step {step + 1}")


def test_matrix_param_groups_sends_embeddings_and_vectors_to_adamw():
    from nlc.optim import matrix_param_groups

    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(5, 3), "block": torch.nn.Linear(3, 3), "lm_head": torch.nn.Linear(3, 5)})
    groups = matrix_param_groups(model.named_parameters())
    matrices = {id(p) for p in groups[0]["params"]}
    assert groups[0]["matrix"] is True and groups[1]["matrix"] is False
    assert matrices == {id(model["block"].weight)}
    assert len(groups[1]["params"]) == 4  # embedding, head weight, two biases


def test_m3_matches_algorithm_1():
    lr, f, beta_fast, beta_slow, beta2, alpha, eps = 0.01, 3, 0.9, 0.5, 0.99, 0.7, 1e-8
    steps = 8  # slow updates at steps 4 and 7
    weight = make_params()[0].detach().clone()
    fast, slow, second = torch.zeros_like(weight), torch.zeros_like(weight), torch.zeros_like(weight)
    slow_out = torch.zeros_like(weight)
    chunk = []
    bias = make_params()[1].detach().clone()  # held fixed: only the matrix is optimised here
    expected = []
    for t in range(1, steps + 1):
        g = gradients([weight, bias])[0]
        if len(chunk) == f:
            slow = beta_slow * slow + (1 - beta_slow) * sum(chunk)
            slow_out = reference_newton_schulz(slow, 5)
            chunk = []
        chunk.append(g)
        fast = beta_fast * fast + (1 - beta_fast) * g
        second = beta2 * second + (1 - beta2) * g * g
        denom = torch.sqrt(second / (1 - beta2**t)) + eps
        weight = weight - lr * (reference_newton_schulz(fast, 5) + alpha * slow_out) / denom
        expected.append([weight.clone()])
    params = make_params()
    params[1].requires_grad_(False)
    optimizer = M3(params[:1], lr=lr, slow_every=f, beta_fast=beta_fast, beta_slow=beta_slow, beta2=beta2, alpha=alpha)
    got = []
    for _ in range(steps):
        optimizer.zero_grad()
        toy_loss(*params).backward()
        optimizer.step()
        got.append([params[0].detach().clone()])
    assert_histories_close(got, expected)


RESUME_KWARGS = {
    "sgd": {"lr": 0.05, "momentum": 0.9},
    "momentum": {"lr": 0.05, "beta": 0.9},
    "adamw": {"lr": 0.01},
    "muon": {"lr": 0.02},
    "delta_momentum": {"lr": 0.05, "inner_lr": 0.7},
    "preconditioned_momentum": {"lr": 0.01},
    "deep_momentum": {"lr": 0.01, "depth": 3, "newton_schulz": True},
    "m3": {"lr": 0.01, "slow_every": 2},
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_continues_identically(name):
    assert set(RESUME_KWARGS) == set(OPTIMIZERS)
    params = make_params()
    optimizer = make_optimizer(name, params, **RESUME_KWARGS[name])
    for _ in range(3):
        optimizer.zero_grad()
        toy_loss(*params).backward()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    fresh = make_optimizer(name, resumed, **RESUME_KWARGS[name])
    fresh.load_state_dict(saved["optimizer"])
    for step in range(4):
        for opt, ps in ((optimizer, params), (fresh, resumed)):
            opt.zero_grad()
            toy_loss(*ps).backward()
            opt.step()
        for a, b in zip(params, resumed):
            assert torch.equal(a, b), f"{name}: step {step + 1} after resuming"


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (Momentum, {"lr": 0.1, "beta": 1.0}),
        (DeltaMomentum, {"lr": 0.1, "inner_lr": -1.0}),
        (PreconditionedMomentum, {"lr": -1.0}),
        (DeepMomentum, {"lr": 0.1, "depth": 1}),
        (Muon, {"steps": 0}),
        (M3, {"lr": 0.001, "slow_every": 0}),
    ],
)
def test_bad_hyperparameters_are_rejected(cls, kwargs):
    with pytest.raises(ValueError):
        cls(make_params(), **kwargs)
