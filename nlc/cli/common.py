"""What the verbs share: finding the spec files named on the command line, reporting diagnostics."""

from __future__ import annotations

import sys
from pathlib import Path

from nlc.diagnostics import Diagnostic, SourceMap, render_json, render_text


def spec_paths(names: list[str]) -> list[str]:
    """Files as given; a directory stands for the `.nl` files directly in it (sorted)."""
    from nlc.cli import UsageError

    out = []
    for name in names:
        p = Path(name)
        if p.is_dir():
            found = sorted(str(f) for f in p.glob("*.nl"))
            if not found:
                raise UsageError(f"no .nl files in '{name}'")
            out += found
        elif p.is_file():
            out.append(name)
        else:
            raise UsageError(f"cannot read '{name}': no such file")
    return out


def report(diagnostics: list[Diagnostic], sources: SourceMap, fmt: str = "text") -> None:
    if not diagnostics:
        return
    if fmt == "json":
        sys.stdout.write(render_json(diagnostics))
    else:
        sys.stderr.write(render_text(diagnostics, sources))
