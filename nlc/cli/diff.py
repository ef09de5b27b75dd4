"""nlc diff: exit 1 when the generated modules are out of date with the specs (for CI)."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from nlc.cli.common import add_build_arguments, generated_modules


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_build_arguments(p, "the generated directory")


def run(args: argparse.Namespace) -> int:
    outputs = generated_modules(args.files, args.out)
    if outputs is None:
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
