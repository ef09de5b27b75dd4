"""Schema-directed conversion of expressions: an AST value and the pydantic type it should have ->
plain data ready for `model_validate`, with a span recorded for every path so that validation
errors can be mapped back to the source."""

from __future__ import annotations

import math
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from nlc.diagnostics import Diagnostic, Span, one_of, shorten, suggest
from nlc.syntax import ast
from nlc.syntax.format import expr as format_expr

Loc = tuple[str | int, ...]


class Invalid(Exception):
    """A value could not be converted; the diagnostic is already recorded."""


UNITS = {"tokens": ("token", "tokens"), "steps": ("step", "steps")}


def describe_expr(e: ast.Expr) -> str:
    match e:
        case ast.Number():
            return f"the number {e.text}"
        case ast.Quantity():
            return f"the quantity '{e.text} {e.unit}'"
        case ast.String():
            return "a string"
        case ast.Literal(value=None):
            return "'none'"
        case ast.Literal():
            return "'true'" if e.value else "'false'"
        case ast.Name():
            return f"'{e.name}'"
        case ast.Call():
            return f"'{e.name}(...)'"
        case ast.ListExpr():
            return "a list"
        case ast.Pipeline():
            return "a pipeline"
    return "this value"


def unwrap(ann) -> tuple[Any, Any]:
    """(origin type without Annotated, discriminator or None)."""
    disc = None
    if typing.get_origin(ann) is Annotated:
        args = typing.get_args(ann)
        ann = args[0]
        for meta in args[1:]:
            if isinstance(meta, FieldInfo) and meta.discriminator:
                disc = meta.discriminator
    return ann, disc


def union_members(ann) -> list:
    origin = typing.get_origin(ann)
    if origin is Union or origin is types.UnionType:
        return list(typing.get_args(ann))
    return [ann]


def variants(ann) -> dict[str, type[BaseModel]]:
    """The variants of a discriminated union (or a single model) by their `kind` tag."""
    out = {}
    for m in union_members(ann):
        m, _ = unwrap(m)
        if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields:
            out[m.model_fields["kind"].default] = m
    return out


def arg_fields(model: type[BaseModel]) -> list[str]:
    return [n for n in model.model_fields if n not in ("kind", "decl", "doc", "field_docs", "name")]


