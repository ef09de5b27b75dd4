"""`memory`: an associative memory that learns while it reads (LANGUAGE.md §3.3, §4), with Hope's
adaptive projections (sources and gates written `memory(...)`)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlc.ops.memory.dispatch import chosen_path, fallback_advice, memory_update
from nlc.ops.memory.dispatch import flush as flush_memory
from nlc.ops.memory.naive import gates_used
from nlc.ops.memory.naive import initial_state as memory_initial_state
from nlc.ops.memory.rule import Gates, MemoryState, Rule, StructureParams
from nlc.ops.memory.structure import apply_structure, weight_shapes
from nlc.runtime.config import Adaptive, GateSpec, MemoryConfig
from nlc.runtime.gates import Gate, gradients_per_step
from nlc.runtime.transforms import SourceProjection, Transforms

PIPELINES = {"key": "keys", "value": "values", "query": "queries"}  # module name -> config field
GATE_FIELDS = {"lr": "lr", "beta": "beta", "alpha": "retention_gate", "lam": "retention_gate", "delta": "huber_delta"}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Memory states and writes are accumulated in float32 for half-precision inputs."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def gradient_point(rule: Rule, state: MemoryState) -> tuple[Tensor, ...]:
    """The weights a token's gradient is taken at: the state at the start of the current mini-batch
    (batch > 1), the state at the end of the previous chunk (every > 1), else the latest state. The
    decayed point `alpha_t M_{t-1}` of retention = decay is not used for reads."""
    if rule.every == 1 and rule.batch > 1 and state.pos % rule.batch != 0 and state.anchor is not None:
        return state.anchor
    return state.weights


def stack_states(states: list[MemoryState]) -> MemoryState:
    """Memories of one rule and shape side by side on the head axis, so that one op call computes them all."""
    if len(states) == 1:
        return states[0]

    def cat(parts):
        return None if parts[0] is None else tuple(torch.cat(ts, dim=1) for ts in zip(*parts))

    def cat_dict(parts):
        return {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}

    return MemoryState(
        weights=cat([s.weights for s in states]),
        pos=states[0].pos,
        momentum=cat([s.momentum for s in states]),
        anchor=cat([s.anchor for s in states]),
        pending=cat([s.pending for s in states]),
        last=cat_dict([s.last for s in states]),
        recent=cat_dict([s.recent for s in states]),
    )


def split_state(state: MemoryState, count: int) -> list[MemoryState]:
    """The inverse of `stack_states`: `count` states of equal head counts."""
    if count == 1:
        return [state]

    def part(ts, i):
        return None if ts is None else tuple(t.chunk(count, dim=1)[i] for t in ts)

    return [
        MemoryState(
            weights=part(state.weights, i),
            pos=state.pos,
            momentum=part(state.momentum, i),
            anchor=part(state.anchor, i),
            pending=part(state.pending, i),
            last={k: v.chunk(count, dim=1)[i] for k, v in state.last.items()},
            recent={k: v.chunk(count, dim=1)[i] for k, v in state.recent.items()},
        )
        for i in range(count)
    ]


def initial_weight_std(index: int, count: int, fan_in: int, residual: bool) -> float:
    """1/sqrt(fan_in) keeps a deep memory's activations of order one; the last layer of a network whose
    output is added to a residual starts small, so that the memory starts near the identity."""
    if residual and index == count - 1:
        return 0.02
    return 1.0 / math.sqrt(fan_in)


def expand_batch(w: Tensor, batch_size: int, dtype: torch.dtype) -> Tensor:
    """A parameter `[H, ...]` as a state tensor `[B, H, ...]`. Under no_grad the view is detached: a view of
    a parameter made under no_grad still claims requires_grad but has no graph."""
    w = w.to(dtype)
    w = w if torch.is_grad_enabled() else w.detach()
    return w[None].expand(batch_size, *w.shape)


class MemoryCore(nn.Module):
    """The outer-level parameters of one memory: its rule, its initial state (zeros or learned, one tensor
    per weight matrix `[H, out, in]`, expanded over the batch) and its structure's norm parameters."""

    def __init__(self, rule: Rule, heads: int, d_in: int, d_out: int, init: str, residual_out: bool = False):
        super().__init__()
        self.rule, self.heads = rule, heads
        self.shapes = [tuple(s) for s in weight_shapes(rule.structure, d_in, d_out)]
        self.learned = init == "learned"
        if self.learned:
            self.init_weights = nn.ParameterList()
            for i, shape in enumerate(self.shapes):
                if rule.structure.kind == "matrix":
                    w = torch.zeros(heads, *shape)
                else:
                    residual = residual_out or rule.structure.residual
                    std = initial_weight_std(i, len(self.shapes), shape[-1], residual)
                    w = torch.randn(heads, *shape) * std
                self.init_weights.append(nn.Parameter(w))
        norm = rule.structure.norm if rule.structure.kind != "matrix" else "none"
        self.norm_weight = nn.Parameter(torch.ones(heads, d_out)) if norm != "none" else None
        self.norm_bias = nn.Parameter(torch.zeros(heads, d_out)) if norm == "layer" else None

    def sparams(self, dtype: torch.dtype) -> StructureParams | None:
        if self.norm_weight is None:
            return None
        bias = None if self.norm_bias is None else self.norm_bias.to(dtype)
        return StructureParams(norm_weight=self.norm_weight.to(dtype), norm_bias=bias)

    def initial_state(self, batch_size: int, device, dtype: torch.dtype) -> MemoryState:
        if self.learned:
            weights = tuple(expand_batch(w, batch_size, dtype) for w in self.init_weights)  # [B, H, out, in]
        else:
            weights = tuple(torch.zeros(batch_size, self.heads, *s, device=device, dtype=dtype) for s in self.shapes)
        return memory_initial_state(self.rule, weights)

    def read(self, state: MemoryState, x: Tensor) -> Tensor:
        """x `[B, H, T, d_in]` -> `[B, H, T, d_out]`, read at the gradient point (an adaptive projection)."""
        return apply_structure(self.rule.structure, gradient_point(self.rule, state), x, self.sparams(x.dtype))


