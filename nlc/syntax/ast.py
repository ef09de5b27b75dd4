"""The syntax tree of a `.nl` file: plain dataclasses, each carrying its span."""

from __future__ import annotations

from dataclasses import dataclass, field

from nlc.diagnostics import Span


@dataclass(slots=True)
class Comment:
    text: str  # including the leading '#'
    span: Span

    @property
    def is_doc(self) -> bool:
        return self.text.startswith("##")


@dataclass(slots=True)
class Number:
    value: int | float
    text: str
    span: Span


@dataclass(slots=True)
class Quantity:
    value: int | float
    text: str  # the number as written
    unit: str  # as written: token, tokens, step, steps
    span: Span


@dataclass(slots=True)
class String:
    value: str
    text: str  # as written, with quotes
    span: Span


@dataclass(slots=True)
class Literal:
    value: bool | None  # true, false, none
    span: Span


@dataclass(slots=True)
class Name:
    name: str
    span: Span


@dataclass(slots=True)
class Arg:
    name: str | None  # None for a positional argument
    value: Expr
    span: Span
    name_span: Span | None = None


@dataclass(slots=True)
class Call:
    name: str
    args: list[Arg]
    span: Span
    name_span: Span


@dataclass(slots=True)
class ListExpr:
    items: list[Expr]
    span: Span


@dataclass(slots=True)
class Pipeline:
    """`a -> b -> c`: two or more terms applied left to right."""

    terms: list[Expr]
    span: Span


Expr = Number | Quantity | String | Literal | Name | Call | ListExpr | Pipeline


@dataclass(slots=True)
class Field:
    name: str
    value: Expr
    span: Span
    name_span: Span
    doc: list[str] = field(default_factory=list)  # text of the `##` comments directly above


@dataclass(slots=True)
class Decl:
    kind: str  # model, block, memory, attention, mlp, cms, level, train
    name: str | None
    extends: str | None
    members: list[Field | Decl]
    span: Span
    kind_span: Span
    name_span: Span | None = None
    extends_span: Span | None = None
    doc: list[str] = field(default_factory=list)

    @property
    def fields(self) -> list[Field]:
        return [m for m in self.members if isinstance(m, Field)]

    @property
    def decls(self) -> list[Decl]:
        return [m for m in self.members if isinstance(m, Decl)]


@dataclass(slots=True)
class Use:
    path: str
    span: Span
    path_span: Span


@dataclass(slots=True)
class File:
    path: str
    uses: list[Use]
    decls: list[Decl]
    comments: list[Comment]
    span: Span
