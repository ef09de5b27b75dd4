"""Find where something is written in a spec, for diagnostics raised after checking (at train time)."""

from __future__ import annotations

from nlc.diagnostics import NlcError, Span
from nlc.syntax import ast, parse
from nlc.syntax.parser import walk_decls


def train_level_pattern(path: str, level: str, pattern: str | None = None) -> tuple[Span, str] | None:
    """The span of `pattern` in the `params` of the train level named `level` (or of the level's
    name), and the file's text; None when it cannot be found (e.g. the level is inherited)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        tree = parse(text, path)
    except (OSError, UnicodeDecodeError, NlcError):
        return None
    for decl in walk_decls(tree.decls):
        if decl.kind != "train":
            continue
        for sub in decl.decls:
            if sub.kind != "level" or sub.name != level:
                continue
            params = next((f for f in sub.fields if f.name == "params"), None)
            if params is not None and isinstance(params.value, ast.ListExpr):
                for item in params.value.items:
                    if isinstance(item, ast.String) and item.value == pattern:
                        return item.span, text
            return (params.value.span if params else sub.name_span or sub.kind_span), text
    return None
