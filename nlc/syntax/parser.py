"""Text -> syntax tree, with every failure turned into a located diagnostic."""

from __future__ import annotations

import ast as pyast
import bisect
import re
import sys
import threading
import unicodedata
from functools import cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from nlc.diagnostics import Diagnostic, NlcError, Span, one_of, shorten, suggest
from nlc.syntax import ast

MAX_DEPTH = 64  # nesting of { ( [ beyond this is refused before parsing (keeps every later pass shallow)
MAX_LINE = 100_000  # characters; bounds every token, so no later pass meets a huge one
KINDS = ("model", "block", "memory", "attention", "mlp", "cms", "level", "train")
RESERVED = (*KINDS, "use", "extends", "true", "false", "none")

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
    **{k.upper(): f"'{k}'" for k in RESERVED},
    "DECL": "a declaration",
    "VALUE": "a value",
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
    check_line_length(text, path)
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
    to_ast = _ToAst(path)
    try:
        file = to_ast.transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, NlcError):
            raise e.orig_exc from None
        raise
    if to_ast.problems:
        raise NlcError(to_ast.problems)
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


_LONG_LINE = re.compile(f"[^\\n]{{{MAX_LINE + 1}}}")


def check_line_length(text: str, path: str) -> None:
    """A line over MAX_LINE characters is refused before lexing (a 10 MB line is reported, quickly)."""
    pos = 0
    while m := _LONG_LINE.search(text, pos):
        end = text.find("\n", m.start())
        end = len(text) if end < 0 else end
        length = len(text[m.start() : end].removesuffix("\r"))
        if length > MAX_LINE:  # not just the '\r' of a CRLF line ending
            line = text.count("\n", 0, m.start()) + 1
            col = MAX_LINE + 1
            raise NlcError([Diagnostic("E008", f"line too long ({length} characters; at most {MAX_LINE})", Span(path, line, col, line, col + 1))])
        pos = end


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
            code_point = f"U+{ord(ch):04X}"
            span = Span(path, lineno, col, lineno, col + 1)
            if unicodedata.category(ch).startswith("C"):
                # Control and format characters are invisible: name the code point, suggest nothing.
                name = unicodedata.name(ch, "")
                raise NlcError([Diagnostic("E002", f"unexpected character {code_point}" + (f" ({name})" if name else ""), span)])
            hint = ""
            ascii_like = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or _CONFUSABLE.get(ch, "")
            if ascii_like:
                hint = f"; did you mean '{ascii_like}'?"
            name = unicodedata.name(ch, code_point)
            raise NlcError([Diagnostic("E002", f"unexpected character '{ch}' ({name}){hint}", span)])


