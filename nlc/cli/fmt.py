"""nlc fmt: print specs in canonical form, or rewrite / check / diff them."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from nlc.cli.common import report, spec_paths
from nlc.diagnostics import NlcError, SourceMap
from nlc.fsutil import write_atomic
from nlc.syntax import parse
from nlc.syntax.format import format_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help=".nl files or directories of them")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-w", "--write", action="store_true", help="rewrite the files in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when a file is not in canonical form")
    mode.add_argument("-d", "--diff", action="store_true", help="show what would change as a unified diff")


def format_text(text: str | bytes, path: str) -> str:
    return format_file(parse(text, path))


def run(args: argparse.Namespace) -> int:
    status = 0
    for path in spec_paths(args.files):
        raw = Path(path).read_bytes()
        try:
            out = format_text(raw, path)
        except NlcError as e:
            report(e.diagnostics, SourceMap({path: raw.decode("utf-8", "replace")}))
            status = 1
            continue
        text = raw.decode("utf-8")
        if args.write:
            if out != text:
                write_atomic(path, out)
        elif args.check:
            if out != text:
                print(f"{path}: not in canonical form (run: nlc fmt -w {path})", file=sys.stderr)
                status = 1
        elif args.diff:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), out.splitlines(True), f"a/{path}", f"b/{path}"))
        else:
            sys.stdout.write(out)
    return status
