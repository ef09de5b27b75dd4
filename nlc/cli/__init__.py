"""The `nlc` command. One module per verb; each verb is a thin shell over library functions.

Exit codes: 0 success, 1 diagnostics (or a failed --check), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nlc import __version__
from nlc.cli import build, check, diff, eval, fmt, generate, info, render, train

VERBS = {"check": check, "fmt": fmt, "render": render, "build": build, "diff": diff, "info": info, "eval": eval, "generate": generate, "train": train}


class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlc", description="A compiler for Nested Learning architectures.")
    parser.add_argument("--version", action="version", version=f"nlc {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for name, module in VERBS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except UsageError as e:
        print(f"nlc {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def app() -> None:
    sys.exit(main())
