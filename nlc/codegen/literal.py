"""IR nodes -> Python expressions that build the runtime's configuration objects, pretty-printed."""

from __future__ import annotations

from dataclasses import dataclass

from nlc.spec import schema as s

WIDTH = 100  # break a call over lines when it would be longer than this


@dataclass(frozen=True)
class Code:
    """A Python expression, printed as is."""

    text: str


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple = ()  # positional values
    kwargs: tuple[tuple[str, object], ...] = ()


def py(v) -> str:
    """One-line Python for a value."""
    match v:
        case Code():
            return v.text
        case Call():
            parts = [py(a) for a in v.args] + [f"{k}={py(x)}" for k, x in v.kwargs]
            return f"{v.name}({', '.join(parts)})"
        case bool() | None:
            return repr(v)
        case int():
            return str(v)
        case float():
            return repr(v)
        case str():
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        case tuple():
            inner = ", ".join(py(x) for x in v)
            return f"({inner},)" if len(v) == 1 else f"({inner})"
    raise TypeError(type(v))


def pretty(v, indent: int = 0) -> str:
    """Python for a value, calls and tuples broken over lines (one argument each) when too long."""
    flat = py(v)
    if indent + len(flat) <= WIDTH or not isinstance(v, (Call, tuple)) or (isinstance(v, tuple) and not v):
        return flat
    pad = " " * (indent + 4)
    if isinstance(v, Call):
        parts = [pretty(a, indent + 4) for a in v.args] + [f"{k}={pretty(x, indent + 4)}" for k, x in v.kwargs]
        open_, close = f"{v.name}(", ")"
    else:
        parts = [pretty(x, indent + 4) for x in v]
        open_, close = "(", ")"
    return open_ + "\n" + "".join(f"{pad}{p},\n" for p in parts) + " " * indent + close


def structure(st) -> Call:
    if isinstance(st, s.Matrix):
        return Call("Structure", ("matrix",))
    defaults = s.Mlp()  # the runtime's Structure has the language's defaults: write only what differs
    fields = ("residual", "norm") if isinstance(st, s.Linear) else ("depth", "expand", "act", "residual", "norm")
    kw = tuple((f, float(getattr(st, f)) if f == "expand" else getattr(st, f)) for f in fields if getattr(st, f) != getattr(defaults, f))
    return Call("Structure", (st.kind,), kw)


def gate(g) -> Call:
    match g:
        case s.Constant():
            return Call("GateSpec", ("constant",), (("value", float(g.value)),))
        case s.Learned():
            return Call("GateSpec", ("learned",), (("value", None if g.init is None else float(g.init)),))
        case s.DataGate():
            return Call("GateSpec", ("gate",), (("squash", g.squash),) + ((("per", g.per),) if g.per != "head" else ()))
        case s.AdaptiveGate():
            return Call("GateSpec", ("memory",), (("adaptive", adaptive(g.memory)),))
    raise TypeError(type(g))


def objective_fields(obj) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [("objective", obj.kind)]
    if isinstance(obj, s.Lp):
        out.append(("p", float(obj.p)))
    if isinstance(obj, s.Huber):
        out.append(("huber_delta", gate(obj.delta)))
    return out


def retention_fields(ret) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [("retention", ret.kind)]
    if isinstance(ret, s.Decay):
        out.append(("retention_gate", gate(ret.alpha)))
    if isinstance(ret, s.WeightDecay):
        out.append(("retention_gate", gate(ret.rate)))
    return out


def update_fields(up) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [("update", up.kind), ("lr", gate(up.lr))]
    if isinstance(up, (s.MomentumUpdate, s.MuonUpdate)):
        out.append(("beta", gate(up.beta)))
    if isinstance(up, s.MuonUpdate):
        out.append(("ns_steps", up.steps))
    return out


def adaptive(m: s.AdaptiveMemory) -> Call:
    kw = [("structure", structure(m.structure))]
    kw += [*objective_fields(m.objective), ("window", m.window), ("targets", m.targets)]
    kw += retention_fields(m.retention) + update_fields(m.update)
    kw += [("batch", m.batch), ("every", m.every), ("init", m.init), ("grad", m.grad)]
    return Call("Adaptive", (), tuple(kw))


