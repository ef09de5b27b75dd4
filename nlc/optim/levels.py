"""Outer levels: parameter groups that update less often than the rest (LANGUAGE.md §3.7).

A level names parameters by fnmatch globs over `model.named_parameters()` names. Its
parameters accumulate their gradients over `every` outer steps and take one step of the
level's own optimiser on the sum (or the mean) at every step whose count is a multiple of
`every`; every other parameter follows the main optimiser at every step.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

OptimizerFactory = Callable[[list[nn.Parameter]], Optimizer]


class LevelPatternError(ValueError):
    """A level's glob pattern matches no parameter, or a parameter is claimed by two levels."""

    def __init__(self, message: str, level: str, pattern: str):
        super().__init__(message)
        self.level = level
        self.pattern = pattern


@dataclass
class Level:
    name: str
    patterns: list[str]
    every: int
    names: list[str]  # the parameters' names, in model order
    params: list[nn.Parameter]
    optimizer: Optimizer
    accumulated: list[torch.Tensor | None]  # gradient sums since the level's last step


class OuterLevels:
    """The main optimiser plus levels that step every N outer steps on accumulated gradients.

        levels = OuterLevels(model, [("slow", ["*.continuum.slow*"], 8, lambda ps: AdamW(ps, lr=1e-4))],
                             main_optimizer_factory=lambda ps: AdamW(ps, lr=3e-4))
        loss.backward(); levels.step(); levels.zero_grad()   # zero_grad every step, as usual

    `levels` is a sequence of (name, glob patterns, every_n_steps, optimizer_factory). With
    `accumulate="mean"` a level steps on the mean of its gradients instead of their sum.
    """

    def __init__(
        self,
        model: nn.Module,
        levels: Sequence[tuple[str, Iterable[str], int, OptimizerFactory]],
        main_optimizer_factory: OptimizerFactory,
        accumulate: str = "sum",
    ):
        if accumulate not in ("sum", "mean"):
            raise ValueError(f"accumulate must be 'sum' or 'mean', got {accumulate!r}")
        self.accumulate = accumulate
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        owner: dict[str, tuple[str, str]] = {}  # parameter name -> (level, pattern) that claimed it
        self.levels: list[Level] = []
        for level_name, patterns, every, factory in levels:
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            if level_name == "main" or any(level.name == level_name for level in self.levels):
                raise ValueError(f"level name {level_name!r} is reserved or used twice")
            if not isinstance(every, int) or every < 1:
                raise ValueError(f"level {level_name!r}: every must be a positive integer, got {every!r}")
            if not patterns:
                raise ValueError(f"level {level_name!r} has no parameter patterns")
            chosen: set[str] = set()
            for pattern in patterns:
                matches = [name for name, _ in named if fnmatch.fnmatchcase(name, pattern)]
                if not matches:
                    raise LevelPatternError(f"level {level_name!r}: pattern {pattern!r} matches no parameter", level_name, pattern)
                for name in matches:
                    claimed = owner.get(name)
                    if claimed is not None and claimed[0] != level_name:
                        raise LevelPatternError(
                            f"parameter {name!r} is claimed by level {claimed[0]!r} (pattern {claimed[1]!r}) and by level {level_name!r} (pattern {pattern!r})",
                            level_name,
                            pattern,
                        )
                    if claimed is None:
                        owner[name] = (level_name, pattern)
                        chosen.add(name)
            names = [name for name, _ in named if name in chosen]  # in model order
            params = [p for name, p in named if name in chosen]
            self.levels.append(Level(level_name, patterns, every, names, params, factory(params), [None] * len(params)))
        self.main_names = [name for name, _ in named if name not in owner]
        self.main_params = [p for name, p in named if name not in owner]
        self.main_optimizer = main_optimizer_factory(self.main_params) if self.main_params else None
        self.step_count = 0

    @property
    def optimizers(self) -> list[Optimizer]:
        """Every optimiser, main first (for schedulers and logging)."""
        main = [self.main_optimizer] if self.main_optimizer is not None else []
        return main + [level.optimizer for level in self.levels]

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        if self.main_optimizer is not None:
            self.main_optimizer.step()
        for level in self.levels:
            for i, p in enumerate(level.params):
                if p.grad is None:
                    continue
                if level.accumulated[i] is None:
                    level.accumulated[i] = p.grad.detach().clone()
                else:
                    level.accumulated[i].add_(p.grad)
            if self.step_count % level.every != 0:
                continue
            for p, total in zip(level.params, level.accumulated):
                if total is not None and self.accumulate == "mean":
                    total = total / level.every
                p.grad = total
            level.optimizer.step()
            level.accumulated = [None] * len(level.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear this step's gradients; the levels' accumulated sums are kept until they step."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "main": self.main_optimizer.state_dict() if self.main_optimizer is not None else None,
            "levels": {level.name: {"optimizer": level.optimizer.state_dict(), "accumulated": list(level.accumulated)} for level in self.levels},
        }

    def load_state_dict(self, state: dict) -> None:
        names = {level.name for level in self.levels}
        if set(state["levels"]) != names:
            raise ValueError(f"state has levels {sorted(state['levels'])}, these outer levels are {sorted(names)}")
        self.step_count = state["step_count"]
        if self.main_optimizer is not None:
            self.main_optimizer.load_state_dict(state["main"])
        for level in self.levels:
            saved = state["levels"][level.name]
            level.optimizer.load_state_dict(saved["optimizer"])
            level.accumulated = [
                None if total is None else total.to(device=p.device, dtype=p.dtype).clone() for p, total in zip(level.params, saved["accumulated"])
            ]

    def describe(self) -> list[dict]:
        """One entry per level, main first: name, every, patterns, parameter tensors and elements."""
        rows = [
            {
                "name": "main",
                "every": 1,
                "patterns": [],
                "tensors": len(self.main_params),
                "parameters": sum(p.numel() for p in self.main_params),
                "optimizer": type(self.main_optimizer).__name__ if self.main_optimizer is not None else None,
            }
        ]
        for level in self.levels:
            rows.append(
                {
                    "name": level.name,
                    "every": level.every,
                    "patterns": list(level.patterns),
                    "tensors": len(level.params),
                    "parameters": sum(p.numel() for p in level.params),
                    "optimizer": type(level.optimizer).__name__,
                }
            )
        return rows

    def __str__(self) -> str:
        lines = []
        for row in self.describe():
            every = "every step" if row["every"] == 1 else f"every {row['every']} steps"
            patterns = f" ({', '.join(row['patterns'])})" if row["patterns"] else ""
            lines.append(f"{row['name']}: {every}, {row['optimizer']}, {row['parameters']:,} parameters in {row['tensors']} tensors{patterns}")
        return "\n".join(lines)
