"""Spans, diagnostics and their rendering (LANGUAGE.md §6).

A diagnostic as text:

    specs/titans.nl:9:15: error[E201]: unknown objective 'l3'; did you mean 'l2'?
        9 |   objective = l3
          |               ^^
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Error codes: one per kind of mistake. Syntax E0xx, schema E2xx, resolution E3xx, cross-field E4xx.
CODES = {
    "E001": "the file is not valid UTF-8 text",
    "E002": "unexpected character",
    "E003": "unexpected token",
    "E004": "unexpected end of file",
    "E005": "nesting too deep",
    "E006": "two members on one line without ';'",
    "E007": "the file declares nothing",
    "E008": "line too long",
    "E201": "unknown name for this field's value",
    "E202": "unknown field",
    "E203": "unknown argument",
    "E204": "wrong type of value",
    "E205": "value out of range",
    "E206": "missing required field",
    "E207": "duplicate field, argument or declaration",
    "E208": "wrong unit",
    "E209": "declaration not allowed here",
    "E301": "cannot read a used file",
    "E302": "unknown name referenced",
    "E303": "cyclic extends or use",
    "E401": "dim not divisible by heads",
    "E402": "widths do not match",
    "E403": "CMS levels not ordered fastest first",
    "E404": "a top-level layer needs its own dim",
    "E405": "combination not allowed",
}


@dataclass(frozen=True, slots=True)
class Span:
    """A region of a source file; lines and columns are 1-based, `end_column` is exclusive."""

    path: str
    line: int
    column: int
    end_line: int
    end_column: int

    @property
    def start(self) -> tuple[int, int]:
        return (self.line, self.column)


@dataclass(frozen=True, slots=True)
class Diagnostic:
    code: str
    message: str
    span: Span
    notes: tuple[str, ...] = ()
    severity: str = "error"


@dataclass
class SourceMap:
    """The text of every file read, so diagnostics can show source lines."""

    texts: dict[str, str] = field(default_factory=dict)

    def line(self, path: str, lineno: int) -> str | None:
        text = self.texts.get(path)
        if text is None:
            return None
        lines = text.split("\n")
        return lines[lineno - 1].rstrip("\r") if 0 < lineno <= len(lines) else None


class NlcError(Exception):
    """Raised with every diagnostic of a failed check."""

    def __init__(self, diagnostics: Sequence[Diagnostic]):
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.span.path, d.span.start))
        super().__init__(self.diagnostics[0].message if self.diagnostics else "error")


MAX_SUGGESTED = 64  # longest word for which a nearest name is looked up
MAX_QUOTED = 40  # characters of a word quoted in a message


def shorten(word: str) -> str:
    """`word` as quoted in a message: at most MAX_QUOTED characters, a long one cut with '...'."""
    return word if len(word) <= MAX_QUOTED else word[: MAX_QUOTED - 3] + "..."


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `word`, if any is close. Short names get a lower bar ('l3' -> 'l2'),
    and ties go to the candidate whose differing characters are of the same class (digit, letter)."""
    if len(word) > MAX_SUGGESTED:
        return None  # no name is that long, and difflib is quadratic in it
    cutoff = 0.5 if len(word) <= 3 else 0.6
    best, best_key = None, None
    for c in sorted(set(candidates)):
        ratio = difflib.SequenceMatcher(None, word, c).ratio()
        if ratio < cutoff:
            continue
        alike = sum(a != b and a.isdigit() == b.isdigit() for a, b in zip(word, c, strict=False))
        key = (ratio, alike)
        if best_key is None or key > best_key:
            best, best_key = c, key
    return best


def suggest(word: str, candidates: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the closest candidate, or ''."""
    match = closest(word, candidates)
    return f"; did you mean '{match}'?" if match else ""


def one_of(names: Iterable[str]) -> str:
    names = [f"'{n}'" for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


MAX_SHOWN = 200  # columns of a source line shown around the caret
# An invisible control character in a shown line is drawn as its symbol: NUL as '␀', one column each.
CONTROL_PICTURES = {c: 0x2400 + c for c in range(0x20)} | {0x7F: 0x2421}


def render_text(diagnostics: Sequence[Diagnostic], sources: SourceMap) -> str:
    out = []
    for d in diagnostics:
        s = d.span
        out.append(f"{s.path}:{s.line}:{s.column}: {d.severity}[{d.code}]: {d.message}")
        src = sources.line(s.path, s.line)
        if src is not None:
            width = len(str(s.line))
            start = s.column - 1
            end = s.end_column - 1 if s.end_line == s.line else len(src)
            end = max(end, start + 1)
            # Very long lines are cut to a window around the caret.
            offset = max(0, start - MAX_SHOWN // 2) if len(src) > MAX_SHOWN else 0
            shown = src[offset : offset + MAX_SHOWN].expandtabs(1).translate(CONTROL_PICTURES)
            caret = " " * (start - offset) + "^" * max(1, min(end, offset + MAX_SHOWN) - start)
            prefix = "…" if offset else ""
            out.append(f"{' ' * 4}{s.line} | {prefix}{shown}")
            out.append(f"{' ' * 4}{' ' * width} | {' ' * len(prefix)}{caret}")
        out.extend(f"    = {note}" for note in d.notes)
    return "\n".join(out) + ("\n" if out else "")


def render_json(diagnostics: Sequence[Diagnostic]) -> str:
    rows = [
        {
            "path": d.span.path,
            "line": d.span.line,
            "column": d.span.column,
            "end_line": d.span.end_line,
            "end_column": d.span.end_column,
            "severity": d.severity,
            "code": d.code,
            "message": d.message,
            "notes": list(d.notes),
        }
        for d in diagnostics
    ]
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
