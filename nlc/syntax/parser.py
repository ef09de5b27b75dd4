"""Text -> syntax tree, with every failure turned into a located diagnostic."""

from __future__ import annotations

import ast as pyast
import re
import threading
import unicodedata
from functools import cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from nlc.diagnostics import Diagnostic, NlcError, Span, one_of, suggest
from nlc.syntax import ast

MAX_DEPTH = 64  # nesting of { ( [ beyond this is refused before parsing (keeps every later pass shallow)
KINDS = ("model", "block", "memory", "attention", "mlp", "cms", "level", "train")

# How a terminal is named in "expected ..." messages: never a raw terminal name.
TERMINAL_DISPLAY = {
    "NAME": "a name",
    "NUMBER": "a number",
    "QUANTITY": "a quantity",
    "STRING": "a string",
    "EQUALS": "'='",
    "ARROW": "'->'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "COLON": "':'",
    "SEMI": "';'",
    "$END": "the end of the file",
    **{k.upper(): f"'{k}'" for k in (*KINDS, "use", "extends", "true", "false", "none")},
}


def grammar_text() -> str:
    """The grammar, from the installed package (wheel) or the source tree (editable install)."""
    packaged = resources.files("nlc") / "grammar" / "nl.lark"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[2] / "grammar" / "nl.lark").read_text(encoding="utf-8")


_comments: list[Token] = []
_lock = threading.Lock()  # the comment callback list is shared by every parse


@cache
def _parser() -> Lark:
    return Lark(
        grammar_text(),
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
        lexer_callbacks={"COMMENT": _comments.append},
    )


def parse(text: str | bytes, path: str) -> ast.File:
    """Parse one file; raises NlcError with a located diagnostic on any malformed input."""
    if isinstance(text, bytes):
        text = decode(text, path)
    check_characters(text, path)
    check_depth(text, path)
    with _lock:
        _comments.clear()
        try:
            tree = _parser().parse(text)
        except UnexpectedInput as e:
            raise NlcError([syntax_diagnostic(e, text, path)]) from None
        finally:
            comments = list(_comments)
            _comments.clear()
    try:
        file = _ToAst(path).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, NlcError):
            raise e.orig_exc from None
        raise
    file.comments = [ast.Comment(str(c), token_span(c, path)) for c in comments]
    attach_docs(file)
    check_separators(file, text, path)
    if not file.decls and not file.uses:
        end = text.count("\n") + 1
        raise NlcError([Diagnostic("E007", "the file declares nothing; expected a declaration such as 'model NAME { ... }'", Span(path, end, 1, end, 1))])
    return file


def decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise NlcError([Diagnostic("E001", f"the file is not valid UTF-8 text (byte 0x{data[e.start]:02x})", Span(path, line, col, line, col + 1))]) from None


_BAD_CHAR = re.compile(r"[^\t\n\r\x20-\x7e]")


def check_characters(text: str, path: str) -> None:
    """Non-ASCII is allowed only inside comments and strings; everything else gets a named diagnostic."""
    for lineno, line in enumerate(text.split("\n"), 1):
        m = _BAD_CHAR.search(line)
        if not m:
            continue
        code = _strip_comment_and_strings(line)
        m = _BAD_CHAR.search(code)
        if m:
            ch = m.group()
            col = m.start() + 1
            name = unicodedata.name(ch, f"U+{ord(ch):04X}")
            hint = ""
            ascii_like = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or _CONFUSABLE.get(ch, "")
            if ascii_like:
                hint = f"; did you mean '{ascii_like}'?"
            shown = repr(ch)[1:-1] if not ch.isprintable() else ch
            raise NlcError([Diagnostic("E002", f"unexpected character '{shown}' ({name}){hint}", Span(path, lineno, col, lineno, col + 1))])


# Letters that look like ASCII but do not decompose to it.
_CONFUSABLE = dict(zip("аеорсухіјѕԁԛмтвнкАЕОРСУХІЈЅМТВНК", "aeopcyxijsdqmtbhkAEOPCYXIJSMTBHK", strict=True)) | {"‐": "-", "−": "-", "–": "-", "＝": "=", "“": '"', "”": '"'}


def _strip_comment_and_strings(line: str) -> str:
    """The line with string contents and any comment blanked out (columns preserved)."""
    out, in_str, i = [], False, 0
    while i < len(line):
        ch = line[i]
        if in_str:
            if ch == "\\" and i + 1 < len(line):
                out.append("  ")
                i += 2
                continue
            in_str = ch != '"'
            out.append(ch if not in_str else " ")
        elif ch == '"':
            in_str = True
            out.append(ch)
        elif ch == "#":
            break
        else:
            out.append(ch)
        i += 1
    return "".join(out)


_BRACKETS = re.compile(r'[{}()\[\]"#\n]')
_OPEN = {"{": "}", "(": ")", "[": "]"}


