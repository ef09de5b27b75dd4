"""IR -> `.nl` text: the fully resolved spec, every default written out, so a user sees exactly
what will be built. Rendering is a function of the IR alone, so a file and its formatted
version render identically, and the rendered text checks back to the same IR."""

from __future__ import annotations

from pydantic import BaseModel

from nlc.spec import schema as s

INDENT = "  "
META = ("kind", "decl", "name", "doc", "field_docs")


def number(v: int | float) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))


def unit_of(model: type[BaseModel], field: str) -> str | None:
    extra = model.model_fields[field].json_schema_extra
    return extra.get("unit") if isinstance(extra, dict) else None


def value(v, model: type[BaseModel] | None = None, field: str | None = None) -> str:
    unit = unit_of(model, field) if model is not None and field is not None else None
    if unit is not None and v is not None:
        return f"{v} {unit[:-1] if v == 1 else unit}"
    match v:
        case None:
            return "none"
        case bool():
            return "true" if v else "false"
        case int() | float():
            return number(v)
        case str() if field == "path" or (model is s.TrainLevel and field == "params"):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        case str():
            return v
        case list() | tuple() if field == "output":
            return " -> ".join(v) if v else "none"
        case list() | tuple():
            return "[" + ", ".join(value(x, model, field) for x in v) + "]"
        case s.Constant():
            return number(v.value)
        case s.Pipeline():
            return " -> ".join([value(v.source), *(value(t) for t in v.transforms)])
        case s.AdaptiveGate() | s.AdaptiveSource():
            return "memory(" + args(v.memory) + ")"
        case BaseModel():
            inner = args(v)
            return f"{v.kind}({inner})" if inner else v.kind
    raise TypeError(type(v))


def args(node: BaseModel) -> str:
    cls = type(node)
    return ", ".join(f"{k}: {value(getattr(node, k), cls, k)}" for k in cls.model_fields if k not in META)


def doc_lines(doc: str, pad: str) -> list[str]:
    return [f"{pad}## {line}".rstrip() for line in doc.split("\n")] if doc else []


def fields(node: BaseModel, depth: int, skip: tuple[str, ...] = ()) -> list[str]:
    pad = INDENT * depth
    cls = type(node)
    docs = getattr(node, "field_docs", {})
    out = []
    for k in cls.model_fields:
        if k in META or k in skip:
            continue
        out += doc_lines(docs.get(k, ""), pad)
        out.append(f"{pad}{k} = {value(getattr(node, k), cls, k)}")
    return out


def decl(kind: str, name: str | None, body: list[str], doc: str, depth: int) -> list[str]:
    pad = INDENT * depth
    head = f"{pad}{kind}" + (f" {name}" if name else "")
    return [*doc_lines(doc, pad), head + " {", *body, pad + "}"]


def layer(node: BaseModel, depth: int) -> list[str]:
    if isinstance(node, s.Cms):
        body = fields(node, depth + 1, skip=("levels",))
        for level in node.levels:
            body += decl("level", level.name, fields(level, depth + 2), level.doc, depth + 1)
        return decl("cms", node.name, body, node.doc, depth)
    return decl(node.decl, node.name, fields(node, depth + 1), node.doc, depth)


def model(m: s.Model) -> list[str]:
    body = fields(m, 1, skip=("blocks", "train"))
    for block in m.blocks:
        inner = []
        for sub in block.layers:
            inner += layer(sub, 2)
        body += decl("block", block.name, inner, block.doc, 1)
    train = fields(m.train, 2, skip=("levels",))
    for level in m.train.levels:
        train += decl("level", level.name, fields(level, 3), level.doc, 2)
    body += decl("train", None, train, "", 1)
    return decl("model", m.name, body, m.doc, 0)


def render(spec: s.SpecFile, name: str | None = None) -> str:
    chunks = []
    for d in spec.decls:
        if name is not None and d.name != name:
            continue
        chunks.append("\n".join(model(d) if isinstance(d, s.Model) else layer(d, 0)))
    return "\n\n".join(chunks) + "\n"
