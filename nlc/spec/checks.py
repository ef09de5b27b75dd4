"""Cross-field checks on the validated IR: the rules no single field can express."""

from __future__ import annotations

from collections.abc import Iterator

from nlc.diagnostics import Diagnostic, Span
from nlc.spec import schema as s

Loc = tuple


def check_layer(layer, loc: Loc, model_dim: int | None, spans: dict[Loc, Span], model_heads: int | None = None) -> list[Diagnostic]:
    """Rules within one layer; model_dim/model_heads are those of the enclosing model (None at the top level)."""
    out: list[Diagnostic] = []
    span, err = reporters(spans, out)
    inherited = model_dim is not None and layer.dim == model_dim and getattr(layer, "heads", None) == model_heads
    if isinstance(layer, (s.Memory, s.Attention)) and layer.dim % layer.heads and not inherited:
        err(
            "E401",
            f"dim = {layer.dim} is not divisible by heads = {layer.heads}",
            span(loc, "heads", "dim"),
            f"{layer.decl} '{layer.name}' splits dim into heads of equal width",
        )
    if isinstance(layer, s.Memory):
        check_memory(layer, loc, model_dim, span, err)
    if isinstance(layer, s.Cms):
        check_cms(layer, loc, span, err)
    return out


def check_model(model: s.Model, loc: Loc, spans: dict[Loc, Span]) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    span, err = reporters(spans, out)
    if model.dim % model.heads:
        err("E401", f"dim = {model.dim} is not divisible by heads = {model.heads}", span(loc, "heads", "dim"))
    check_train(model.train, (*loc, "train"), span, err)
    return out


def reporters(spans: dict[Loc, Span], out: list[Diagnostic]):
    def span(loc: Loc, *fields) -> Span:
        for f in fields:
            if (*loc, f) in spans:
                return spans[(*loc, f)]
        while loc and loc not in spans:
            loc = loc[:-1]
        return spans.get(loc) or next(iter(spans.values()))

    def err(code: str, msg: str, where: Span, *notes: str) -> None:
        out.append(Diagnostic(code, msg, where, tuple(notes)))

    return span, err


def gates(memory: s.Memory) -> Iterator[tuple[str, tuple[str, ...], object]]:
    """(role, path of fields, gate value) for every gate of a memory."""
    if isinstance(memory.objective, s.Huber):
        yield "delta", ("objective", "delta"), memory.objective.delta
    if isinstance(memory.retention, s.Decay):
        yield "alpha", ("retention", "alpha"), memory.retention.alpha
    if isinstance(memory.retention, s.WeightDecay):
        yield "rate", ("retention", "rate"), memory.retention.rate
    yield "lr", ("update", "lr"), memory.update.lr
    if hasattr(memory.update, "beta"):
        yield "beta", ("update", "beta"), memory.update.beta


# Ranges of constant (and learned-init) gate values, by role: (low, low inclusive, high, high inclusive).
GATE_RANGES = {
    "alpha": (0.0, False, 1.0, True),
    "rate": (0.0, True, 1.0, True),
    "beta": (0.0, True, 1.0, False),
    "lr": (0.0, True, None, False),
    "delta": (0.0, False, None, False),
}


def in_range(v: float, role: str) -> bool:
    lo, lo_inc, hi, hi_inc = GATE_RANGES[role]
    ok_lo = v >= lo if lo_inc else v > lo
    ok_hi = hi is None or (v <= hi if hi_inc else v < hi)
    return ok_lo and ok_hi


def range_text(role: str) -> str:
    lo, lo_inc, hi, hi_inc = GATE_RANGES[role]
    if hi is None:
        return f"{'>=' if lo_inc else '>'} {lo:g}"
    return f"in {'[' if lo_inc else '('}{lo:g}, {hi:g}{']' if hi_inc else ')'}"


def check_memory(m: s.Memory, loc: Loc, model_dim: int | None, span, err) -> None:
    network = m.structure.kind != "matrix"
    for role, path, gate in gates(m):
        where = span((*loc, path[0]), path[1])
        value = gate.value if isinstance(gate, s.Constant) else gate.init if isinstance(gate, s.Learned) else None
        if value is not None and not in_range(value, role):
            name = {"alpha": "decay", "rate": "weight decay", "beta": "momentum beta", "lr": "learning rate", "delta": "huber delta"}[role]
            err("E205", f"{name} must be {range_text(role)} (found {value:g})", where)
        if isinstance(gate, s.DataGate) and gate.per == "channel" and network:
            err(
                "E405",
                f"a per-channel gate needs a matrix memory; '{m.name}' has a {m.structure.kind} structure",
                where,
                "use per: head, or structure = matrix",
            )
        if isinstance(gate, s.AdaptiveGate) and getattr(gate.memory.structure, "residual", False):
            err("E405", "a gate memory maps the input to one value per head, so it cannot be residual", where)
    if m.batch > 1 and m.every > 1:
        err("E405", "'batch' and 'every' cannot both exceed 1 token: 'every = C' already takes its gradients at the chunk start", span(loc, "every"))
    if m.out == "none" and model_dim is not None and m.dim != model_dim:
        err("E402", f"out = none needs the memory's width ({m.dim}) to equal the model's ({model_dim})", span(loc, "out"), "use out = linear to project back")
    for field in ("keys", "values", "queries"):
        p = getattr(m, field)
        if isinstance(p.source, s.InputSource) and model_dim is not None and m.dim != model_dim:
            err("E402", f"{field} = input needs the memory's width ({m.dim}) to equal the model's ({model_dim})", span(loc, field))
    residual = getattr(m.structure, "residual", False)
    poly_keys = any(isinstance(t, s.Poly) and t.p > 1 for t in m.keys.transforms)
    if residual and poly_keys:
        err(
            "E402",
            "a residual structure needs keys and values of equal width, but poly(p) widens the keys",
            span(loc, "structure"),
            "drop residual, or poly from the keys",
        )
    if m.targets == "self" and poly_keys:
        err("E402", "targets = self reads the memory at the values, so keys and values need equal width; poly(p) widens the keys", span(loc, "targets"))


def check_cms(c: s.Cms, loc: Loc, span, err) -> None:
    last = 0
    for i, level in enumerate(c.levels):
        update = level.update or c.update
        level_update = span((*loc, "levels", i), "update")
        where = level_update if level_update.start != span((*loc, "levels", i)).start else span(loc, "update")
        if not isinstance(update, (s.Gd, s.MomentumUpdate)):
            err("E405", f"a CMS level learns with gd or momentum, not {update.kind}", where)
        elif not all(isinstance(g, s.Constant) for g in (update.lr, getattr(update, "beta", s.Constant(value=0.0)))):
            err(
                "E405",
                "a CMS level's lr and beta are numbers: its writes happen once per chunk, with no token to gate them",
                where,
                "e.g. update = gd(lr: 1e-2)",
            )
        every = level.every if level.every > 0 else float("inf")
        if every < last:
            err(
                "E403",
                f"CMS levels go fastest first: '{level.name}' (every {level.every} tokens) comes after a slower level",
                span((*loc, "levels", i), "every"),
                "order levels by increasing 'every' (0 tokens, never, goes last)",
            )
        last = max(last, every)


def check_train(t: s.Train, loc: Loc, span, err) -> None:
    names = {}
    for i, level in enumerate(t.levels):
        for j, pattern in enumerate(level.params):
            if pattern in names:
                err("E207", f"the pattern '{pattern}' is claimed by levels '{names[pattern]}' and '{level.name}'", span((*loc, "levels", i, "params"), j))
            names[pattern] = level.name
