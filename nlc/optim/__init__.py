"""Optimisers as associative memories (Nested Learning paper §4) and outer levels.

`make_optimizer("delta_momentum", model.parameters(), lr=0.01, beta=0.9)` builds any optimiser
of `OPTIMIZERS` by the name LANGUAGE.md §3.7 gives it in a `train { update = ... }` block.
"""

from __future__ import annotations

import difflib
import inspect

import torch

from nlc.optim.deep_momentum import DeepMomentum
from nlc.optim.levels import LevelPatternError, OuterLevels
from nlc.optim.momentum import DeltaMomentum, Momentum, PreconditionedMomentum
from nlc.optim.muon import M3, Muon, matrix_param_groups

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "momentum": Momentum,
    "adamw": torch.optim.AdamW,
    "muon": Muon,
    "delta_momentum": DeltaMomentum,
    "preconditioned_momentum": PreconditionedMomentum,
    "deep_momentum": DeepMomentum,
    "m3": M3,
}


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def make_optimizer(name: str, params, **kwargs) -> torch.optim.Optimizer:
    """Build `OPTIMIZERS[name](params, **kwargs)`, with errors that name the bad name or argument."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}{_did_you_mean(name, list(OPTIMIZERS))} (known: {', '.join(OPTIMIZERS)})")
    cls = OPTIMIZERS[name]
    arguments = {
        parameter.name: parameter
        for parameter in list(inspect.signature(cls.__init__).parameters.values())[2:]  # after self, params
        if parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    for key in kwargs:
        if key not in arguments:
            raise ValueError(f"unknown argument {key!r} for optimizer {name!r}{_did_you_mean(key, list(arguments))} (accepted: {', '.join(arguments)})")
    missing = [key for key, parameter in arguments.items() if parameter.default is inspect.Parameter.empty]
    missing = [key for key in missing if key not in kwargs]
    if missing:
        raise ValueError(f"optimizer {name!r} needs argument {missing[0]!r}")
    return cls(params, **kwargs)


__all__ = [
    "M3",
    "OPTIMIZERS",
    "DeepMomentum",
    "DeltaMomentum",
    "LevelPatternError",
    "Momentum",
    "Muon",
    "OuterLevels",
    "PreconditionedMomentum",
    "make_optimizer",
    "matrix_param_groups",
]
