"""Outer levels: schedule, accumulated gradients, resuming, errors."""

import io
import re

import pytest
import torch
from torch import nn

from nlc.optim import LevelPatternError, Momentum, OuterLevels

LR = 0.1


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.fast = nn.Linear(3, 3).double()
        self.slow = nn.Linear(3, 2).double()
        self.slower = nn.Parameter(torch.randn(4, dtype=torch.float64, generator=generator))


def sgd(params):
    return torch.optim.SGD(params, lr=LR)


def gradient_stream(model, steps, seed=1):
    """A fixed random gradient for every parameter at every step: {name: [g_1, ..., g_steps]}."""
    generator = torch.Generator().manual_seed(seed)
    return {name: [torch.randn(p.shape, dtype=p.dtype, generator=generator) for _ in range(steps)] for name, p in model.named_parameters()}


def drive(model, levels, grads, steps, start=0):
    """Feed step t's gradients, step, zero; return each parameter's values after every step."""
    history = []
    for t in range(start, start + steps):
        for name, p in model.named_parameters():
            p.grad = grads[name][t].clone()
        levels.step()
        levels.zero_grad()
        history.append({name: p.detach().clone() for name, p in model.named_parameters()})
    return history


@pytest.mark.parametrize("accumulate", ["sum", "mean"])
def test_levels_step_on_schedule_with_accumulated_gradients(accumulate):
    model = Toy()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    levels = OuterLevels(
        model,
        [("slow", ["slow.*"], 3, sgd), ("slower", ["slower"], 4, sgd)],
        main_optimizer_factory=sgd,
        accumulate=accumulate,
    )
    steps = 9
    grads = gradient_stream(model, steps)
    history = drive(model, levels, grads, steps)
    every = {"fast.weight": 1, "fast.bias": 1, "slow.weight": 3, "slow.bias": 3, "slower": 4}
    for name, n in every.items():
        expected = initial[name].clone()
        pending = []
        for t in range(steps):
            pending.append(grads[name][t])
            if (t + 1) % n == 0:
                total = sum(pending)
                expected = expected - LR * (total / n if accumulate == "mean" else total)
                pending = []
            torch.testing.assert_close(history[t][name], expected, rtol=1e-12, atol=1e-14, msg=f"{name} step {t + 1}")
    # the schedule itself: a slow parameter moves at steps 3, 6, 9 and nowhere else
    moved = [t + 1 for t in range(1, steps) if not torch.equal(history[t]["slow.weight"], history[t - 1]["slow.weight"])]
    assert moved == [3, 6, 9]


def test_levels_skip_parameters_without_gradients():
    model = Toy()
    levels = OuterLevels(model, [("slow", ["slow.*"], 2, sgd)], main_optimizer_factory=sgd)
    grads = gradient_stream(model, 2)
    before = model.slow.weight.detach().clone()
    model.slow.weight.grad = grads["slow.weight"][0].clone()
    levels.step()
    levels.zero_grad()
    levels.step()  # no gradient this step: the sum is the first step's gradient alone
    torch.testing.assert_close(model.slow.weight.detach(), before - LR * grads["slow.weight"][0])


def test_resuming_mid_accumulation_continues_identically():
    def build(model):
        return OuterLevels(
            model,
            [("slow", ["slow.*"], 3, lambda ps: Momentum(ps, lr=0.05, beta=0.9))],
            main_optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=0.01),
        )

    model = Toy()
    levels = build(model)
    grads = gradient_stream(model, 10)
    drive(model, levels, grads, 4)  # one slow step taken, one gradient pending
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "levels": levels.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = Toy()
    resumed_model.load_state_dict(saved["model"])
    resumed = build(resumed_model)
    resumed.load_state_dict(saved["levels"])
    assert resumed.step_count == 4
    expected = drive(model, levels, grads, 6, start=4)
    got = drive(resumed_model, resumed, grads, 6, start=4)
    for t, (a, b) in enumerate(zip(got, expected)):
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name} step {t + 5}"


def test_pattern_matching_nothing_names_level_and_pattern():
    with pytest.raises(LevelPatternError, match=re.escape("'missing.*'")) as error:
        OuterLevels(Toy(), [("slow", ["slow.*", "missing.*"], 2, sgd)], main_optimizer_factory=sgd)
    assert isinstance(error.value, ValueError)
    assert error.value.level == "slow" and error.value.pattern == "missing.*"


def test_parameter_claimed_by_two_levels_is_an_error():
    with pytest.raises(LevelPatternError, match=re.escape("'slow.weight'")) as error:
        OuterLevels(Toy(), [("a", ["slow.*"], 2, sgd), ("b", ["*.weight"], 4, sgd)], main_optimizer_factory=sgd)
    assert error.value.level == "b" and error.value.pattern == "*.weight"
    assert "'a'" in str(error.value) and "'slow.*'" in str(error.value)


@pytest.mark.parametrize(
    "levels",
    [
        [("slow", ["slow.*"], 0, sgd)],
        [("slow", ["slow.*"], 2, sgd), ("slow", ["slower"], 2, sgd)],
        [("main", ["slow.*"], 2, sgd)],
        [("slow", [], 2, sgd)],
    ],
)
def test_bad_level_definitions_are_rejected(levels):
    with pytest.raises(ValueError):
        OuterLevels(Toy(), levels, main_optimizer_factory=sgd)


def test_describe_lists_levels_with_frequencies_and_counts():
    levels = OuterLevels(Toy(), [("slow", ["slow.*"], 8, sgd)], main_optimizer_factory=sgd)
    rows = levels.describe()
    assert [(r["name"], r["every"], r["tensors"], r["parameters"]) for r in rows] == [
        ("main", 1, 3, 3 * 3 + 3 + 4),
        ("slow", 8, 2, 3 * 2 + 2),
    ]
    text = str(levels)
    assert "slow: every 8 steps" in text and "main: every step" in text
