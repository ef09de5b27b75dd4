"""nlc diff: exit 1 when the generated modules are out of date with the specs (for CI)."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from nlc.cli.common import report, spec_paths
from nlc.codegen.files import build_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", default=["specs"], metavar="FILE", help=".nl files or directories (default: specs)")
    p.add_argument("-o", "--out", default="generated", metavar="DIR", help="the generated directory (default: generated)")


def run(args: argparse.Namespace) -> int:
    from nlc.cli import UsageError

    try:
        outputs, diagnostics, sources = build_outputs(spec_paths(args.files), args.out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if diagnostics:
        report(diagnostics, sources)
        return 1
    stale = False
    for path, text in outputs.items():
        target = Path(path)
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current != text:
            stale = True
            sys.stderr.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True), f"a/{path}", f"b/{path}"))
    out_dir = Path(args.out)
    if out_dir.is_dir():
        for extra in sorted(out_dir.glob("*.py")):
            if str(extra) not in outputs and extra.name != "__init__.py":
                stale = True
                print(f"{extra}: not built from any spec (remove it)", file=sys.stderr)
    if stale:
        print("generated code is out of date: run nlc build", file=sys.stderr)
    return 1 if stale else 0
