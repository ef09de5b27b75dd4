"""The canonical form of a `.nl` file: the syntax tree printed under fixed rules.

Two-space indentation, one field per line, ` = ` and `: ` spacing, `a -> b` pipelines,
at most one blank line where the source had any, every comment kept where it was (own-line
comments before the next member, trailing comments after their line's member).
"""

from __future__ import annotations

from nlc.syntax import ast

INDENT = "  "


def expr(e: ast.Expr) -> str:
    match e:
        case ast.Number():
            return e.text
        case ast.Quantity():
            return f"{e.text} {e.unit}"
        case ast.String():
            return e.text
        case ast.Literal():
            return "none" if e.value is None else ("true" if e.value else "false")
        case ast.Name():
            return e.name
        case ast.Call():
            return f"{e.name}({', '.join(arg(a) for a in e.args)})"
        case ast.ListExpr():
            return f"[{', '.join(expr(x) for x in e.items)}]"
        case ast.Pipeline():
            return " -> ".join(expr(t) for t in e.terms)
    raise TypeError(type(e))


def arg(a: ast.Arg) -> str:
    return expr(a.value) if a.name is None else f"{a.name}: {expr(a.value)}"


class _Printer:
    def __init__(self, comments: list[ast.Comment]):
        self.comments = sorted(comments, key=lambda c: c.span.start)
        self.next = 0
        self.lines: list[str] = []
        self.last_line = 0  # last source line printed so far

    def pending(self, before: tuple[int, int]) -> list[ast.Comment]:
        out = []
        while self.next < len(self.comments) and self.comments[self.next].span.start < before:
            out.append(self.comments[self.next])
            self.next += 1
        return out

    def gap(self, line: int) -> None:
        if self.lines and line > self.last_line + 1 and self.lines[-1].strip() not in ("", "{") and not self.lines[-1].endswith("{"):
            self.lines.append("")

    def own_line_comments(self, before: tuple[int, int], depth: int) -> None:
        for c in self.pending(before):
            self.gap(c.span.line)
            self.lines.append(INDENT * depth + c.text.rstrip())
            self.last_line = c.span.line

    def trailing(self, line: int, next_start: tuple[int, int] | None = None) -> None:
        """Attach a comment that sits on `line` after the code to the last printed line (unless
        another member follows on that line: the comment is then that member's)."""
        if next_start is not None and next_start[0] == line:
            return
        if self.next < len(self.comments) and self.comments[self.next].span.line == line:
            self.lines[-1] += "  " + self.comments[self.next].text.rstrip()
            self.next += 1

    def member(self, m: ast.Field | ast.Decl | ast.Use, depth: int, next_start: tuple[int, int] | None = None) -> None:
        self.own_line_comments(m.span.start, depth)
        self.gap(m.span.line)
        pad = INDENT * depth
        if isinstance(m, ast.Use):
            self.lines.append(f"{pad}use {_use_text(m)}")
            self.last_line = m.span.end_line
            self.trailing(m.span.end_line, next_start)
        elif isinstance(m, ast.Field):
            self.lines.append(f"{pad}{m.name} = {expr(m.value)}")
            self.last_line = m.span.end_line
            self.trailing(m.span.end_line, next_start)
        else:
            self.decl(m, depth, next_start)

    def decl(self, d: ast.Decl, depth: int, next_start: tuple[int, int] | None = None) -> None:
        pad = INDENT * depth
        head = d.kind + (f" {d.name}" if d.name else "") + (f" extends {d.extends}" if d.extends else "")
        inner = [c for c in self.comments[self.next :] if c.span.start < (d.span.end_line, d.span.end_column)]
        if not d.members and not inner:
            self.lines.append(f"{pad}{head} {{}}")
            self.last_line = d.span.end_line
            self.trailing(d.span.end_line, next_start)
            return
        self.lines.append(f"{pad}{head} {{")
        self.last_line = d.span.line
        first = d.members[0].span.start if d.members else (d.span.end_line, d.span.end_column)
        if self.next < len(self.comments) and self.comments[self.next].span.line == d.span.line and self.comments[self.next].span.start < first:
            self.trailing(d.span.line)
        for m, member_next_start in with_next_start(d.members):
            self.member(m, depth + 1, member_next_start)
        self.own_line_comments((d.span.end_line, d.span.end_column - 1), depth + 1)
        self.lines.append(f"{pad}}}")
        self.last_line = d.span.end_line
        self.trailing(d.span.end_line, next_start)


def with_next_start(members: list) -> list[tuple]:
    """Each member with where the one after it starts (None for the last)."""
    return list(zip(members, [m.span.start for m in members[1:]] + [None], strict=True)) if members else []


def _use_text(u: ast.Use) -> str:
    return '"' + u.path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_file(file: ast.File) -> str:
    p = _Printer(file.comments)
    items = sorted([*file.uses, *file.decls], key=lambda n: n.span.start)
    for item, next_start in with_next_start(items):
        p.member(item, 0, next_start)
    p.own_line_comments((10**12, 0), 0)
    return "\n".join(p.lines).rstrip("\n") + "\n"
