"""Memory ops: what an in-context memory computes (LANGUAGE.md §4), the oracle and the dispatch to fast paths."""

from nlc.ops.memory.dispatch import FAST_PATHS, chosen_path, flush, memory_update
from nlc.ops.memory.naive import flush_naive, gates_used, initial_state, memory_naive
from nlc.ops.memory.rule import (
    Gates,
    MemoryState,
    Rule,
    Structure,
    StructureParams,
    detach_state,
    zeros_like_weights,
)
from nlc.ops.memory.structure import apply_structure, newton_schulz, weight_shapes

__all__ = [
    "FAST_PATHS",
    "Gates",
    "MemoryState",
    "Rule",
    "Structure",
    "StructureParams",
    "apply_structure",
    "chosen_path",
    "detach_state",
    "flush",
    "flush_naive",
    "gates_used",
    "initial_state",
    "memory_naive",
    "memory_update",
    "newton_schulz",
    "weight_shapes",
    "zeros_like_weights",
]