def check_depth(text: str, path: str) -> None:
    depth, line, line_start, pos = 0, 1, 0, 0
    while True:
        m = _BRACKETS.search(text, pos)
        if not m:
            return
        ch, pos = m.group(), m.end()
        if ch == "\n":
            line, line_start = line + 1, pos
        elif ch == "#":
            nl = text.find("\n", pos)
            pos = len(text) if nl < 0 else nl
        elif ch == '"':
            end = re.compile(r'(?:[^"\\\n]|\\.)*"').match(text, pos)
            pos = end.end() if end else pos
        elif ch in _OPEN:
            depth += 1
            if depth > MAX_DEPTH:
                col = m.start() - line_start + 1
                raise NlcError([Diagnostic("E005", f"nesting too deep (more than {MAX_DEPTH} levels of brackets)", Span(path, line, col, line, col + 1))])
        else:
            depth -= 1


def token_span(tok: Token, path: str) -> Span:
    return Span(path, tok.line, tok.column, tok.end_line, tok.end_column)


def syntax_diagnostic(e: UnexpectedInput, text: str, path: str) -> Diagnostic:
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        hint = ""
        if ch == '"':
            hint = "; a string must end on the line where it starts"
        return Diagnostic("E002", f"unexpected character '{ch}'{hint}", Span(path, e.line, e.column, e.line, e.column + 1))
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        expected = getattr(e, "expected", None) or getattr(e, "accepts", None) or []
        lines = text.split("\n")
        line = len(lines)
        col = len(lines[-1]) + 1
        return Diagnostic("E004", f"unexpected end of file; expected {describe(expected)}", Span(path, line, col, line, col), notes=unclosed_note(text))
    assert isinstance(e, UnexpectedToken)
    tok = e.token
    span = token_span(tok, path)
    expected = e.accepts or e.expected
    shown = str(tok) if len(str(tok)) <= 40 else str(tok)[:37] + "..."
    if tok.type == "EQUALS":
        before = re.search(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*$", text[max(0, tok.start_pos - 80) : tok.start_pos])
        if before and before.group(1).upper() in KINDS_UPPER:
            word = before.group(1)
            col = tok.column - (len(before.group(0)))
            return Diagnostic("E003", f"'{word}' is a reserved word and cannot be a field name", Span(path, tok.line, col, tok.line, col + len(word)))
    after = text[tok.end_pos : tok.end_pos + 80].lstrip(" \t")
    if tok.type in KINDS_UPPER and after.startswith("=") and not after.startswith("=="):
        return Diagnostic("E003", f"'{tok}' is a reserved word and cannot be a field name", span)
    if tok.type == "NAME" and {"MODEL", "MEMORY"} <= set(expected):
        return Diagnostic("E003", f"unknown declaration kind '{shown}'{suggest(str(tok), KINDS)}", span, notes=(f"declarations are {one_of(KINDS)}",))
    if tok.type == "NAME" and "EQUALS" in expected:
        return Diagnostic("E003", f"expected '=' after the field name, found '{shown}'", span)
    what = {"NAME": "name ", "NUMBER": "number ", "QUANTITY": "quantity ", "STRING": "string "}.get(tok.type, "")
    msg = f"unexpected {what}'{shown}'; expected {describe(expected)}"
    if tok.type in KINDS_UPPER and "NAME" in expected:
        msg += f" ('{tok}' is a reserved word)"
    return Diagnostic("E003", msg, span)


KINDS_UPPER = {k.upper() for k in (*KINDS, "use", "extends", "true", "false", "none")}


def describe(expected) -> str:
    expected = {t for t in expected if not t.startswith("__")}
    if {"NAME", "NUMBER", "STRING"} <= expected:
        expected = (expected - {"NAME", "NUMBER", "STRING", "QUANTITY", "TRUE", "FALSE", "NONE", "LSQB", "MEMORY", "MLP"}) | {"VALUE"}
    names = sorted({TERMINAL_DISPLAY.get(t, "a value" if t == "VALUE" else t) for t in expected})
    if len(names) > 6:
        names = [n for n in names if n in ("a name", "a value", "'}'", "')'", "']'", "'='", "','")] or names[:6]
    if not names:
        return "something else"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def unclosed_note(text: str) -> tuple[str, ...]:
    """Where the innermost unclosed bracket was opened, for 'unexpected end of file'."""
    stack = []
    code_lines = [_strip_comment_and_strings(line) for line in text.split("\n")]
    for lineno, line in enumerate(code_lines, 1):
        for col, ch in enumerate(line, 1):
            if ch in _OPEN:
                stack.append((ch, lineno, col))
            elif ch in _OPEN.values() and stack:
                stack.pop()
    if not stack:
        return ()
    ch, line, col = stack[-1]
    return (f"'{ch}' opened at line {line}, column {col} is never closed",)


def _number(text: str) -> int | float:
    clean = text.replace("_", "")
    if re.fullmatch(r"[+-]?\d+", clean):
        return int(clean)
    return float(clean)


@v_args(meta=True)
class _ToAst(Transformer):
    """Lark tree -> ast dataclasses. Depth is bounded by check_depth, so recursion here is shallow."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def span(self, meta) -> Span:
        return Span(self.path, meta.line, meta.column, meta.end_line, meta.end_column)

    def tok(self, t: Token) -> Span:
        return token_span(t, self.path)

    def start(self, meta, items):
        uses = [i for i in items if isinstance(i, ast.Use)]
        decls = [i for i in items if isinstance(i, ast.Decl)]
        span = self.span(meta) if not meta.empty else Span(self.path, 1, 1, 1, 1)
        return ast.File(self.path, uses, decls, [], span)

    def use(self, meta, items):
        _, s = items
        return ast.Use(pyast.literal_eval(str(s)), self.span(meta), self.tok(s))

    def decl(self, meta, items):
        kind, name, extends, _, members, _ = items
        kind_tok = kind.children[0]
        ext_name, ext_span = extends if extends else (None, None)
        return ast.Decl(
            kind=str(kind_tok),
            name=str(name) if name is not None else None,
            extends=ext_name,
            members=members,
            span=self.span(meta),
            kind_span=self.tok(kind_tok),
            name_span=self.tok(name) if name is not None else None,
            extends_span=ext_span,
        )

    def extends(self, meta, items):
        return (str(items[1]), self.tok(items[1]))

    def body(self, meta, items):
        # SEMI tokens are kept (as tokens) so the separator check can see them.
        return [i for i in items if not (isinstance(i, Token) and i.type == "SEMI")] + [
            ("semi", i) for i in items if isinstance(i, Token) and i.type == "SEMI"
        ]

    def field(self, meta, items):
        name, _, value = items
        return ast.Field(str(name), value, self.span(meta), self.tok(name))

    def expr(self, meta, items):
        terms = [i for i in items if not (isinstance(i, Token) and i.type == "ARROW")]
        return terms[0] if len(terms) == 1 else ast.Pipeline(terms, self.span(meta))

    def number(self, meta, items):
        t = items[0]
        return ast.Number(_number(str(t)), str(t), self.tok(t))

    def quantity(self, meta, items):
        t = items[0]
        num, unit = str(t).split()
        return ast.Quantity(_number(num), num, unit, self.tok(t))

    def string(self, meta, items):
        t = items[0]
        return ast.String(pyast.literal_eval(str(t)), str(t), self.tok(t))

    def true(self, meta, items):
        return ast.Literal(True, self.tok(items[0]))

    def false(self, meta, items):
        return ast.Literal(False, self.tok(items[0]))

    def none(self, meta, items):
        return ast.Literal(None, self.tok(items[0]))

    def name(self, meta, items):
        return ast.Name(str(items[0]), self.tok(items[0]))

    def call(self, meta, items):
        callee, _, *rest = items
        args = [a for a in rest if isinstance(a, ast.Arg)]
        return ast.Call(str(callee), args, self.span(meta), self.tok(callee))

    def positional(self, meta, items):
        return ast.Arg(None, items[0], self.span(meta))

    def keyword(self, meta, items):
        name, _, value = items
        return ast.Arg(str(name), value, self.span(meta), self.tok(name))

    def list(self, meta, items):
        return ast.ListExpr([i for i in items if i is not None and not isinstance(i, Token)], self.span(meta))


def _split_semis(decl: ast.Decl) -> list:
    semis = [m[1] for m in decl.members if isinstance(m, tuple)]
    decl.members = [m for m in decl.members if not isinstance(m, tuple)]
    return semis


def walk_decls(decls: list[ast.Decl]):
    """Every declaration, outermost first, without recursion."""
    stack = list(reversed(decls))
    while stack:
        d = stack.pop()
        yield d
        stack.extend(reversed(d.decls))


def check_separators(file: ast.File, text: str, path: str) -> None:
    """Two members on one line need a ';' between them (LANGUAGE.md §1)."""
    problems = []
    for decl in walk_decls(file.decls):
        semis = _split_semis(decl)
        semi_pos = {(s.line, s.column) for s in semis}
        for a, b in zip(decl.members, decl.members[1:], strict=False):
            if a.span.end_line != b.span.line:
                continue
            between = [p for p in semi_pos if p[0] == a.span.end_line and a.span.end_column <= p[1] < b.span.column]
            if not between:
                problems.append(Diagnostic("E006", "two fields on one line need a ';' between them", b.span if isinstance(b, ast.Field) else b.kind_span))
    if problems:
        raise NlcError(problems)


def attach_docs(file: ast.File) -> None:
    """`##` comments on the lines directly above a declaration or field become its documentation."""
    docs = {c.span.line: c.text for c in file.comments if c.is_doc}
    if not docs:
        return

    def doc_above(line: int) -> list[str]:
        out = []
        while line - 1 in docs:
            line -= 1
            out.append(docs[line][2:].strip())
        return out[::-1]

    for d in walk_decls(file.decls):
        d.doc = doc_above(d.span.line)
        for f in d.fields:
            f.doc = doc_above(f.span.line)