@dataclass
class MemoryLayerState:
    """Everything a memory layer needs to continue a stream.

    memory: the memory's state (weights, momentum, mini-batch anchor, pending chunk, position)
    pos:    tokens seen (adaptive projections are computed mini-batch by mini-batch from the stream start)
    tails:  conv tails per pipeline (key, value, query), `[B, w - 1, H * d]` per conv
    inner:  the adaptive projections' states, by name (key, value, query, lr, beta, alpha, lam, delta)
    """

    memory: MemoryState
    pos: int = 0
    tails: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)
    inner: dict[str, MemoryState] = field(default_factory=dict)


def pick(override, inherited):
    return inherited if override is None else override


class MemoryLayer(nn.Module):
    """x `[B, T, dim]` -> y `[B, T, dim]`, `y, state = layer(x, state)`."""

    def __init__(self, cfg: MemoryConfig):
        super().__init__()
        self.cfg = cfg
        H, hd = cfg.heads, cfg.dim // cfg.heads
        if H * hd != cfg.dim:
            raise ValueError(f"heads ({H}) must divide dim ({cfg.dim})")
        self.heads, self.head_dim = H, hd

        self.sources = nn.ModuleDict()
        self.transforms = nn.ModuleDict()
        for name, fld in PIPELINES.items():
            pipe = getattr(cfg, fld)
            if pipe.source.kind != "memory":
                self.sources[name] = SourceProjection(pipe.source, cfg.dim, H, hd)
        self.transforms["key"] = Transforms(cfg.keys.transforms, H, hd)
        self.transforms["value"] = Transforms(cfg.values.transforms, H, hd)
        self.transforms["query"] = Transforms(cfg.queries.transforms, H, hd, shared_poly=self.transforms["key"].poly)
        d_k, d_v = self.transforms["key"].out_width, self.transforms["value"].out_width
        if self.transforms["query"].out_width != d_k:
            raise ValueError(f"queries are {self.transforms['query'].out_width} wide but keys are {d_k} wide")
        self.d_k, self.d_v = d_k, d_v

        structure = cfg.structure
        network = structure.kind != "matrix"
        self.rule = Rule(
            structure=structure,
            objective=cfg.objective,
            p=cfg.p,
            window=cfg.window,
            targets=cfg.targets,
            retention=cfg.retention,
            update=cfg.update,
            ns_steps=cfg.ns_steps,
            batch=cfg.batch,
            every=cfg.every,
            grad=cfg.grad,
        )
        self.gate_specs = {n: self._gate_spec(cfg, n) for n in gates_used(self.rule)}
        self.gates = nn.ModuleDict({n: Gate(s, n, cfg.dim, H, d_k, network, gradients_per_step(self.rule)) for n, s in self.gate_specs.items()})
        for n, s in self.gate_specs.items():
            if s.per == "channel" and network:
                raise ValueError(f"a per-channel {n} gate needs a matrix memory")
        self.core = MemoryCore(self.rule, H, d_k, d_v, pick(cfg.init, "learned" if network else "zeros"))

        # adaptive projections: one inner memory per `memory(...)` source or gate
        adaptive = {n: getattr(cfg, f).source.adaptive for n, f in PIPELINES.items() if getattr(cfg, f).source.kind == "memory"}
        adaptive.update({n: s.adaptive for n, s in self.gate_specs.items() if s.kind == "memory"})
        if adaptive and (d_k != hd or d_v != hd):
            raise ValueError("adaptive projections learn on the keys and values: they must be head_dim wide")
        self.inner = nn.ModuleDict()
        self.inner_gates = nn.ModuleDict()
        self.inner_shared: dict[str, dict[str, str]] = {}
        self_targets: dict[str, bool] = {}  # the layer computes the inner memory's targets M_P(v_t)
        for name, a in adaptive.items():
            is_gate = name not in PIPELINES
            rule = self._inner_rule(a, cfg, is_gate)
            self_targets[name] = is_gate or (pick(a.targets, cfg.targets) == "self" and rule.targets == "values")
            # a gate memory starts near 0, so the gate starts at its bias
            self.inner[name] = MemoryCore(rule, H, hd, 1 if is_gate else hd, pick(a.init, "learned"), residual_out=is_gate)
            own, shared = nn.ModuleDict(), {}
            for g in gates_used(rule):
                spec = getattr(a, GATE_FIELDS[g])
                if spec is not None:
                    if spec.kind == "memory":
                        raise ValueError("an adaptive projection's own gates cannot be memories")
                    own[g] = Gate(spec, g, cfg.dim, H, hd, rule.structure.kind != "matrix", gradients_per_step(rule))
                elif g in self.gate_specs:
                    if self.gate_specs[g].per == "channel" and rule.structure.kind != "matrix":
                        raise ValueError(f"the inner memory of {name} cannot share a per-channel {g} gate")
                    shared[g] = g
                else:
                    raise ValueError(f"the inner memory of {name} needs its own {g}: the enclosing memory has none")
            self.inner_gates[name] = own
            self.inner_shared[name] = shared
        self.inner_self_targets = self_targets

        out_width = H * d_v
        self.out_norm = nn.Parameter(torch.ones(H, d_v)) if "norm" in cfg.output else None
        self.out_gate = nn.Linear(cfg.dim, out_width, bias=False) if "gate" in cfg.output else None
        if cfg.out == "linear":
            self.out_proj = nn.Linear(out_width, cfg.dim, bias=False)
        elif out_width != cfg.dim:
            raise ValueError(f"out = none needs heads * value width == dim, got {out_width} != {cfg.dim}")
        else:
            self.out_proj = None

    @staticmethod
    def _gate_spec(cfg: MemoryConfig, name: str) -> GateSpec:
        spec = getattr(cfg, GATE_FIELDS[name])
        if spec is None and name == "delta":
            raise ValueError("objective = huber needs huber_delta")
        return spec if spec is not None else GateSpec("gate")

    @staticmethod
    def _inner_rule(a: Adaptive, cfg: MemoryConfig, is_gate: bool) -> Rule:
        if is_gate and a.structure.residual:
            raise ValueError("a gate's memory maps to one value per head: it cannot be residual")
        rule = Rule(
            structure=a.structure,
            objective=pick(a.objective, cfg.objective),
            p=pick(a.p, cfg.p),
            window=pick(a.window, cfg.window),
            targets=pick(a.targets, cfg.targets),
            retention=pick(a.retention, cfg.retention),
            update=pick(a.update, cfg.update),
            ns_steps=pick(a.ns_steps, cfg.ns_steps),
            batch=pick(a.batch, cfg.batch),
            every=pick(a.every, cfg.every),
            grad=pick(a.grad, cfg.grad),
        )
        # Self-generated targets M_P(v_t) are computed by the layer at the read point P and passed as plain
        # values: a gate's memory is one value wide, which the ops' targets = self does not take, and the
        # chunked paths run plain values. P is the gradient point unless a token's window reaches back into
        # an earlier mini-batch or the point is the decayed alpha_t M_{t-1}; then a source's memory leaves
        # targets = self to the ops and a gate's memory is an error.
        if rule.targets == "values" and not is_gate:
            return rule
        exact = rule.window == 1 and not (rule.retention == "decay" and rule.batch == 1 and rule.every == 1)
        if exact:
            return replace(rule, targets="values")
        if is_gate:
            raise ValueError("a gate's memory needs window = 1 and, with retention = decay, batch or every > 1")
        return rule

    def initial_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> MemoryLayerState:
        cdtype = compute_dtype(dtype)
        return MemoryLayerState(
            memory=self.core.initial_state(batch_size, device, cdtype),
            inner={n: m.initial_state(batch_size, device, cdtype) for n, m in self.inner.items()},
        )

    def flush(self, state: MemoryLayerState) -> MemoryLayerState:
        """Write every pending mini-batch or chunk now (end of a document)."""
        return MemoryLayerState(
            memory=flush_memory(self.rule, state.memory),
            pos=state.pos,
            tails=state.tails,
            inner={n: flush_memory(self.inner[n].rule, s) for n, s in state.inner.items()},
        )

    def paths(self) -> dict[str, str]:
        """The `nlc.ops` path that computes each memory of the layer (on CPU float32): "memory" for the
        layer's own, then one entry per adaptive projection."""
        return {name: chosen_path(rule, gates) for name, (rule, gates) in self._memories().items()}

    def fallback_advice(self) -> dict[str, str]:
        """For each memory of the layer that runs on the oracle, a nearby change that has a fast path ("" if none)."""
        advice = {name: fallback_advice(rule, gates) for name, (rule, gates) in self._memories().items()}
        return {name: text for name, text in advice.items() if text is not None}

    def _memories(self) -> dict[str, tuple[Rule, Gates | None]]:
        """Each memory's rule and example gates, as `paths` names them: the layer's own per channel where the spec
        says so, an adaptive projection's per head (a network memory's gates are)."""

        def example(name: str, spec: GateSpec | None) -> Tensor:
            return torch.zeros(1, 1, 1, self.d_k) if spec is not None and spec.per == "channel" else torch.zeros(1, 1, 1)

        memories = {"memory": (self.rule, Gates(**{n: example(n, s) for n, s in self.gate_specs.items()}))}
        memories.update({name: (core.rule, None) for name, core in self.inner.items()})
        return memories

    def _inner_groups(self) -> list[tuple[str, ...]]:
        """The inner memories that one op call computes side by side: same rule, weight shapes, norm
        parameters, targets and gates (Hope's key and value memories; its lr and weight-decay memories)."""
        groups: dict[tuple, list[str]] = {}
        for n, core in self.inner.items():
            shared = tuple((g, self.gate_specs[g].per) for g in sorted(self.inner_shared[n]))
            own = tuple((g, gm.width) for g, gm in sorted(self.inner_gates[n].items()))
            norm = (core.norm_weight is not None, core.norm_bias is not None)
            signature = (core.rule, tuple(core.shapes), norm, self.inner_self_targets[n], shared, own)
            groups.setdefault(signature, []).append(n)
        return [tuple(names) for names in groups.values()]

    def _group_sparams(self, group: tuple[str, ...], dtype: torch.dtype) -> StructureParams | None:
        parts = [self.inner[n].sparams(dtype) for n in group]
        if parts[0] is None or len(group) == 1:
            return parts[0]
        bias = None if parts[0].norm_bias is None else torch.cat([p.norm_bias for p in parts])
        return StructureParams(norm_weight=torch.cat([p.norm_weight for p in parts]), norm_bias=bias)  # [count * H, d_out]

    def _group_read(self, group: tuple[str, ...], state: MemoryState, x: Tensor, sparams: StructureParams | None) -> Tensor:
        """Every memory of a group at its gradient point, x `[B, count * H, t, hd]` -> `[B, count * H, t, d_out]`."""
        rule = self.inner[group[0]].rule
        return apply_structure(rule.structure, gradient_point(rule, state), x, sparams)

    def _segments(self, pos: int, T: int) -> list[tuple[int, int]]:
        """Cut the call at every mini-batch or chunk boundary of an inner memory: inside a segment every
        inner memory reads at one fixed gradient point."""
        if not self.inner or T == 0:
            return [(0, T)]
        periods = [m.rule.every if m.rule.every > 1 else m.rule.batch for m in self.inner.values()]
        cuts = [0]
        while cuts[-1] < T:
            here = pos + cuts[-1]
            cuts.append(min(T, min((here // p + 1) * p - pos for p in periods)))
        return list(itertools.pairwise(cuts))

    def forward(self, x: Tensor, state: MemoryLayerState | None = None) -> tuple[Tensor, MemoryLayerState]:
        B, T, _ = x.shape
        H, hd = self.heads, self.head_dim
        cdtype = compute_dtype(x.dtype)
        if state is None:
            state = self.initial_state(B, x.device, x.dtype)
        x_heads = x.to(cdtype).view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]: what inner memories read
        projected = {n: src(x) for n, src in self.sources.items()}  # [B, T, H, hd]
        fixed_gates = {n: g(x, cdtype) for n, g in self.gates.items() if self.gate_specs[n].kind != "memory"}

        # inner memories of one rule run stacked on the head axis: one read and one write per group and segment
        groups = self._inner_groups()
        stacked = {group: stack_states([state.inner[n] for n in group]) for group in groups}
        sparams = {group: self._group_sparams(group, cdtype) for group in groups}
        x_stacked = {len(group): x_heads.repeat(1, len(group), 1, 1) for group in groups}  # [B, count * H, T, hd]
        own_gates = {n: {g: gm(x, cdtype) for g, gm in self.inner_gates[n].items()} for n in self.inner}  # [B, H, T(, d)]
        tails = dict(state.tails)
        pieces: dict[str, list[Tensor]] = {n: [] for n in (*PIPELINES, *self.gate_specs)}
        for s, e in self._segments(state.pos, T):
            inputs, reads = {}, {}
            for group in groups:
                inputs[group] = x_stacked[len(group)][:, :, s:e]  # [B, count * H, t, hd]
                read = self._group_read(group, stacked[group], inputs[group], sparams[group])  # [B, count * H, t, hd or 1]
                reads.update(zip(group, read.chunk(len(group), dim=1)))
            seg = {}
            for n in PIPELINES:
                src = reads[n].transpose(1, 2).to(x.dtype) if n in reads else projected[n][:, s:e]  # [B, t, H, hd]
                out, tails[n] = self.transforms[n](src, tails.get(n))
                seg[n] = out.transpose(1, 2).to(cdtype)  # [B, H, t, d]
            for n, g in self.gates.items():
                seg[n] = g(x[:, s:e], cdtype, reads[n][..., 0]) if n in reads else fixed_gates[n][:, :, s:e]
            for group in groups:
                rule, count = self.inner[group[0]].rule, len(group)
                gates = {}
                for g in gates_used(rule):
                    per_member = [seg[self.inner_shared[n][g]] if g in self.inner_shared[n] else own_gates[n][g][:, :, s:e] for n in group]
                    gates[g] = torch.cat(per_member, dim=1)  # [B, count * H, t(, d)]
                keys, values = (seg[n].repeat(1, count, 1, 1) for n in ("key", "value"))  # [B, count * H, t, hd]
                if self.inner_self_targets[group[0]]:
                    values = self._group_read(group, stacked[group], values, sparams[group])  # M_P(v_t)
                # the inner memories' own reads of the queries are not used
                _, stacked[group] = memory_update(inputs[group], keys, values, Gates(**gates), rule, stacked[group], sparams[group])
            for n in pieces:
                pieces[n].append(seg[n])
        inner = dict(state.inner)
        for group in groups:
            inner.update(zip(group, split_state(stacked[group], len(group))))
        q, k, v = (torch.cat(pieces[n], dim=2) for n in ("query", "key", "value"))  # [B, H, T, d]
        gates = Gates(**{n: torch.cat(pieces[n], dim=2) for n in self.gate_specs})

        o, memory = memory_update(q, k, v, gates, self.rule, state.memory, self.core.sparams(cdtype))  # [B, H, T, d_v]
        y = o.transpose(1, 2)  # [B, T, H, d_v]
        for step in self.cfg.output:
            if step == "norm":
                y = F.rms_norm(y, (self.d_v,), eps=1e-6) * self.out_norm.to(cdtype)
            elif step == "gate":
                y = y * F.silu(self.out_gate(x).to(cdtype)).view(B, T, H, self.d_v)
        y = y.reshape(B, T, H * self.d_v).to(x.dtype)
        if self.out_proj is not None:
            y = self.out_proj(y)
        return y, MemoryLayerState(memory=memory, pos=state.pos + T, tails=tails, inner=inner)
