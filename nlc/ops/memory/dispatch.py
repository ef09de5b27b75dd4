"""Choosing how a memory is computed: the first fast path that supports the combination, else the oracle.

A fast path is a module listed in FAST_PATHS exposing `NAME: str`, `supports(rule, gates, q) -> bool` and
`apply(q, k, v, gates, rule, state, sparams) -> (o, state)`. All paths share the `MemoryState` format, so a
stream may move between them and `flush` is the oracle's.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from types import ModuleType

import torch
from torch import Tensor

from nlc.ops.memory.naive import check_rule, describe, flush_naive, gates_used, memory_naive
from nlc.ops.memory.rule import Gates, MemoryState, Rule, StructureParams

FAST_PATHS = (
    "nlc.ops.matrix.triton",
    "nlc.ops.matrix.chunk",
    "nlc.ops.network.triton",
    "nlc.ops.network.chunk",
    "nlc.ops.matrix.scaled_chunk",
    "nlc.ops.matrix.recurrent",
)
GPU_ONLY = ("nlc.ops.matrix.triton", "nlc.ops.network.triton")  # kernels serve CUDA tensors only
FALLBACK = "naive (fallback)"

_loaded: list[ModuleType] | None = None
_warned: set[str] = set()


def optional_module(name: str, gpu_only: bool = False) -> ModuleType | None:
    """The module, or None when it cannot be imported (Triton missing) or, `gpu_only`, without CUDA: importing
    Triton costs ~0.6 s and its kernels could serve nothing here."""
    if gpu_only and not torch.cuda.is_available():
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def fast_paths() -> list[ModuleType]:
    """The importable fast-path modules, in priority order (imported once, on first use)."""
    global _loaded
    if _loaded is None:
        modules = (optional_module(name, gpu_only=name in GPU_ONLY) for name in FAST_PATHS)
        _loaded = [module for module in modules if module is not None]
    return _loaded


def find_path(rule: Rule, gates: Gates, q: Tensor) -> ModuleType | None:
    return next((path for path in fast_paths() if path.supports(rule, gates, q)), None)


def combination(rule: Rule, gates: Gates, q: Tensor) -> str:
    wide = [name for name in gates_used(rule) if getattr(gates, name) is not None and getattr(gates, name).dim() == 4]
    extra = f" with per-channel {', '.join(wide)}" if wide else ""
    return f"{describe(rule)}{extra} ({q.dtype}, {q.device.type})"


def memory_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Gates,
    rule: Rule,
    state: MemoryState | None,
    sparams: StructureParams | None = None,
    impl: str = "auto",
) -> tuple[Tensor, MemoryState]:
    """Reads `[B, H, T, d_out]` and the new state. impl: "auto" (first supporting fast path, else the oracle
    with a warning once per combination), "naive" (the oracle), "chunk" (a fast path or a ValueError)."""
    if impl not in ("auto", "naive", "chunk"):
        raise ValueError(f"impl must be 'auto', 'naive' or 'chunk', got {impl!r}")
    d_out = v.shape[-1] if state is None else state.weights[-1].shape[-2]
    check_rule(rule, gates, q, k, v, d_out)
    if impl == "naive":
        return memory_naive(q, k, v, gates, rule, state, sparams)
    path = find_path(rule, gates, q)
    if path is not None:
        return path.apply(q, k, v, gates, rule, state, sparams)
    combo = combination(rule, gates, q)
    if impl == "chunk":
        raise ValueError(f"no fast path supports {combo} (paths available: {[p.NAME for p in fast_paths()]})")
    if combo not in _warned:
        _warned.add(combo)
        warnings.warn(f"no fast path supports {combo}: using the token-by-token oracle (slow){nearest_fast(rule, gates, q)}", stacklevel=2)
    return memory_naive(q, k, v, gates, rule, state, sparams)


def nearest_fast(rule: Rule, gates: Gates, q: Tensor) -> str:
    """Advice for the fallback warning: a change to the rule or its gates that a fast path takes, or ""."""
    changes = []
    if rule.structure.kind != "matrix" and rule.batch == rule.every == 1:
        changes.append(("batch = 16 tokens (mini-batches, as in TTT)", dataclasses.replace(rule, batch=16), gates))
    if any(g is not None and g.dim() == 4 for g in vars(gates).values()):
        per_head = Gates(**{name: None if g is None else g.mean(-1) if g.dim() == 4 else g for name, g in vars(gates).items()})
        changes.append(("gates per head instead of per channel", rule, per_head))
    for change, changed_rule, changed_gates in changes:
        path = find_path(changed_rule, changed_gates, q)
        if path is not None:
            return f"; with {change} it would run on {path.NAME}"
    return ""


def chosen_path(rule: Rule, gates_example: Gates | None = None) -> str:
    """The name of the path `memory_update(impl="auto")` takes for this rule on CPU float32 tensors, or
    "naive (fallback)". Without an example, gates are one per head."""
    path = find_path(rule, *_cpu_example(rule, gates_example))
    return FALLBACK if path is None else path.NAME


def fallback_advice(rule: Rule, gates_example: Gates | None = None) -> str | None:
    """None when a fast path takes the rule (as `chosen_path` sees it); else the nearby change one would take
    (`nearest_fast`), "" if none is near."""
    gates, q = _cpu_example(rule, gates_example)
    return None if find_path(rule, gates, q) is not None else nearest_fast(rule, gates, q)


def _cpu_example(rule: Rule, gates_example: Gates | None) -> tuple[Gates, Tensor]:
    """The gates (one per head without an example) and a query as wide as the example's per-channel gates."""
    if gates_example is None:
        gates_example = Gates(**{name: torch.zeros(1, 1, 1) for name in gates_used(rule)})
    width = max((g.shape[-1] for g in vars(gates_example).values() if g is not None and g.dim() == 4), default=1)
    return gates_example, torch.zeros(1, 1, 1, width)


def flush(rule: Rule, state: MemoryState) -> MemoryState:
    """Write a pending partial chunk now (every path shares the state format)."""
    return flush_naive(rule, state)
