"""make_optimizer: every registered name builds and steps; bad names and arguments say what is wrong."""

import pytest
import torch

from nlc.optim import OPTIMIZERS, make_optimizer


def param():
    p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(3, 4))
    p.grad = torch.cos(p.detach() * 3)
    return p


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_registered_optimizer_builds_and_moves_the_parameter(name):
    p = param()
    before = p.detach().clone()
    optimizer = make_optimizer(name, [p], lr=0.01)
    assert isinstance(optimizer, OPTIMIZERS[name])
    optimizer.step()
    assert not torch.equal(p.detach(), before)


def test_unknown_argument_is_named_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown argument 'betta' for optimizer 'momentum'; did you mean 'beta'\?"):
        make_optimizer("momentum", [param()], lr=0.1, betta=0.9)


def test_unknown_argument_of_a_torch_optimizer():
    with pytest.raises(ValueError, match=r"'weight_dacay'.*did you mean 'weight_decay'"):
        make_optimizer("adamw", [param()], lr=0.1, weight_dacay=0.1)


def test_unknown_optimizer_is_named_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown optimizer 'delta_momentm'; did you mean 'delta_momentum'\?"):
        make_optimizer("delta_momentm", [param()], lr=0.1)


def test_missing_learning_rate_is_named():
    with pytest.raises(ValueError, match="optimizer 'momentum' needs argument 'lr'"):
        make_optimizer("momentum", [param()])