class Converter:
    def __init__(self) -> None:
        self.diagnostics: list[Diagnostic] = []
        self.spans: dict[Loc, Span] = {}

    def error(self, code: str, message: str, span: Span, notes: tuple[str, ...] = ()) -> typing.NoReturn:
        self.diagnostics.append(Diagnostic(code, message, span, notes))
        raise Invalid

    def record(self, loc: Loc, span: Span) -> None:
        self.spans[loc] = span

    def value(self, e: ast.Expr, ann, loc: Loc, info: FieldInfo | None = None, what: str = "") -> Any:
        """Convert e to data for the type ann. `what` names the field for messages."""
        self.record(loc, e.span)
        ann, _ = unwrap(ann)
        members = union_members(ann)
        optional = type(None) in members
        if optional:
            if isinstance(e, ast.Literal) and e.value is None:
                return None
            rest = [m for m in members if m is not type(None)]
            ann = rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007
            ann, _ = unwrap(ann)
        unit = (info.json_schema_extra or {}).get("unit") if info is not None and isinstance(info.json_schema_extra, dict) else None
        if unit:
            return self.quantity(e, unit, what)
        if isinstance(e, ast.Quantity):
            self.error("E208", f"{what or 'this value'} takes a plain number, not a quantity in {e.unit}", e.span)
        origin = typing.get_origin(ann)
        if origin is Literal:
            return self.literal(e, typing.get_args(ann), what)
        if origin is list:
            (item,) = typing.get_args(ann)
            item_ann, _ = unwrap(item)
            if typing.get_origin(item_ann) is Literal:
                return self.steps(e, typing.get_args(item_ann), loc, what)
            if not isinstance(e, ast.ListExpr):
                self.error("E204", f"{what or 'this field'} takes a list, found {describe_expr(e)}", e.span, (f"write it as [{format_expr(e)}]",))
            return [self.value(x, item, (*loc, i), what=what) for i, x in enumerate(e.items)]
        if origin is tuple:
            items = typing.get_args(ann)
            if not isinstance(e, ast.ListExpr):
                self.error("E204", f"{what or 'this field'} takes a list of {len(items)}, found {describe_expr(e)}", e.span)
            if len(e.items) != len(items):
                self.error("E204", f"{what or 'this field'} takes exactly {len(items)} values, found {len(e.items)}", e.span)
            return [self.value(x, t, (*loc, i), what=what) for i, (x, t) in enumerate(zip(e.items, items, strict=True))]
        if ann in (int, float):
            return self.number(e, ann, what)
        if ann is bool:
            if isinstance(e, ast.Literal) and isinstance(e.value, bool):
                return e.value
            self.error("E204", f"{what or 'this field'} takes true or false, found {describe_expr(e)}", e.span)
        if ann is str:
            if isinstance(e, ast.String):
                return e.value
            self.error("E204", f"{what or 'this field'} takes a string in double quotes, found {describe_expr(e)}", e.span)
        if isinstance(ann, type) and issubclass(ann, BaseModel) and "source" in ann.model_fields:
            return self.pipeline(e, ann, loc, what)
        vs = variants(ann)
        if vs:
            return self.variant(e, vs, loc, what)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return self.call_args(e, ann, loc, what)
        raise TypeError(f"no conversion for {ann!r}")

    def quantity(self, e: ast.Expr, unit: str, what: str) -> int:
        if isinstance(e, ast.Quantity):
            if e.unit not in UNITS[unit]:
                self.error("E208", f"{what} is counted in {unit}, not {e.unit}", e.span, (f"write it as '{e.text} {unit}'",))
            if not isinstance(e.value, int):
                self.error("E204", f"{what} takes a whole number of {unit}, found {e.text}", e.span)
            return e.value
        if isinstance(e, ast.Number):
            self.error("E208", f"{what} needs a unit: write '{e.text} {unit}'", e.span)
        self.error("E204", f"{what} takes a quantity such as '16 {unit}', found {describe_expr(e)}", e.span)

    def number(self, e: ast.Expr, ann, what: str) -> int | float:
        if not isinstance(e, ast.Number):
            self.error("E204", f"{what or 'this field'} takes a number, found {describe_expr(e)}", e.span)
        if not math.isfinite(e.value):
            self.error("E205", f"{what or 'this value'} must be finite (found {e.text})", e.span)
        if ann is int and not isinstance(e.value, int):
            if float(e.value).is_integer():
                return int(e.value)
            self.error("E204", f"{what or 'this field'} takes a whole number, found {e.text}", e.span)
        return e.value

    def literal(self, e: ast.Expr, allowed: tuple[str, ...], what: str) -> str:
        if isinstance(e, ast.Name):
            name = e.name
        elif isinstance(e, ast.Literal) and e.value is None and "none" in allowed:
            return "none"
        elif isinstance(e, ast.Literal) and isinstance(e.value, bool) and str(e.value).lower() in allowed:
            return str(e.value).lower()
        else:
            self.error("E204", f"{what or 'this field'} takes one of {one_of(allowed)}, found {describe_expr(e)}", e.span)
        if name not in allowed:
            self.error("E201", f"unknown {what or 'value'} '{shorten(name)}'{suggest(name, allowed)}", e.span, (f"expected {one_of(allowed)}",))
        return name

    def steps(self, e: ast.Expr, allowed: tuple[str, ...], loc: Loc, what: str) -> list[str]:
        """A pipeline of names, or `none` for the empty list (the `output` field)."""
        if isinstance(e, ast.Literal) and e.value is None:
            return []
        terms = e.terms if isinstance(e, ast.Pipeline) else [e]
        out = []
        for i, t in enumerate(terms):
            self.record((*loc, i), t.span)
            out.append(self.literal(t, allowed, what))
        return out

    def pipeline(self, e: ast.Expr, model: type[BaseModel], loc: Loc, what: str) -> dict:
        terms = e.terms if isinstance(e, ast.Pipeline) else [e]
        src_ann = model.model_fields["source"].annotation
        tr_ann = typing.get_args(model.model_fields["transforms"].annotation)[0]
        sources, transforms = variants(unwrap(src_ann)[0]), variants(unwrap(tr_ann)[0])
        head, *rest = terms
        if isinstance(head, (ast.Name, ast.Call)) and head.name in transforms and head.name not in sources:
            self.error(
                "E201",
                f"{what} must start with a source ({one_of(sources)}), not the transform '{head.name}'",
                head.span,
                (f"for example: {what} = linear -> {head.name}",),
            )
        self.record((*loc, "source"), head.span)
        out = {"source": self.variant(head, sources, (*loc, "source"), f"{what} source")}
        items = []
        for i, t in enumerate(rest):
            self.record((*loc, "transforms", i), t.span)
            items.append(self.variant(t, transforms, (*loc, "transforms", i), f"{what} transform"))
        out["transforms"] = items
        return out

    def variant(self, e: ast.Expr, vs: dict[str, type[BaseModel]], loc: Loc, what: str) -> dict:
        # A variant whose only argument is `value` is written as a bare number (a constant gate).
        numeric = next((k for k, m in vs.items() if arg_fields(m) == ["value"]), None)
        names = [k for k in vs if k != numeric]
        if isinstance(e, ast.Number) and numeric:
            return {"kind": numeric, "value": self.number(e, float, what)}
        if isinstance(e, ast.Literal) and e.value is None and "none" in vs:
            return {"kind": "none"}
        if not isinstance(e, (ast.Name, ast.Call)):
            extra = " or a number" if numeric else ""
            self.error("E204", f"{what or 'this field'} takes {one_of(names)}{extra}, found {describe_expr(e)}", e.span)
        name = e.name
        if name not in names:
            expected = f"expected {one_of(names)}" + (" or a number" if numeric else "")
            self.error(
                "E201", f"unknown {what or 'value'} '{shorten(name)}'{suggest(name, names)}", e.name_span if isinstance(e, ast.Call) else e.span, (expected,)
            )
        model = vs[name]
        fields = arg_fields(model)
        # `memory(structure, ...)`: the call's arguments are those of the inner memory.
        if fields == ["memory"] and isinstance(model.model_fields["memory"].annotation, type):
            inner = model.model_fields["memory"].annotation
            self.record((*loc, "memory"), e.span)
            return {"kind": name, "memory": self.call_args(e, inner, (*loc, "memory"), name)}
        data = self.call_args(e, model, loc, name)
        data["kind"] = name
        return data

    def call_args(self, e: ast.Expr, model: type[BaseModel], loc: Loc, what: str) -> dict:
        fields = arg_fields(model)
        if isinstance(e, ast.Name):  # a call without arguments: every field at its default
            return {}
        if not isinstance(e, ast.Call):
            self.error("E204", f"{what} takes arguments in parentheses, found {describe_expr(e)}", e.span)
        data: dict[str, Any] = {}
        seen_keyword = False
        failed = False
        for i, arg in enumerate(e.args):
            if arg.name is None:
                if seen_keyword:
                    self.diagnostics.append(Diagnostic("E204", "a positional argument cannot follow a keyword argument", arg.span))
                    failed = True
                    continue
                if i >= len(fields):
                    n = len(fields)
                    self.diagnostics.append(
                        Diagnostic(
                            "E203",
                            f"{e.name}() takes {n} argument{'s' if n != 1 else ''}, found more",
                            arg.span,
                            (f"arguments: {one_of(fields)}",) if fields else (),
                        )
                    )
                    failed = True
                    continue
                key = fields[i]
            else:
                seen_keyword = True
                key = arg.name
                if key not in fields:
                    self.diagnostics.append(
                        Diagnostic(
                            "E203",
                            f"unknown argument '{shorten(key)}' of {e.name}(){suggest(key, fields)}",
                            arg.name_span or arg.span,
                            (f"arguments: {one_of(fields)}",) if fields else (f"{e.name}() takes no arguments",),
                        )
                    )
                    failed = True
                    continue
            if key in data:
                self.diagnostics.append(Diagnostic("E207", f"argument '{key}' of {e.name}() given twice", arg.span))
                failed = True
                continue
            info = model.model_fields[key]
            self.record((*loc, key), arg.span)
            try:
                data[key] = self.value(arg.value, info.annotation, (*loc, key), info, key)
            except Invalid:
                failed = True
        if failed:
            raise Invalid
        return data
