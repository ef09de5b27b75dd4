"""nlc build: compile specs into Python modules (one per model or top-level layer)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nlc.cli.common import report, spec_paths
from nlc.codegen.files import build_outputs
from nlc.fsutil import write_atomic


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", default=["specs"], metavar="FILE", help=".nl files or directories (default: specs)")
    p.add_argument("-o", "--out", default="generated", metavar="DIR", help="output directory (default: generated)")


def run(args: argparse.Namespace) -> int:
    from nlc.cli import UsageError

    try:
        outputs, diagnostics, sources = build_outputs(spec_paths(args.files), args.out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if diagnostics:
        report(diagnostics, sources)
        return 1
    for path, text in outputs.items():
        target = Path(path)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            write_atomic(target, text)  # only when changed: mtimes stay put
        print(f"built {path}")
    return 0
