"""nlc render: the fully resolved spec (defaults filled, use/extends applied) as .nl text."""

from __future__ import annotations

import argparse
import sys

from nlc.cli.common import report, spec_paths
from nlc.spec import load_spec
from nlc.spec.render import render


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("name", nargs="?", metavar="NAME", help="one declaration of the file (default: all)")


def run(args: argparse.Namespace) -> int:
    from nlc.cli import UsageError

    (path,) = spec_paths([args.file])
    spec, diagnostics, sources = load_spec(path)
    if diagnostics:
        report(diagnostics, sources)
        return 1
    if args.name is not None and spec.get(args.name) is None:
        names = ", ".join(d.name for d in spec.decls)
        raise UsageError(f"'{path}' declares no '{args.name}' (it declares: {names})")
    sys.stdout.write(render(spec, args.name))
    return 0
