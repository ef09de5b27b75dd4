"""Syntax tree -> IR: load `use`d files, merge `extends`, expand `layout`, fill defaults,
validate with the schema, and run the cross-field checks. Every problem becomes a diagnostic."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from nlc.diagnostics import Diagnostic, NlcError, SourceMap, Span, one_of, shorten, suggest
from nlc.spec import schema as s
from nlc.spec.checks import check_layer, check_model
from nlc.spec.convert import Converter, Invalid, Loc
from nlc.syntax import ast, parse

# Which declarations may appear where; the top level is keyed by None.
ALLOWED = {
    None: ("model", "memory", "attention", "mlp", "cms", "block"),
    "model": ("block", "train"),
    "block": ("memory", "attention", "mlp", "cms"),
    "cms": ("level",),
    "train": ("level",),
}
LAYER_MODELS: dict[str, type[BaseModel]] = {"memory": s.Memory, "attention": s.Attention, "mlp": s.FeedForward, "cms": s.Cms}
# Names of unnamed declarations: they become attribute names, so never a reserved word.
DEFAULT_NAMES = {"block": "main", "memory": "mem", "attention": "attn", "mlp": "ffn", "cms": "continuum"}
RESERVED = {"model", "block", "memory", "attention", "mlp", "cms", "level", "train", "use", "extends", "true", "false", "none"}
DECL_FIELDS = {  # fields written as nested declarations, not `name = value`
    s.Model: ("blocks", "train", "decl", "name", "doc", "field_docs"),
    s.Cms: ("levels", "decl", "name", "doc", "field_docs"),
    s.Train: ("levels", "field_docs"),
}


class Program:
    """Everything read for one check: files by path, their trees, the diagnostics so far."""

    def __init__(self) -> None:
        self.sources = SourceMap()
        self.trees: dict[str, ast.File] = {}
        self.diagnostics: list[Diagnostic] = []

    def load(self, path: str, text: str | bytes | None = None, used_from: Span | None = None, stack: tuple[str, ...] = ()) -> ast.File | None:
        key = str(Path(path))
        if key in stack:
            self.diagnostics.append(
                Diagnostic("E303", f"'{key}' uses itself (through {' -> '.join((*stack[stack.index(key) :], key))})", used_from or Span(key, 1, 1, 1, 1))
            )
            return None
        if key in self.trees:
            return self.trees[key]
        if text is None:
            try:
                text = Path(path).read_bytes()
            except OSError as e:
                reason = e.strerror or str(e)
                if used_from is None:
                    raise
                self.diagnostics.append(Diagnostic("E301", f"cannot read '{path}': {reason}", used_from))
                return None
        if isinstance(text, bytes):
            try:
                self.sources.texts[key] = text.decode("utf-8")
            except UnicodeDecodeError:
                self.sources.texts[key] = text.decode("utf-8", "replace")
        else:
            self.sources.texts[key] = text
        try:
            tree = parse(text, key)
        except NlcError as e:
            self.diagnostics.extend(e.diagnostics)
            return None
        self.trees[key] = tree
        for use in tree.uses:
            target = str(Path(key).parent / use.path)
            self.load(target, used_from=use.path_span, stack=(*stack, key))
        return tree


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def spec_sha256(sources: SourceMap, main: str) -> str:
    """The hash of a spec and every file it uses: sha256 of the text alone when it uses none, else of the
    text followed by each used file's path (relative to the spec's folder) and text, in path order."""
    if len(sources.texts) == 1:
        return sha256_of(sources.texts[main])
    folder = Path(main).parent
    parts = [sources.texts[main]]
    for path in sorted(p for p in sources.texts if p != main):
        parts += [os.path.relpath(path, folder), sources.texts[path]]
    return sha256_of("\0".join(parts))


def load_spec(path: str, text: str | bytes | None = None) -> tuple[s.SpecFile | None, list[Diagnostic], SourceMap]:
    """Check one file. Returns (IR or None, diagnostics, the sources read)."""
    program = Program()
    tree = program.load(path, text)
    if tree is None or program.diagnostics:
        return None, sorted_diags(program.diagnostics), program.sources
    lowering = Lowering(program)
    spec = lowering.file(tree)
    diags = program.diagnostics + lowering.conv.diagnostics
    return (spec if not diags else None), sorted_diags(diags), program.sources


def sorted_diags(diags: list[Diagnostic]) -> list[Diagnostic]:
    unique = {(d.span, d.code, d.message): d for d in diags}
    return sorted(unique.values(), key=lambda d: (d.span.path, d.span.start, d.code))


def doc_text(lines: list[str]) -> str:
    return "\n".join(lines)


class Lowering:
    def __init__(self, program: Program):
        self.program = program
        self.conv = Converter()
        self.scope: dict[str, ast.Decl] = {}
        self.bad: set[Loc] = set()  # fields already reported: validation must not call them missing
        self.cycles: set[frozenset[str]] = set()

    def error(self, code: str, message: str, span: Span, notes: tuple[str, ...] = ()) -> None:
        self.conv.diagnostics.append(Diagnostic(code, message, span, notes))

    # -- scope and extends

    def build_scope(self, tree: ast.File) -> None:
        """Top-level declarations of this file and every file it uses, by name."""
        seen: set[str] = set()
        order = []

        def visit(path: str) -> None:
            if path in seen or path not in self.program.trees:
                return
            seen.add(path)
            t = self.program.trees[path]
            for use in t.uses:
                visit(str(Path(path).parent / use.path))
            order.append(t)

        visit(tree.path)
        for t in order:
            for d in t.decls:
                if d.name is None:
                    continue
                prev = self.scope.get(d.name)
                if prev is not None and prev is not d:
                    self.error("E207", f"'{d.name}' is declared twice", d.name_span or d.kind_span, (f"first declared at {prev.span.path}:{prev.span.line}",))
                    continue
                self.scope[d.name] = d

    def merged(self, decl: ast.Decl, stack: tuple[str, ...] = ()) -> ast.Decl:
        """decl with its `extends` base merged in: restated fields and declarations replace the base's."""
        if decl.extends is None:
            return decl
        base = self.scope.get(decl.extends)
        if base is None:
            self.error("E302", f"unknown declaration '{decl.extends}' in extends{suggest(decl.extends, self.scope)}", decl.extends_span)
            raise Invalid
        if base.kind != decl.kind:
            self.error("E302", f"{article(decl.kind)} {decl.kind} cannot extend the {base.kind} '{base.name}'", decl.extends_span)
            raise Invalid
        if base.name in stack or base is decl:
            members = (*stack, decl.name or "?")
            cycle = members[members.index(base.name) :] if base.name in members else members
            if frozenset(cycle) not in self.cycles:  # one cycle, one diagnostic, whichever member meets it first
                self.cycles.add(frozenset(cycle))
                self.error("E303", f"cyclic extends: {' -> '.join((*cycle, base.name))}", decl.extends_span)
            raise Invalid
        base = self.merged(base, (*stack, decl.name or "?"))

        def key(m):
            return ("field", m.name) if isinstance(m, ast.Field) else ("decl", m.kind, m.name)

        own = {key(m): m for m in decl.members}
        members = [own.pop(key(m), m) for m in base.members] + [m for m in decl.members if key(m) in own]
        return ast.Decl(decl.kind, decl.name, None, members, decl.span, decl.kind_span, decl.name_span, None, decl.doc or base.doc)

    # -- declarations

    def file(self, tree: ast.File) -> s.SpecFile | None:
        self.build_scope(tree)
        decls = []
        for d in tree.decls:
            if d.kind not in ALLOWED[None]:
                self.error(
                    "E209",
                    f"a '{d.kind}' declaration cannot stand at the top level",
                    d.kind_span,
                    (f"it belongs inside {'a model' if d.kind == 'train' else 'a cms or train declaration'}",),
                )
                continue
            if d.kind == "block":
                continue  # top-level blocks are building material for layouts
            try:
                decl = self.merged(d)
                decls.append(self.top_level(decl, (len(decls),)))
            except Invalid:
                continue
        if self.conv.diagnostics:
            return None
        try:
            return s.SpecFile(path=tree.path, sha256=spec_sha256(self.program.sources, tree.path), decls=decls)
        except ValidationError as e:
            self.validation_errors(e, ())
            return None

    def top_level(self, d: ast.Decl, loc: Loc) -> BaseModel:
        if d.kind == "model":
            return self.model(d, loc)
        data = self.fields(d, LAYER_MODELS[d.kind], loc)
        if "dim" not in data:
            self.error("E404", f"a top-level {d.kind} needs its own 'dim' (it is not inside a model)", d.name_span or d.kind_span, ("add e.g. 'dim = 256'",))
            raise Invalid
        return self.layer(d, data, loc, model_dim=None, model_heads=None)

    def fields(self, d: ast.Decl, model: type[BaseModel], loc: Loc, custom: tuple[str, ...] = ()) -> dict[str, Any]:
        """`name = value` members of d converted against model's fields; nested declarations are left to
        the caller, and so are the `custom` fields. A bad field is reported and left out; its location is
        remembered so that validation does not report it again as missing."""
        skip = DECL_FIELDS.get(model, ("decl", "name", "doc", "field_docs"))
        allowed = [n for n in model.model_fields if n not in skip]
        data: dict[str, Any] = {}
        seen: dict[str, ast.Field] = {}
        docs = {}
        for f in d.fields:
            if model is s.Block:
                self.error(
                    "E202",
                    f"a block holds memory, attention, mlp and cms declarations, not fields: '{shorten(f.name)}' has no meaning here",
                    f.name_span,
                    ("widths and heads come from the model, or go inside a declaration",),
                )
                continue
            if f.name not in allowed:
                where = f"{d.kind} '{d.name}'" if d.name else d.kind
                hint = suggest(f.name, allowed)
                notes = () if hint else (f"fields of {d.kind}: {one_of(allowed)}",)
                self.error("E202", f"unknown field '{shorten(f.name)}' in {where}{hint}", f.name_span, notes)
                continue
            if f.name in seen:
                self.error("E207", f"field '{f.name}' is set twice", f.name_span, (f"first set at line {seen[f.name].span.line}",))
                continue
            seen[f.name] = f
            if f.doc:
                docs[f.name] = doc_text(f.doc)
            self.conv.record((*loc, f.name), f.span)
            if f.name in custom:
                continue
            info = model.model_fields[f.name]
            try:
                data[f.name] = self.conv.value(f.value, info.annotation, (*loc, f.name), info, f.name)
            except Invalid:
                self.bad.add((*loc, f.name))
        for sub in d.decls:
            if sub.kind not in ALLOWED.get(d.kind, ()):
                inside = ALLOWED.get(d.kind, ())
                note = f"a {d.kind} holds {one_of(inside)} declarations" if inside else f"a {d.kind} holds no declarations"
                self.error("E209", f"a '{sub.kind}' declaration cannot stand inside a {d.kind}", sub.kind_span, (note,))
        self.conv.record(loc, d.name_span or d.kind_span)
        if "field_docs" in model.model_fields:
            data["field_docs"] = docs
        if "doc" in model.model_fields:
            data["doc"] = doc_text(d.doc)
        return data

    def layer(self, d: ast.Decl, data: dict[str, Any], loc: Loc, model_dim: int | None, model_heads: int | None) -> BaseModel:
        data["decl"] = d.kind
        data["name"] = d.name or DEFAULT_NAMES[d.kind]
        data.setdefault("dim", model_dim)
        if data.get("dim") is None:  # the model's dim is missing or wrong, and reported there
            self.bad.update({(*loc, "dim"), (*loc, "heads")})
        if d.kind in ("memory", "attention"):
            dim = data.get("dim")
            data.setdefault("heads", model_heads if model_heads is not None and dim == model_dim else default_heads(dim))
        if data.get("dim") is None:
            data.pop("dim", None)
        if d.kind == "memory":
            structure = data.get("structure", {"kind": "matrix"})
            data.setdefault("init", "zeros" if structure.get("kind") == "matrix" else "learned")
        if d.kind == "cms":
            data["levels"] = self.levels(d, loc, s.CmsLevel)
            if not data["levels"] and not any(sub.kind == "level" for sub in d.decls):
                self.error(
                    "E206",
                    f"cms '{d.name or 'cms'}' needs at least one level",
                    d.name_span or d.kind_span,
                    ("add e.g. level fast { every = 16 tokens }: level NAME { ... }, fastest first",),
                )
                raise Invalid
            for level in data["levels"]:
                level.setdefault("update", data.get("update", s.Cms.model_fields["update"].default.model_dump()))
        model = LAYER_MODELS[d.kind]
        try:
            obj = model.model_validate(data)
        except ValidationError as e:
            self.validation_errors(e, loc)
            raise Invalid from None
        obj = resolve_adaptive(obj) if isinstance(obj, s.Memory) else obj
        self.conv.diagnostics.extend(check_layer(obj, loc, model_dim, self.conv.spans, model_heads))
        return obj

    def levels(self, d: ast.Decl, loc: Loc, model: type[BaseModel]) -> list[dict[str, Any]]:
        out, failed, names = [], False, {}
        for sub in d.decls:
            if sub.kind != "level":
                continue
            i = len(out)
            if sub.name is None:
                self.error("E206", "a level needs a name: 'level NAME { ... }'", sub.kind_span)
                failed = True
                continue
            if sub.name in names:
                self.error("E207", f"level '{sub.name}' is declared twice", sub.name_span)
                failed = True
                continue
            names[sub.name] = sub
            data = self.fields(sub, model, (*loc, "levels", i))
            data["name"] = sub.name
            out.append(data)
        if failed:
            raise Invalid
        return out

    def model(self, d: ast.Decl, loc: Loc) -> s.Model:
        data = self.fields(d, s.Model, loc, custom=("layout",))
        failed = False
        data["decl"] = "model"
        stem = Path(d.span.path).stem
        data["name"] = d.name or (f"{stem}_model" if stem in RESERVED or not stem.isidentifier() else stem)
        dim = data.get("dim")
        if "dim" not in data and (*loc, "dim") not in self.bad:
            self.error("E206", f"model '{data['name']}' needs 'dim', the width of the residual stream", d.name_span or d.kind_span, ("add e.g. 'dim = 256'",))
            failed = True
        elif isinstance(dim, int) and dim <= 0:
            self.error("E205", f"'dim' must be > 0 (found {dim})", self.conv.spans[(*loc, "dim")])
            failed = True
        if not isinstance(dim, int) or dim <= 0:
            dim = None
        data.setdefault("heads", default_heads(dim))
        heads = data["heads"] if isinstance(data["heads"], int) and data["heads"] > 0 else None
        blocks, block_decls = [], {}
        trains = [sub for sub in d.decls if sub.kind == "train"]
        for extra in trains[1:]:
            self.error("E207", "a model holds at most one train declaration", extra.kind_span, (f"the first is at line {trains[0].span.line}",))
            failed = True
        if trains:
            train = self.fields(trains[0], s.Train, (*loc, "train"))
            try:
                train["levels"] = self.levels(trains[0], (*loc, "train"), s.TrainLevel)
                data["train"] = train
            except Invalid:
                failed = True
        for sub in d.decls:
            if sub.kind != "block":
                continue
            name = sub.name or DEFAULT_NAMES["block"]
            if name in block_decls:
                self.error("E207", f"block '{name}' is declared twice", sub.name_span or sub.kind_span, ("give each block its own name",))
                failed = True
                continue
            block_decls[name] = sub
        layout_field = next((f for f in d.fields if f.name == "layout"), None)
        if layout_field is not None:
            try:
                layout = self.layout(layout_field.value, block_decls)
            except Invalid:
                failed = True
                layout = []
            if not layout and not failed:
                self.error("E206", "the layout names no block", layout_field.value.span, (f"e.g. layout = [{', '.join(block_decls) or 'main'}]",))
                raise Invalid
        elif len(block_decls) > 1:
            self.error(
                "E206",
                f"model '{data['name']}' has {len(block_decls)} blocks but no 'layout' to order them",
                d.name_span or d.kind_span,
                (f"add e.g. layout = [{', '.join(block_decls)}]",),
            )
            raise Invalid
        elif not block_decls:
            self.error("E206", f"model '{data['name']}' has no block", d.name_span or d.kind_span, ("add e.g. block { memory mix {} ; mlp ffn {} }",))
            raise Invalid
        else:
            depth = data.get("depth")
            if depth is None:
                if (*loc, "depth") not in self.bad:  # a bad depth is reported where it is written
                    self.error("E206", f"model '{data['name']}' needs 'depth' (or a 'layout')", d.name_span or d.kind_span)
                raise Invalid
            layout = [next(iter(block_decls))] * depth if isinstance(depth, int) and depth > 0 else []
        if layout_field is not None and layout:
            if "depth" in data and data["depth"] != len(layout):
                depth_field = next(f for f in d.fields if f.name == "depth")
                self.error(
                    "E402",
                    f"depth = {data['depth']} but the layout has {len(layout)} blocks",
                    depth_field.value.span,
                    ("leave out 'depth': the layout decides it",),
                )
                failed = True
            data["depth"] = len(layout)
        data["layout"] = layout
        used = [n for n in block_decls if n in layout] if layout else list(block_decls)
        for name in used:
            sub = block_decls[name]
            try:
                blocks.append(self.block(sub, name, (*loc, "blocks", len(blocks)), dim, heads))
            except Invalid:
                failed = True
        if failed:
            raise Invalid
        data["blocks"] = blocks
        try:
            model = s.Model.model_validate(data)
        except ValidationError as e:
            self.validation_errors(e, loc)
            raise Invalid from None
        self.conv.diagnostics.extend(check_model(model, loc, self.conv.spans))
        return model

    def layout(self, e: ast.Expr, blocks: dict[str, ast.Decl]) -> list[str]:
        """A list of block names, `repeat(list, n)`, or lists of those, flattened; names from the model or the top level."""
        out: list[str] = []
        stack: list[tuple[ast.Expr, int]] = [(e, 1)]
        while stack:
            node, _ = stack.pop()
            match node:
                case ast.ListExpr():
                    stack.extend((x, 1) for x in reversed(node.items))
                case ast.Name():
                    if node.name not in blocks:
                        top = self.scope.get(node.name)
                        if top is not None and top.kind == "block":
                            blocks[node.name] = self.merged(top)
                        else:
                            self.error(
                                "E302",
                                f"unknown block '{node.name}' in layout{suggest(node.name, blocks)}",
                                node.span,
                                (f"blocks: {one_of(blocks)}",) if blocks else (),
                            )
                            raise Invalid
                    out.append(node.name)
                case ast.Call(name="repeat"):
                    args = {a.name or ("blocks", "n")[i]: a.value for i, a in enumerate(node.args) if i < 2 or a.name}
                    if len(node.args) != 2 or set(args) != {"blocks", "n"}:
                        self.error("E203", "repeat takes a list of blocks and a count: repeat([a, b], 2) or repeat(blocks: [a, b], n: 2)", node.span)
                        raise Invalid
                    body, count = args["blocks"], args["n"]
                    if not isinstance(count, ast.Number) or not isinstance(count.value, int) or count.value < 1:
                        self.error("E205", "the count of repeat must be a whole number >= 1", count.span)
                        raise Invalid
                    sub = self.layout(body, blocks)
                    out.extend(sub * count.value)
                case _:
                    self.error("E204", "layout takes a list of block names or repeat([...], n)", node.span)
                    raise Invalid
        return out

    def block(self, d: ast.Decl, name: str, loc: Loc, dim: int | None, heads: int | None) -> s.Block:
        d = self.merged(d)
        self.fields(d, s.Block, loc)  # a block has no fields of its own: reports any as unknown
        layers, failed, names = [], False, {}
        for sub in d.decls:
            if sub.kind not in LAYER_MODELS:
                continue
            lname = sub.name or DEFAULT_NAMES[sub.kind]
            if lname in names:
                self.error(
                    "E207",
                    f"two sub-layers named '{lname}' in block '{name}'",
                    sub.name_span or sub.kind_span,
                    ("sub-layer names become attribute names: give each its own",),
                )
                failed = True
                continue
            names[lname] = sub
            i = len(layers)
            try:
                sub = self.merged(sub)
                data = self.fields(sub, LAYER_MODELS[sub.kind], (*loc, "layers", i))
                layers.append(self.layer(sub, data, (*loc, "layers", i), dim, heads))
            except Invalid:
                failed = True
        if failed:
            raise Invalid
        if not layers:
            if not any(sub.kind not in LAYER_MODELS for sub in d.decls):  # a misplaced one is reported already
                self.error("E206", f"block '{name}' has no sub-layer", d.name_span or d.kind_span, ("add e.g. 'memory mix {}'",))
            raise Invalid
        return s.Block(name=name, doc=doc_text(d.doc), layers=layers)

    def validation_errors(self, e: ValidationError, base: Loc) -> None:
        known = {k[:i] for k in self.conv.spans for i in range(len(k) + 1)}
        for err in e.errors():
            loc = (*base, *err["loc"])
            if any(loc[: len(b)] == b or b[: len(loc)] == loc for b in self.bad):
                continue
            cur: tuple = ()
            for part in loc:
                if (*cur, part) in known:
                    cur = (*cur, part)
            span = self.conv.spans.get(cur) or self.conv.spans.get(base)
            if span is None:
                span = next(iter(self.conv.spans.values()))
            field = next((str(p) for p in reversed(err["loc"]) if isinstance(p, str)), "value")
            kind = err["type"]
            ctx = err.get("ctx", {})
            if kind == "missing":
                self.error("E206", f"missing required field '{field}'", span)
            elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
                op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
                bound = next(iter(ctx.values()), "")
                self.error("E205", f"'{field}' must be {op} {bound} (found {err.get('input')})", span)
            elif kind == "too_short":
                self.error("E206", f"'{field}' needs at least {ctx.get('min_length', 1)} item", span)
            else:
                self.error("E204", f"'{field}': {err['msg']}", span)


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def default_heads(dim: int | None) -> int | None:
    return max(1, dim // 64) if isinstance(dim, int) and dim > 0 else None


INHERITED = ("objective", "window", "targets", "retention", "update", "batch", "every", "grad")


def resolve_adaptive(memory: s.Memory) -> s.Memory:
    """Fill every `memory(...)` source and gate with the enclosing memory's fields it leaves out.
    An inherited gate that is itself `memory(...)` becomes a data-dependent `gate` (no recursion);
    `init` is not inherited: inner memories start from a learned state."""

    def plain(value):
        if isinstance(value, s.AdaptiveGate):
            return s.DataGate()
        if isinstance(value, BaseModel):
            return value.model_copy(update={k: plain(v) for k, v in value if isinstance(v, BaseModel)})
        return value

    def fill(inner: s.AdaptiveMemory) -> s.AdaptiveMemory:
        update = {}
        for k in INHERITED:
            if getattr(inner, k) is None:
                update[k] = plain(getattr(memory, k))
        if inner.init is None:
            update["init"] = "learned"  # a projection that starts at zero would output nothing
        return inner.model_copy(update=update)

    def walk(value):
        if isinstance(value, (s.AdaptiveGate, s.AdaptiveSource)):
            return value.model_copy(update={"memory": fill(value.memory)})
        if isinstance(value, BaseModel):
            changes = {k: walk(v) for k, v in value if isinstance(v, BaseModel)}
            return value.model_copy(update=changes) if changes else value
        return value

    changes = {k: walk(getattr(memory, k)) for k in ("keys", "values", "queries", "objective", "retention", "update")}
    return memory.model_copy(update=changes)
