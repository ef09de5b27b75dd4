"""`.nl` text -> syntax tree (with spans and comments) and back (the formatter)."""

from nlc.syntax.parser import parse

__all__ = ["parse"]
