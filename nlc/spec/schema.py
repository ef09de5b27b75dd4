"""The IR: the validated, fully resolved spec (LANGUAGE.md §3), as pydantic models.

Every model forbids unknown fields. Calls and named values are discriminated unions on `kind`,
so a mistake reports one error, not one per variant. Positional arguments of a call fill the
fields in the order they are declared here. A field whose value is a quantity carries its unit
in `json_schema_extra={"unit": ...}`; the IR stores the bare number.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def tokens(default: int, ge: int = 1, description: str = "") -> object:
    return Field(default, ge=ge, description=description, json_schema_extra={"unit": "tokens"})


def steps(default: int, ge: int = 1, description: str = "") -> object:
    return Field(default, ge=ge, description=description, json_schema_extra={"unit": "steps"})


# Gate values: the arguments of decay, weight_decay, huber, and lr/beta of the updates.


class Constant(Node):
    kind: Literal["constant"] = "constant"
    value: float


class Learned(Node):
    """One learnable scalar per head, independent of the data."""

    kind: Literal["learned"] = "learned"
    init: float | None = Field(None, description="initial value after the squash; None: a per-gate default")


class DataGate(Node):
    """squash(x W + b): one value per token and head (or channel)."""

    kind: Literal["gate"] = "gate"
    squash: Literal["sigmoid", "softplus"] = "sigmoid"
    per: Literal["head", "channel"] = "head"


class AdaptiveGate(Node):
    """Produced by an adaptive inner memory mapping the input to one value per head."""

    kind: Literal["memory"] = "memory"
    memory: AdaptiveMemory


GateValue = Annotated[Union[Constant, Learned, DataGate, AdaptiveGate], Field(discriminator="kind")]  # noqa: UP007

# Structures


class Matrix(Node):
    kind: Literal["matrix"] = "matrix"


class Linear(Node):
    kind: Literal["linear"] = "linear"
    residual: bool = False
    norm: Literal["none", "layer", "rms"] = "none"


class Mlp(Node):
    kind: Literal["mlp"] = "mlp"
    depth: int = Field(2, ge=1, description="number of weight matrices")
    expand: float = Field(4.0, gt=0, description="hidden width over input width")
    act: Literal["gelu", "silu", "relu", "swiglu"] = "gelu"
    residual: bool = False
    norm: Literal["none", "layer", "rms"] = "none"


Structure = Annotated[Union[Matrix, Linear, Mlp], Field(discriminator="kind")]  # noqa: UP007

# Sources and transforms of the keys/values/queries pipelines


class InputSource(Node):
    kind: Literal["input"] = "input"


class LinearSource(Node):
    kind: Literal["linear"] = "linear"


class LowRank(Node):
    kind: Literal["lowrank"] = "lowrank"
    r: int = Field(ge=1, description="rank of the projection")


class AdaptiveSource(Node):
    kind: Literal["memory"] = "memory"
    memory: AdaptiveMemory


Source = Annotated[Union[InputSource, LinearSource, LowRank, AdaptiveSource], Field(discriminator="kind")]  # noqa: UP007


class Conv(Node):
    kind: Literal["conv"] = "conv"
    width: int = Field(ge=1, description="causal depthwise convolution width")


class Silu(Node):
    kind: Literal["silu"] = "silu"


class Relu(Node):
    kind: Literal["relu"] = "relu"


class Elu1(Node):
    kind: Literal["elu1"] = "elu1"


class L2Norm(Node):
    kind: Literal["l2norm"] = "l2norm"


class RmsNorm(Node):
    kind: Literal["rmsnorm"] = "rmsnorm"


class Poly(Node):
    kind: Literal["poly"] = "poly"
    p: int = Field(ge=1, description="polynomial degree")


class Scale(Node):
    kind: Literal["scale"] = "scale"
    c: float


Transform = Annotated[Union[Conv, Silu, Relu, Elu1, L2Norm, RmsNorm, Poly, Scale], Field(discriminator="kind")]  # noqa: UP007


class Pipeline(Node):
    source: Source
    transforms: list[Transform] = []


# Objectives, retention, updates


class Dot(Node):
    kind: Literal["dot"] = "dot"


class L2(Node):
    kind: Literal["l2"] = "l2"


class Lp(Node):
    kind: Literal["lp"] = "lp"
    p: float = Field(ge=1)


class Huber(Node):
    kind: Literal["huber"] = "huber"
    delta: GateValue


MemoryObjective = Annotated[Union[Dot, L2, Lp, Huber], Field(discriminator="kind")]  # noqa: UP007


class NoRetention(Node):
    kind: Literal["none"] = "none"


class Decay(Node):
    """M_t = alpha_t M_{t-1} + U_t, the gradient taken at the decayed state."""

    kind: Literal["decay"] = "decay"
    alpha: GateValue


class WeightDecay(Node):
    """M_t = (1 - rate_t) M_{t-1} + U_t."""

    kind: Literal["weight_decay"] = "weight_decay"
    rate: GateValue


Retention = Annotated[Union[NoRetention, Decay, WeightDecay], Field(discriminator="kind")]  # noqa: UP007

DEFAULT_GATE = DataGate()


class Gd(Node):
    kind: Literal["gd"] = "gd"
    lr: GateValue = DEFAULT_GATE


class MomentumUpdate(Node):
    kind: Literal["momentum"] = "momentum"
    lr: GateValue = DEFAULT_GATE
    beta: GateValue = DEFAULT_GATE


class Dgd(Node):
    kind: Literal["dgd"] = "dgd"
    lr: GateValue = DEFAULT_GATE


class MuonUpdate(Node):
    kind: Literal["muon"] = "muon"
    lr: GateValue = DEFAULT_GATE
    beta: GateValue = DEFAULT_GATE
    steps: int = Field(5, ge=1, description="Newton-Schulz iterations")


MemoryUpdate = Annotated[Union[Gd, MomentumUpdate, Dgd, MuonUpdate], Field(discriminator="kind")]  # noqa: UP007

OutputStep = Literal["norm", "gate"]


class AdaptiveMemory(Node):
    """`memory(structure, ...)` used as a source or gate: an inner memory that learns in context.
    Fields left out inherit from the enclosing memory."""

    structure: Structure
    objective: MemoryObjective | None = None
    window: int | None = Field(None, ge=1)
    targets: Literal["values", "self"] | None = None
    retention: Retention | None = None
    update: MemoryUpdate | None = None
    batch: int | None = tokens(None)
    every: int | None = tokens(None)
    init: Literal["zeros", "learned"] | None = None
    grad: Literal["full", "stop"] | None = None


# Declarations


class Memory(Node):
    """An associative memory that learns while it reads (LANGUAGE.md §3.3)."""

    decl: Literal["memory"] = "memory"
    name: str
    doc: str = ""
    dim: int = Field(gt=0, description="input and output width")
    heads: int = Field(gt=0, description="independent memories, each of width dim / heads")
    structure: Structure = Matrix()
    keys: Pipeline = Pipeline(source=LinearSource(), transforms=[L2Norm()])
    values: Pipeline = Pipeline(source=LinearSource())
    queries: Pipeline = Pipeline(source=LinearSource(), transforms=[L2Norm()])
    objective: MemoryObjective = L2()
    window: int = Field(1, ge=1, description="the objective sums the last `window` tokens (Omega rule)")
    retention: Retention = NoRetention()
    update: MemoryUpdate = Gd()
    targets: Literal["values", "self"] = "values"
    batch: int = tokens(1, description="tokens per mini-batch; gradients at the state before the mini-batch")
    every: int = tokens(1, description="tokens per write; reads see the previous chunk's state")
    init: Literal["zeros", "learned"] = "zeros"
    output: list[OutputStep] = ["norm"]
    out: Literal["linear", "none"] = "linear"
    grad: Literal["full", "stop"] = "full"
    field_docs: dict[str, str] = {}


class Attention(Node):
    """Causal softmax attention, the non-parametric memory (LANGUAGE.md §3.4)."""

    decl: Literal["attention"] = "attention"
    name: str
    doc: str = ""
    dim: int = Field(gt=0)
    heads: int = Field(gt=0)
    window: int | None = Field(None, ge=1, description="sliding window in tokens; none: global")
    rope: bool = True
    field_docs: dict[str, str] = {}


class FeedForward(Node):
    """A position-wise MLP that never learns in context (LANGUAGE.md §3.5)."""

    decl: Literal["mlp"] = "mlp"
    name: str
    doc: str = ""
    dim: int = Field(gt=0)
    act: Literal["swiglu", "gelu", "silu", "relu"] = "swiglu"
    expand: float = Field(4.0, gt=0)
    field_docs: dict[str, str] = {}


class CmsLevel(Node):
    name: str
    doc: str = ""
    structure: Structure = Mlp()
    every: int = tokens(1, ge=0, description="tokens per write; 0: never learns in context")
    update: MemoryUpdate | None = None
    field_docs: dict[str, str] = {}


class Cms(Node):
    """The Continuum Memory System: MLP levels that learn at different speeds (LANGUAGE.md §3.6)."""

    decl: Literal["cms"] = "cms"
    name: str
    doc: str = ""
    dim: int = Field(gt=0)
    variant: Literal["sequential", "independent", "nested"] = "sequential"
    objective: Literal["task", "l2"] = "task"
    update: MemoryUpdate = Gd(lr=Constant(value=1e-2))
    levels: list[CmsLevel] = Field(min_length=1)
    field_docs: dict[str, str] = {}


Layer = Annotated[Union[Memory, Attention, FeedForward, Cms], Field(discriminator="decl")]  # noqa: UP007


class Block(Node):
    name: str
    doc: str = ""
    layers: list[Layer] = Field(min_length=1)


# The outermost level


class Sgd(Node):
    kind: Literal["sgd"] = "sgd"
    lr: float = Field(1e-2, ge=0)


class MomentumOpt(Node):
    kind: Literal["momentum"] = "momentum"
    lr: float = Field(1e-2, ge=0)
    beta: float = Field(0.9, ge=0, lt=1)


class AdamW(Node):
    kind: Literal["adamw"] = "adamw"
    lr: float = Field(3e-4, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    eps: float = Field(1e-8, gt=0)


class MuonOpt(Node):
    kind: Literal["muon"] = "muon"
    lr: float = Field(2e-2, ge=0)
    beta: float = Field(0.95, ge=0, lt=1)
    steps: int = Field(5, ge=1)


class DeltaMomentum(Node):
    kind: Literal["delta_momentum"] = "delta_momentum"
    lr: float = Field(1e-2, ge=0)
    beta: float = Field(0.9, ge=0, lt=1)


class PreconditionedMomentum(Node):
    kind: Literal["preconditioned_momentum"] = "preconditioned_momentum"
    lr: float = Field(1e-3, ge=0)
    beta: float = Field(0.9, ge=0, lt=1)


class DeepMomentum(Node):
    """DMGD: the momentum is an MLP memory acting on each gradient element (input width 1, so its
    hidden width is `expand`), trained by its own inner gradient step."""

    kind: Literal["deep_momentum"] = "deep_momentum"
    lr: float = Field(1e-2, ge=0)
    memory: Mlp = Mlp(depth=2, expand=16)
    beta: float = Field(0.9, ge=0, lt=1, description="decay of the memory's weights")
    inner_lr: float = Field(0.1, ge=0, description="the memory's own learning rate")
    newton_schulz: bool = False


class M3(Node):
    kind: Literal["m3"] = "m3"
    lr: float = Field(2e-2, ge=0)
    slow_every: int = steps(10)
    beta_fast: float = Field(0.9, ge=0, lt=1)
    beta_slow: float = Field(0.99, ge=0, lt=1)


OuterUpdate = Annotated[
    Union[Sgd, MomentumOpt, AdamW, MuonOpt, DeltaMomentum, PreconditionedMomentum, DeepMomentum, M3],  # noqa: UP007
    Field(discriminator="kind"),
]


class Cosine(Node):
    kind: Literal["cosine"] = "cosine"
    warmup: int = Field(100, ge=0, description="warm-up steps")
    min_lr: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of the peak")


class ConstantSchedule(Node):
    kind: Literal["constant"] = "constant"
    warmup: int = Field(0, ge=0)


Schedule = Annotated[Union[Cosine, ConstantSchedule], Field(discriminator="kind")]  # noqa: UP007


class Bytes(Node):
    kind: Literal["bytes"] = "bytes"
    path: str


class Corpus(Node):
    kind: Literal["corpus"] = "corpus"


class Mqar(Node):
    kind: Literal["mqar"] = "mqar"
    keys: int = Field(8, ge=1)
    queries: int = Field(8, ge=1)
    vocab: int = Field(64, ge=4)


class Niah(Node):
    kind: Literal["niah"] = "niah"
    length: int = Field(256, ge=8)


class Copy(Node):
    kind: Literal["copy"] = "copy"
    length: int = Field(32, ge=1)


class Parity(Node):
    kind: Literal["parity"] = "parity"
    length: int = Field(32, ge=1)


Data = Annotated[Union[Bytes, Corpus, Mqar, Niah, Copy, Parity], Field(discriminator="kind")]  # noqa: UP007


class TrainLevel(Node):
    """Parameters named by glob patterns, updated only every N outer steps."""

    name: str
    doc: str = ""
    params: list[str] = Field(min_length=1)
    every: int = steps(1)
    update: OuterUpdate | None = None
    field_docs: dict[str, str] = {}


class Train(Node):
    objective: Literal["next_token"] = "next_token"
    update: OuterUpdate = AdamW()
    schedule: Schedule = Cosine()
    batch: int = Field(16, ge=1, description="sequences per step")
    steps: int = Field(1000, ge=1)
    clip: float | None = Field(1.0, gt=0, description="gradient-norm clipping; none: off")
    data: Data = Corpus()
    seed: int = Field(0, ge=0)
    eval_every: int = Field(100, ge=1, description="steps between validation evaluations")
    levels: list[TrainLevel] = []
    field_docs: dict[str, str] = {}


class Model(Node):
    """A language model: embedding, the layout of blocks, final norm, head (LANGUAGE.md §3.1)."""

    decl: Literal["model"] = "model"
    name: str
    doc: str = ""
    vocab: int = Field(256, gt=0, description="tokens in the vocabulary")
    dim: int = Field(gt=0, description="width of the residual stream")
    depth: int = Field(gt=0, description="number of blocks")
    heads: int = Field(gt=0, description="default heads of every memory and attention layer")
    context: int = Field(512, gt=0, description="training sequence length")
    norm: Literal["rms", "layer"] = "rms"
    tie: bool = True
    layout: list[str] = Field(min_length=1, description="block names, one per block, in order")
    blocks: list[Block] = Field(min_length=1)
    train: Train = Train()
    field_docs: dict[str, str] = {}


class SpecFile(Node):
    path: str
    sha256: str
    decls: list[Annotated[Union[Model, Memory, Attention, FeedForward, Cms], Field(discriminator="decl")]]  # noqa: UP007

    def get(self, name: str | None = None):
        """The named declaration, or the file's model (or only declaration) when name is None."""
        if name is None:
            models = [d for d in self.decls if d.decl == "model"]
            return models[0] if len(models) == 1 else (self.decls[0] if len(self.decls) == 1 else None)
        return next((d for d in self.decls if d.name == name), None)


AdaptiveGate.model_rebuild()
AdaptiveSource.model_rebuild()
