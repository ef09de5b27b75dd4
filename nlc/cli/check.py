"""nlc check: parse and validate specs; never imports torch, never writes a file."""

from __future__ import annotations

import argparse

from nlc.cli.common import report, spec_paths
from nlc.spec import load_spec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help=".nl files or directories of them")
    p.add_argument("--format", choices=("text", "json"), default="text", help="diagnostics as text (stderr) or JSON (stdout)")


def run(args: argparse.Namespace) -> int:
    failed = False
    everything = []
    for path in spec_paths(args.files):
        _, diagnostics, sources = load_spec(path)
        if args.format == "json":
            everything += diagnostics
        else:
            report(diagnostics, sources)
        failed |= bool(diagnostics)
    if args.format == "json":
        report(everything, None, "json") if everything else print("[]")
    return 1 if failed else 0