def source(src) -> Call:
    if isinstance(src, s.LowRank):
        return Call("Source", ("lowrank",), (("rank", src.r),))
    if isinstance(src, s.AdaptiveSource):
        return Call("Source", ("memory",), (("adaptive", adaptive(src.memory)),))
    return Call("Source", (src.kind,))


TRANSFORM_ARG = {"conv": "width", "poly": "p", "scale": "c"}


def pipeline(p: s.Pipeline) -> Call:
    steps = []
    for t in p.transforms:
        arg = TRANSFORM_ARG.get(t.kind)
        steps.append(Call("Transform", (t.kind, float(getattr(t, arg)) if t.kind == "scale" else getattr(t, arg))) if arg else Call("Transform", (t.kind,)))
    return Call("Pipeline", (source(p.source), tuple(steps)))


def memory_config(m: s.Memory, dim: Code | int, heads: Code | int) -> Call:
    kw = [("dim", dim), ("heads", heads), ("structure", structure(m.structure))]
    kw += [("keys", pipeline(m.keys)), ("values", pipeline(m.values)), ("queries", pipeline(m.queries))]
    kw += [*objective_fields(m.objective), ("window", m.window)]
    kw += retention_fields(m.retention) + update_fields(m.update)
    kw += [("targets", m.targets), ("batch", m.batch), ("every", m.every), ("init", m.init)]
    kw += [("output", tuple(m.output)), ("out", m.out), ("grad", m.grad)]
    return Call("MemoryConfig", (), tuple(kw))


def attention_config(a: s.Attention, dim, heads) -> Call:
    return Call("AttentionConfig", (), (("dim", dim), ("heads", heads), ("window", a.window), ("rope", a.rope)))


def mlp_config(m: s.FeedForward, dim) -> Call:
    return Call("MlpConfig", (), (("dim", dim), ("act", m.act), ("expand", float(m.expand))))


def cms_config(c: s.Cms, dim) -> Call:
    levels = []
    for level in c.levels:
        up = level.update or c.update
        kw = [("name", level.name), ("structure", structure(level.structure)), ("every", level.every), ("update", up.kind)]
        kw.append(("lr", float(up.lr.value)))
        if isinstance(up, s.MomentumUpdate):
            kw.append(("beta", float(up.beta.value)))
        levels.append(Call("CmsLevelConfig", (), tuple(kw)))
    return Call("CmsConfig", (), (("dim", dim), ("levels", tuple(levels)), ("variant", c.variant), ("objective", c.objective)))


LAYER_CLASS = {
    "memory": ("MemoryLayer", "MemoryConfig"),
    "attention": ("AttentionLayer", "AttentionConfig"),
    "mlp": ("MlpLayer", "MlpConfig"),
    "cms": ("CmsLayer", "CmsConfig"),
}


def layer_config(layer, model: s.Model | None) -> Call:
    """The config of a sub-layer; widths that are the model's are written as `config.dim`/`config.heads`."""
    dim = Code("config.dim") if model is not None and layer.dim == model.dim else layer.dim
    heads = None
    if hasattr(layer, "heads"):
        heads = Code("config.heads") if model is not None and layer.dim == model.dim and layer.heads == model.heads else layer.heads
    match layer:
        case s.Memory():
            return memory_config(layer, dim, heads)
        case s.Attention():
            return attention_config(layer, dim, heads)
        case s.FeedForward():
            return mlp_config(layer, dim)
        case s.Cms():
            return cms_config(layer, dim)
    raise TypeError(type(layer))


def names_used(v, out: set[str] | None = None) -> set[str]:
    """Every class name a literal calls, for the import line."""
    out = set() if out is None else out
    if isinstance(v, Call):
        out.add(v.name)
        for a in (*v.args, *(x for _, x in v.kwargs)):
            names_used(a, out)
    elif isinstance(v, tuple):
        for a in v:
            names_used(a, out)
    return out