# Letters that look like ASCII but do not decompose to it.
_CONFUSABLE = dict(zip("аеорсухіјѕԁԛмтвнкАЕОРСУХІЈЅМТВНК", "aeopcyxijsdqmtbhkAEOPCYXIJSMTBHK", strict=True)) | {
    "‐": "-",
    "−": "-",
    "–": "-",
    "＝": "=",
    "“": '"',
    "”": '"',
}


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
_STRING_REST = re.compile(r'[^"\\\n]*(?:\\.[^"\\\n]*)*"')  # after the opening quote; unrolled, as in the grammar
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
            end = _STRING_REST.match(text, pos)
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
    shown = shorten(str(tok))
    if tok.type == "EQUALS":
        before = re.search(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*$", text[max(0, tok.start_pos - 80) : tok.start_pos])
        if before and before.group(1) in RESERVED:
            word = before.group(1)
            col = tok.column - (len(before.group(0)))
            return Diagnostic("E003", f"'{word}' is a reserved word and cannot be a field name", Span(path, tok.line, col, tok.line, col + len(word)))
    after = text[tok.end_pos : tok.end_pos + 80].lstrip(" \t")
    if tok.type in KINDS_UPPER and after.startswith("=") and not after.startswith("=="):
        return Diagnostic("E003", f"'{tok}' is a reserved word and cannot be a field name", span)
    if tok.type == "NAME" and {"MODEL", "MEMORY"} <= set(expected):
        return unknown_kind(tok, path)
    previous = _last_token(e)
    declaration_like = tok.type in ("LBRACE", "EXTENDS") or (tok.type == "NAME" and re.match(r"(\{|extends(?![A-Za-z0-9_]))", after))
    if "EQUALS" in expected and declaration_like and previous is not None and previous.type == "NAME":
        return unknown_kind(previous, path)  # `memroy mix {` read as a field named 'memroy'
    if tok.type == "NAME" and "EQUALS" in expected:
        return Diagnostic("E003", f"expected '=' after the field name, found '{shown}'", span)
    what = {"NAME": "name ", "NUMBER": "number ", "QUANTITY": "quantity ", "STRING": "string "}.get(tok.type, "")
    msg = f"unexpected {what}'{shown}'; expected {describe(expected)}"
    if tok.type in KINDS_UPPER and "NAME" in expected:
        msg += f" ('{tok}' is a reserved word)"
    return Diagnostic("E003", msg, span)


def unknown_kind(word: Token, path: str) -> Diagnostic:
    message = f"unknown declaration kind '{shorten(str(word))}'{suggest(str(word), KINDS)}"
    return Diagnostic("E003", message, token_span(word, path), notes=(f"declarations are {one_of(KINDS)}",))


def _last_token(e: UnexpectedToken) -> Token | None:
    """The token just before the unexpected one, when the parser still holds it as a token."""
    stack = e.interactive_parser.parser_state.value_stack if e.interactive_parser else []
    return stack[-1] if stack and isinstance(stack[-1], Token) else None


KINDS_UPPER = {k.upper() for k in RESERVED}
VALUE_STARTS = {"NAME", "NUMBER", "STRING", "QUANTITY", "TRUE", "FALSE", "NONE", "LSQB", "MEMORY", "MLP"}


def describe(expected) -> str:
    """The terminals a parser state accepts, in words, grouped (every kind -> 'a declaration',
    everything that starts a value -> 'a value') so that the list is short without being cut."""
    expected = {t for t in expected if not t.startswith("__")}
    kinds = {k.upper() for k in KINDS}
    if kinds <= expected:
        expected = (expected - kinds) | {"DECL"}
        if "$END" in expected:
            expected -= {"USE"}  # the top level, where files put their uses first
    if {"NAME", "NUMBER", "STRING"} <= expected:
        expected = (expected - VALUE_STARTS) | {"VALUE"}
    names = sorted({TERMINAL_DISPLAY.get(t, t) for t in expected}, key=lambda n: (n == "the end of the file", n.startswith("'"), n))
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


def _number(tok: Token, text: str, path: str) -> int | float:
    clean = text.replace("_", "")
    if not re.fullmatch(r"[+-]?\d+", clean):
        return float(clean)
    try:
        value = int(clean)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        value = None
    if value is None or abs(value) > sys.float_info.max:  # every later use may convert it to a float
        raise NlcError([Diagnostic("E204", f"number too large ({len(clean.lstrip('+-'))} digits)", token_span(tok, path))])
    return value


@v_args(meta=True)
class _ToAst(Transformer):
    """Lark tree -> ast dataclasses. Depth is bounded by check_depth, so recursion here is shallow."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.problems: list[Diagnostic] = []  # reserved words used as names, reported together

    def check_not_reserved(self, name: Token, what: str) -> None:
        # The contextual lexer reads a reserved word as a NAME where its keyword cannot occur.
        if str(name) in RESERVED:
            self.problems.append(Diagnostic("E003", f"'{name}' is a reserved word and cannot {what}", self.tok(name)))

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
        if name is not None:
            self.check_not_reserved(name, "name a declaration")
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
        return [i for i in items if not (isinstance(i, Token) and i.type == "SEMI")] + [("semi", i) for i in items if isinstance(i, Token) and i.type == "SEMI"]

    def field(self, meta, items):
        name, _, value = items
        self.check_not_reserved(name, "be a field name")
        return ast.Field(str(name), value, self.span(meta), self.tok(name))

    def expr(self, meta, items):
        terms = [i for i in items if not (isinstance(i, Token) and i.type == "ARROW")]
        return terms[0] if len(terms) == 1 else ast.Pipeline(terms, self.span(meta))

    def number(self, meta, items):
        t = items[0]
        return ast.Number(_number(t, str(t), self.path), str(t), self.tok(t))

    def quantity(self, meta, items):
        t = items[0]
        num, unit = str(t).split()
        return ast.Quantity(_number(t, num, self.path), num, unit, self.tok(t))

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
        semis = [(s.line, s.column) for s in _split_semis(decl)]  # in source order, so sorted
        for a, b in zip(decl.members, decl.members[1:], strict=False):
            if a.span.end_line != b.span.line:
                continue
            i = bisect.bisect_left(semis, (a.span.end_line, a.span.end_column))
            if i == len(semis) or semis[i] >= b.span.start:
                what = {(True, True): "two fields", (False, False): "two declarations"}.get(
                    (isinstance(a, ast.Field), isinstance(b, ast.Field)), "a field and a declaration"
                )
                problems.append(Diagnostic("E006", f"{what} on one line need a ';' between them", b.span if isinstance(b, ast.Field) else b.kind_span))
    if problems:
        raise NlcError(problems)


def attach_docs(file: ast.File) -> None:
    """`##` comments on the lines directly above a member become its documentation. A block of
    them documents one member only: the first starting on the line below, outermost first."""
    docs = {c.span.line: c.text for c in file.comments if c.is_doc}
    if not docs:
        return
    documented: set[int] = set()  # lines whose member already took the comments above them

    def doc_above(line: int) -> list[str]:
        if line in documented:
            return []
        documented.add(line)
        out = []
        while line - 1 in docs:
            line -= 1
            out.append(docs[line][2:].strip())
        return out[::-1]

    # Pre-order, members in source order: a declaration before its first field on the same line.
    stack = list(reversed(file.decls))
    while stack:
        m = stack.pop()
        m.doc = doc_above(m.span.line)
        if isinstance(m, ast.Decl):
            stack.extend(reversed([c for c in m.members if isinstance(c, ast.Field | ast.Decl)]))
