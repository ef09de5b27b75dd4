"""The `nlc` command. One module per verb (`nlc/cli/<verb>.py`: `add_arguments`, `run`); each verb is a
thin shell over library functions, and only the verb that runs is imported.

Exit codes: 0 success, 1 diagnostics (or a failed --check), 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from nlc import __version__

VERBS = {
    "check": "check .nl specs and report every error",
    "fmt": "format .nl specs canonically",
    "render": "print the fully resolved spec, every default written out",
    "build": "compile specs into PyTorch modules in generated/",
    "diff": "show how generated/ differs from what the specs compile to; exit 1 if it does",
    "info": "show parameters, state size, update frequencies, FLOPs and fast paths of a spec",
    "train": "train a model (outputs metrics.jsonl, loss.png and a checkpoint in --out)",
    "eval": "evaluate a checkpoint: task accuracy, validation bits per byte, or the loss along a stream",
    "generate": "sample text from a checkpoint (temperature, top-k), carrying the in-context state",
}


class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


def build_parser(verbs: Sequence[str] = tuple(VERBS)) -> argparse.ArgumentParser:
    """The parser; only the named verbs get their arguments (and their module imported)."""
    parser = argparse.ArgumentParser(prog="nlc", description="A compiler for Nested Learning architectures.")
    parser.add_argument("--version", action="version", version=f"nlc {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for name, help_text in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in verbs:
            module = importlib.import_module(f"nlc.cli.{name}")
            module.add_arguments(p)
            p.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([verb] if verb in VERBS else VERBS)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help, --version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
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
