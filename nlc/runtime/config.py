"""Plain configuration objects for the runtime layers, one per construct of LANGUAGE.md §3.

Generated code writes these as Python literals, e.g.
`MemoryConfig(dim=256, heads=4, structure=Structure("mlp", depth=2, expand=2.0), ...)`.
Every field has the language's name where one exists and the language's default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nlc.ops.memory.rule import Structure

Squash = Literal["sigmoid", "softplus"]


@dataclass(frozen=True)
class Transform:
    """One step of a keys/values/queries pipeline.

    name: conv (arg = width w), silu, relu, elu1, l2norm, rmsnorm, poly (arg = degree p), scale (arg = factor c).
    """

    name: Literal["conv", "silu", "relu", "elu1", "l2norm", "rmsnorm", "poly", "scale"]
    arg: float | None = None


@dataclass(frozen=True)
class Adaptive:
    """`memory(structure, ...)`: an inner memory that produces a source or a gate and learns in context.

    A field left None inherits the enclosing memory's value; gates (lr, beta, retention_gate, huber_delta)
    left None share the enclosing memory's per-token gate values. Sources are never inherited.
    """

    structure: Structure  # the inner network; a gate's memory maps to one value, so it cannot be residual
    objective: Literal["dot", "l2", "lp", "huber"] | None = None
    p: float | None = None  # lp(p)
    huber_delta: GateSpec | None = None  # huber(delta)
    window: int | None = None  # Omega window
    targets: Literal["values", "self"] | None = None
    retention: Literal["none", "decay", "weight_decay"] | None = None
    retention_gate: GateSpec | None = None  # the alpha of decay(alpha) or the lambda of weight_decay(lambda)
    update: Literal["gd", "momentum", "dgd", "muon"] | None = None
    lr: GateSpec | None = None
    beta: GateSpec | None = None  # momentum and muon
    ns_steps: int | None = None  # muon: Newton-Schulz iterations
    batch: int | None = None  # mini-batch size in tokens
    every: int | None = None  # chunk size in tokens
    init: Literal["zeros", "learned"] | None = None
    grad: Literal["full", "stop"] | None = None


@dataclass(frozen=True)
class GateSpec:
    """A gate value (lr, beta, decay alpha, weight-decay lambda, huber delta), LANGUAGE.md §3.3.

    constant: `value` for every token and head.
    learned:  one learnable scalar per head, stored before its squash; `value` is the initial value after
              the squash (None: the runtime's default for that gate).
    gate:     squash(x W + b) per token and head (per = "head") or per token and key channel (per = "channel").
    memory:   squash(M(x) + b), M an adaptive inner memory per head mapping the head's input to one value.
    squash None picks the gate's natural range: sigmoid for beta, alpha and lambda, softplus for a learned lr
    and for huber delta, sigmoid for a data-dependent lr.
    """

    kind: Literal["constant", "learned", "gate", "memory"]
    value: float | None = None
    squash: Squash | None = None
    per: Literal["head", "channel"] = "head"
    adaptive: Adaptive | None = None


@dataclass(frozen=True)
class Source:
    """The first term of a pipeline: input (x split into heads), linear (dim -> heads * head_dim),
    lowrank (two linears through rank `rank`), memory (an adaptive projection)."""

    kind: Literal["input", "linear", "lowrank", "memory"] = "linear"
    rank: int | None = None  # lowrank only
    adaptive: Adaptive | None = None  # memory only


@dataclass(frozen=True)
class Pipeline:
    """A source followed by transforms applied left to right."""

    source: Source = field(default_factory=Source)
    transforms: tuple[Transform, ...] = ()


def _keys_default() -> Pipeline:
    return Pipeline(Source("linear"), (Transform("l2norm"),))


@dataclass(frozen=True)
class MemoryConfig:
    """`memory`: an in-context level (LANGUAGE.md §3.3). All defaults: DeltaNet."""

    dim: int  # width of the sub-layer input and output
    heads: int = 1  # independent memories; head width = dim // heads
    structure: Structure = field(default_factory=Structure)  # what the memory stores
    keys: Pipeline = field(default_factory=_keys_default)
    values: Pipeline = field(default_factory=Pipeline)
    queries: Pipeline = field(default_factory=_keys_default)
    objective: Literal["dot", "l2", "lp", "huber"] = "l2"  # the attentional bias
    p: float = 3.0  # lp(p)
    huber_delta: GateSpec | None = None  # huber(delta); required when objective = huber
    window: int = 1  # Omega rule: the objective sums the last `window` tokens
    retention: Literal["none", "decay", "weight_decay"] = "none"
    retention_gate: GateSpec | None = None  # alpha of decay(alpha) / lambda of weight_decay(lambda)
    update: Literal["gd", "momentum", "dgd", "muon"] = "gd"
    lr: GateSpec = field(default_factory=lambda: GateSpec("gate"))  # eta of every update rule
    beta: GateSpec | None = None  # momentum / muon; required for those
    ns_steps: int = 5  # muon: Newton-Schulz iterations
    targets: Literal["values", "self"] = "values"
    batch: int = 1  # mini-batch size in tokens (gradients at the mini-batch start state)
    every: int = 1  # chunk size in tokens (one write per chunk)
    init: Literal["zeros", "learned"] | None = None  # None: zeros for matrix, learned otherwise
    output: tuple[Literal["norm", "gate", "none"], ...] = ("norm",)  # applied to the concatenated reads
    out: Literal["linear", "none"] = "linear"  # projection back to dim
    grad: Literal["full", "stop"] = "full"  # stop: writes detached from the outer graph


@dataclass(frozen=True)
class AttentionConfig:
    """`attention`: causal softmax attention (LANGUAGE.md §3.4)."""

    dim: int
    heads: int = 1
    window: int | None = None  # sliding window in tokens; None = global
    rope: bool = True  # rotary position embedding on queries and keys
    rope_base: float = 10000.0  # runtime only: the RoPE frequency base


@dataclass(frozen=True)
class MlpConfig:
    """`mlp`: a position-wise feed-forward layer (LANGUAGE.md §3.5)."""

    dim: int
    act: Literal["swiglu", "gelu", "silu", "relu"] = "swiglu"
    expand: float = 4.0  # hidden = expand * dim (swiglu: round(2/3 * expand * dim))


@dataclass(frozen=True)
class CmsLevelConfig:
    """`level NAME { ... }` inside a cms: a network memory written once per chunk of `every` tokens."""

    name: str
    structure: Structure = field(default_factory=lambda: Structure("mlp", depth=2, expand=4.0, act="swiglu"))
    every: int = 16  # chunk size in tokens; 0 = never learns in context
    update: Literal["gd", "momentum"] = "gd"
    lr: float = 1e-2  # constant
    beta: float = 0.9  # momentum only, constant


@dataclass(frozen=True)
class CmsConfig:
    """`cms`: the Continuum Memory System (LANGUAGE.md §3.6). Levels fastest first; the cms-wide `update`
    of the language is written into every level that does not override it."""

    dim: int
    levels: tuple[CmsLevelConfig, ...]
    variant: Literal["sequential", "independent", "nested"] = "sequential"
    objective: Literal["task", "l2"] = "task"
