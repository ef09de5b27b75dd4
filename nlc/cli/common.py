"""What the verbs share: finding the spec files named on the command line, reporting diagnostics, the
generated modules that `build` writes and `diff` compares."""

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


def add_build_arguments(p, out_help: str) -> None:
    """The spec files and the output directory, as `build` and `diff` take them."""
    p.add_argument("files", nargs="*", default=["specs"], metavar="FILE", help=".nl files or directories (default: specs)")
    p.add_argument("-o", "--out", default="generated", metavar="DIR", help=f"{out_help} (default: generated)")


def generated_modules(files: list[str], out: str) -> dict[str, str] | None:
    """The generated source of every module the specs in `files` compile to, by output path; None when the
    specs have errors (reported on stderr)."""
    from nlc.cli import UsageError
    from nlc.codegen.files import build_outputs

    try:
        outputs, diagnostics, sources = build_outputs(spec_paths(files), out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if diagnostics:
        report(diagnostics, sources)
        return None
    return outputs
